"""Where async code touches the database: a small, fixed pool of threads.

Django gives every ASGI request its own thread for sync work, and so its own database
connection; a thousand held long-polls would hold a thousand of each. The agent endpoints and
live streams run their database steps here instead, on at most TETHER_DB_THREADS threads whose
connections are kept open between steps.
"""

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import close_old_connections, connection

T = TypeVar("T")

_executor = ThreadPoolExecutor(
    max_workers=max(1, settings.DB_THREADS), thread_name_prefix="tether-db"
)


def _call(func: Callable[..., T], args: tuple, kwargs: dict) -> T:
    # Drops a connection that broke or outlived CONN_MAX_AGE, as Django does per request; never
    # one inside a transaction (an in-process test's, as Django's test client spares it too):
    # closed there, PostgreSQL's would be gone for the rest of the test.
    if not connection.in_atomic_block:
        close_old_connections()
    return func(*args, **kwargs)


# Built once: sync_to_async builds a wrapper object (functools.update_wrapper and all) on
# every call, which on the agent hot path cost a fifth of the server's CPU.
_on_pool = sync_to_async(_call, thread_sensitive=False, executor=_executor)
_on_request_thread = sync_to_async(_call)


async def run_db(func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a sync function that uses the ORM, on the database pool. With DB_THREADS = 0 it
    runs where Django would put it (the request's own thread), as in-process tests need."""
    if not settings.DB_THREADS:
        return await _on_request_thread(func, args, kwargs)
    return await _on_pool(func, args, kwargs)
