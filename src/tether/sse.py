"""Server-Sent Events plumbing shared by the live streams (commands, deployments): who is
asking, the event format, and the answer for a stream the caller may not open."""

import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from django.conf import settings
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from rest_framework import exceptions
from rest_framework.request import Request
from rest_framework.settings import api_settings

from tether.db import run_db
from tether.errors import json_error

KEEPALIVE_SECONDS = 15
KEEPALIVE = ": keepalive\n\n"


class Pause:
    """The wait between two reads of a stream, shared by every stream: until a wake-up or
    POLL_RECHECK, then a keepalive comment if nothing was sent for KEEPALIVE_SECONDS, so that
    proxies do not close a quiet stream."""

    def __init__(self) -> None:
        self.last_sent = time.monotonic()

    def sent(self) -> None:
        self.last_sent = time.monotonic()

    async def wait(self, waiter: Any) -> str | None:
        """Wait on `waiter` (a tether.wakeups.Waiter); the keepalive to send, if it is time."""
        await waiter.wait(settings.POLL_RECHECK)
        if time.monotonic() - self.last_sent > KEEPALIVE_SECONDS:
            self.sent()
            return KEEPALIVE
        return None


def authenticated_user(request: HttpRequest) -> Any:
    """The human behind a request (API token or session), as DRF would decide it."""
    authenticators = [auth() for auth in api_settings.DEFAULT_AUTHENTICATION_CLASSES]
    drf_request = Request(request, authenticators=authenticators)
    user = drf_request.user
    if not user or not user.is_authenticated:
        raise exceptions.NotAuthenticated()
    return user


def event(name: str, data: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"


def _check_visible(request: HttpRequest, visible: Callable[[Any], QuerySet], pk: int) -> None:
    if not visible(authenticated_user(request)).filter(pk=pk).exists():
        raise exceptions.NotFound()


async def open_stream(
    request: HttpRequest,
    visible: Callable[[Any], QuerySet],
    pk: int,
    events: Callable[[int], AsyncIterator[str]],
) -> HttpResponse:
    """Answer with `events(pk)` as an SSE stream if the caller may see object `pk` of
    `visible(user)`; otherwise the JSON error a REST call would get (401, 404, 405)."""
    if request.method != "GET":
        return json_error("method_not_allowed", f"Method {request.method} not allowed.", 405)
    try:
        await run_db(_check_visible, request, visible, pk)
    except exceptions.NotAuthenticated:
        return json_error("not_authenticated", "Authentication credentials were not provided.", 401)
    except exceptions.AuthenticationFailed as exc:
        return json_error("authentication_failed", str(exc.detail), 401)
    except exceptions.NotFound:
        return json_error("not_found", "Not found.", 404)
    response = StreamingHttpResponse(events(pk), content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"
    return response
