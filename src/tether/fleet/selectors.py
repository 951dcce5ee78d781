"""Questions about the fleet, asked the same way by the API, the pages and the streams."""

from collections.abc import Iterable
from dataclasses import dataclass

from django.contrib.auth.models import AbstractBaseUser
from django.db.models import Count, F, Q, QuerySet
from rest_framework import exceptions

from tether.accounts.selectors import owned_by

from .lookups import HasTag
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
    name; `tag` one of the agent's tags exactly; `server` (API only) a server's id."""

    status: str = ""
    search: str = ""
    tag: str = ""
    server: int | None = None

    def __post_init__(self) -> None:
        if self.status and self.status not in Agent.Status.values:
            raise ValueError(f"must be one of {Agent.Status.values}")

    def q(self) -> Q:
        """The filters as one condition, for a query or an aggregate's `filter=`; every one
        is answered by the database (a page of 10,000 agents reads only its rows)."""
        chosen = Q()
        if self.status:
            chosen &= Q(status=self.status)
        if self.server is not None:
            chosen &= Q(server_id=self.server)
        if self.search:
            chosen &= Q(hostname__icontains=self.search) | Q(server__name__icontains=self.search)
        if self.tag:
            chosen &= Q(HasTag(F("tags"), self.tag))
        return chosen

    def apply(self, agents: QuerySet[Agent]) -> QuerySet[Agent]:
        """The agents that pass every filter given."""
        return agents.filter(self.q())


def count_by_status(agents: QuerySet[Agent], *, matching: Q | None = None) -> dict[str, int]:
    """`total`, one count per status and `matching` (how many match the condition `matching`:
    a filtered list's length, counted in the same pass; `total` without one), from one query."""
    counts = {"total": Count("id")}
    counts.update({status: Count("id", filter=Q(status=status)) for status in Agent.Status.values})
    if matching:
        counts["matching"] = Count("id", filter=matching)
    result = agents.aggregate(**counts)
    if "matching" not in result:
        result["matching"] = result["total"]
    return result


def resolve_targets(
    user: AbstractBaseUser,
    *,
    agents: Iterable[int | str] = (),
    tags: Iterable[str] = (),
    servers: Iterable[int] = (),
    everything: bool = False,
) -> list[Agent]:
    """The agents a fleet-wide action reaches: the union of agents by id or hostname, agents
    with any of `tags`, agents of `servers`, or all of the user's. An id, hostname or server
    that is not the user's is a 404 (as if it did not exist); a tag none of the user's agents
    has, or an empty union, a 400. Ordered by hostname."""
    visible = agents_visible_to(user)
    chosen: dict[int, Agent] = {}
    if everything:
        chosen.update((agent.pk, agent) for agent in visible)
    ids = {a for a in agents if isinstance(a, int)}
    names = {a for a in agents if isinstance(a, str)}
    if ids:
        found = {agent.pk: agent for agent in visible.filter(pk__in=ids)}
        if missing := ids - set(found):
            raise exceptions.NotFound(f"No such agent: {sorted(missing)[0]}.")
        chosen.update(found)
    if names:
        found_names = list(visible.filter(hostname__in=names))
        if missing := names - {agent.hostname for agent in found_names}:
            raise exceptions.NotFound(f"No such agent: {sorted(missing)[0]}.")
        chosen.update((agent.pk, agent) for agent in found_names)
    if servers := set(servers):
        owned = set(servers_visible_to(user).filter(pk__in=servers).values_list("pk", flat=True))
        if missing := servers - owned:
            raise exceptions.NotFound(f"No such server: {sorted(missing)[0]}.")
        chosen.update((agent.pk, agent) for agent in visible.filter(server_id__in=servers))
    for tag in set(tags):
        tagged = AgentFilter(tag=tag).apply(visible)
        if not tagged:
            raise exceptions.ValidationError(
                {"targets": [f"No agent of yours has the tag {tag!r}."]}
            )
        chosen.update((agent.pk, agent) for agent in tagged)
    if not chosen:
        raise exceptions.ValidationError({"targets": ["The targets name no agent."]})
    return sorted(chosen.values(), key=lambda agent: (agent.hostname, agent.pk))
