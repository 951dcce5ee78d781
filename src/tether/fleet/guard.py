"""Throttles on the agent API: failed authentication per address, polls per agent.

Failed authentication. Every 401 an address earns counts in the shared cache (a DRF throttle:
in PostgreSQL when several processes serve the fleet); past TETHER_AGENT_AUTH_FAIL_RATE the
address is refused with 429 before any token it sends is looked at, so guessing tokens is
capped. The refusal itself is decided from this process's memory: an authenticated agent's
request costs a dict lookup and no cache query. Another process learns that an address is
blocked at the first failure it sees from it, so past the rate an address gets at most one
more 401 per process and window.

Polls. An agent polling far faster than its config asks (TETHER_POLL_RATE) gets 429. Polls
are counted in each process's own memory (the `process` cache): counting them in the shared
cache would cost two queries a poll. An agent's polls spread over N processes may so reach N
times the rate before one of them refuses it.
"""

import threading
import time

from django.core.cache import caches
from rest_framework import exceptions

from tether.accounts.throttling import SettingRateThrottle

# address -> time.time() until which it is refused
_blocked: dict[str, float] = {}
_blocked_lock = threading.Lock()
BLOCKED_MAX = 100_000  # addresses remembered at most (a flood from many addresses)


class AuthFailureThrottle(SettingRateThrottle):
    scope = "agent_auth_failure"
    rate_setting = "AGENT_AUTH_FAIL_RATE"

    def __init__(self, address: str) -> None:
        super().__init__()
        self.address = address

    def get_cache_key(self, request: object, view: object) -> str:
        return self.cache_format % {"scope": self.scope, "ident": self.address}


class PollThrottle(SettingRateThrottle):
    scope = "agent_poll"
    rate_setting = "POLL_RATE"
    cache = caches["process"]

    def __init__(self, agent_id: int) -> None:
        super().__init__()
        self.agent_id = agent_id

    def get_cache_key(self, request: object, view: object) -> str:
        return self.cache_format % {"scope": self.scope, "ident": self.agent_id}


def _key(address: str | None) -> str:
    # Requests whose address is unknown (a Unix socket without a proxy) share one count.
    return address or "unknown"


def refuse_blocked(address: str | None) -> None:
    """Raise 429 (Throttled) when the address has failed authentication too often; from
    memory only, so an agent's every request may call it."""
    until = _blocked.get(_key(address))
    if until is None:
        return
    wait = until - time.time()
    if wait > 0:
        raise exceptions.Throttled(wait=max(wait, 1.0))
    _blocked.pop(_key(address), None)


def note_failure(address: str | None) -> None:
    """Count a refused agent request (a 401) against its address; the address is refused
    from the failure that fills its allowance on. Touches the shared cache (a query on
    PostgreSQL): call it from a database thread, never from the event loop."""
    throttle = AuthFailureThrottle(_key(address))
    if throttle.allow_request(None, None) and len(throttle.history) < throttle.num_requests:
        return
    until = time.time() + throttle.wait()
    with _blocked_lock:
        if len(_blocked) >= BLOCKED_MAX:
            now = time.time()
            for stale in [key for key, end in _blocked.items() if end <= now]:
                del _blocked[stale]
            if len(_blocked) >= BLOCKED_MAX:
                _blocked.clear()
        _blocked[_key(address)] = until


def refuse_polling_too_fast(agent_id: int) -> None:
    """Raise 429 (Throttled) when the agent's polls that found nothing filled TETHER_POLL_RATE:
    polls that carry work away never count, so an operator's commands sent back to back are
    never slowed by the agent's own answers. In memory."""
    throttle = PollThrottle(agent_id)
    throttle.key = throttle.get_cache_key(None, None)
    throttle.history = throttle.cache.get(throttle.key, [])
    throttle.now = throttle.timer()
    while throttle.history and throttle.history[-1] <= throttle.now - throttle.duration:
        throttle.history.pop()
    if len(throttle.history) >= throttle.num_requests:
        raise exceptions.Throttled(wait=throttle.wait())


def count_idle_poll(agent_id: int) -> None:
    """Count a poll answered with nothing to do (see refuse_polling_too_fast)."""
    PollThrottle(agent_id).allow_request(None, None)


def forget_all() -> None:
    """Forget what this process counted and refused (tests)."""
    with _blocked_lock:
        _blocked.clear()
    caches["process"].clear()
