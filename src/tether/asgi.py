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
import contextlib
import contextvars
import functools
import logging
import os
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tether.settings")

import django  # noqa: E402

django.setup(set_prefix=False)

from asgiref.sync import ThreadSensitiveContext, iscoroutinefunction, sync_to_async  # noqa: E402
from django.conf import settings  # noqa: E402
from django.core.handlers.asgi import ASGIHandler  # noqa: E402
from django.core.handlers.base import BaseHandler  # noqa: E402
from django.http import HttpRequest, HttpResponse  # noqa: E402
from django.urls import Resolver404, get_resolver, set_urlconf  # noqa: E402

from tether import metrics, wakeups  # noqa: E402
from tether.commands import poll  # noqa: E402
from tether.db import run_db  # noqa: E402
from tether.errors import json_error, server_error  # noqa: E402

log = logging.getLogger("tether.agent_api")
AGENT_PREFIX = "/api/agents/"


# A command's progress and result paths hold its id, so each is new to a path cache; resolved
# through the URLconf they cost a tenth of the server's CPU in a fan-out. They are matched here
# by one regex, then resolved once per shape (`command` or `commands`, progress or result):
# the view and the route are the URLconf's own (tests/test_agent_routes.py holds them equal).
_COMMAND_REPORT = re.compile(r"^/api/agents/(commands?)/([0-9]{1,18})/(progress|result)/$")


def agent_endpoint_match(path: str) -> Any:
    """The URL match of an agent endpoint (a view marked `agent_endpoint`), else None."""
    if not path.startswith(AGENT_PREFIX):
        return None
    report = _COMMAND_REPORT.match(path)
    if report is not None:
        prefix, command_id, kind = report.groups()
        shape = _resolve_agent_path(f"{AGENT_PREFIX}{prefix}/1/{kind}/")
        if shape is not None:
            return SimpleNamespace(
                func=shape.func, args=(), kwargs={"command_id": int(command_id)}, route=shape.route
            )
    return _resolve_agent_path(path)


@functools.lru_cache(maxsize=1024)
def _resolve_agent_path(path: str) -> Any:
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
    """The rest of the body is never read: the connection closes after the answer (the server
    drops what still arrives for a while, so that the client reads this; tether.httpserver)."""
    response = json_error(
        "too_large", f"request body is larger than {limit} bytes", 413, limit=limit
    )
    response["Connection"] = "close"
    return response


class _Threads:
    """A few single-thread executors for the human side's sync work (views, middleware),
    each keeping its database connection between requests; a request takes the least busy.
    A request's sync calls all run on its thread, as Django expects; requests sharing a
    thread take turns (a view's transaction never spans two of its calls)."""

    def __init__(self, count: int) -> None:
        self.executors = [
            ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"tether-http-{i}")
            for i in range(max(1, count))
        ]
        self.busy = [0] * len(self.executors)

    @contextlib.contextmanager
    def lease(self) -> Iterator[ThreadPoolExecutor]:
        index = self.busy.index(min(self.busy))
        self.busy[index] += 1
        try:
            yield self.executors[index]
        finally:
            self.busy[index] -= 1


_human_threads = _Threads(settings.HTTP_THREADS)


@functools.lru_cache(maxsize=4096)
def _serves_async(path: str) -> bool:
    """Whether the path's view is async (the live streams): those keep Django's async chain,
    so that a stream holds a coroutine, not a thread."""
    set_urlconf(settings.ROOT_URLCONF)
    try:
        func = get_resolver().resolve(path).func
    except Resolver404:
        return False
    view_class = getattr(func, "view_class", None)
    if view_class is not None:
        return bool(getattr(view_class, "view_is_async", False))
    return asyncio.iscoroutinefunction(func) or iscoroutinefunction(func)


class TetherASGIHandler(ASGIHandler):
    # Per request (each ASGI call runs in a task of its own, so a context of its own): the
    # agent endpoint it resolved to (None for the rest), and whether its body ran past the
    # limit.
    agent_match: contextvars.ContextVar[Any] = contextvars.ContextVar("agent_match", default=None)
    too_large: contextvars.ContextVar[bool] = contextvars.ContextVar("too_large", default=False)

    def __init__(self) -> None:
        super().__init__()
        self.sync_handler = BaseHandler()
        self.sync_handler.load_middleware(is_async=False)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        """Agent requests skip Django's per-request ThreadSensitiveContext: their database
        work runs on the pool in tether.db, so a held long-poll holds no thread. The others
        run their sync work on one of a few long-lived threads (`_human_threads`) instead of
        a new thread per request, which would open a new database connection each time."""
        if scope["type"] == "http" and scope["path"] in poll.PATHS:
            # The hottest path of all: no Django request, no URL resolution (tether.commands.poll).
            await poll.serve(scope, receive, send)
            return
        if scope["type"] != "http":
            raise ValueError(f"Tether serves HTTP only, not {scope['type']}")
        match = agent_endpoint_match(scope.get("path", ""))
        self.agent_match.set(match)
        self.too_large.set(False)
        if match is not None:
            await self.handle(scope, receive, send)
            return
        with _human_threads.lease() as executor:
            async with ThreadSensitiveContext(executor=executor):
                await self.handle(scope, receive, send)

    async def handle(self, scope: dict, receive: Any, send: Any) -> None:
        """Refuse a declared length above the path's limit before reading any of the body:
        Django's ASGI handler would otherwise spool it whole, to memory and then to disk."""
        limit = body_limit(self.agent_match.get())
        length = dict(scope.get("headers") or []).get(b"content-length", b"0")
        if length.isdigit() and int(length) > limit:
            await self.send_response(_too_large(limit), send)
            return
        await super().handle(scope, receive, send)

    async def read_body(self, receive: Any) -> Any:
        """Keep at most the path's limit of a body (a chunked one declares no length): past
        it, stop reading and answer 413."""
        limit = body_limit(self.agent_match.get())
        seen = 0

        async def bounded_receive() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen <= limit:
                return message
            self.too_large.set(True)
            return {"type": message["type"], "body": b"", "more_body": False}

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
        if _serves_async(request.path_info):
            return await super().get_response_async(request)
        # A sync view: the whole middleware chain and the view in one trip to the request's
        # thread. Django's async chain would hop to it and back for every middleware, twice.
        return await sync_to_async(self.sync_handler.get_response, thread_sensitive=True)(request)

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
