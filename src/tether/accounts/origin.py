"""Where a request came from: its peer address (as the throttles see it) and user agent, kept
for the audit log.

A middleware records the human request's origin in a context variable for the length of the
request, so that `services.audit()` reads it without every service taking a request: under
tether.asgi a human request runs its whole middleware chain and its view in one call on one
thread, with a context of its own. Agent endpoints skip the middleware (and its cost); the
one that audits (register) sets the origin itself with `request_origin`.
"""

import contextlib
import contextvars
import ipaddress
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

from asgiref.sync import iscoroutinefunction
from django.http import HttpRequest, HttpResponse
from django.utils.decorators import sync_and_async_middleware
from rest_framework.throttling import BaseThrottle

USER_AGENT_MAX = 256  # AuditEvent.user_agent's length: a longer header is cut, not refused


@dataclass(frozen=True)
class Origin:
    address: str | None
    user_agent: str


_current: contextvars.ContextVar[Origin | None] = contextvars.ContextVar(
    "tether_request_origin", default=None
)


def peer_address(request: HttpRequest) -> str | None:
    """The client's address as the throttles see it (X-Forwarded-For only behind
    NUM_PROXIES proxies): what the audit log records and where the server reaches an agent's
    RPC endpoint."""
    return address_of(BaseThrottle().get_ident(request))


def address_of(ident: str) -> str | None:
    """A throttle ident as an address to store, or None when it is not one."""
    try:
        parsed = ipaddress.ip_address(ident)
    except ValueError:
        return None
    # A scoped IPv6 address loses its scope in the database: not a usable RPC target.
    return None if getattr(parsed, "scope_id", None) else str(parsed)


def origin_of(request: HttpRequest) -> Origin:
    user_agent = request.META.get("HTTP_USER_AGENT", "")
    return Origin(address=peer_address(request), user_agent=user_agent[:USER_AGENT_MAX])


def current_origin() -> Origin | None:
    """The origin of the request being served, or None outside one (a worker, the CLI)."""
    return _current.get()


@contextlib.contextmanager
def request_origin(request: HttpRequest) -> Iterator[Origin]:
    """Audit events written inside the block record `request`'s address and user agent."""
    origin = origin_of(request)
    token = _current.set(origin)
    try:
        yield origin
    finally:
        _current.reset(token)


Handler = Callable[[HttpRequest], HttpResponse | Awaitable[HttpResponse]]


@sync_and_async_middleware
def audit_origin(get_response: Handler) -> Handler:
    """Record each human request's origin for the audit log (both sync and async, so that it
    adds no thread hop to an async stack)."""
    if iscoroutinefunction(get_response):

        async def middleware_async(request: HttpRequest) -> HttpResponse:
            with request_origin(request):
                return await get_response(request)

        return middleware_async

    def middleware(request: HttpRequest) -> HttpResponse:
        with request_origin(request):
            return get_response(request)

    return middleware
