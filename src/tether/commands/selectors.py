"""Questions about commands and templates, asked the same way by the API, pages and streams."""

from collections.abc import Iterable

from django.contrib.auth.models import AbstractBaseUser
from django.db.models import Count, QuerySet

from tether.accounts.selectors import owned_by
from tether.fleet.models import Agent

from . import states
from .models import Command, CommandTemplate, Run

HISTORY_LENGTH = 50


def commands_visible_to(user: AbstractBaseUser) -> QuerySet[Command]:
    """The commands of the agents `user` may see."""
    commands = Command.objects.select_related("agent", "created_by")
    return owned_by(user, commands, "agent__server__owner")


def runs_visible_to(user: AbstractBaseUser) -> QuerySet[Run]:
    """The runs `user` started (staff: everyone's). A run may reach agents of several
    owners only for staff, so it is its creator's."""
    return owned_by(user, Run.objects.select_related("created_by"), "created_by")


def run_targets(run: Run) -> QuerySet[Command]:
    """A run's targets with their agents and servers, by hostname (the run page's grid)."""
    return run.commands.select_related("agent__server").order_by("agent__hostname", "id")


# Targets not started count as `queued` (docs/runs.md).
NOT_STARTED_YET = frozenset({Command.Status.HELD, Command.Status.QUEUED, Command.Status.DELIVERED})


def counts_by_state(by_status: dict[str, int]) -> dict[str, int]:
    """A run's counts as docs/runs.md names them, from its targets' command statuses: the one
    rule for the run's answer, its stream and the runs history."""
    counts = {"queued": 0, "running": 0, **{status.value: 0 for status in states.FINAL}}
    for status, n in by_status.items():
        counts["queued" if status in NOT_STARTED_YET else status] += n
    counts["total"] = sum(by_status.values())
    return counts


def commands_by_status() -> dict[str, int]:
    """How many commands are in each status, every status present (0 included), from one
    GROUP BY: what /metrics reports, the queue's depth (`queued`) among them."""
    counts = dict.fromkeys(Command.Status.values, 0)
    rows = Command.objects.order_by().values_list("status").annotate(n=Count("id"))
    counts.update(rows.values_list("status", "n"))
    return counts


def target_counts(run_ids: Iterable[int]) -> dict[int, dict[str, int]]:
    """The counts of several runs at once (a page of the runs history), from one query."""
    ids = list(run_ids)
    by_run: dict[int, dict[str, int]] = {run_id: {} for run_id in ids}
    rows = (
        Command.objects.filter(run_id__in=ids)
        .values_list("run_id", "status")
        .annotate(n=Count("id"))
        .values_list("run_id", "status", "n")
    )
    for run_id, status, n in rows:
        by_run[run_id][status] = n
    return {run_id: counts_by_state(by_status) for run_id, by_status in by_run.items()}


def templates_visible_to(user: AbstractBaseUser) -> QuerySet[CommandTemplate]:
    """A user's own command templates: templates are personal, staff included."""
    return CommandTemplate.objects.filter(owner=user)


TEMPLATE_NAME_TAKEN = "You already have a template with this name."


def template_name_taken(
    *, owner: AbstractBaseUser, name: str, template: CommandTemplate | None = None
) -> bool:
    """Whether `owner` already has another template called `name` (names are per owner)."""
    taken = templates_visible_to(owner).filter(name=name)
    if template is not None and template.pk is not None:
        taken = taken.exclude(pk=template.pk)
    return taken.exists()


def command_history(agent: Agent) -> QuerySet[Command]:
    """The agent's latest commands, newest first (the API's and the agent page's history)."""
    latest = agent.commands.select_related("created_by").order_by("-created_at", "-id")
    return latest[:HISTORY_LENGTH]
