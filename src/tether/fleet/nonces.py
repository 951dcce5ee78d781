"""Nonces of signed agent requests, remembered for the signature window (DESIGN §6).

A captured request replayed within the window carries a nonce already seen, and is refused.
Each process remembers what it accepted; on PostgreSQL, where several processes (or hosts)
serve one fleet, the nonces also go into one table they share, so a replay sent to another
process is refused as well. SQLite is served by one process: its memory is the whole record
(a restart forgets, and the window then bounds what a replay could do).

The shared record costs one INSERT per signed request; the long-polls of a whole process go
in batches (`check_soon`), so an idle fleet of 10,000 agents adds about ten multi-row
INSERTs a second per process, not one statement per poll.
"""

import asyncio
import contextlib
import threading
import time
import weakref
from collections import deque

from django.conf import settings
from django.db import connection

from tether.db import run_db

from .models import AgentNonce

# Signed requests a process remembers at most (about 300 bytes each): above a fleet's rate
# times the window (10,000 agents polling every 25 s for 300 s: 120,000). Past it the oldest
# are forgotten early, and the shared record still holds them on PostgreSQL.
LOCAL_MAX = 300_000
BATCH = 500
# How long a poll's nonce may wait for others to share its INSERT (the poll is held anyway).
BATCH_DELAY = 0.1

_seen: dict[tuple[int, str], int] = {}
_order: deque[tuple[int, tuple[int, str]]] = deque()
_lock = threading.Lock()


def expiry(timestamp: str) -> int:
    """When a nonce signed at `timestamp` may be forgotten: its request is then refused by the
    window anyway."""
    # With a margin for hosts whose clocks differ from the one that sweeps the shared record.
    return int(timestamp) + settings.SIGNATURE_WINDOW + settings.SIGNATURE_FUTURE + 1


def _first_here(agent_id: int, nonce: str, expires: int) -> bool:
    now = time.time()
    key = (agent_id, nonce)
    with _lock:
        while _order and (_order[0][0] < now or len(_order) >= LOCAL_MAX):
            _seen.pop(_order.popleft()[1], None)
        if key in _seen:
            return False
        _seen[key] = expires
        _order.append((expires, key))
        return True


def _shared() -> bool:
    return connection.vendor == "postgresql"


def _insert(rows: list[tuple[int, str, int]]) -> set[tuple[int, str]]:
    """The rows that were new, in one statement (ON CONFLICT: the others were seen)."""
    values = ", ".join(["(%s, %s, %s)"] * len(rows))
    params = [value for row in rows for value in row]
    table = AgentNonce._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {table} (agent_id, nonce, expires) VALUES {values} "
            "ON CONFLICT DO NOTHING RETURNING agent_id, nonce",
            params,
        )
        return {(agent_id, nonce) for agent_id, nonce in cursor.fetchall()}


def remember(agent_id: int, nonce: str, timestamp: str) -> bool:
    """False when the nonce was seen in the window (a replay); on a request's thread."""
    expires = expiry(timestamp)
    if not _first_here(agent_id, nonce, expires):
        return False
    if not _shared():
        return True
    return (agent_id, nonce) in _insert([(agent_id, nonce, expires)])


class _Batcher:
    """The shared INSERTs of one event loop's polls, gathered for up to BATCH_DELAY: a held
    poll needs its nonce confirmed only before it counts, hands out work or answers, so an
    idle fleet's polls go in a few statements a second. A poll about to act hurries it."""

    def __init__(self) -> None:
        self.pending: list[tuple[tuple[int, str, int], asyncio.Future[bool]]] = []
        self.task: asyncio.Task | None = None
        self.hurry = asyncio.Event()

    def submit(self, row: tuple[int, str, int]) -> "asyncio.Future[bool]":
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        # A poll that left before its answer never reads it: the error is read here instead.
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        self.pending.append((row, future))
        if self.task is None or self.task.done():
            self.task = loop.create_task(self.drain())
        return future

    async def drain(self) -> None:
        while self.pending:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.hurry.wait(), BATCH_DELAY)
            self.hurry.clear()
            batch, self.pending = self.pending[:BATCH], self.pending[BATCH:]
            try:
                fresh = await run_db(_insert, [row for row, _ in batch])
            except Exception as exc:  # each waiting poll answers the error itself
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (agent_id, nonce, _), future in batch:
                if not future.done():
                    future.set_result((agent_id, nonce) in fresh)


# One per event loop (`tether serve` runs one; in-process tests start several).
_batchers: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Batcher]" = (
    weakref.WeakKeyDictionary()
)


def _batcher() -> _Batcher:
    loop = asyncio.get_running_loop()
    batcher = _batchers.get(loop)
    if batcher is None:
        batcher = _batchers[loop] = _Batcher()
    return batcher


def check_soon(agent_id: int, nonce: str, timestamp: str) -> "bool | asyncio.Future[bool]":
    """`remember` for the event loop (the thin long-poll route): False for a replay this
    process saw, True when nothing more is to be checked, else a future the caller awaits
    (through `confirmed`) before it acts on the request."""
    expires = expiry(timestamp)
    if not _first_here(agent_id, nonce, expires):
        return False
    if not _shared():
        return True
    return _batcher().submit((agent_id, nonce, expires))


async def confirmed(pending: "asyncio.Future[bool] | None", *, hurry: bool = True) -> bool:
    """Whether a nonce from `check_soon` was new everywhere; at once if already known.
    `hurry`: send the batch now (the caller is about to hand out work) rather than after its
    BATCH_DELAY."""
    if pending is None:
        return True
    if hurry and not pending.done():
        _batcher().hurry.set()
    return await pending


def prune() -> int:
    """Forget the shared nonces past their window (the sweep calls this)."""
    return AgentNonce.objects.filter(expires__lt=int(time.time())).delete()[0]


def forget_all() -> None:
    """Tests start each case with no nonces remembered in this process."""
    with _lock:
        _seen.clear()
        _order.clear()
