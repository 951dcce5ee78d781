"""Which agents a command line names: `web-1` (a hostname), `12` (an agent id), `tag:web`,
`server:4` and `all`. `run` hands them to the server as a run's `targets` (docs/runs.md);
`upgrade` and `status` resolve them to agents here, through `/api/agents/`."""

import re
from dataclasses import dataclass, field
from typing import Any

from .client import Client
from .errors import CliError

TARGET_FORMS = "a hostname, an agent id, tag:NAME, server:ID or all"
DIGITS = re.compile(r"[0-9]+")


@dataclass
class Targets:
    agents: list[int | str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    servers: list[int] = field(default_factory=list)
    all: bool = False

    def as_body(self) -> dict[str, Any]:
        """The `targets` object of `POST /api/runs/`: only the parts given."""
        body: dict[str, Any] = {}
        if self.agents:
            body["agents"] = self.agents
        if self.tags:
            body["tags"] = self.tags
        if self.servers:
            body["servers"] = self.servers
        if self.all:
            body["all"] = True
        return body


def parse_targets(words: list[str]) -> Targets:
    """The targets named by `words`, each kept once, in the order given."""
    targets = Targets()
    if not words:
        raise CliError(f"name at least one target: {TARGET_FORMS}")
    for word in (w.strip() for w in words):
        prefix, colon, rest = word.partition(":")
        if word == "all":
            targets.all = True
        elif colon and prefix == "tag" and rest:
            _append_once(targets.tags, rest)
        elif colon and prefix == "server" and DIGITS.fullmatch(rest):
            _append_once(targets.servers, int(rest))
        elif DIGITS.fullmatch(word):
            _append_once(targets.agents, int(word))
        elif word and not colon and not word.startswith("-"):
            _append_once(targets.agents, word)
        else:
            raise CliError(f"not a target: {word!r} (give {TARGET_FORMS})")
    return targets


def _append_once(items: list[Any], item: Any) -> None:
    if item not in items:
        items.append(item)


def agents_named(client: Client, hostname: str) -> list[dict[str, Any]]:
    """The caller's agents with exactly this hostname (one per server that has it)."""
    found = client.get_all("/api/agents/", search=hostname)
    return [agent for agent in found if agent["hostname"] == hostname]


def agent_by_id(client: Client, agent_id: int) -> dict[str, Any]:
    try:
        return client.get(f"/api/agents/{agent_id}/")
    except CliError as exc:
        if exc.status == 404:
            raise CliError(f"no agent {agent_id} (not found, or not yours)", status=404) from None
        raise


def resolve_agents(client: Client, targets: Targets) -> list[dict[str, Any]]:
    """Every agent the targets name, once each, in the order named. A hostname that names
    several agents (the same host name on several servers) stands for all of them; a name,
    id, tag or server that names none is an error."""
    chosen: dict[int, dict[str, Any]] = {}

    def add(agents: list[dict[str, Any]], what: str) -> None:
        if not agents:
            raise CliError(f"no agent matches {what}")
        for agent in agents:
            chosen.setdefault(agent["id"], agent)

    everyone = client.get_all("/api/agents/") if targets.all or targets.servers else []
    for item in targets.agents:
        if isinstance(item, int):
            add([agent_by_id(client, item)], f"id {item}")
        else:
            add(agents_named(client, item), f"hostname {item!r}")
    for tag in targets.tags:
        add(client.get_all("/api/agents/", tag=tag), f"tag:{tag}")
    for server in targets.servers:
        add([a for a in everyone if a["server"] == server], f"server:{server}")
    if targets.all:
        add(everyone, "all")
    return list(chosen.values())


def resolve_one(client: Client, word: str) -> dict[str, Any]:
    """The one agent an id or a hostname names; a hostname on several servers is an error
    that lists their ids."""
    targets = parse_targets([word])
    if len(targets.agents) != 1 or targets.tags or targets.servers or targets.all:
        raise CliError(f"give one agent, by hostname or id: {word!r} is not one")
    item = targets.agents[0]
    if isinstance(item, int):
        return agent_by_id(client, item)
    agents = agents_named(client, item)
    if not agents:
        raise CliError(f"no agent has hostname {item!r}")
    if len(agents) > 1:
        ids = ", ".join(str(a["id"]) for a in agents)
        raise CliError(f"{len(agents)} agents have hostname {item!r} (ids {ids}): give an id")
    return agents[0]
