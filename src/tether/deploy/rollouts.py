"""Rolling upgrades: many agents upgraded in waves (docs/runs.md, "Rolling upgrade").

Each target is an ordinary upgrade deployment (through the agent when it is online, over SSH
when it is not), requested as lifecycle.request_deployment requests any other. A wave of
`batch_size` agents starts when the one before it has ended; once more than `max_errors`
upgrades have failed, no further wave starts and the agents left are reported as not started.
The first wave is the canary: with `max_errors: 0`, one failure there stops the rollout.
"""

from typing import Any

from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.db.models import Count
from django.utils import timezone

from tether.accounts.services import audit
from tether.errors import Conflict, TetherError
from tether.fleet.agent_files import agent_version
from tether.fleet.models import Agent

from . import lifecycle
from .models import Deployment, Rollout
from .services import ACTIVE, FINAL, cancel_deployment, create_deployment, finish_deployment

D = Deployment.Status


def start_rollout(
    *,
    user: AbstractBaseUser,
    agents: list[Agent],
    batch_size: int,
    max_errors: int = 0,
    server_url: str = "",
) -> Rollout:
    """Record the rollout and start its first wave (one transaction)."""
    with transaction.atomic():
        rollout = Rollout.objects.create(
            created_by=user,
            batch_size=batch_size,
            max_errors=max_errors,
            target_version=agent_version(),
            pending=[agent.pk for agent in agents],
            server_url=server_url,
        )
        audit(user=user, action="rollout.start", target=rollout, agents=len(agents))
        _advance(rollout)
    return rollout


def advance_rollout(*, deployment: Deployment) -> None:
    """Connected to deploy's deployment_finished: when a wave has ended, start the next one,
    or stop the rollout."""
    if deployment.rollout_id is None:
        return
    with transaction.atomic():
        rollout = Rollout.objects.select_for_update().filter(pk=deployment.rollout_id).first()
        if rollout is not None and rollout.status == Rollout.Status.RUNNING:
            _advance(rollout)


def advance_open_rollouts() -> int:
    """The sweep's safety net for a rollout whose wave's end was missed (a crash between the
    deployment's commit and its hook)."""
    count = 0
    for rollout_id in Rollout.objects.filter(status=Rollout.Status.RUNNING).values_list(
        "pk", flat=True
    ):
        with transaction.atomic():
            rollout = Rollout.objects.select_for_update().get(pk=rollout_id)
            if rollout.status == Rollout.Status.RUNNING:
                _advance(rollout)
                count += 1
    return count


def _advance(rollout: Rollout) -> None:
    deployments = Deployment.objects.filter(rollout=rollout)
    if deployments.filter(status__in=ACTIVE).exists():
        return  # the wave is still going
    failed = deployments.filter(status__in=[D.FAILED, D.CANCELLED]).count()
    if failed > rollout.max_errors:
        rollout.not_started, rollout.pending = rollout.pending, []
        rollout.reason = (
            f"wave {rollout.wave}: {failed} upgrade(s) failed, more than max_errors "
            f"({rollout.max_errors}); {len(rollout.not_started)} agent(s) not upgraded"
        )
        _finish(rollout, Rollout.Status.FAILED)
        return
    if not rollout.pending:
        _finish(rollout, Rollout.Status.FAILED if failed else Rollout.Status.SUCCEEDED)
        return
    wave, rollout.pending = (
        rollout.pending[: rollout.batch_size],
        rollout.pending[rollout.batch_size :],
    )
    rollout.wave += 1
    rollout.save(update_fields=["pending", "wave"])
    for agent in Agent.objects.filter(pk__in=wave).select_related("server").order_by("hostname"):
        _upgrade(rollout, agent)
    if not deployments.filter(status__in=ACTIVE).exists():
        _advance(rollout)  # every request of the wave was refused: judge it now


def _upgrade(rollout: Rollout, agent: Agent) -> None:
    try:
        busy = Deployment.objects.filter(agent=agent, status__in=ACTIVE).first()
        if busy is not None:
            # A rollout never supersedes an operator's own stop, start or upgrade.
            raise Conflict(
                f"another deployment of {agent.hostname} is running (#{busy.pk})", code="busy"
            )
        lifecycle.request_deployment(
            kind=Deployment.Kind.UPGRADE,
            server=agent.server,
            agent=agent,
            user=rollout.created_by,
            server_url=rollout.server_url,
            rollout=rollout,
        )
    except TetherError as exc:
        # Refused (no SSH key for an offline agent, another deployment of it running): a
        # failed upgrade of this wave. Recorded without its agent until it is final, so the
        # one-active-deployment-per-agent rule cannot refuse the record of the refusal.
        refused = create_deployment(
            server=agent.server,
            agent=None,
            kind=Deployment.Kind.UPGRADE,
            method=Deployment.Method.SSH,
            user=rollout.created_by,
            target_version=rollout.target_version,
            rollout=rollout,
        )
        finish_deployment(deployment=refused, status=D.FAILED, line=f"refused: {exc.detail}")
        Deployment.objects.filter(pk=refused.pk).update(agent=agent)


def _finish(rollout: Rollout, status: str) -> None:
    rollout.status = status
    rollout.finished_at = timezone.now()
    rollout.save()


def cancel_rollout(*, rollout: Rollout, user: AbstractBaseUser | None) -> Rollout:
    """Stop: no further wave starts and the wave's upgrades still going are cancelled."""
    with transaction.atomic():
        rollout = Rollout.objects.select_for_update().get(pk=rollout.pk)
        if rollout.status != Rollout.Status.RUNNING:
            raise Conflict(f"rollout is already {rollout.status}", code="already_final")
        who = getattr(user, "username", None) or "the server"
        rollout.not_started, rollout.pending = rollout.pending, []
        rollout.reason = f"cancelled by {who}"
        _finish(rollout, Rollout.Status.CANCELLED)
        audit(user=user, action="rollout.cancel", target=rollout)
        for deployment in Deployment.objects.filter(rollout=rollout, status__in=ACTIVE):
            cancel_deployment(deployment=deployment, user=user)
    return rollout


def rollout_counts(rollout: Rollout) -> dict[str, Any]:
    """Targets by state, from one query: deployments by status, plus those not started."""
    rows = dict(
        Deployment.objects.filter(rollout=rollout)
        .values_list("status")
        .annotate(n=Count("id"))
        .values_list("status", "n")
    )
    counts = {status: rows.get(status, 0) for status in D.values}
    counts["pending"] = len(rollout.pending)
    counts["not_started"] = len(rollout.not_started)
    counts["total"] = sum(rows.values()) + counts["pending"] + counts["not_started"]
    counts["done"] = sum(rows.get(status, 0) for status in FINAL)
    return counts
