"""The ASGI application: Django, with a thin route in front of it for the agent API.

Agent endpoints are the hot path (every poll, every output chunk, every result), and they
use none of the human-facing middleware (sessions, CSRF, messages, clickjacking): under
ASGI each of those costs two thread hops per request, about 3 ms in all on this stack. So
agent views are called directly, resolved by Django's own URLconf, with one hop for a sync
view and none for the async long-poll. Everything else goes through the full stack.
"""

import asyncio
import contextvars
import json
import logging
import os
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.handlers.asgi import ASGIHandler
from django.http import HttpRequest, HttpResponse
from django.urls import Resolver404, get_resolver, set_urlconf

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tether.settings")

log = logging.getLogger("tether.agent_api")
AGENT_PREFIX = "/api/agents/"


def is_agent_endpoint(func: Any) -> bool:
    view = getattr(func, "view_class", func)
    return bool(getattr(view, "agent_endpoint", False))


def _call_sync_view(func: Any, request: HttpRequest, args: Any, kwargs: Any) -> HttpResponse:
    from tether.errors import server_error

    try:
        response = func(request, *args, **kwargs)
        if callable(getattr(response, "render", None)):
            response = response.render()
        return response
    except Exception:
        # DRF views answer their own errors; this is a bug: log it, show nothing of it.
        log.exception("agent endpoint failed: %s %s", request.method, request.path)
        return server_error(request)


class TetherASGIHandler(ASGIHandler):
    # Per request (each ASGI call runs in its own task, so its own context).
    too_large: contextvars.ContextVar[bool] = contextvars.ContextVar("too_large", default=False)

    async def handle(self, scope: dict, receive: Any, send: Any) -> None:
        """Refuse a body over the largest limit before reading any of it: Django's ASGI
        handler would otherwise spool it whole, to memory and then to disk."""
        length = dict(scope.get("headers") or []).get(b"content-length", b"0")
        if length.isdigit() and int(length) > settings.DATA_UPLOAD_MAX_MEMORY_SIZE:
            from tether.errors import PayloadTooLarge, error_body

            exc = PayloadTooLarge(settings.DATA_UPLOAD_MAX_MEMORY_SIZE)
            body = json.dumps(error_body(exc.error_code, str(exc.detail), **exc.extra)).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"connection", b"close")],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        await super().handle(scope, receive, send)

    async def read_body(self, receive: Any) -> Any:
        """Stop a body sent without a length (chunked) at the same limit; the request is then
        answered 413 by get_response_async."""
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        seen = 0

        async def bounded_receive() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                self.too_large.set(True)
                return {"type": "http.request", "body": b"", "more_body": False}
            return message

        self.too_large.set(False)
        return await super().read_body(bounded_receive)

    async def get_response_async(self, request: HttpRequest) -> HttpResponse:
        if self.too_large.get():
            from tether.errors import json_error

            limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
            return json_error("too_large", f"request body is larger than {limit} bytes", 413)
        if request.path_info.startswith(AGENT_PREFIX):
            set_urlconf(settings.ROOT_URLCONF)
            try:
                match = get_resolver().resolve(request.path_info)
            except Resolver404:
                match = None
            if match is not None and is_agent_endpoint(match.func):
                if asyncio.iscoroutinefunction(match.func):
                    response = await match.func(request, *match.args, **match.kwargs)
                else:
                    response = await sync_to_async(_call_sync_view)(
                        match.func, request, match.args, match.kwargs
                    )
                response._resource_closers.append(request.close)
                return response
        return await super().get_response_async(request)


def get_application() -> TetherASGIHandler:
    import django

    django.setup(set_prefix=False)
    return TetherASGIHandler()


application = get_application()
