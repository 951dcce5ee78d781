"""`GET /api/commands/{id}/stream/`: a command's output as Server-Sent Events.

Events: `output` ({stream, offset, data}) as chunks arrive, `status` when the state changes,
then `end` with the final command (status, exit code) and the stream closes.
"""

import codecs
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from rest_framework import exceptions
from rest_framework.authentication import SessionAuthentication, TokenAuthentication
from rest_framework.request import Request

from tether import wakeups
from tether.accounts.selectors import commands_visible_to
from tether.db import run_db
from tether.errors import json_error

from .. import states
from ..models import Command, OutputChunk

KEEPALIVE_SECONDS = 15


def authenticated_user(request: HttpRequest) -> Any:
    """The human behind a request (API token or session), as DRF would decide it."""
    drf_request = Request(request, authenticators=[TokenAuthentication(), SessionAuthentication()])
    user = drf_request.user
    if not user or not user.is_authenticated:
        raise exceptions.NotAuthenticated()
    return user


def _visible_command_id(request: HttpRequest, command_id: int) -> int:
    user = authenticated_user(request)
    if not commands_visible_to(user).filter(pk=command_id).exists():
        raise exceptions.NotFound()
    return command_id


@dataclass
class Snapshot:
    command: Command
    chunks: list[tuple[str, int, bytes]] = field(default_factory=list)


def _snapshot(command_id: int, offsets: dict[str, int]) -> Snapshot:
    # Status first, then chunks: when the status is final, every chunk is already committed.
    command = Command.objects.get(pk=command_id)
    snapshot = Snapshot(command=command)
    for stream, after in offsets.items():
        rows = (
            OutputChunk.objects.filter(command_id=command_id, stream=stream, offset__gte=after)
            .order_by("offset")
            .values_list("offset", "data")
        )
        snapshot.chunks.extend((stream, offset, bytes(data)) for offset, data in rows)
    return snapshot


def _event(name: str, data: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"


async def _events(command_id: int) -> AsyncIterator[str]:
    offsets = {"stdout": 0, "stderr": 0}
    decoders = {s: codecs.getincrementaldecoder("utf-8")("replace") for s in offsets}
    last_status = None
    last_sent = time.monotonic()
    with wakeups.subscribe(wakeups.command_key(command_id)) as waiter:
        while True:
            snap = await run_db(_snapshot, command_id, offsets)
            for stream, offset, data in snap.chunks:
                offsets[stream] = offset + len(data)
                text = decoders[stream].decode(data)
                if text:
                    yield _event("output", {"stream": stream, "offset": offset, "data": text})
                    last_sent = time.monotonic()
            command = snap.command
            if command.status != last_status:
                last_status = command.status
                yield _event("status", {"status": command.status})
                last_sent = time.monotonic()
            if states.is_final(command.status):
                for stream, decoder in decoders.items():
                    tail = decoder.decode(b"", final=True)
                    if tail:
                        yield _event("output", {"stream": stream, "offset": -1, "data": tail})
                yield _event(
                    "end",
                    {
                        "id": command.pk,
                        "status": command.status,
                        "exit_code": command.exit_code,
                        "truncated": command.truncated,
                        "error": command.error,
                    },
                )
                return
            await waiter.wait(settings.POLL_RECHECK)
            if time.monotonic() - last_sent > KEEPALIVE_SECONDS:
                yield ": keepalive\n\n"
                last_sent = time.monotonic()


async def command_stream(request: HttpRequest, command_id: int) -> HttpResponse:
    if request.method != "GET":
        return json_error("method_not_allowed", f"Method {request.method} not allowed.", 405)
    try:
        await run_db(_visible_command_id, request, command_id)
    except exceptions.NotAuthenticated:
        return json_error("not_authenticated", "Authentication credentials were not provided.", 401)
    except exceptions.AuthenticationFailed as exc:
        return json_error("authentication_failed", str(exc.detail), 401)
    except exceptions.NotFound:
        return json_error("not_found", "Not found.", 404)
    response = StreamingHttpResponse(_events(command_id), content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"
    return response
