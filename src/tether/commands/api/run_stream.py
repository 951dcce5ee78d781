"""`GET /api/runs/{id}/stream/`: a run's targets' output, status changes and counts as
Server-Sent Events (docs/runs.md), then `end`."""

import codecs
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from django.db.models import Q
from django.http import HttpRequest, HttpResponse
from django.views.decorators.csrf import csrf_exempt

from tether import wakeups
from tether.db import run_db
from tether.sse import Pause, event, open_stream

from .. import runs, states
from ..models import Command, OutputChunk, Run
from ..output import dropped_marker
from ..selectors import runs_visible_to


@dataclass
class RunSnapshot:
    run: Run
    counts: dict[str, int]
    # command, agent, hostname, status, exit code, stdout end, stderr end
    targets: list[tuple[int, int, str, str, int | None, int, int]]
    chunks: list[tuple[int, int, str, int, bytes]] = field(default_factory=list)


def _snapshot(run_id: int, seen: dict[int, tuple[int, int, int]]) -> RunSnapshot:
    """The run, its targets and the output stored since `seen` ({command: (stdout read to,
    stderr read to, last chunk id)}). Chunks are asked for by command and offset, not by a
    run-wide chunk id: on PostgreSQL rows may commit out of id order, and a cursor on ids
    would skip one for good. Only targets whose streams grew are asked about."""
    # Targets first, then chunks: a target seen final has every chunk committed.
    run = Run.objects.get(pk=run_id)
    targets = list(
        Command.objects.filter(run_id=run_id)
        .order_by("agent__hostname", "id")
        .values_list(
            "id", "agent_id", "agent__hostname", "status", "exit_code", "stdout_end", "stderr_end"
        )
    )
    grown = Q()
    for command_id, *_, stdout_end, stderr_end in targets:
        before = seen.get(command_id, (0, 0, 0))
        if (stdout_end, stderr_end) != before[:2]:
            # Each stream from where it was read up to; a chunk stored again whole (the older
            # dialect's final output) is found by its newer id.
            unread = Q(stream="stdout", offset__gte=before[0])
            unread |= Q(stream="stderr", offset__gte=before[1])
            grown |= Q(command_id=command_id) & (unread | Q(id__gt=before[2]))
    chunks = []
    if grown:
        chunks = list(
            OutputChunk.objects.filter(grown)
            .order_by("command_id", "stream", "offset", "id")
            .values_list("id", "command_id", "stream", "offset", "data")
        )
    return RunSnapshot(run=run, counts=runs.run_counts(run), targets=targets, chunks=chunks)


async def run_events(run_id: int) -> AsyncIterator[str]:
    """`output`, `status`, `counts`, then `end` (docs/runs.md). Each byte of each target's
    output is sent once and in order: what was already sent of a chunk is skipped."""
    seen: dict[int, tuple[int, int, int]] = {}
    sent: dict[tuple[int, str], int] = {}
    decoders: dict[tuple[int, str], Any] = {}
    statuses: dict[int, str] = {}
    flushed: set[int] = set()
    last_counts: dict[str, int] | None = None
    pause = Pause()
    with wakeups.subscribe(runs.run_key(run_id)) as waiter:
        while True:
            snap = await run_db(_snapshot, run_id, seen)
            hosts = {target[0]: (target[1], target[2]) for target in snap.targets}
            last_ids: dict[int, int] = {}
            for chunk_id, command_id, stream, offset, data in snap.chunks:
                last_ids[command_id] = max(last_ids.get(command_id, 0), chunk_id)
                key = (command_id, stream)
                already = sent.get(key, 0)
                decoder = decoders.setdefault(key, codecs.getincrementaldecoder("utf-8")("replace"))
                agent, host = hosts.get(command_id, (None, ""))
                if offset > already:
                    # Chunks of a command commit in offset order, so a hole is not bytes
                    # still to come: they were dropped past the output cap before this
                    # client read them. The marker stands for them (docs/runs.md).
                    dropped = offset - already
                    yield event(
                        "output",
                        {
                            "command": command_id,
                            "agent": agent,
                            "hostname": host,
                            "stream": stream,
                            "offset": already,
                            "data": decoder.decode(b"", final=True) + dropped_marker(dropped),
                            "dropped": dropped,
                        },
                    )
                    already = offset
                data = bytes(data)[already - offset :]
                if not data:
                    continue
                sent[key] = already + len(data)
                text = decoder.decode(data)
                if text:
                    yield event(
                        "output",
                        {
                            "command": command_id,
                            "agent": agent,
                            "hostname": host,
                            "stream": stream,
                            "offset": already,
                            "data": text,
                        },
                    )
                    pause.sent()
            for command_id, *_, stdout_end, stderr_end in snap.targets:
                old = seen.get(command_id, (0, 0, 0))
                if (stdout_end, stderr_end) != old[:2]:
                    done_out = sent.get((command_id, "stdout"), 0)
                    done_err = sent.get((command_id, "stderr"), 0)
                    last_id = max(old[2], last_ids.get(command_id, 0))
                    seen[command_id] = (done_out, done_err, last_id)
            for command_id, agent, host, state, exit_code, *_, out_end, err_end in snap.targets:
                if states.is_final(state) and command_id not in flushed:
                    # Every chunk of a final target has been read: what a decoder still
                    # holds (a character cut by the output cap) is sent as the single-command
                    # stream sends it, at offset -1; bytes the agent lost at a stream's end
                    # (a full disk) get their marker.
                    flushed.add(command_id)
                    for stream, end in (("stdout", out_end), ("stderr", err_end)):
                        decoder = decoders.pop((command_id, stream), None)
                        tail = decoder.decode(b"", final=True) if decoder else ""
                        target = {"command": command_id, "agent": agent, "hostname": host}
                        if tail:
                            yield event(
                                "output", {**target, "stream": stream, "offset": -1, "data": tail}
                            )
                        done = sent.get((command_id, stream), 0)
                        if end > done:
                            marker = {"stream": stream, "offset": done, "dropped": end - done}
                            yield event(
                                "output", {**target, **marker, "data": dropped_marker(end - done)}
                            )
                if statuses.get(command_id) != state:
                    statuses[command_id] = state
                    yield event(
                        "status",
                        {
                            "command": command_id,
                            "agent": agent,
                            "hostname": host,
                            "status": state,
                            "exit_code": exit_code,
                        },
                    )
                    pause.sent()
            if snap.counts != last_counts:
                last_counts = snap.counts
                yield event("counts", {"status": snap.run.status, "counts": snap.counts})
                pause.sent()
            if snap.run.status != Run.Status.RUNNING and all(
                states.is_final(state) for state in statuses.values()
            ):
                run = snap.run
                yield event(
                    "end",
                    {
                        "id": run.pk,
                        "status": run.status,
                        "reason": run.reason,
                        "counts": snap.counts,
                    },
                )
                return
            if keepalive := await pause.wait(waiter):
                yield keepalive


@csrf_exempt  # GET only (anything else is a JSON 405); nothing here reads a form
async def run_stream(request: HttpRequest, run_id: int) -> HttpResponse:
    return await open_stream(request, runs_visible_to, run_id, run_events)
