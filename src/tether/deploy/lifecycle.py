"""Lifecycle requests: install, upgrade, stop or start an agent (DESIGN §4).

One request is one transaction: the latest request supersedes what is active, the method is
chosen (through the agent when it is online and can act for itself, over SSH otherwise), and
the work is handed to the agent as an internal command or to a background worker (SSH)."""

from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from tether.commands import states
from tether.commands.models import Command
from tether.commands.services import queue_command
from tether.errors import Conflict
from tether.fleet.agent_files import agent_version
from tether.fleet.models import Agent, Server
from tether.fleet.services import agent_is_online, set_agent_status

from .models import Deployment
from .services import ACTIVE, append_log, create_deployment, end_deployment
from .tasks import run_ssh_deployment_task

S = Deployment.Status
K = Deployment.Kind
M = Deployment.Method


def _check_ssh_ready(server: Server) -> None:
    if not server.ssh_private_key_encrypted:
        raise Conflict(
            f"server {server.name!r} has no SSH private key: set ssh_private_key first",
            code="no_ssh_credentials",
        )


def _supersede(*, agent: Agent | None, server: Server, kind: str, user: Any) -> None:
    """The latest request wins: an agent's (or, for installs, a server's) active deployment is
    cancelled before a new one starts, and so is the internal command carrying it out."""
    active = Deployment.objects.select_for_update().filter(status__in=ACTIVE)
    active = active.filter(agent=agent) if agent else active.filter(server=server, kind=kind)
    who = getattr(user, "username", None) or "the server"
    for old in active:
        end_deployment(
            deployment=old,
            status=S.CANCELLED,
            line=f"superseded by a new {kind} from {who}",
            user=user,
        )


def _longest_running(agent: Agent) -> float:
    """Seconds until the agent's active commands must have ended: an agent upgrades only once
    they have, so its deadline starts after them."""
    timeouts = (
        Command.objects.filter(agent=agent)
        .exclude(status__in=states.FINAL)
        .values_list("timeout", flat=True)
    )
    return float(max(timeouts, default=0))


def request_deployment(
    *,
    kind: str,
    server: Server,
    agent: Agent | None,
    user: Any,
    server_url: str,
    rollout: Any = None,
) -> Deployment:
    """Start an install, upgrade, stop or start (one transaction): supersede what is active,
    choose the method (through the agent when it is online and can, over SSH otherwise), and
    hand the work to the agent (an internal command) or to a background worker (SSH)."""
    try:
        return _request_deployment(kind, server, agent, user, server_url, rollout)
    except IntegrityError as exc:
        # Only when two requests for one agent raced past each other (PostgreSQL, no row
        # lock held yet): the database kept one; this one says so.
        raise Conflict(
            "another deployment of this agent started at the same moment", code="busy"
        ) from exc


def _request_deployment(
    kind: str, server: Server, agent: Agent | None, user: Any, server_url: str, rollout: Any
) -> Deployment:
    with transaction.atomic():
        if agent is not None:
            # Serialises concurrent requests for one agent (SQLite serialises all writers).
            agent = Agent.objects.select_for_update().get(pk=agent.pk)
        method = _choose_method(kind, agent)
        if method == M.SSH:
            _check_ssh_ready(server)
        _supersede(agent=agent, server=server, kind=kind, user=user)
        # Through the agent, the agent swaps only once its running commands have ended: its
        # command and the deployment both allow for the longest of them. Over SSH the deadline
        # is set when a worker starts the run (ssh_run_started): a queue of installs must not
        # use up the time of the ones at its end.
        budget = 0.0
        if method == M.AGENT:
            assert agent is not None
            budget = settings.DEPLOY_ONLINE_DEADLINE + _longest_running(agent)
        deployment = create_deployment(
            server=server,
            agent=agent,
            kind=kind,
            method=method,
            user=user,
            target_version=agent_version() if kind in (K.INSTALL, K.UPGRADE) else "",
            server_url=server_url,
            deadline=timezone.now() + timedelta(seconds=budget) if budget else None,
            rollout=rollout,
        )
        if method == M.AGENT:
            verb = "upgrade to " + deployment.target_version if kind == K.UPGRADE else kind
            append_log(deployment_id=deployment.pk, text=f"asking the agent to {verb}")
            queue_command(
                agent=agent,
                command=kind,
                kind=Command.Kind.INTERNAL,
                timeout=int(budget),
                deployment=deployment,
            )
        else:
            transaction.on_commit(lambda: _enqueue_ssh(deployment.pk))
        if kind == K.UPGRADE and agent is not None:
            set_agent_status(agent.pk, Agent.Status.UPGRADING)
    return deployment


def _choose_method(kind: str, agent: Agent | None) -> str:
    if agent is None or kind in (K.INSTALL, K.START):
        if kind == K.START and agent is not None and agent_is_online(agent):
            raise Conflict("the agent is already online", code="already_online")
        return M.SSH
    # An agent of the original dialect cannot check a signed manifest or take internal
    # commands: it is upgraded and stopped over SSH.
    if agent_is_online(agent) and agent.signs_requests:
        return M.AGENT
    return M.SSH


def _enqueue_ssh(deployment_id: int) -> None:
    run_ssh_deployment_task.enqueue(deployment_id)
