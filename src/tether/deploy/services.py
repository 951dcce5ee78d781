"""Deployment lifecycle: create, append to the log, finish, cancel. One transaction each."""

from typing import Any

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.utils import timezone

from tether import wakeups
from tether.accounts.services import audit
from tether.errors import Conflict
from tether.fleet.models import Agent, Server

from .models import Deployment

S = Deployment.Status
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
) -> Deployment:
    with transaction.atomic():
        deployment = Deployment.objects.create(
            server=server,
            agent=agent,
            kind=kind,
            method=method,
            target_version=target_version,
            created_by=user,
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
        wakeups.notify_on_commit(deployment_key(deployment.pk))
    return deployment


def cancel_deployment(*, deployment: Deployment, user: AbstractBaseUser | None) -> Deployment:
    if deployment.status in FINAL:
        raise Conflict(f"deployment is already {deployment.status}", code="already_final")
    with transaction.atomic():
        audit(user=user, action="deployment.cancel", target=deployment)
        who: Any = getattr(user, "username", None) or "the server"
        return finish_deployment(
            deployment=deployment, status=S.CANCELLED, line=f"cancelled by {who}"
        )
