"""The ASGI application: Django, with a thin route in front of it for the agent API.

Agent endpoints are the hot path (every poll, every output chunk, every result), and they
use none of the human-facing middleware (sessions, CSRF, messages, clickjacking): under
ASGI each of those costs two thread hops per request, about 3 ms in all on this stack. So
agent views are called directly, resolved by Django's own URLconf, with one hop for a sync
view and none for the async long-poll. Everything else goes through the full stack.
"""

import asyncio
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
    async def get_response_async(self, request: HttpRequest) -> HttpResponse:
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
