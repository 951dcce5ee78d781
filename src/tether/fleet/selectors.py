"""Questions about the fleet, asked the same way by the API, the pages and the streams."""

from dataclasses import dataclass

from django.contrib.auth.models import AbstractBaseUser
from django.db.models import Count, Q, QuerySet

from tether.accounts.selectors import owned_by

from .models import Agent, Server


def servers_visible_to(user: AbstractBaseUser) -> QuerySet[Server]:
    """The servers `user` may see and act on."""
    return owned_by(user, Server.objects.all(), "owner")


def agents_visible_to(user: AbstractBaseUser) -> QuerySet[Agent]:
    """The agents of the servers `user` may see."""
    return owned_by(user, Agent.objects.select_related("server"), "server__owner")


def server_name_taken(*, owner: AbstractBaseUser, name: str, server: Server | None = None) -> bool:
    """Whether `owner` already has another server called `name` (names are per owner)."""
    taken = Server.objects.filter(owner=owner, name=name)
    if server is not None and server.pk is not None:
        taken = taken.exclude(pk=server.pk)
    return taken.exists()


@dataclass(frozen=True)
class AgentFilter:
    """How operators narrow the agent list, in the API (`?status=&search=&tag=`) and on the
    fleet page (`?status=&q=&tag=`) alike. `search` matches the hostname or the server's
    name; `tag` one of the agent's tags exactly."""

    status: str = ""
    search: str = ""
    tag: str = ""

    def __post_init__(self) -> None:
        if self.status and self.status not in Agent.Status.values:
            raise ValueError(f"must be one of {Agent.Status.values}")

    def apply(self, agents: QuerySet[Agent]) -> QuerySet[Agent]:
        """The agents that pass every filter given."""
        if self.status:
            agents = agents.filter(status=self.status)
        if self.search:
            agents = agents.filter(
                Q(hostname__icontains=self.search) | Q(server__name__icontains=self.search)
            )
        if self.tag:
            # JSON containment is not portable to SQLite; tag lists are short.
            tagged = [
                pk for pk, tags in agents.values_list("pk", "tags") if self.tag in (tags or [])
            ]
            agents = agents.filter(pk__in=tagged)
        return agents


def count_by_status(agents: QuerySet[Agent]) -> dict[str, int]:
    """`total` and one count per status, from one query."""
    counts = {"total": Count("id")}
    counts.update({status: Count("id", filter=Q(status=status)) for status in Agent.Status.values})
    return agents.aggregate(**counts)
