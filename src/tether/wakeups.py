"""Wake-ups for long-polls and live streams, within one process and across processes.

The database is the queue; this only shortens the wait. A writer calls `notify_on_commit(key)`
inside its transaction; once it commits, every coroutine waiting on that key, in this process
and (on PostgreSQL) in every other server process, wakes within milliseconds.

Across processes this is PostgreSQL's LISTEN/NOTIFY: the NOTIFY is sent inside the writer's
transaction, so PostgreSQL delivers it on commit and drops it on rollback, and one listening
connection per process (a thread) turns it back into local wake-ups. No extra service. On
SQLite (one process) the local wake-up is all there is. Whoever waits still has a safety net
for a notification that cannot come (a lease running out, a listener reconnecting): the long
poll's one periodic query for all held polls (tether.commands.poll), the streams' re-check.
"""

import asyncio
import logging
import os
import threading
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from django.db import connection, connections, transaction

log = logging.getLogger("tether.wakeups")

CHANNEL = "tether"
# PostgreSQL refuses a NOTIFY payload of 8000 bytes or more: keys go in chunks below that.
_PAYLOAD_LIMIT = 7900
# Tells this process's own notifications apart when they come back from PostgreSQL.
_ORIGIN = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"

_lock = threading.Lock()
_waiters: dict[str, set["Waiter"]] = defaultdict(set)
_observers: list[Callable[[str], None]] = []
_resync: list[Callable[[], None]] = []


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
    """Add `waiter` under `key`; callable from any thread."""
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


def observe(callback: Callable[[str], None]) -> None:
    """Call `callback(key)` on every notification this process sees (from any thread, so it
    must be quick and thread-safe): how the long-poll hub keeps its set of agents with work
    and the agent credential cache forgets a changed agent."""
    _observers.append(callback)


def on_resync(callback: Callable[[], None]) -> None:
    """Call `callback()` when notifications may have been missed (the listener reconnected):
    whoever keeps state from them rebuilds it."""
    _resync.append(callback)


def notify(key: str) -> None:
    """Wake every waiter on `key` in this process now (safe from any thread)."""
    for observer in _observers:
        observer(key)
    with _lock:
        waiters = list(_waiters.get(key, ()))
    for waiter in waiters:
        waiter.wake()


def notify_on_commit(*keys: str) -> None:
    """Wake waiters on `keys`, here and in every other server process, once the current
    transaction commits (at once outside one), so they see the new rows."""
    if not keys:
        return
    transaction.on_commit(lambda: [notify(key) for key in keys])
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            for payload in _payloads(keys):
                cursor.execute("SELECT pg_notify(%s, %s)", [CHANNEL, payload])


def _payloads(keys: tuple[str, ...]) -> Iterator[str]:
    chunk: list[str] = []
    size = len(_ORIGIN)
    for key in keys:
        if chunk and size + len(key) + 1 > _PAYLOAD_LIMIT:
            yield "\n".join([_ORIGIN, *chunk])
            chunk, size = [], len(_ORIGIN)
        chunk.append(key)
        size += len(key) + 1
    yield "\n".join([_ORIGIN, *chunk])


def received(payload: str) -> None:
    """A notification from PostgreSQL: wake this process's waiters, unless it was our own
    (those woke at commit already)."""
    origin, _, keys = payload.partition("\n")
    if origin == _ORIGIN or not keys:
        return
    for key in keys.split("\n"):
        notify(key)


def resync() -> None:
    for callback in _resync:
        callback()


class Listener(threading.Thread):
    """This process's LISTEN connection: a daemon thread that turns PostgreSQL
    notifications into local wake-ups, reconnecting (with a resync) when the connection
    breaks."""

    def __init__(self) -> None:
        super().__init__(name="tether-listen", daemon=True)
        self.connected = threading.Event()
        self.stopping = threading.Event()

    def run(self) -> None:
        import psycopg

        params = connections["default"].get_connection_params()
        params.pop("cursor_factory", None)
        params.pop("context", None)
        backoff = 0.1
        while not self.stopping.is_set():
            try:
                # Keepalives: a half-open connection is noticed in about a minute, not in
                # the kernel's quarter of an hour of retransmits.
                with psycopg.connect(**params, **KEEPALIVES, autocommit=True) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self.connected.set()
                    backoff = 0.1
                    resync()  # anything sent while we were not listening
                    while not self.stopping.is_set():
                        for note in conn.notifies(timeout=5):
                            received(note.payload)
                        conn.execute("SELECT 1")  # notice a dead connection
            except Exception:
                if self.stopping.is_set():
                    return
                log.warning("wake-up listener lost its connection; reconnecting", exc_info=True)
            self.connected.clear()
            self.stopping.wait(backoff)
            backoff = min(backoff * 2, 5)


KEEPALIVES = {
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
    "tcp_user_timeout": 60_000,
}
_listener: Listener | None = None
_listener_lock = threading.Lock()


def start_listener() -> Listener | None:
    """Listen for other processes' notifications (PostgreSQL only; once per process)."""
    global _listener
    if connections["default"].vendor != "postgresql":
        return None
    with _listener_lock:
        if _listener is None or not _listener.is_alive():
            _listener = Listener()
            _listener.start()
    return _listener


def agent_key(agent_id: int) -> str:
    return f"agent:{agent_id}"


def command_key(command_id: int) -> str:
    return f"command:{command_id}"


def auth_key(agent_id: int) -> str:
    """Notified when an agent's credentials or delivered config change."""
    return f"auth:{agent_id}"
