"""`GET /api/commands/{id}/stream/`: a command's output as Server-Sent Events.

Events: `output` ({stream, offset, data}) as chunks arrive, `status` when the state changes,
then `end` with the final command (status, exit code) and the stream closes. Where bytes of a
stream were dropped before this client read them (past the output cap), one `output` event
carries the dropped marker as its data, with `dropped` (the byte count) and the offset where
the hole starts.
"""

import codecs
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from django.http import HttpRequest, HttpResponse
from django.views.decorators.csrf import csrf_exempt

from tether import wakeups
from tether.db import run_db
from tether.sse import Pause, event, open_stream

from .. import states
from ..models import Command, OutputChunk
from ..output import dropped_marker
from ..selectors import commands_visible_to


@dataclass
class Snapshot:
    command: Command
    chunks: list[tuple[str, int, bytes]] = field(default_factory=list)


def _snapshot(command_id: int, offsets: dict[str, int]) -> Snapshot:
    # Status first, then chunks: when the status is final, every chunk is already committed.
    command = Command.objects.get(pk=command_id)
    snapshot = Snapshot(command=command)
    for stream, after in offsets.items():
        if getattr(command, f"{stream}_end") <= after:
            continue  # nothing new on this stream (stored with the row, in its transaction)
        rows = (
            OutputChunk.objects.filter(command_id=command_id, stream=stream, offset__gte=after)
            .order_by("offset")
            .values_list("offset", "data")
        )
        snapshot.chunks.extend((stream, offset, bytes(data)) for offset, data in rows)
    return snapshot


async def _events(command_id: int) -> AsyncIterator[str]:
    offsets = {"stdout": 0, "stderr": 0}
    decoders = {s: codecs.getincrementaldecoder("utf-8")("replace") for s in offsets}
    last_status = None
    pause = Pause()
    with wakeups.subscribe(wakeups.command_key(command_id)) as waiter:
        while True:
            snap = await run_db(_snapshot, command_id, offsets)
            for stream, offset, data in snap.chunks:
                if offset > offsets[stream]:
                    # Dropped before this client read it: the cut character (if any), then
                    # the marker; the tail is decoded afresh.
                    dropped = offset - offsets[stream]
                    text = decoders[stream].decode(b"", final=True) + dropped_marker(dropped)
                    yield event(
                        "output",
                        {
                            "stream": stream,
                            "offset": offsets[stream],
                            "data": text,
                            "dropped": dropped,
                        },
                    )
                offsets[stream] = offset + len(data)
                text = decoders[stream].decode(data)
                if text:
                    yield event("output", {"stream": stream, "offset": offset, "data": text})
                    pause.sent()
            command = snap.command
            if command.status != last_status:
                last_status = command.status
                yield event("status", {"status": command.status})
                pause.sent()
            if states.is_final(command.status):
                for stream, decoder in decoders.items():
                    tail = decoder.decode(b"", final=True)
                    if tail:
                        yield event("output", {"stream": stream, "offset": -1, "data": tail})
                    missing = getattr(command, f"{stream}_end") - offsets[stream]
                    if missing > 0:  # the agent lost the stream's last bytes (a full disk)
                        marker = {"stream": stream, "offset": offsets[stream], "dropped": missing}
                        yield event("output", {**marker, "data": dropped_marker(missing)})
                yield event(
                    "end",
                    {
                        "id": command.pk,
                        "status": command.status,
                        "exit_code": command.exit_code,
                        "truncated": command.truncated,
                        "stdout_dropped": command.stdout_dropped,
                        "stderr_dropped": command.stderr_dropped,
                        "error": command.error,
                    },
                )
                return
            if keepalive := await pause.wait(waiter):
                yield keepalive


@csrf_exempt  # GET only (anything else is a JSON 405); nothing here reads a form
async def command_stream(request: HttpRequest, command_id: int) -> HttpResponse:
    return await open_stream(request, commands_visible_to, command_id, _events)
