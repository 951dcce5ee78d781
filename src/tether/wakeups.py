"""In-process wake-ups for long-polls and live streams.

The database is the queue; this only shortens the wait. A writer calls `notify(key)` after
its transaction commits, from any thread; every coroutine waiting on that key wakes within
one event-loop turn. Waiters also re-check the database on a short period, so a write made
by another process (a CLI, a second server) is seen even without a wake-up.
"""

import asyncio
import threading
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

from django.db import transaction

_lock = threading.Lock()
_waiters: dict[str, set["Waiter"]] = defaultdict(set)


class Waiter:
    """One coroutine's subscription to a key; created inside the event loop."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.event = asyncio.Event()
        self.keys: set[str] = set()

    def wake(self) -> None:
        self.loop.call_soon_threadsafe(self.event.set)

    async def wait(self, timeout: float) -> bool:
        """Wait up to `timeout` s; True if woken. Clears the event for the next round."""
        try:
            await asyncio.wait_for(self.event.wait(), timeout=max(timeout, 0))
            return True
        except TimeoutError:
            return False
        finally:
            self.event.clear()


def register(key: str, waiter: Waiter) -> None:
    """Add `waiter` under `key`; callable from any thread (the long-poll registers from its
    database hop, as soon as it knows which agent is calling)."""
    with _lock:
        _waiters[key].add(waiter)
        waiter.keys.add(key)


def unregister(waiter: Waiter) -> None:
    with _lock:
        for key in waiter.keys:
            waiters = _waiters.get(key)
            if waiters is not None:
                waiters.discard(waiter)
                if not waiters:
                    del _waiters[key]
        waiter.keys.clear()


@contextmanager
def subscribe(key: str | None = None) -> Iterator[Waiter]:
    """Subscribe before reading the database, so a notify between read and wait is not lost.
    Without a key, the caller registers one later with `register`."""
    waiter = Waiter()
    if key is not None:
        register(key, waiter)
    try:
        yield waiter
    finally:
        unregister(waiter)


def notify(key: str) -> None:
    """Wake every waiter on `key` now (safe from any thread)."""
    with _lock:
        waiters = list(_waiters.get(key, ()))
    for waiter in waiters:
        waiter.wake()


def notify_on_commit(*keys: str) -> None:
    """Wake waiters once the current transaction commits, so they see the new rows."""
    transaction.on_commit(lambda: [notify(key) for key in keys])


def agent_key(agent_id: int) -> str:
    return f"agent:{agent_id}"


def command_key(command_id: int) -> str:
    return f"command:{command_id}"
