"""The pages that set the fleet up: servers (and their tokens) and command templates."""

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.db.models import Prefetch
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils.cache import add_never_cache_headers
from django.views.decorators.http import require_http_methods, require_POST
from rest_framework import exceptions

from tether.commands.selectors import templates_visible_to
from tether.commands.services import delete_template, save_template
from tether.deploy import lifecycle
from tether.deploy.models import Deployment
from tether.fleet import services as fleet_services
from tether.fleet.models import Agent, Server
from tether.fleet.selectors import servers_visible_to

from .forms import ServerForm, TemplateForm

SERVERS_PAGE = 50  # servers per page of the servers page
# A server's agents as its row shows them: names and statuses, by hostname.
AGENTS = Prefetch(
    "agents", queryset=Agent.objects.only("id", "server", "hostname", "status").order_by("hostname")
)


def _agent_command_line(token: str) -> str:
    return (
        f"python3 main.py --server {settings.PUBLIC_URL} --server-token {token} "
        "--state-dir /var/lib/tether-agent"
    )


def _token_page(request: HttpRequest, server: Server, token: str) -> HttpResponse:
    """The one time a server token is shown: with the agent command line to paste."""
    context = {
        "server": server,
        "token": token,
        "command_line": _agent_command_line(token),
    }
    response = render(request, "web/server_token.html", context)
    add_never_cache_headers(response)  # shown once: not from the back button's cache either
    return response


@login_required
@require_http_methods(["GET", "POST"])
def servers(request: HttpRequest) -> HttpResponse:
    form = ServerForm(request.POST or None, owner=request.user)
    if request.method == "POST" and form.is_valid():
        server, token = fleet_services.create_server(owner=request.user, **form.cleaned_data)
        return _token_page(request, server, token)
    listing = servers_visible_to(request.user).order_by("name", "id")
    # A page of servers, and the agents of those only (one query for all of them).
    page = Paginator(listing.prefetch_related(AGENTS), SERVERS_PAGE).get_page(
        request.GET.get("page")
    )
    return render(request, "web/servers.html", {"servers": page, "page": page, "form": form})


@login_required
@require_POST
def server_rotate(request: HttpRequest, server_id: int) -> HttpResponse:
    server = get_object_or_404(servers_visible_to(request.user), pk=server_id)
    token = fleet_services.rotate_server_token(server=server, user=request.user)
    return _token_page(request, server, token)


@login_required
@require_POST
def server_install(request: HttpRequest, server_id: int) -> HttpResponse:
    """Install the agent over SSH; the deployment page follows its log."""
    server = get_object_or_404(servers_visible_to(request.user), pk=server_id)
    try:
        deployment = lifecycle.request_deployment(
            kind=Deployment.Kind.INSTALL,
            server=server,
            agent=None,
            user=request.user,
            server_url=settings.PUBLIC_URL,
        )
    except exceptions.APIException as exc:
        messages.error(request, f"{server.name}: {exc.detail}")
        return redirect("web:servers")
    return redirect("web:deployment", deployment_id=deployment.pk)


@login_required
@require_POST
def server_delete(request: HttpRequest, server_id: int) -> HttpResponse:
    server = get_object_or_404(servers_visible_to(request.user), pk=server_id)
    fleet_services.delete_server(server=server, user=request.user)
    messages.success(request, f"Server {server.name} was deleted.")
    return redirect("web:servers")


@login_required
@require_http_methods(["GET", "POST"])
def templates(request: HttpRequest) -> HttpResponse:
    form = TemplateForm(request.POST or None, owner=request.user)
    if request.method == "POST" and form.is_valid():
        template = save_template(template=form.save(commit=False), user=request.user)
        messages.success(request, f"Template {template.name} was created.")
        return redirect("web:templates")
    listing = templates_visible_to(request.user).order_by("name")
    return render(request, "web/templates.html", {"templates": listing, "form": form})


@login_required
@require_http_methods(["GET", "POST"])
def template_edit(request: HttpRequest, template_id: int) -> HttpResponse:
    template = get_object_or_404(templates_visible_to(request.user), pk=template_id)
    form = TemplateForm(request.POST or None, instance=template, owner=request.user)
    if request.method == "POST" and form.is_valid():
        save_template(template=form.save(commit=False), user=request.user)
        messages.success(request, f"Template {template.name} was saved.")
        return redirect("web:templates")
    return render(request, "web/template_edit.html", {"template": template, "form": form})


@login_required
@require_POST
def template_delete(request: HttpRequest, template_id: int) -> HttpResponse:
    template = get_object_or_404(templates_visible_to(request.user), pk=template_id)
    delete_template(template=template, user=request.user)
    messages.success(request, f"Template {template.name} was deleted.")
    return redirect("web:templates")
