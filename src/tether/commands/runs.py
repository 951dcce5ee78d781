"""Runs: one command to many agents (docs/runs.md).

A run's targets are ordinary commands, created together in one transaction: `held` until the
concurrency window lets them into the queue, `skipped` at once when their agent is offline and
the run says so. Whenever a target ends (a result, a cancel, the sweep calling it lost),
`advance_run` looks at the run again under its row lock: past `max_errors` the targets not
yet started are cancelled, free places in the window are filled, and once every target is
final the run ends. Only the agents whose commands were released are woken.
"""

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

from django.contrib.auth.models import AbstractBaseUser
from django.db import IntegrityError, transaction
from django.db.models import Count
from django.utils import timezone

from tether import wakeups
from tether.accounts.services import audit
from tether.errors import Conflict
from tether.fleet.models import Agent
from tether.fleet.services import agent_is_online, online_q

from . import states
from .models import Command, CommandTemplate, Run, expiry_from
from .selectors import counts_by_state

S = Command.Status
NOT_STARTED = (S.HELD, S.QUEUED)


def run_key(run_id: int) -> str:
    """The wake-up key of a run's live stream."""
    return f"run:{run_id}"


@dataclass(frozen=True)
class RunRequest:
    """What an operator asked for, as validated by the API (targets already resolved)."""

    agents: list[Agent]
    command: str
    args: list[str] | None
    timeout: int
    max_concurrency: int | str | None = None
    max_errors: int | str | None = None
    offline: str = Run.Offline.SKIP
    template: CommandTemplate | None = None
    expires_in: int | None = None


def fingerprint(body: Any) -> str:
    """What tells a replay (same key, same request) from a reused key."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def resolve_limit(value: int | str | None, total: int, *, at_least: int) -> int | None:
    """A count, or a percentage of `total` ("20%"); concurrency rounds up, errors down."""
    if value is None:
        return None
    if isinstance(value, str):
        percent = int(value.rstrip("%"))
        share = total * percent / 100
        return max(at_least, math.ceil(share) if at_least else math.floor(share))
    return value


def create_run(
    *,
    user: AbstractBaseUser,
    request: RunRequest,
    idempotency_key: str = "",
    request_hash: str = "",
) -> tuple[Run, bool]:
    """Create the run and all its targets in one transaction, release the first window and
    wake exactly those agents. The caller has looked for a replay of `idempotency_key`
    (replayed_run); a request that races another with the same key past that look gets the
    run the database kept (False: not created)."""
    total = len(request.agents)
    try:
        with transaction.atomic():
            run = Run.objects.create(
                created_by=user,
                command=request.command,
                args=request.args,
                template=request.template,
                timeout=request.timeout,
                max_concurrency=resolve_limit(request.max_concurrency, total, at_least=1) or total,
                max_errors=resolve_limit(request.max_errors, total, at_least=0),
                offline=request.offline,
                expires_in=request.expires_in,
                targets_total=total,
                idempotency_key=idempotency_key,
                request_hash=request_hash,
            )
            now = timezone.now()
            skip = request.offline == Run.Offline.SKIP
            Command.objects.bulk_create(
                [
                    _target(run, agent, skipped=skip and not agent_is_online(agent), now=now)
                    for agent in request.agents
                ]
            )
            audit(user=user, action="run.create", target=run, targets=total, command=run.command)
            _advance(run)
    except IntegrityError:
        # Two requests with one key raced past the first look; the database kept one.
        earlier = replayed_run(user, idempotency_key, request_hash) if idempotency_key else None
        if earlier is None:
            raise
        return earlier, False
    return run, True


def replayed_run(user: AbstractBaseUser, key: str, request_hash: str) -> Run | None:
    """The run this user already created with `key` (a retry), else None; the same key for a
    different request is a 409. Asked before the targets are resolved, so a retry answers
    the run even when the fleet has changed since (a tag removed, an agent deleted)."""
    earlier = Run.objects.filter(created_by=user, idempotency_key=key).first()
    if earlier is not None and earlier.request_hash != request_hash:
        raise Conflict(
            "this Idempotency-Key was used for a different request", code="idempotency_key_reused"
        )
    return earlier


def _target(run: Run, agent: Agent, *, skipped: bool, now: Any) -> Command:
    command = Command(
        agent=agent,
        run=run,
        command=run.command,
        args=run.args,
        timeout=run.timeout,
        created_by=run.created_by,
        created_at=now,
        status=S.SKIPPED if skipped else S.HELD,
    )
    if skipped:
        command.finished_at = now
        command.error = "skipped: the agent was offline when the run started"
    return command


def lock_run(run_id: int) -> None:
    """Take the run's row lock (PostgreSQL; SQLite writers are serialised anyway)."""
    Run.objects.select_for_update().filter(pk=run_id).values_list("pk", flat=True).first()


def advance_run(run_id: int) -> None:
    """Look at a run again after one of its targets changed (in the caller's transaction)."""
    # No savepoint: nothing catches a failure here, so the caller's transaction fails whole.
    with transaction.atomic(savepoint=False):
        run = Run.objects.select_for_update().filter(pk=run_id).first()
        if run is not None and run.status == Run.Status.RUNNING:
            _advance(run)


def advance_runs(run_ids: set[int]) -> None:
    """advance_run for each run that had a target change (the sweep, bulk updates)."""
    for run_id in sorted(run_ids):
        advance_run(run_id)


def advance_open_runs() -> int:
    """The sweep's safety net: every running run is looked at once (one query to find them)."""
    open_ids = set(Run.objects.filter(status=Run.Status.RUNNING).values_list("pk", flat=True))
    advance_runs(open_ids)
    return len(open_ids)


def _advance(run: Run) -> None:
    # One grouped read answers every question below; it is read again only after a cancel
    # or a skip (a release moves targets from held to queued: none of them becomes final).
    by_status = _targets_by_status(run.pk)
    counts = _counts(by_status)
    errors = sum(counts[s] for s in states.ERRORS)
    if run.max_errors is not None and errors > run.max_errors and not run.reason:
        stopped = _cancel_not_started(run, "not started: the run's max_errors was exceeded")
        run.reason = (
            f"max_errors ({run.max_errors}) exceeded: {errors} targets failed; "
            f"{stopped} not started were cancelled"
        )
        run.save(update_fields=["reason"])
        by_status = _targets_by_status(run.pk)
    elif not run.cancel_requested and not run.reason and by_status.get(S.HELD):
        active = sum(by_status.get(s, 0) for s in (S.QUEUED, *states.ACTIVE))
        free = run.max_concurrency - active
        if free > 0 and _release(run, free):
            by_status = _targets_by_status(run.pk)  # some ended skipped
    if all(status in states.FINAL for status in by_status):
        _finish(run, _counts(by_status))
    wakeups.notify_on_commit(run_key(run.pk))


def _release(run: Run, places: int) -> int:
    """Fill the window: targets of online agents first. Under `offline: skip` a target whose
    agent went offline while it was held is skipped rather than released (it would hold a
    place, and the run, until the agent returns); under `wait` it goes last. Returns how
    many were skipped."""
    held = Command.objects.filter(run=run, status=S.HELD)
    skipped = 0
    if run.offline == Run.Offline.SKIP:
        skipped = _skip(held.exclude(online_q("agent__")))
    ready = held.filter(online_q("agent__")).order_by("id").values_list("id", "agent_id")
    released = list(ready[:places])
    if len(released) < places and run.offline == Run.Offline.WAIT:
        away = held.exclude(online_q("agent__")).order_by("id").values_list("id", "agent_id")
        released += list(away[: places - len(released)])
    if released:
        ids = [pk for pk, _ in released]
        # A target's time in the queue counts from its release, not from the run's start.
        Command.objects.filter(id__in=ids, status=S.HELD).update(
            status=S.QUEUED, expires_at=expiry_from(timezone.now(), run.expires_in)
        )
        wakeups.notify_on_commit(*{wakeups.agent_key(agent_id) for _, agent_id in released})
    return skipped


def _skip(targets: Any) -> int:
    return targets.update(
        status=S.SKIPPED,
        finished_at=timezone.now(),
        error="skipped: the agent was offline when the target's turn came",
    )


def skip_unreachable_targets() -> int:
    """The sweep: a released target of an `offline: skip` run whose agent has since gone
    offline is skipped, so the run neither waits for it nor keeps its place (a delivered or
    running one is the lost-command sweep's)."""
    stranded = Command.objects.filter(
        run__offline=Run.Offline.SKIP, run__status=Run.Status.RUNNING, status=S.QUEUED
    ).exclude(online_q("agent__"))
    affected = runs_of(stranded)
    if not affected:
        return 0
    count = _skip(stranded)
    advance_runs(affected)
    return count


def _cancel_not_started(run: Run, reason: str) -> int:
    """Cancel the targets no agent has started (held, or queued and not yet handed out); one
    handed out but not acknowledged yet is asked to cancel, as a running one would be."""
    waiting = Command.objects.filter(run=run, status__in=NOT_STARTED)
    handed_out = Command.objects.filter(run=run, status=S.DELIVERED, cancel_requested=False)
    agent_ids = set(waiting.values_list("agent_id", flat=True))
    agent_ids |= set(handed_out.values_list("agent_id", flat=True))
    handed_out.update(cancel_requested=True)
    count = waiting.update(
        status=S.CANCELLED, finished_at=timezone.now(), error=reason, lease_expires_at=None
    )
    # A queued target's agent may hold a poll: nothing to hand it now, but it re-reads.
    wakeups.notify_on_commit(*{wakeups.agent_key(agent_id) for agent_id in agent_ids})
    return count


def _finish(run: Run, counts: dict[str, int]) -> None:
    if run.cancel_requested:
        run.status = Run.Status.CANCELLED
    elif counts["succeeded"] == counts["total"] == run.targets_total:
        run.status = Run.Status.SUCCEEDED
    else:
        run.status = Run.Status.FAILED
        gone = run.targets_total - counts["total"]
        if gone > 0 and not run.reason:
            run.reason = f"{gone} target(s) were deleted with their agents before they ended"
    run.finished_at = timezone.now()
    run.save(update_fields=["status", "finished_at", "reason"])


def cancel_run(*, run: Run, user: AbstractBaseUser | None) -> Run:
    """An operator's cancel: targets not started end at once, running ones are killed by
    their agents (woken for it); the run ends `cancelled` once all are final. 409 if over."""
    with transaction.atomic():
        run = Run.objects.select_for_update().get(pk=run.pk)
        if run.status != Run.Status.RUNNING:
            raise Conflict(f"run is already {run.status}", code="already_final")
        who = getattr(user, "username", None) or "the server"
        run.cancel_requested = True
        run.reason = run.reason or f"cancelled by {who}"
        run.save(update_fields=["cancel_requested", "reason"])
        _cancel_not_started(run, f"cancelled by {who} before it started")
        started = Command.objects.filter(run=run, status__in=states.ACTIVE)
        agent_ids = set(started.values_list("agent_id", flat=True))
        started.update(cancel_requested=True)
        wakeups.notify_on_commit(*{wakeups.agent_key(agent_id) for agent_id in agent_ids})
        audit(user=user, action="run.cancel", target=run)
        _advance(run)
    return run


def run_counts(run: Run) -> dict[str, int]:
    """`total` and the targets by state (docs/runs.md), from one query."""
    return _counts(_targets_by_status(run.pk))


def _targets_by_status(run_id: int) -> dict[str, int]:
    """How many of the run's targets are in each command status."""
    return dict(
        Command.objects.filter(run_id=run_id)
        .values_list("status")
        .annotate(n=Count("id"))
        .values_list("status", "n")
    )


def _counts(by_status: dict[str, int]) -> dict[str, int]:
    return counts_by_state(by_status)


def runs_of(commands: Any) -> set[int]:
    """The runs that the given commands (a queryset) belong to."""
    return set(commands.exclude(run=None).values_list("run_id", flat=True).distinct())
