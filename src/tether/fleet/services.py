"""Fleet state changes: servers, agent registration, heartbeats, offline marking."""

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.utils import timezone

from tether.accounts.services import audit

from . import credentials
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
        "max_output_bytes": settings.MAX_OUTPUT_BYTES,
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
    if "ssh_private_key" in fields:
        key = fields.pop("ssh_private_key")
        server.ssh_private_key_encrypted = credentials.encrypt(key) if key else ""
    for name, value in fields.items():
        setattr(server, name, value)
    server.save()
    audit(user=user, action="server.update", target=server, fields=sorted(fields))
    return server


@transaction.atomic
def forget_host_key(*, server: Server, user: AbstractBaseUser) -> Server:
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
    audit(user=user, action="server.delete", target=server, name=server.name)
    server.delete()


@transaction.atomic
def set_agent_tags(*, agent: Agent, tags: list[str] | None, user: AbstractBaseUser) -> Agent:
    if tags is not None:
        agent.tags = tags
        agent.save(update_fields=["tags"])
        audit(user=user, action="agent.set_tags", target=agent, tags=tags)
    return agent


@dataclass
class Registration:
    agent: Agent
    token: str
    secret_key: str


def server_for_token(server_token: str) -> Server | None:
    return Server.objects.filter(token_hash=credentials.hash_token(server_token)).first()


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
) -> Registration:
    """Create the agent for (server, hostname), or rotate its credentials if it exists:
    registering again revokes the old token and secret at once."""
    token = credentials.new_agent_token()
    secret_key = credentials.new_secret_key()
    now = timezone.now()
    agent, created = Agent.objects.update_or_create(
        server=server,
        hostname=hostname,
        defaults={
            "version": version,
            "os": os,
            "arch": arch,
            "rpc_port": rpc_port,
            "address": address,
            "token_hash": credentials.hash_agent_token(token),
            "secret_key_encrypted": credentials.encrypt(secret_key),
            "signs_requests": signing,
            "registered_at": now,
            "status": Agent.Status.PENDING,
        },
    )
    if not created:
        from tether.commands.services import mark_commands_lost_on_reregister

        mark_commands_lost_on_reregister(agent=agent)
    # A registration is a new identity (the old state dir, and its certificate, may be gone).
    _issue_certificate_if_needed(agent, fresh=True)
    return Registration(agent=agent, token=token, secret_key=secret_key)


# Far below any offline threshold (3 x heartbeat interval), so skipping is always safe.
HEARTBEAT_FRESHNESS = 1.0


def _issue_certificate_if_needed(agent: Agent, fresh: bool = False) -> None:
    from tether.pki.services import issue_certificate, needs_certificate

    if needs_certificate(agent, fresh=fresh):
        issue_certificate(agent=agent)


def record_heartbeat(
    *,
    agent: Agent,
    version: str | None = None,
    rpc_port: int | None = None,
    address: str | None = None,
) -> None:
    """Mark the agent alive now: one UPDATE, skipped when nothing changes and the last
    heartbeat is fresher than HEARTBEAT_FRESHNESS (a busy agent polls many times a second)."""
    now = timezone.now()
    fields: dict[str, Any] = {}
    if agent.status in (Agent.Status.PENDING, Agent.Status.OFFLINE, Agent.Status.STOPPED):
        fields["status"] = Agent.Status.ONLINE
    new_version = bool(version) and version != agent.version
    if new_version:
        fields["version"] = version
    if rpc_port is not None and rpc_port != agent.rpc_port:
        fields["rpc_port"] = rpc_port
    if address and address != agent.address:
        fields["address"] = address
    stale = agent.last_heartbeat is None or (
        (now - agent.last_heartbeat).total_seconds() >= HEARTBEAT_FRESHNESS
    )
    if not fields and not stale:
        return
    fields["last_heartbeat"] = now
    Agent.objects.filter(pk=agent.pk).update(**fields)
    for name, value in fields.items():
        setattr(agent, name, value)
    if new_version:
        from tether.deploy.services import agent_reported_version

        agent_reported_version(agent, version)
    if "rpc_port" in fields:
        _issue_certificate_if_needed(agent)


def offline_cutoff(now: Any = None) -> Any:
    return (now or timezone.now()) - timedelta(seconds=3 * settings.HEARTBEAT_INTERVAL)


def heartbeat_is_fresh(agent: Agent) -> bool:
    """Heard from within the offline threshold: what the sweep would still call online."""
    return agent.last_heartbeat is not None and agent.last_heartbeat >= offline_cutoff()


def mark_offline_agents() -> int:
    """Agents silent for more than 3 heartbeat intervals are offline."""
    return Agent.objects.filter(
        status=Agent.Status.ONLINE, last_heartbeat__lt=offline_cutoff()
    ).update(status=Agent.Status.OFFLINE)
