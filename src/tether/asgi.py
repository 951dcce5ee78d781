"""The ASGI application: Django, with thin routes in front of it for the agent API.

The long-poll (every idle agent, all the time) is answered by tether.commands.poll straight
from the ASGI scope: no Django request, no URL resolution, no DRF.

Agent endpoints are the hot path (every poll, every output chunk, every result), and they
use none of the human-facing middleware (sessions, CSRF, messages, clickjacking): under
ASGI each of those costs two thread hops per request, about 3 ms in all on this stack. So
agent views are called directly, resolved by Django's own URLconf, on the small database
thread pool (tether.db). Everything else goes through the full stack.

Request bodies are bounded here, before Django reads them: an agent endpoint's view declares
its `max_body` (results, whose older dialect carries the whole output, take more), every
other path MAX_REQUEST_BYTES.
"""

import asyncio
import contextvars
import logging
import os
from typing import Any

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tether.settings")

import django  # noqa: E402

django.setup(set_prefix=False)

from django.conf import settings  # noqa: E402
from django.core.handlers.asgi import ASGIHandler  # noqa: E402
from django.http import HttpRequest, HttpResponse  # noqa: E402
from django.urls import Resolver404, get_resolver, set_urlconf  # noqa: E402

from tether import metrics, wakeups  # noqa: E402
from tether.commands import poll  # noqa: E402
from tether.db import run_db  # noqa: E402
from tether.errors import json_error, server_error  # noqa: E402

log = logging.getLogger("tether.agent_api")
AGENT_PREFIX = "/api/agents/"


def agent_endpoint_match(path: str) -> Any:
    """The URL match of an agent endpoint (a view marked `agent_endpoint`), else None."""
    if not path.startswith(AGENT_PREFIX):
        return None
    set_urlconf(settings.ROOT_URLCONF)
    try:
        match = get_resolver().resolve(path)
    except Resolver404:
        return None
    return match if getattr(_view(match), "agent_endpoint", False) else None


def _view(match: Any) -> Any:
    return getattr(match.func, "view_class", match.func)


def body_limit(match: Any) -> int:
    """What the agent endpoint's view declares (`max_body`), else MAX_REQUEST_BYTES."""
    if match is None:
        return settings.MAX_REQUEST_BYTES
    return getattr(_view(match), "max_body", settings.MAX_REQUEST_BYTES)


def _call_sync_view(func: Any, request: HttpRequest, args: Any, kwargs: Any) -> HttpResponse:
    response = func(request, *args, **kwargs)
    if callable(getattr(response, "render", None)):
        response = response.render()
    return response


def _too_large(limit: int) -> HttpResponse:
    return json_error("too_large", f"request body is larger than {limit} bytes", 413, limit=limit)


class TetherASGIHandler(ASGIHandler):
    # Per request (each ASGI call runs in a task of its own, so a context of its own): the
    # agent endpoint it resolved to (None for the rest), and whether its body ran past the
    # limit.
    agent_match: contextvars.ContextVar[Any] = contextvars.ContextVar("agent_match", default=None)
    too_large: contextvars.ContextVar[bool] = contextvars.ContextVar("too_large", default=False)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        """Agent requests skip Django's per-request ThreadSensitiveContext: it gives every
        request a thread of its own for sync work, so each held long-poll would hold an idle
        thread. Their database work runs on the pool in tether.db instead."""
        if scope["type"] == "http" and scope["path"] in poll.PATHS:
            # The hottest path of all: no Django request, no URL resolution (tether.commands.poll).
            await poll.serve(scope, receive, send)
            return
        match = agent_endpoint_match(scope.get("path", "")) if scope["type"] == "http" else None
        self.agent_match.set(match)
        self.too_large.set(False)
        if match is not None:
            await self.handle(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)

    async def handle(self, scope: dict, receive: Any, send: Any) -> None:
        """Refuse an absurd declared length before reading any of the body: Django's ASGI
        handler would otherwise spool it whole, to memory and then to disk."""
        ceiling = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        length = dict(scope.get("headers") or []).get(b"content-length", b"0")
        if length.isdigit() and int(length) > ceiling:
            response = _too_large(ceiling)
            response["Connection"] = "close"
            await self.send_response(response, send)
            return
        await super().handle(scope, receive, send)

    async def read_body(self, receive: Any) -> Any:
        """Keep at most the path's limit of a body. Past it the rest is read and dropped (so
        the client gets its 413 rather than a broken pipe), and past the ceiling no longer
        read at all."""
        limit = body_limit(self.agent_match.get())
        ceiling = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        seen = 0

        async def bounded_receive() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen <= limit:
                return message
            self.too_large.set(True)
            more = message.get("more_body", False) and seen <= ceiling
            return {"type": message["type"], "body": b"", "more_body": more}

        return await super().read_body(bounded_receive)

    async def get_response_async(self, request: HttpRequest) -> HttpResponse:
        match = self.agent_match.get()
        if self.too_large.get():
            return _too_large(body_limit(match))
        if match is not None:
            response = await self._agent_response(request, match)
            response._resource_closers.append(request.close)
            # Agent endpoints skip the middleware that counts the others (tether.monitoring).
            metrics.observe_request(match.route, request.method, response.status_code)
            return response
        return await super().get_response_async(request)

    async def _agent_response(self, request: HttpRequest, match: Any) -> HttpResponse:
        try:
            if asyncio.iscoroutinefunction(match.func):
                return await match.func(request, *match.args, **match.kwargs)
            return await run_db(_call_sync_view, match.func, request, match.args, match.kwargs)
        except asyncio.CancelledError:
            raise
        except Exception:
            # Views answer their own errors; this is a bug: log it, show nothing of it.
            log.exception("agent endpoint failed: %s %s", request.method, request.path)
            return server_error(request)


application = TetherASGIHandler()
# Other server processes' notifications (PostgreSQL; nothing to do on SQLite).
wakeups.start_listener()
