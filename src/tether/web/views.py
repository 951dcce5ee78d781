"""The operators' pages: agent console, commands and deployments (the fleet page is
fleet_views.py).

Each view reads through the ownership selectors (another user's object is a 404) and changes
state only through the services, which audit every human action. The live output is not
rendered here: the page's script follows the API's SSE streams with the session cookie.
"""

from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import SuspiciousFileOperation
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_GET, require_POST
from django.views.static import serve
from rest_framework import exceptions

from tether.commands import output
from tether.commands import services as command_services
from tether.commands.models import Command
from tether.commands.selectors import command_history, commands_visible_to
from tether.commands.states import is_final
from tether.deploy import lifecycle
from tether.deploy.models import Deployment
from tether.deploy.selectors import deployment_history, deployments_visible_to
from tether.fleet.selectors import agents_visible_to
from tether.pki import services as pki_services

from .forms import RunCommandForm, chosen_template, template_values

K = Deployment.Kind
LIFECYCLE_ACTIONS = (K.UPGRADE, K.STOP, K.START)
STATIC_DIR = Path(__file__).resolve().parent / "static" / "web"


@require_GET
def static_file(request: HttpRequest, path: str) -> HttpResponse:
    """This app's own CSS and scripts (uvicorn serves no static files); a path that would
    leave the directory is simply not found."""
    try:
        return serve(request, path, document_root=STATIC_DIR)
    except SuspiciousFileOperation as exc:
        raise Http404 from exc


@login_required
@require_GET
def agent_detail(request: HttpRequest, agent_id: int) -> HttpResponse:
    agent = get_object_or_404(agents_visible_to(request.user), pk=agent_id)
    context = {
        "agent": agent,
        "form": RunCommandForm(user=request.user),
        "deployments": deployment_history(agent, length=5),
        "certificate": pki_services.current_certificate(agent),
        "lifecycle_actions": LIFECYCLE_ACTIONS,
        "commands": command_history(agent),
    }
    return render(request, "web/agent.html", context)


@login_required
@require_GET
def agent_status(request: HttpRequest, agent_id: int) -> HttpResponse:
    """The agent page's status badge, polled like the fleet's rows."""
    agent = get_object_or_404(agents_visible_to(request.user), pk=agent_id)
    return render(request, "web/_agent_status.html", {"agent": agent})


@login_required
@require_GET
def agent_history(request: HttpRequest, agent_id: int) -> HttpResponse:
    agent = get_object_or_404(agents_visible_to(request.user), pk=agent_id)
    return render(request, "web/_history.html", {"commands": command_history(agent)})


@login_required
@require_GET
def template_params(request: HttpRequest, agent_id: int) -> HttpResponse:
    """The parameter inputs of the chosen template, swapped into the command form."""
    get_object_or_404(agents_visible_to(request.user), pk=agent_id)
    template = chosen_template(request.user, request.GET.get("template", ""))
    return render(request, "web/_template_params.html", {"template": template})


@login_required
@require_POST
def run_command(request: HttpRequest, agent_id: int) -> HttpResponse:
    """Queue a command line, or a template with its values (each value is shell-quoted by
    the template renderer), and answer with the console that follows its output."""
    agent = get_object_or_404(agents_visible_to(request.user), pk=agent_id)
    form = RunCommandForm(request.POST, user=request.user)
    if not form.is_valid():
        return render(request, "web/_console_error.html", {"form": form}, status=400)
    template = form.cleaned_data["template"]
    try:
        command = command_services.send_command(
            agent=agent,
            user=request.user,
            command=form.cleaned_data["command"] if template is None else None,
            template=template,
            params=template_values(template, request.POST) if template is not None else None,
            timeout=form.cleaned_data["timeout"],
        )
    except exceptions.ValidationError as exc:
        form.add_error(None, _message(exc))
        return render(request, "web/_console_error.html", {"form": form}, status=400)
    return render(request, "web/_console.html", {"command": command})


@login_required
@require_POST
def agent_action(request: HttpRequest, agent_id: int, action: str) -> HttpResponse:
    """Upgrade, stop or start (a deployment with a live log), or a new certificate."""
    agent = get_object_or_404(agents_visible_to(request.user), pk=agent_id)
    try:
        if action == "certificate":
            pki_services.update_certificate(agent=agent, user=request.user, regenerate=True)
            messages.success(request, "A new certificate was issued and is being delivered.")
            return redirect("web:agent", agent_id=agent.pk)
        deployment = lifecycle.request_deployment(
            kind=action,
            server=agent.server,
            agent=agent,
            user=request.user,
            server_url=settings.PUBLIC_URL,
        )
    except exceptions.APIException as exc:
        messages.error(request, _message(exc))
        return redirect("web:agent", agent_id=agent.pk)
    return redirect("web:deployment", deployment_id=deployment.pk)


def _message(exc: exceptions.APIException) -> str:
    detail = exc.detail
    while isinstance(detail, list | dict) and detail:
        detail = next(iter(detail.values())) if isinstance(detail, dict) else detail[0]
    return str(detail)


@login_required
@require_GET
def command_detail(request: HttpRequest, command_id: int) -> HttpResponse:
    command = get_object_or_404(commands_visible_to(request.user), pk=command_id)
    return render(request, "web/command.html", _console_context(command))


@login_required
@require_GET
def command_console(request: HttpRequest, command_id: int) -> HttpResponse:
    """One command's console alone (a run's row opened in its grid): the stored output of a
    finished command, or the live stream of one still running."""
    command = get_object_or_404(commands_visible_to(request.user), pk=command_id)
    return render(request, "web/_console.html", _console_context(command))


def _console_context(command: Command) -> dict[str, Any]:
    final = is_final(command.status)
    return {
        "command": command,
        "final": final,
        "stdout": output.output_text(command, "stdout") if final else "",
        "stderr": output.output_text(command, "stderr") if final else "",
    }


@login_required
@require_GET
def command_raw(request: HttpRequest, command_id: int, stream: str) -> HttpResponse:
    """The stored bytes of one stream, as a download (never rendered by the browser), with
    the dropped marker where the middle of a long stream was dropped."""
    command = get_object_or_404(commands_visible_to(request.user), pk=command_id)
    if stream not in ("stdout", "stderr"):
        return HttpResponse(status=404)
    data = output.read_output(command, stream)
    response = HttpResponse(data, content_type="application/octet-stream")
    response["Content-Disposition"] = f'attachment; filename="command-{command.pk}.{stream}"'
    return response


@login_required
@require_POST
def command_cancel(request: HttpRequest, command_id: int) -> HttpResponse:
    """The console hears the outcome on its stream; this only answers whether it was taken."""
    command = get_object_or_404(commands_visible_to(request.user), pk=command_id)
    try:
        command_services.cancel_command(command=command, user=request.user)
    except exceptions.APIException as exc:
        return HttpResponse(_message(exc), status=409, content_type="text/plain")
    return HttpResponse(status=204)


@login_required
@require_GET
def deployment_detail(request: HttpRequest, deployment_id: int) -> HttpResponse:
    deployment = get_object_or_404(
        deployments_visible_to(request.user).select_related("agent", "server"), pk=deployment_id
    )
    return render(request, "web/deployment.html", {"deployment": deployment})
