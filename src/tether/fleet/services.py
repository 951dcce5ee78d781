"""Fleet state changes: servers, agent registration, heartbeats, offline marking."""

from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone

from tether import wakeups
from tether.accounts.services import audit
from tether.errors import Conflict, TetherError

from . import authentication, credentials, hooks
from .models import Agent, Server


def effective_long_poll_timeout() -> float:
    """Never hold a poll long enough for the sweeper to call a waiting agent offline."""
    return min(settings.LONG_POLL_TIMEOUT, 2 * settings.HEARTBEAT_INTERVAL)


def agent_config(agent: Agent | None = None) -> dict[str, Any]:
    """Timers and limits every agent follows (the older dialect reads the min/max pairs), and
    the agent's own TLS setting."""
    heartbeat = settings.HEARTBEAT_INTERVAL
    poll = settings.POLL_INTERVAL
    config = {
        "heartbeat_interval": heartbeat,
        "poll_interval": poll,
        "long_poll_timeout": effective_long_poll_timeout(),
        "heartbeat_min_interval": min(poll, heartbeat),
        "heartbeat_max_interval": heartbeat,
        "poll_min_interval": min(1.0, poll),
        "poll_max_interval": poll,
        # Both streams' window: Tether's agent spools MAX_OUTPUT_BYTES of each, the same head
        # and a rolling tail as the server keeps, and declares what it drops; agents of the
        # original system read it as their cap (docs/agent-protocol.md, Output limits).
        "max_output_bytes": 2 * settings.MAX_OUTPUT_BYTES,
        "lease_seconds": settings.COMMAND_LEASE,
    }
    if agent is not None:
        config["verify_ssl"] = agent.verify_ssl
    return config


@transaction.atomic
def create_server(*, owner: AbstractBaseUser, **fields: Any) -> tuple[Server, str]:
    """Create a server and return it with its token, which is never shown again."""
    ssh_private_key = fields.pop("ssh_private_key", "")
    token = credentials.new_server_token()
    server = Server.objects.create(
        owner=owner,
        token_hash=credentials.hash_token(token),
        ssh_private_key_encrypted=credentials.encrypt(ssh_private_key) if ssh_private_key else "",
        **fields,
    )
    audit(user=owner, action="server.create", target=server, name=server.name)
    return server, token


@transaction.atomic
def update_server(*, server: Server, user: AbstractBaseUser, **fields: Any) -> Server:
    """Change a server's fields (a new SSH key is encrypted; a blank one removes it). The
    audit names every field changed, the key included, never a value of the key."""
    changed = sorted(fields)
    if "ssh_private_key" in fields:
        key = fields.pop("ssh_private_key")
        server.ssh_private_key_encrypted = credentials.encrypt(key) if key else ""
    for name, value in fields.items():
        setattr(server, name, value)
    server.save()
    audit(user=user, action="server.update", target=server, fields=changed)
    return server


@transaction.atomic
def forget_host_key(*, server: Server, user: AbstractBaseUser) -> Server:
    """Drop the recorded SSH host keys: the next SSH run records the host's keys anew."""
    server.ssh_known_hosts = ""
    server.save(update_fields=["ssh_known_hosts"])
    audit(user=user, action="server.forget_host_key", target=server)
    return server


@transaction.atomic
def rotate_server_token(*, server: Server, user: AbstractBaseUser) -> str:
    """A new server token; the old one stops registering agents at once."""
    token = credentials.new_server_token()
    server.token_hash = credentials.hash_token(token)
    server.save(update_fields=["token_hash"])
    audit(user=user, action="server.rotate_token", target=server)
    return token


@transaction.atomic
def delete_server(*, server: Server, user: AbstractBaseUser) -> None:
    """Delete a server with its agents (and their commands and deployments)."""
    audit(user=user, action="server.delete", target=server, name=server.name)
    server.delete()


@transaction.atomic
def set_agent_tags(*, agent: Agent, tags: list[str] | None, user: AbstractBaseUser) -> Agent:
    """Replace the agent's tags (None leaves them as they are)."""
    if tags is not None:
        agent.tags = tags
        agent.save(update_fields=["tags"])
        audit(user=user, action="agent.set_tags", target=agent, tags=tags)
    return agent


@dataclass
class Registration:
    """A registered agent with its new credentials, which are shown to it once."""

    agent: Agent
    token: str
    secret_key: str


@dataclass
class Enrollment:
    """A registration token issued by a higher app (an SSH install's one-time token): the
    server the agent joins, and what that app does once the agent has registered."""

    server: Server
    registered: Callable[[Agent], None]


def server_for_token(server_token: str) -> Server | None:
    """The server whose token this is (only hashes are stored, so the lookup is by hash)."""
    return Server.objects.filter(token_hash=credentials.hash_token(server_token)).first()


@transaction.atomic
def register_with_token(*, token: str, **fields: Any) -> Registration:
    """Register with a server token or, failing that, a token a higher app issued (an SSH
    install's): one transaction, so an install never records an agent that did not register.
    An unknown token is a 401 and changes nothing."""
    server = server_for_token(token)
    enrollment: Enrollment | None = None
    if server is None:
        enrollment = hooks.enrollment_for_token.first(token=token)
        server = enrollment.server if enrollment is not None else None
    if server is None:
        raise TetherError("Invalid server token.", code="authentication_failed", status_code=401)
    registration = register_agent(server=server, **fields)
    if enrollment is not None:
        enrollment.registered(registration.agent)
    return registration


@transaction.atomic
def register_agent(
    *,
    server: Server,
    hostname: str,
    version: str = "",
    os: str = "",
    arch: str = "",
    rpc_port: int | None = None,
    signing: bool = False,
    address: str | None = None,
    machine_id: str = "",
    instance_id: str = "",
) -> Registration:
    """Create the agent for its identity on `server`, or rotate its credentials if it exists:
    registering again revokes the old token and secret at once. The identity is the machine
    id when the agent sends one (DESIGN §6), else the hostname (the original dialect).

    Another install with the same machine identity (a cloned host), or one adopting an agent
    known by hostname, is refused while the agent it would displace is online, so two hosts
    never take the identity from each other; once that agent is gone, the newcomer takes its
    place. The apps above hear of it
    (agent_registered): what a replaced install was running is lost (not what the same
    install, registering again, still runs), a new identity gets a certificate."""
    agent = _registered_agent(server, hostname, machine_id)
    # The same install: its state dir's own id matches (an id never recorded proves nothing).
    same_install = (
        agent is not None and bool(agent.instance_id) and agent.instance_id == instance_id
    )
    if machine_id and agent is not None and not same_install and agent_is_online(agent):
        raise Conflict(
            f"Agent {agent.pk} ({agent.hostname}) has this identity and is online: "
            "is this host a clone? Give it its own /etc/machine-id "
            "(systemd-machine-id-setup) or another state dir.",
            code="identity_in_use",
        )
    replaced = agent is not None and not same_install
    token = credentials.new_agent_token()
    secret_key = credentials.new_secret_key()
    fields = {
        "hostname": hostname,
        "machine_id": machine_id,
        "instance_id": instance_id,
        "version": version,
        "os": os,
        "arch": arch,
        "rpc_port": rpc_port,
        "address": address,
        "token_hash": credentials.hash_agent_token(token),
        "secret_key_encrypted": credentials.encrypt(secret_key),
        "signs_requests": signing,
        "sends_nonces": False,
        "registered_at": timezone.now(),
        "status": Agent.Status.PENDING,
    }
    if agent is None:
        try:
            with transaction.atomic():
                agent = Agent.objects.create(server=server, **fields)
        except IntegrityError as exc:  # the same identity, registering at this very moment
            raise Conflict(
                "Another registration of this agent is in progress; try again.",
                code="identity_in_use",
            ) from exc
    else:
        for name, value in fields.items():
            setattr(agent, name, value)
        agent.save(update_fields=[*fields])
    hooks.agent_registered.send(agent=agent, replaced=replaced)
    return Registration(agent=agent, token=token, secret_key=secret_key)


def _registered_agent(server: Server, hostname: str, machine_id: str) -> Agent | None:
    """The agent a registration is for, locked: by machine id, else by hostname. An agent that
    registered before it sent a machine id (Tether's own, signing, by hostname) is adopted
    by its first registration with one, rather than left behind as a stale twin."""
    agents = Agent.objects.select_for_update()
    if not machine_id:
        return agents.filter(server=server, hostname=hostname, machine_id="").first()
    return (
        agents.filter(server=server, machine_id=machine_id).first()
        or agents.filter(
            server=server, hostname=hostname, machine_id="", signs_requests=True
        ).first()
    )


def registration_answer(registration: Registration) -> dict[str, Any]:
    """What a registering agent is told: its credentials, its config, and what the apps above
    add (registration_extras: the CA to pin, say)."""
    agent = registration.agent
    answer = {
        "agent_id": agent.pk,
        "server_id": agent.server_id,
        "token": registration.token,
        "secret_key": registration.secret_key,
        "rpc_port": agent.rpc_port,
        "config": agent_config(agent),
        # The original system's agents read this; Tether's ignore it.
        "heartbeat_mode": "push",
    }
    for extras in hooks.registration_extras.collect(agent=agent):
        answer.update(extras)
    return answer


# Far below any offline threshold (3 x heartbeat interval), so skipping is always safe.
HEARTBEAT_FRESHNESS = 1.0
# A sign of life (a poll, a heartbeat, an answered status check) brings these back online;
# an agent that is upgrading stays so until its deployment ends.
REVIVED_BY_SIGN_OF_LIFE = frozenset(
    {Agent.Status.PENDING, Agent.Status.OFFLINE, Agent.Status.STOPPED}
)


def sign_of_life_changes(
    agent: Agent, *, version: str | None, rpc_port: int | None, address: str | None
) -> dict[str, Any]:
    """What a sign of life changes in the agent's row besides its heartbeat, as `agent` shows
    the row: the status it revives, a new version, RPC port or address."""
    fields: dict[str, Any] = {}
    if agent.status in REVIVED_BY_SIGN_OF_LIFE:
        fields["status"] = Agent.Status.ONLINE
    if version and version != agent.version:
        fields["version"] = version
    if rpc_port is not None and rpc_port != agent.rpc_port:
        fields["rpc_port"] = rpc_port
    if address and address != agent.address:
        fields["address"] = address
    return fields


def record_heartbeat(
    *,
    agent: Agent,
    version: str | None = None,
    rpc_port: int | None = None,
    address: str | None = None,
) -> None:
    """Mark the agent alive now (every sign of life comes here): one UPDATE, skipped when
    nothing changes and the last heartbeat is fresher than HEARTBEAT_FRESHNESS (a busy agent
    polls many times a second). A new version or RPC port is told to the apps above."""
    now = timezone.now()
    fields = sign_of_life_changes(agent, version=version, rpc_port=rpc_port, address=address)
    stale = agent.last_heartbeat is None or (
        (now - agent.last_heartbeat).total_seconds() >= HEARTBEAT_FRESHNESS
    )
    if not fields and not stale:
        return
    fields["last_heartbeat"] = now
    Agent.objects.filter(pk=agent.pk).update(**fields)
    for name, value in fields.items():
        setattr(agent, name, value)
    if len(fields) > 1:  # more than the heartbeat: this process's cached view is stale
        authentication.forget_agent(agent.pk)
    changed = set(fields) & {"version", "rpc_port", "address"}
    if changed:
        hooks.agent_changed.send(agent=agent, changed=changed)


def set_agent_status(agent_id: int, status: str, *, only_from: str | None = None) -> bool:
    """Set the status an app above decides (stopped, upgrading, back from upgrading). Every
    process forgets its cached view of the agent (tether.fleet.authentication), so the agent's
    next poll sees the new status: a stopped agent that starts again is online at once."""
    rows = Agent.objects.filter(pk=agent_id)
    if only_from is not None:
        rows = rows.filter(status=only_from)
    changed = bool(rows.update(status=status))
    if changed:
        wakeups.notify_on_commit(wakeups.auth_key(agent_id))
    return changed


def offline_after() -> float:
    """Seconds of silence after which an online agent is offline (3 heartbeat intervals):
    an agent still online was heard from within this (what the fleet page says of it)."""
    return 3 * settings.HEARTBEAT_INTERVAL


def offline_cutoff(now: Any = None) -> Any:
    """Heartbeats older than this are an offline agent's (see offline_after)."""
    return (now or timezone.now()) - timedelta(seconds=offline_after())


def agent_is_online(agent: Agent) -> bool:
    """Whether the agent can act now: online (or mid-upgrade) and heard from within the
    offline threshold, so a sweep that has not caught up yet is not believed."""
    return agent.status in ONLINE_STATUSES and heartbeat_is_fresh(agent)


ONLINE_STATUSES = (Agent.Status.ONLINE, Agent.Status.UPGRADING)


def online_q(path: str = "") -> Q:
    """agent_is_online as a query condition, for `path` the way to the agent ("agent__")."""
    return Q(
        **{f"{path}status__in": ONLINE_STATUSES, f"{path}last_heartbeat__gte": offline_cutoff()}
    )


def heartbeat_is_fresh(agent: Agent) -> bool:
    """Heard from within the offline threshold: what the sweep would still call online."""
    return agent.last_heartbeat is not None and agent.last_heartbeat >= offline_cutoff()


def mark_offline_agents() -> int:
    """Agents silent for more than 3 heartbeat intervals are offline."""
    return Agent.objects.filter(
        status=Agent.Status.ONLINE, last_heartbeat__lt=offline_cutoff()
    ).update(status=Agent.Status.OFFLINE)
