"""Deployment lifecycle: create, append to the log, finish, cancel. One transaction each."""

import re
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import IntegrityError, transaction
from django.utils import timezone

from tether import wakeups
from tether.accounts.services import audit
from tether.commands import states
from tether.errors import Conflict
from tether.fleet import credentials
from tether.fleet.models import Agent, Server
from tether.fleet.services import heartbeat_is_fresh

from .models import Deployment

S = Deployment.Status
K = Deployment.Kind
M = Deployment.Method
FINAL = frozenset({S.SUCCEEDED, S.FAILED, S.CANCELLED})
TRUNCATION_MARK = "\n[log truncated: TETHER_MAX_DEPLOYMENT_LOG_BYTES reached]\n"


def deployment_key(deployment_id: int) -> str:
    return f"deployment:{deployment_id}"


def create_deployment(
    *,
    server: Server,
    agent: Agent | None,
    kind: str,
    method: str,
    user: AbstractBaseUser | None,
    target_version: str = "",
    server_url: str = "",
    deadline: datetime | None = None,
) -> Deployment:
    with transaction.atomic():
        deployment = Deployment.objects.create(
            server=server,
            agent=agent,
            kind=kind,
            method=method,
            target_version=target_version,
            created_by=user,
            server_url=server_url,
            deadline=deadline,
        )
        audit(user=user, action=f"deployment.{kind}", target=deployment, method=method)
    return deployment


def _append(deployment: Deployment, text: str) -> None:
    """Append `text` as whole lines, up to the log cap; past it, one mark and nothing more."""
    if deployment.log_truncated or not text:
        return
    if not text.endswith("\n"):
        text += "\n"
    room = settings.MAX_DEPLOYMENT_LOG_BYTES - len(deployment.log.encode())
    if len(text.encode()) > room:
        text = text.encode()[: max(0, room)].decode(errors="ignore") + TRUNCATION_MARK
        deployment.log_truncated = True
    deployment.log += text
    if deployment.status == S.QUEUED:
        deployment.status = S.RUNNING
        deployment.started_at = timezone.now()


def append_log(*, deployment_id: int, text: str, agent: Agent | None = None) -> Deployment:
    """Append to a deployment's log. With `agent`, only that agent's deployment is found
    (Deployment.DoesNotExist otherwise). A finished deployment's log is closed."""
    with transaction.atomic():
        scope = Deployment.objects.select_for_update()
        if agent is not None:
            scope = scope.filter(agent=agent)
        deployment = scope.get(pk=deployment_id)
        if deployment.status not in FINAL:
            _append(deployment, text)
            deployment.save()
            wakeups.notify_on_commit(deployment_key(deployment.pk))
    return deployment


def finish_deployment(*, deployment: Deployment, status: str, line: str = "") -> Deployment:
    """End a deployment (no-op once it is final), with a last line for the log."""
    with transaction.atomic():
        deployment = Deployment.objects.select_for_update().get(pk=deployment.pk)
        if deployment.status in FINAL:
            return deployment
        _append(deployment, line)
        deployment.status = status
        deployment.finished_at = timezone.now()
        deployment.save()
        _settle_agent_status(deployment)
        wakeups.notify_on_commit(deployment_key(deployment.pk))
    return deployment


def end_deployment(
    *, deployment: Deployment, status: str, line: str, user: AbstractBaseUser | None = None
) -> Deployment:
    """End a deployment and cancel the internal commands still carrying it out, so that an
    agent does not go on to stop or swap itself for a deployment that is over."""
    from tether.commands.models import Command
    from tether.commands.services import cancel_command

    with transaction.atomic():
        done = finish_deployment(deployment=deployment, status=status, line=line)
        for command in Command.objects.filter(deployment=done).exclude(status__in=states.FINAL):
            cancel_command(command=command, user=user)
    return done


def cancel_deployment(*, deployment: Deployment, user: AbstractBaseUser | None) -> Deployment:
    """An operator's cancel; a finished deployment answers 409."""
    if deployment.status in FINAL:
        raise Conflict(f"deployment is already {deployment.status}", code="already_final")
    with transaction.atomic():
        audit(user=user, action="deployment.cancel", target=deployment)
        who: Any = getattr(user, "username", None) or "the server"
        return end_deployment(
            deployment=deployment, status=S.CANCELLED, line=f"cancelled by {who}", user=user
        )


# ---------------------------------------------------------------------------------------------
# Lifecycle requests: upgrade, stop, start, install
# ---------------------------------------------------------------------------------------------

ACTIVE = (S.QUEUED, S.RUNNING)
VERSION_LINE = re.compile(rb"""^__version__\s*=\s*["']([^"']+)["']""", re.MULTILINE)


def agent_version() -> str:
    """The version of the agent file this server hands out (its `__version__` line)."""
    try:
        found = VERSION_LINE.search((settings.AGENT_DIR / "main.py").read_bytes())
    except OSError:
        return ""
    return found.group(1).decode() if found else ""


def public_url(deployment: Deployment | None = None) -> str:
    """Where an agent reaches this server: TETHER_PUBLIC_URL, else the URL the deployment was
    requested on."""
    return settings.PUBLIC_URL or (deployment.server_url.rstrip("/") if deployment else "")


def new_enrollment_token(deployment: Deployment) -> str:
    """A registration token for the agent this deployment starts; only its hash is kept and it
    stops working when the deployment ends."""
    token = credentials.new_server_token()
    Deployment.objects.filter(pk=deployment.pk).update(
        enroll_token_hash=credentials.hash_token(token)
    )
    return token


def deployment_for_enrollment_token(token: str) -> Deployment | None:
    """The active SSH deployment whose registration token this is (none once it ended)."""
    active = Deployment.objects.filter(
        enroll_token_hash=credentials.hash_token(token), status__in=ACTIVE
    ).select_related("server")
    return active.first()


def record_enrolled_agent(deployment: Deployment, agent: Agent) -> None:
    """An install learns which agent it brought up: the one that registered with its token.
    Left unrecorded if that agent is busy with another deployment (the database allows one)."""
    if deployment.agent_id is not None:
        return
    try:
        with transaction.atomic():
            Deployment.objects.filter(pk=deployment.pk, agent=None).update(agent=agent)
    except IntegrityError:
        pass


def agent_is_online(agent: Agent) -> bool:
    return agent.status in (Agent.Status.ONLINE, Agent.Status.UPGRADING) and heartbeat_is_fresh(
        agent
    )


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


def ssh_run_started(deployment: Deployment) -> None:
    """A worker took up the SSH run: from now on the playbook and the wait for the agent have
    their time, and a backstop past it fails a run whose worker died."""
    budget = settings.DEPLOY_SSH_TIMEOUT + settings.DEPLOY_ONLINE_DEADLINE + 60
    deadline = timezone.now() + timedelta(seconds=budget)
    Deployment.objects.filter(pk=deployment.pk).update(deadline=deadline)
    deployment.deadline = deadline


def _longest_running(agent: Agent) -> float:
    """Seconds until the agent's active commands must have ended: an agent upgrades only once
    they have, so its deadline starts after them."""
    from tether.commands.models import Command

    timeouts = (
        Command.objects.filter(agent=agent)
        .exclude(status__in=states.FINAL)
        .values_list("timeout", flat=True)
    )
    return float(max(timeouts, default=0))


def request_deployment(
    *, kind: str, server: Server, agent: Agent | None, user: Any, server_url: str
) -> Deployment:
    """Start an install, upgrade, stop or start (one transaction): supersede what is active,
    choose the method (through the agent when it is online and can, over SSH otherwise), and
    hand the work to the agent (an internal command) or to a background worker (SSH)."""
    try:
        return _request_deployment(kind, server, agent, user, server_url)
    except IntegrityError as exc:
        # Only when two requests for one agent raced past each other (PostgreSQL, no row
        # lock held yet): the database kept one; this one says so.
        raise Conflict(
            "another deployment of this agent started at the same moment", code="busy"
        ) from exc


def _request_deployment(
    kind: str, server: Server, agent: Agent | None, user: Any, server_url: str
) -> Deployment:
    from tether.commands.services import queue_command

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
        )
        if method == M.AGENT:
            verb = "upgrade to " + deployment.target_version if kind == K.UPGRADE else kind
            append_log(deployment_id=deployment.pk, text=f"asking the agent to {verb}")
            queue_command(
                agent=agent,
                command=kind,
                kind="internal",
                timeout=int(budget),
                deployment=deployment,
            )
        else:
            transaction.on_commit(lambda: _enqueue_ssh(deployment.pk))
        if kind == K.UPGRADE and agent is not None:
            Agent.objects.filter(pk=agent.pk).update(status=Agent.Status.UPGRADING)
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
    from .tasks import run_ssh_deployment_task

    run_ssh_deployment_task.enqueue(deployment_id)


def internal_command_finished(command: Any) -> None:
    """An internal command carrying out a deployment ended (inside its transaction). Stop is
    done when the agent acknowledges it; an upgrade when the agent is back at the new version
    (see agent_reported_version); any failure of the command fails the deployment."""
    from tether.commands.models import Command
    from tether.commands.output import output_text

    deployment = Deployment.objects.select_for_update().get(pk=command.deployment_id)
    if deployment.status in FINAL:
        return
    if command.status != Command.Status.SUCCEEDED:
        reason = command.error or output_text(command, "stderr")[-2000:] or command.status
        finish_deployment(deployment=deployment, status=S.FAILED, line=f"failed: {reason.strip()}")
        return
    if deployment.kind == K.STOP:
        Agent.objects.filter(pk=command.agent_id).update(status=Agent.Status.STOPPED)
        finish_deployment(deployment=deployment, status=S.SUCCEEDED, line="agent stopped")
    elif deployment.kind == K.UPGRADE and command.agent.version == deployment.target_version:
        finish_deployment(
            deployment=deployment,
            status=S.SUCCEEDED,
            line=f"agent already at version {deployment.target_version}",
        )
    elif deployment.kind == K.UPGRADE:
        # From the swap on, the new agent has the full online deadline to come back. It rolls
        # back after half of it (confirm_within), so its report of that still finds the
        # deployment open.
        append_log(
            deployment_id=deployment.pk,
            text=f"agent swapped in {deployment.target_version}; waiting for it to come back",
        )
        deadline = timezone.now() + timedelta(seconds=settings.DEPLOY_ONLINE_DEADLINE)
        Deployment.objects.filter(pk=deployment.pk).update(deadline=deadline)


def agent_reported_version(agent: Agent, version: str) -> None:
    """An agent came back with a new version: an upgrade waiting for it has succeeded."""
    waiting = Deployment.objects.filter(
        agent=agent, kind=K.UPGRADE, method=M.AGENT, status__in=ACTIVE, target_version=version
    )
    for deployment in waiting:
        finish_deployment(
            deployment=deployment,
            status=S.SUCCEEDED,
            line=f"agent online at version {version}",
        )


def _settle_agent_status(deployment: Deployment) -> None:
    """After an upgrade ends (whichever way, by whichever method), an agent shown as
    upgrading is online or offline again."""
    if deployment.agent_id is None or deployment.kind != K.UPGRADE:
        return
    agent = Agent.objects.get(pk=deployment.agent_id)
    if agent.status == Agent.Status.UPGRADING:
        status = Agent.Status.ONLINE if heartbeat_is_fresh(agent) else Agent.Status.OFFLINE
        Agent.objects.filter(pk=agent.pk, status=Agent.Status.UPGRADING).update(status=status)


def expire_deployments() -> int:
    """Deployments past their deadline fail: an agent that never came back, a worker that
    died mid-run. Their internal commands are cancelled."""
    overdue = Deployment.objects.filter(status__in=ACTIVE, deadline__lt=timezone.now())
    count = 0
    for deployment in overdue:
        waited_for = "the agent"
        if deployment.target_version:
            waited_for += f" at version {deployment.target_version}"
        done = end_deployment(
            deployment=deployment,
            status=S.FAILED,
            line=f"failed: no result within the deadline (waited for {waited_for})",
        )
        count += done.status == S.FAILED
    return count
