"""Agent certificates: issue, deliver, revoke, renew; verify_ssl per agent."""

import asyncio
import json
import time
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.utils import timezone

from tether.accounts.services import audit
from tether.commands.models import Command
from tether.commands.services import cancel_command, queue_command
from tether.errors import Conflict
from tether.fleet import credentials
from tether.fleet import services as fleet_services
from tether.fleet.authentication import credentials_changed
from tether.fleet.models import Agent

from . import ca, rpc
from .models import Certificate
from .rpc import Target

UPDATE_CERTIFICATE = "update_certificate"


def current_certificate(agent: Agent) -> Certificate | None:
    """The one certificate of the agent that is not revoked (issuing revokes the others)."""
    return agent.certificates.filter(revoked_at=None).first()


def _names(agent: Agent) -> list[str]:
    return [agent.hostname, agent.address or ""]


def issue_certificate(*, agent: Agent, user: AbstractBaseUser | None = None) -> Certificate:
    """A new certificate for the agent's RPC endpoint, revoking its previous one at once, and
    the internal command that delivers it. One transaction: a certificate is never recorded
    without its delivery, nor an old one revoked without its successor."""
    issued = ca.issue(str(agent.pk), _names(agent), days=settings.AGENT_CERT_DAYS)
    with transaction.atomic():
        # Two issues at once (registration, sweep, API) must not both leave a valid one.
        Agent.objects.select_for_update().filter(pk=agent.pk).first()
        now = timezone.now()
        Certificate.objects.filter(agent=agent, revoked_at=None).update(revoked_at=now)
        certificate = Certificate.objects.create(
            agent=agent,
            serial=issued.serial,
            fingerprint_sha256=issued.fingerprint,
            not_before=issued.certificate.not_valid_before_utc,
            not_after=issued.certificate.not_valid_after_utc,
        )
        # An older delivery still waiting would install a revoked certificate.
        waiting = Command.objects.filter(
            agent=agent, command=UPDATE_CERTIFICATE, kind=Command.Kind.INTERNAL
        )
        for command in waiting.filter(status__in=[Command.Status.QUEUED, Command.Status.DELIVERED]):
            cancel_command(command=command, user=user)
        payload = {
            "certificate": issued.cert_pem,
            "private_key": issued.key_pem,
        }
        if pinned := ca.pin_for_agents():
            payload["ca_certificate"] = pinned
        queue_command(
            agent=agent,
            command=UPDATE_CERTIFICATE,
            kind=Command.Kind.INTERNAL,
            timeout=60,
            user=user,
            payload_encrypted=credentials.encrypt(json.dumps(payload)),
        )
        audit(user=user, action="agent.certificate.issue", target=agent, serial=issued.serial)
    return certificate


def update_certificate(
    *,
    agent: Agent,
    user: AbstractBaseUser | None,
    regenerate: bool = False,
    verify_ssl: bool | None = None,
) -> None:
    """An operator's change (API and web UI alike): `verify_ssl` set, and with `regenerate` a
    new certificate issued and delivered. An agent of the original dialect has no RPC
    endpoint to certify: 409 `legacy_agent`, and nothing changes."""
    if regenerate and not agent.signs_requests:
        raise Conflict(
            "an agent of the original dialect has no RPC endpoint to certify",
            code="legacy_agent",
        )
    with transaction.atomic():
        if verify_ssl is not None:
            set_verify_ssl(agent=agent, verify_ssl=verify_ssl, user=user)
        if regenerate:
            issue_certificate(agent=agent, user=user)


def set_verify_ssl(*, agent: Agent, verify_ssl: bool, user: AbstractBaseUser | None) -> None:
    """Whether the server verifies the agent's RPC certificate, and the agent the server's."""
    with transaction.atomic():
        Agent.objects.filter(pk=agent.pk).update(verify_ssl=verify_ssl)
        credentials_changed(agent.pk)  # the agent is told verify_ssl with every poll
        agent.verify_ssl = verify_ssl
        audit(user=user, action="agent.certificate.verify_ssl", target=agent, value=verify_ssl)


def certificate_installed(*, command: Command) -> None:
    """Connected to commands' command_finished: an update_certificate command ended. Its key
    leaves the database either way; if it was the newest delivery and succeeded, the agent
    serves the current certificate (a late success of an older, superseded delivery proves
    nothing about the current one)."""
    if command.kind != Command.Kind.INTERNAL or command.command != UPDATE_CERTIFICATE:
        return
    Command.objects.filter(pk=command.pk).update(payload_encrypted="")
    newest = (
        Command.objects.filter(agent_id=command.agent_id, command=UPDATE_CERTIFICATE)
        .order_by("-created_at", "-id")
        .values_list("pk", flat=True)
        .first()
    )
    if command.status != Command.Status.SUCCEEDED or newest != command.pk:
        return
    Certificate.objects.filter(
        agent_id=command.agent_id, revoked_at=None, installed_at=None
    ).update(installed_at=timezone.now())


def certificate_answer(agent: Agent) -> dict[str, Any]:
    """What update_certificate answers: the current certificate and whether it is delivered."""
    certificate = current_certificate(agent)
    return {
        "serial": certificate.serial if certificate else None,
        "fingerprint_sha256": certificate.fingerprint_sha256 if certificate else None,
        "not_after": certificate.not_after if certificate else None,
        "verify_ssl": agent.verify_ssl,
        "pending": bool(certificate and certificate.installed_at is None),
    }


def needs_certificate(agent: Agent, fresh: bool = False) -> bool:
    """Agents of Tether's dialect with an RPC port get a certificate when they register
    (`fresh`: a new one even if one stands) or first report a port."""
    if not (agent.signs_requests and agent.rpc_port):
        return False
    return fresh or current_certificate(agent) is None


def agent_registered(*, agent: Agent, replaced: bool) -> None:
    """Connected to fleet's agent_registered: a registration is a new identity (the old state
    dir, and its certificate, may be gone), so it gets a fresh certificate."""
    if needs_certificate(agent, fresh=True):
        issue_certificate(agent=agent)


def agent_changed(*, agent: Agent, changed: set[str]) -> None:
    """Connected to fleet's agent_changed: an agent that reports an RPC port for the first
    time gets its certificate."""
    if "rpc_port" in changed and needs_certificate(agent):
        issue_certificate(agent=agent)


def registration_extras(*, agent: Agent) -> dict[str, Any]:
    """Connected to fleet's registration_extras: the CA a registering agent pins, when the
    built-in CA vouches for this server (None otherwise)."""
    return {"ca_certificate": ca.pin_for_agents()}


def renew_expiring() -> int:
    """Re-issue certificates within CERT_RENEW_DAYS of expiry (the sweep calls this)."""
    soon = timezone.now() + timedelta(days=settings.CERT_RENEW_DAYS)
    expiring = Certificate.objects.filter(revoked_at=None, not_after__lt=soon).select_related(
        "agent"
    )
    count = 0
    for certificate in expiring:
        issue_certificate(agent=certificate.agent)
        count += 1
    return count


def rpc_target(agent: Agent) -> Target | None:
    """How to call the agent's RPC endpoint, or None when it has none yet."""
    return rpc_targets([agent])[agent.pk]


def rpc_targets(agents: list[Agent]) -> dict[int, Target | None]:
    """rpc_target for many agents with one query for their certificates (a fleet-wide check
    must not cost queries per agent)."""
    serials: dict[int, set[str]] = {agent.pk: set() for agent in agents}
    rows = Certificate.objects.filter(agent_id__in=list(serials), revoked_at=None)
    for agent_id, serial in rows.values_list("agent_id", "serial"):
        serials[agent_id].add(serial)
    ca_pem = ca.authority().pem if any(serials.values()) else ""
    targets: dict[int, Target | None] = {}
    for agent in agents:
        if not agent.rpc_port or not agent.address or not serials[agent.pk]:
            targets[agent.pk] = None
            continue
        targets[agent.pk] = Target(
            agent_id=agent.pk,
            host=agent.address,
            port=agent.rpc_port,
            secret_key=credentials.decrypt(agent.secret_key_encrypted),
            verify=agent.verify_ssl,
            ca_pem=ca_pem,
            good_serials=frozenset(serials[agent.pk]),
        )
    return targets


async def check_many(targets: dict[int, Target | None], at_once: int = 200) -> dict[int, dict]:
    """ask_status for many agents concurrently (at most `at_once` calls in flight): a
    fleet-wide check takes about as long as its slowest agent, not the sum."""
    gate = asyncio.Semaphore(at_once)

    async def one(target: Target | None) -> dict[str, Any]:
        async with gate:
            return await ask_status(target)

    answers = await asyncio.gather(*(one(target) for target in targets.values()))
    return dict(zip(targets, answers, strict=True))


async def ask_status(target: Target | None) -> dict[str, Any]:
    """Ask the agent's RPC endpoint for its status (a coroutine: the wait is on a socket, not
    on a server thread). Every outcome is an answer: unreachable, refused or without an
    endpoint is `reachable: false` with the reason; record_status_check then judges it."""
    started = time.monotonic()
    answer: dict[str, Any] = {"reachable": False, "version": None, "running": []}
    if target is None:
        answer["error"] = "the agent has no RPC endpoint (no rpc_port or no certificate yet)"
    else:
        try:
            status, data = await rpc.call(target, "GET", "/status", settings.RPC_TIMEOUT)
        except rpc.RpcError as exc:
            answer["error"] = str(exc)
        else:
            if status == 200:
                answer.update(
                    reachable=True, version=data.get("version"), running=data.get("running", [])
                )
            else:
                answer["error"] = f"the agent answered HTTP {status}"
    answer["latency_ms"] = round((time.monotonic() - started) * 1000, 1)
    answer["checked_at"] = timezone.now().isoformat()
    return answer


def record_status_check(agent_id: int, answer: dict[str, Any]) -> str:
    """An answer proves the agent alive (a sign of life, as a poll is); no answer changes
    nothing: a fresh heartbeat still stands, and a stale one is the sweep's to judge."""
    agent = Agent.objects.filter(pk=agent_id).first()
    if agent is None:
        return "deleted"
    # Without verify_ssl anyone at that address could answer: report it, trust nothing.
    if answer["reachable"] and agent.verify_ssl:
        fleet_services.record_heartbeat(agent=agent)
    return agent.status


def record_status_checks(answers: dict[int, dict[str, Any]]) -> dict[int, str]:
    """record_status_check for many answers; each agent's status after it."""
    return {agent_id: record_status_check(agent_id, answer) for agent_id, answer in answers.items()}
