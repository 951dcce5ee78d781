"""The "Run on many" pages: the runs history with the form that starts one, and a run's live
grid.

A run is created exactly as `POST /api/runs/` creates it: the form becomes the API's body,
the API's `RunInput` validates it, `run_request` resolves its targets and template as the
user may see them, and the runs service queues it. So the page refuses what the API refuses,
with the same message, and another user's agent or template is a 404. No page lists every
agent or every target: the agent picker and the grid show a page at a time.
"""

import uuid
from typing import Any

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.http import Http404, HttpRequest, HttpResponse, QueryDict
from django.shortcuts import get_object_or_404, redirect, render
from django.utils.cache import add_never_cache_headers
from django.views.decorators.http import require_GET, require_http_methods, require_POST
from rest_framework import exceptions

from tether.commands import runs
from tether.commands.api.runs import RunInput, start_run
from tether.commands.models import Command, Run
from tether.commands.selectors import (
    run_targets,
    runs_visible_to,
    target_counts,
    templates_visible_to,
)
from tether.errors import first_message
from tether.fleet.models import Agent
from tether.fleet.selectors import agents_visible_to, count_by_status

from .fleet_views import filtered_agents, listed_agents
from .forms import chosen_template, posted_template, run_body

RUNS_PAGE = 50  # runs per page of the history
PICKER_ROWS = 50  # agents offered at once in the form's picker: the filters find the rest
GRID_PAGE = 100  # targets per page of a run's grid
# The counters at the top of a run's page, in the order a run moves through them.
COUNTERS = [
    "total",
    "queued",
    "running",
    "succeeded",
    "failed",
    "timed_out",
    "cancelled",
    "lost",
    "expired",
    "skipped",
]
# What the form posts that is not the request itself (left out of the replay fingerprint).
FORM_ONLY = ("csrfmiddlewaretoken", "idempotency_key")


@login_required
@require_http_methods(["GET", "POST"])
def runs_page(request: HttpRequest) -> HttpResponse:
    """The history and the form. A refused form comes back with the API's message and what
    was typed; a run created (or a double submit of the same form) leads to its grid."""
    if request.method == "GET":
        return _runs_page(request)
    try:
        run = _start_run(request)
    except exceptions.NotFound as exc:
        raise Http404 from exc
    except exceptions.APIException as exc:  # refused (400), or the form's key reused (409)
        return _runs_page(request, error=first_message(exc.detail), status=exc.status_code)
    return redirect("web:run", run_id=run.pk)


def _start_run(request: HttpRequest) -> Run:
    body = run_body(request.POST, request.user)
    data = RunInput(data=body)
    data.is_valid(raise_exception=True)
    # The form's one-time key makes a double click (or a resent POST) one run, not two.
    key = request.POST.get("idempotency_key", "").strip()[:200]
    posted = {name: request.POST.getlist(name) for name in request.POST if name not in FORM_ONLY}
    run, _ = start_run(request.user, data.validated_data, key=key, body=posted)
    return run


def _runs_page(request: HttpRequest, error: str = "", status: int = 200) -> HttpResponse:
    posted = request.POST if request.method == "POST" else QueryDict()
    history = Paginator(runs_visible_to(request.user).order_by("-created_at", "-id"), RUNS_PAGE)
    page = history.get_page(request.GET.get("page"))
    counts = target_counts(run.pk for run in page)
    template = chosen_template(request.user, posted.get("template", ""))
    fleet = count_by_status(agents_visible_to(request.user))
    context = {
        "page": page,
        "history": [(run, counts[run.pk]) for run in page],
        "error": error,
        "form": posted,
        "key": uuid.uuid4().hex,
        "templates": templates_visible_to(request.user).order_by("name"),
        "template": posted_template(template, posted),
        "status_choices": [(status, fleet[status]) for status in Agent.Status.values],
        "fleet_counts": fleet,
        "filters": {key: request.GET.get(key, "") for key in ("status", "q", "tag")},
        **_picker(request, checked=posted.getlist("agents")),
    }
    response = render(request, "web/runs.html", context, status=status)
    add_never_cache_headers(response)  # the back button brings a fresh form, with a fresh key
    return response


def _picker(request: HttpRequest, checked: list[str]) -> dict[str, Any]:
    """The agents the form offers: those already checked (kept across filtering), then the
    first PICKER_ROWS that match the filters (the fleet page's), and how many more match."""
    ids = [int(value) for value in checked if value.isdigit() and len(value) <= 18]
    visible = listed_agents(request)
    pinned = list(visible.filter(pk__in=ids).order_by("hostname", "id")) if ids else []
    matching = filtered_agents(request).exclude(pk__in=ids)
    offered = list(matching[:PICKER_ROWS])
    more = matching.count() - len(offered) if len(offered) == PICKER_ROWS else 0
    return {"checked_agents": pinned, "offered_agents": offered, "more_agents": more}


@login_required
@require_GET
def run_picker(request: HttpRequest) -> HttpResponse:
    """The picker's rows again, for new filters (the checked agents stay)."""
    context = _picker(request, checked=request.GET.getlist("agents"))
    return render(request, "web/_run_picker.html", context)


@login_required
@require_GET
def run_template_params(request: HttpRequest) -> HttpResponse:
    """The parameter inputs of the template chosen in the run form."""
    template = chosen_template(request.user, request.GET.get("template", ""))
    return render(request, "web/_template_params.html", {"template": template})


@login_required
@require_GET
def run_detail(request: HttpRequest, run_id: int) -> HttpResponse:
    """A run's counts and its grid, a page of targets at a time (optionally of one status);
    the page's script keeps both live from the run's stream."""
    run = get_object_or_404(runs_visible_to(request.user), pk=run_id)
    status = request.GET.get("status", "")
    targets = run_targets(run)
    if status in Command.Status.values:
        targets = targets.filter(status=status)
    grid = Paginator(targets, GRID_PAGE).get_page(request.GET.get("page"))
    counts = runs.run_counts(run)
    context = {
        "run": run,
        "final": run.status != Run.Status.RUNNING,
        "counts": [(name, counts[name]) for name in COUNTERS],
        "grid": grid,
        "status": status,
        "statuses": Command.Status.values,
    }
    return render(request, "web/run.html", context)


@login_required
@require_POST
def run_cancel(request: HttpRequest, run_id: int) -> HttpResponse:
    """Cancel through the runs service; the grid then shows the targets ending."""
    run = get_object_or_404(runs_visible_to(request.user), pk=run_id)
    try:
        runs.cancel_run(run=run, user=request.user)
    except exceptions.APIException as exc:
        messages.error(request, first_message(exc.detail))
    else:
        messages.success(request, f"Run #{run.pk} is being cancelled.")
    return redirect("web:run", run_id=run.pk)
