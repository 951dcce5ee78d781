"""Questions about commands and templates, asked the same way by the API, pages and streams."""

from django.contrib.auth.models import AbstractBaseUser
from django.db.models import QuerySet

from tether.accounts.selectors import owned_by
from tether.fleet.models import Agent

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
