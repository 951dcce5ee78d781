"""Command lifecycle: queue, hand out, record progress and results, cancel, mark lost.

Each function is one transaction; agents and humans reach them through their own views.
"""

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import connection, transaction
from django.db.models import F, Q, QuerySet, Window
from django.db.models.functions import RowNumber
from django.utils import timezone
from rest_framework import exceptions

from tether import metrics, wakeups
from tether.accounts.services import audit
from tether.errors import Conflict
from tether.fleet import credentials
from tether.fleet.models import Agent
from tether.fleet.services import offline_cutoff

from . import command_templates, holding, hooks, output, runs, states
from .models import Command, CommandTemplate, expiry_from
from .reports import Result

S = Command.Status


def queue_command(
    *,
    agent: Agent,
    command: str,
    args: list[str] | None = None,
    timeout: int | None = None,
    user: AbstractBaseUser | None = None,
    kind: str = Command.Kind.SHELL,
    deployment: Any = None,
    payload_encrypted: str = "",
    expires_in: int | None = None,
) -> Command:
    """Queue a command; the agent's long-poll wakes as soon as the row is committed. `kind`
    internal is the server's own work for the agent (an upgrade, a certificate), which
    `payload_encrypted` may carry and `deployment` may own."""
    with transaction.atomic():
        queued = Command.objects.create(
            agent=agent,
            kind=kind,
            command=command,
            args=args,
            timeout=timeout or settings.COMMAND_TIMEOUT_DEFAULT,
            created_by=user,
            deployment=deployment,
            payload_encrypted=payload_encrypted,
            expires_at=expiry_from(timezone.now(), expires_in),
        )
        audit(user=user, action="command.send", target=queued, agent=agent.pk)
        wakeups.notify_on_commit(wakeups.agent_key(agent.pk))
    return queued


def send_command(
    *,
    agent: Agent,
    user: AbstractBaseUser,
    command: str | None = None,
    args: list[str] | None = None,
    template: CommandTemplate | None = None,
    params: dict[str, Any] | None = None,
    timeout: int | None = None,
    expires_in: int | None = None,
) -> Command:
    """An operator's command for one agent: a line, an argv, or a template with its values
    (each shell-quoted by the template). The API and the web UI both come here; values that
    do not fit the template are a 400 (`params`) and queue nothing."""
    if template is not None:
        command, args = render_template(template, params), None
        timeout = timeout or template.timeout
    if command is None:
        raise exceptions.ValidationError("Give either a command or a template.")
    return queue_command(
        agent=agent,
        command=command,
        args=args,
        timeout=timeout,
        user=user,
        expires_in=expires_in,
    )


def render_template(template: CommandTemplate, params: dict[str, Any] | None) -> str:
    """The template's command line with `params` shell-quoted into it; values that do not
    fit the template are a 400 (`params`)."""
    try:
        return command_templates.render(template.command, template.parameters, params or {})
    except command_templates.TemplateError as exc:
        raise exceptions.ValidationError({"params": [str(exc)]}) from exc


@dataclass
class Delivery:
    """What one poll hands an agent: commands to run and ids it must cancel."""

    commands: list[Command]
    cancel: list[int]


CANCEL_RESEND = timedelta(seconds=5)
# Every status `_due` or `_cancel_due` can match, said outright: SQLite then reads the
# (status, agent) index instead of scanning every command ever run.
OPEN = sorted({S.QUEUED, *states.ACTIVE})
# Commands one poll hands out at most.
CLAIM_LIMIT = 20


def _report_deadline(start: datetime, timeout: int) -> datetime:
    return start + timedelta(seconds=timeout + settings.COMMAND_LEASE + settings.LOST_GRACE)


def _due(now: datetime) -> Q:
    """Commands to hand out: queued, or delivered with their lease run out; not cancelled."""
    return (Q(status=S.QUEUED) | Q(status=S.DELIVERED, lease_expires_at__lt=now)) & Q(
        cancel_requested=False
    )


def _cancel_due(now: datetime) -> Q:
    """Cancels the agent must be told of: never sent, or not lately."""
    return Q(cancel_requested=True, status__in=states.ACTIVE) & (
        Q(cancel_sent_at__isnull=True) | Q(cancel_sent_at__lt=now - CANCEL_RESEND)
    )


def agents_with_work() -> set[int]:
    """Every agent with something to hand out or a cancel to send: one query for all held
    long-polls (the poll hub's safety net for what no notification announces, such as a
    lease running out)."""
    now = timezone.now()
    return set(
        Command.objects.filter(_due(now) | _cancel_due(now), status__in=OPEN)
        .order_by()
        .values_list("agent_id", flat=True)
        .distinct()
    )


def claim_commands(*, agent: Agent, limit: int = CLAIM_LIMIT) -> Delivery:
    """Hand out queued commands (and delivered ones whose lease ran out) to the agent, and
    the cancels it has not been told of lately. A command with a cancel pending is never
    handed out again: the agent is told to cancel it instead."""
    return claim_for_agents([agent.pk], limit=limit)[agent.pk]


def claim_for_agents(agent_ids: list[int], *, limit: int = CLAIM_LIMIT) -> dict[int, Delivery]:
    """`claim_commands` for many agents at once, in a fixed number of queries: the long-poll
    hub claims for every poll woken together (a run's release wakes hundreds) in one trip."""
    now = timezone.now()
    due, cancel_due = _due(now), _cancel_due(now)
    held = holding.held_by(agent_ids)
    if held is not None:  # listed by the agent's poll as waiting in its local queue
        due &= ~held
    deliveries = {agent_id: Delivery(commands=[], cancel=[]) for agent_id in agent_ids}
    # Most polls find nothing: answer those with one read, without taking the write lock. The
    # same read says what there is: work (a row without a cancel), cancels to send, or both.
    found = set(
        Command.objects.filter(due | cancel_due, agent_id__in=agent_ids, status__in=OPEN)
        .order_by()
        .values_list("agent_id", "cancel_requested")
        .distinct()
    )
    if not found:
        return deliveries
    with_work = sorted({agent_id for agent_id, cancel in found if not cancel})
    with_cancel = sorted({agent_id for agent_id, cancel in found if cancel})
    with transaction.atomic():
        if with_work:
            _hand_out(deliveries, with_work, due, now, limit)
        if with_cancel:
            cancel = list(
                Command.objects.filter(cancel_due, agent_id__in=with_cancel).values_list(
                    "id", "agent_id"
                )
            )
            if cancel:
                Command.objects.filter(id__in=[pk for pk, _ in cancel]).update(cancel_sent_at=now)
            for pk, agent_id in cancel:
                deliveries[agent_id].cancel.append(pk)
    return deliveries


def _hand_out(
    deliveries: dict[int, Delivery], agent_ids: list[int], due: Q, now: datetime, limit: int
) -> None:
    """The oldest `limit` due commands of each agent, marked delivered with a lease."""
    rank = Window(RowNumber(), partition_by=F("agent_id"), order_by=[F("created_at"), F("id")])
    commands = list(
        Command.objects.filter(due, agent_id__in=agent_ids)
        .annotate(rank=rank)
        .filter(rank__lte=limit)
        .order_by("agent_id", "created_at", "id")
    )
    if not commands:
        return
    ids = [command.pk for command in commands]
    lease_expires_at = now + timedelta(seconds=settings.COMMAND_LEASE)
    # `due` again in the UPDATE: a row cancelled or finished since the read above is left
    # alone (PostgreSQL re-checks the condition under the row lock), so two processes never
    # hand out one command.
    taken = Command.objects.filter(due, id__in=ids).update(
        status=S.DELIVERED,
        delivered_at=now,
        lease_expires_at=lease_expires_at,
        delivery_count=F("delivery_count") + 1,
    )
    if taken == len(commands):
        for command in commands:
            command.status, command.delivered_at = S.DELIVERED, now
            command.lease_expires_at = lease_expires_at
            command.delivery_count += 1
    else:  # some changed since the read (another transaction): keep what this took
        commands = list(
            Command.objects.filter(id__in=ids, status=S.DELIVERED, delivered_at=now).order_by(
                "agent_id", "created_at", "id"
            )
        )
    for command in commands:
        deliveries[command.agent_id].commands.append(command)


def as_delivered(command: Command) -> dict[str, Any]:
    """A command as the agent receives it."""
    delivered = {
        "id": command.pk,
        "kind": command.kind,
        "command": command.command,
        "args": command.args,
        "timeout": command.timeout,
        "created_at": command.created_at.isoformat(),
    }
    if command.payload_encrypted:
        try:
            delivered["payload"] = json.loads(credentials.decrypt(command.payload_encrypted))
        except ValueError:  # SECRET_KEY changed: the agent reports it failed, polls go on
            delivered["payload"] = None
    if command.deployment_id is not None:
        delivered["deployment_id"] = command.deployment_id
        # How long an upgraded agent has to reach the server before it rolls back: half the
        # server's wait, so that the rollback is reported while the deployment is open.
        delivered["confirm_within"] = settings.DEPLOY_ONLINE_DEADLINE / 2
    return delivered


def _agent_time(value: float | None) -> datetime | None:
    """An agent-reported Unix time, if it is plausible (within a day of ours)."""
    if value is None:
        return None
    try:
        moment = datetime.fromtimestamp(float(value), tz=UTC)
    except (TypeError, ValueError, OverflowError, OSError):
        return None
    return moment if abs((moment - timezone.now()).total_seconds()) < 86400 else None


def _locked_command(*, agent: Agent, command_id: int, with_run: bool = False) -> Command:
    """The agent's command, row-locked. `with_run`: its run first (a result or a cancel may
    move the run on), so that every path locks a run before its commands and two of them
    never wait on each other (cancel_run takes the run, then updates the commands). SQLite
    has no row locks (its writers take turns): nothing to order there, two queries saved."""
    if with_run and connection.features.has_select_for_update:
        run_id = (
            Command.objects.filter(pk=command_id, agent=agent)
            .values_list("run_id", flat=True)
            .first()
        )
        if run_id is not None:
            runs.lock_run(run_id)
    return Command.objects.select_for_update().get(pk=command_id, agent=agent)


def _mark_running(command: Command, started_at: float | None) -> None:
    if command.status in (S.QUEUED, S.DELIVERED):
        command.status = S.RUNNING
        # The agent's clock may be off (it signs with ours, not stamps): a command starts
        # after it was handed out and before we hear of it, so its report deadline is ours.
        now = timezone.now()
        earliest = min(command.delivered_at or command.created_at, now)
        command.started_at = min(max(_agent_time(started_at) or now, earliest), now)
        command.report_deadline = _report_deadline(command.started_at, command.timeout)


def record_progress(
    *,
    agent: Agent,
    command_id: int,
    chunks: list[output.Chunk],
    started_at: float | None = None,
) -> dict[str, Any]:
    """Store a progress call; the first one acknowledges the command (-> running).
    Raises Command.DoesNotExist for an id that is not this agent's."""
    with transaction.atomic():
        command = _locked_command(agent=agent, command_id=command_id)
        if states.takes_agent_reports(command.status):
            before = output.ends(command)
            skipped = output.apply_chunks(command, chunks)
            _count_received(command, before, skipped)
            _mark_running(command, started_at)
            command.save()
            wakeups.notify_on_commit(*_watchers(command))
    return {"offsets": output.ends(command), "cancel": command.cancel_requested}


def _count_received(command: Command, before: dict[str, int], skipped: dict[str, int]) -> None:
    """Count the output bytes this report added (tether_output_bytes_total), once committed:
    a resent chunk adds none, and neither does the older dialect's final result, which
    carries again the output that progress already stored, nor a hole the agent declared."""
    for stream, end in output.ends(command).items():
        received = end - before[stream] - skipped[stream]
        if received > 0:
            counter = metrics.OUTPUT_BYTES.labels(stream=stream)
            transaction.on_commit(partial(counter.inc, received))


def _watchers(command: Command) -> list[str]:
    """The wake-up keys of everyone following this command: its stream, and its run's."""
    keys = [wakeups.command_key(command.pk)]
    if command.run_id is not None:
        keys.append(runs.run_key(command.run_id))
    return keys


def record_result(*, agent: Agent, command_id: int, result: Result) -> None:
    """Store the final result (see reports.Result for the older dialect's forms). Idempotent:
    a result for a finished command changes nothing. `result.sizes` lets the agent prove
    every byte arrived (a shortfall answers offset_gap, nothing is stored). The apps above
    hear of it (command_finished) in the same transaction."""
    with transaction.atomic():
        command = _locked_command(agent=agent, command_id=command_id, with_run=True)
        if not states.takes_agent_reports(command.status) or command.status == result.status:
            return
        chunks = result.chunks
        before = output.ends(command)
        if result.replace_output:
            output.discard_output(command)
        if result.error_as_stderr and command.stderr_end == 0:
            error_chunk = output.Chunk(stream="stderr", data=result.error.encode(), offset=None)
            chunks = [*chunks, error_chunk]
        skipped = output.apply_chunks(command, chunks)
        for stream, size in result.sizes.items():
            if getattr(command, f"{stream}_end") < size:
                raise output.gap(command, stream)
        _count_received(command, before, skipped)
        command.truncated = command.truncated or result.truncated
        _mark_running(command, result.started_at)
        _finish(command, result.status, exit_code=result.exit_code, error=result.error)
        command.save()
        wakeups.notify_on_commit(*_watchers(command))
        hooks.command_finished.send(command=command)
        if command.run_id is not None:
            runs.advance_run(command.run_id)


def _finish(
    command: Command, status: str, *, exit_code: int | None = None, error: str = ""
) -> None:
    if not states.can_transition(command.status, status):
        raise Conflict(f"cannot move a {command.status} command to {status}", code="bad_state")
    command.status = status
    command.exit_code = exit_code
    command.error = error[:4096]
    command.finished_at = timezone.now()
    command.lease_expires_at = None


def cancel_command(*, command: Command, user: AbstractBaseUser | None) -> Command:
    """Cancel at once if queued; otherwise ask the agent, whose long-poll wakes for it."""
    with transaction.atomic():
        command = _locked_command(agent=command.agent, command_id=command.pk, with_run=True)
        if states.is_final(command.status):
            raise Conflict(f"command is already {command.status}", code="already_final")
        if command.status in (S.HELD, S.QUEUED):
            _finish(command, S.CANCELLED, error="cancelled before delivery")
        else:
            command.cancel_requested = True
        command.save()
        audit(user=user, action="command.cancel", target=command)
        wakeups.notify_on_commit(wakeups.agent_key(command.agent_id), *_watchers(command))
        if command.run_id is not None:
            runs.advance_run(command.run_id)
    return command


def mark_lost_commands() -> int:
    """Commands that will never report are lost: running ones whose agent has been offline
    for longer than the grace period, and any whose report deadline (start + timeout + lease
    + grace) has passed. A late report from the agent still wins (see states.ALLOWED). A
    command delivered but never started is not lost: its lease runs out and it is delivered
    again when the agent is back (DESIGN §3), or it expires (expire_queued_commands)."""
    now = timezone.now()
    cutoff = offline_cutoff(now) - timedelta(seconds=settings.LOST_GRACE)
    away = (Q(agent__last_heartbeat__lt=cutoff) | Q(agent__last_heartbeat__isnull=True)) & ~Q(
        agent__status__in=[Agent.Status.ONLINE, Agent.Status.PENDING]
    )
    overdue = Q(report_deadline__lt=now)
    lost = Command.objects.filter((away & Q(status=S.RUNNING)) | overdue, status__in=states.ACTIVE)
    ids = list(lost.values_list("id", flat=True))
    if not ids:
        return 0
    affected_runs = runs.runs_of(Command.objects.filter(id__in=ids))
    # The same conditions again in the UPDATE: a command that reported since is left alone.
    count = _mark_lost(
        lost.filter(id__in=ids),
        "the agent stopped reporting on the command (offline, or past its timeout)",
    )
    wakeups.notify_on_commit(*[wakeups.command_key(command_id) for command_id in ids])
    runs.advance_runs(affected_runs)
    return count


# Commands one sweep expires at most: a backlog (a run's `wait` for thousands of agents that
# never came back) drains over a few sweeps instead of holding the writer for one long UPDATE.
EXPIRE_BATCH = 1000


def past_expiry(now: datetime) -> QuerySet[Command]:
    """Commands waiting past their expiry: queued ones, and delivered ones whose
    lease ran out while their agent is away (it never started them and has not come back). Read from
    the (status, expires_at) index, so the sweep touches only them however many commands
    have ever run."""
    # A delivery its agent lost while the agent is still around is delivered again instead.
    gone = ~Q(agent__status__in=[Agent.Status.ONLINE, Agent.Status.PENDING, Agent.Status.UPGRADING])
    waiting = Q(status=S.QUEUED) | (Q(status=S.DELIVERED, lease_expires_at__lt=now) & gone)
    # No order: a sweep takes any EXPIRE_BATCH of them (a sort would read them all first).
    return Command.objects.filter(
        waiting, status__in=[S.QUEUED, S.DELIVERED], expires_at__lt=now
    ).order_by()


def expire_queued_commands() -> int:
    """Waiting commands past their `expires_at` end `expired`: their agent never came for
    them, or never started them (TETHER_COMMAND_EXPIRE). One indexed read and one UPDATE by
    id per sweep; their streams end and their runs move on, as for a lost command. A
    delivered command expires only once its lease ran out (an agent holding it renews the
    lease while it polls)."""
    now = timezone.now()
    due = past_expiry(now)
    rows = list(due.values_list("id", "run_id")[:EXPIRE_BATCH])
    if not rows:
        return 0
    ids = [pk for pk, _ in rows]
    # `due` again in the UPDATE: one handed out since the read is left alone.
    count = due.filter(id__in=ids).update(
        status=S.EXPIRED,
        finished_at=now,
        error="expired: the agent did not take or start the command in time",
    )
    wakeups.notify_on_commit(*[wakeups.command_key(pk) for pk in ids])
    runs.advance_runs({run_id for _, run_id in rows if run_id is not None})
    return count


def _mark_lost(commands: Any, reason: str) -> int:
    return commands.update(
        status=S.LOST, finished_at=timezone.now(), error=reason, lease_expires_at=None
    )


def mark_commands_lost_on_reregister(*, agent: Agent, replaced: bool = True) -> int:
    """An install that takes an agent's identity over (its state dir was lost, or it replaced
    a dead one) will not report what the old one was running. A report that comes later
    still wins. (Connected to fleet's agent_registered; a first registration, and the same
    install registering again with its journal intact, have nothing to lose.)"""
    if not replaced:
        return 0
    active = Command.objects.filter(agent=agent, status__in=states.ACTIVE)
    ids = list(active.values_list("id", flat=True))
    affected_runs = runs.runs_of(active)
    count = _mark_lost(active, "the agent registered again while the command was active")
    wakeups.notify_on_commit(*[wakeups.command_key(command_id) for command_id in ids])
    runs.advance_runs(affected_runs)
    return count


def save_template(*, template: CommandTemplate, user: AbstractBaseUser) -> CommandTemplate:
    """Create or change a command template, with its audit record (the API and the web UI
    both come here)."""
    created = template.pk is None
    with transaction.atomic():
        template.save()
        action = "template.create" if created else "template.update"
        audit(user=user, action=action, target=template, name=template.name)
    return template


def delete_template(*, template: CommandTemplate, user: AbstractBaseUser) -> None:
    """Delete a command template, with its audit record."""
    with transaction.atomic():
        audit(user=user, action="template.delete", target=template, name=template.name)
        template.delete()
