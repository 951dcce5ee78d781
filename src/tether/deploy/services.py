"""Deployments: create, append to the log, finish, cancel; the enrollment token of an SSH
install; what an agent's own reports mean for its deployment. One transaction each.

Requests to install, upgrade, stop or start are `lifecycle.py`; the SSH run is `ssh.py`."""

from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import IntegrityError, transaction
from django.utils import timezone

from tether import wakeups
from tether.accounts.services import audit
from tether.commands import states
from tether.commands.models import Command
from tether.commands.output import output_text
from tether.commands.services import cancel_command
from tether.errors import Conflict
from tether.fleet import credentials
from tether.fleet.models import Agent, Server
from tether.fleet.services import Enrollment, heartbeat_is_fresh, set_agent_status

from . import hooks
from .models import Deployment

S = Deployment.Status
K = Deployment.Kind
M = Deployment.Method
FINAL = frozenset({S.SUCCEEDED, S.FAILED, S.CANCELLED})
ACTIVE = (S.QUEUED, S.RUNNING)
TRUNCATION_MARK = "\n[log truncated: TETHER_MAX_DEPLOYMENT_LOG_BYTES reached]\n"


def deployment_key(deployment_id: int) -> str:
    """The wake-up key of a deployment's live log."""
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
    rollout: Any = None,
) -> Deployment:
    """Record a deployment and its audit line; the caller hands the work to the agent or to a
    worker."""
    with transaction.atomic():
        deployment = Deployment.objects.create(
            rollout=rollout,
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
        if deployment.rollout_id is not None:
            ended = deployment
            transaction.on_commit(lambda: hooks.deployment_finished.send(deployment=ended))
    return deployment


def end_deployment(
    *, deployment: Deployment, status: str, line: str, user: AbstractBaseUser | None = None
) -> Deployment:
    """End a deployment and cancel the internal commands still carrying it out, so that an
    agent does not go on to stop or swap itself for a deployment that is over."""
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
# Enrollment: the one-time registration token an SSH install hands its agent
# ---------------------------------------------------------------------------------------------


def public_url(deployment: Deployment | None = None) -> str:
    """Where an agent reaches this server: the URL recorded when the deployment was requested
    (the serving process's PUBLIC_URL; a separate `tether worker` may not know it), else
    PUBLIC_URL."""
    return (deployment.server_url.rstrip("/") if deployment else "") or settings.PUBLIC_URL


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


def enrollment_for_token(*, token: str) -> Enrollment | None:
    """Connected to fleet's enrollment_for_token: an install's token registers its agent on
    the install's server, and the install learns which agent it brought up."""
    deployment = deployment_for_enrollment_token(token)
    if deployment is None:
        return None
    return Enrollment(
        server=deployment.server, registered=lambda agent: record_enrolled_agent(deployment, agent)
    )


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


# ---------------------------------------------------------------------------------------------
# What the agent's own reports mean for its deployment
# ---------------------------------------------------------------------------------------------


def ssh_run_started(deployment: Deployment) -> None:
    """A worker took up the SSH run: from now on the playbook and the wait for the agent have
    their time, and a backstop past it fails a run whose worker died."""
    budget = settings.DEPLOY_SSH_TIMEOUT + settings.DEPLOY_ONLINE_DEADLINE + 60
    deadline = timezone.now() + timedelta(seconds=budget)
    Deployment.objects.filter(pk=deployment.pk).update(deadline=deadline)
    deployment.deadline = deadline


def agent_stopped(deployment: Deployment) -> Deployment:
    """A stop is done once the agent has stopped, whichever way it was asked (its own
    acknowledgement, or the SSH run): the agent shows `stopped` and the deployment succeeds."""
    with transaction.atomic():
        if deployment.agent_id is not None:
            set_agent_status(deployment.agent_id, Agent.Status.STOPPED)
        return finish_deployment(deployment=deployment, status=S.SUCCEEDED, line="agent stopped")


def internal_command_finished(*, command: Command) -> None:
    """Connected to commands' command_finished: an internal command carrying out a deployment
    ended (inside its transaction). Stop is done when the agent acknowledges it; an upgrade
    when the agent is back at the new version (see agent_reported_version); any failure of
    the command fails the deployment."""
    if command.deployment_id is None:
        return
    deployment = Deployment.objects.select_for_update().get(pk=command.deployment_id)
    if deployment.status in FINAL:
        return
    if command.status != Command.Status.SUCCEEDED:
        reason = command.error or output_text(command, "stderr")[-2000:] or command.status
        finish_deployment(deployment=deployment, status=S.FAILED, line=f"failed: {reason.strip()}")
        return
    if deployment.kind == K.STOP:
        agent_stopped(deployment)
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


def agent_changed(*, agent: Agent, changed: set[str]) -> None:
    """Connected to fleet's agent_changed: a new version may be what an upgrade waits for."""
    if "version" in changed:
        agent_reported_version(agent, agent.version)


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
        set_agent_status(agent.pk, status, only_from=Agent.Status.UPGRADING)


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
