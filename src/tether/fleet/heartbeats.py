"""Heartbeats in batches: a poll notes that its agent is alive, and one UPDATE a tick writes
every agent noted since (tether.commands.poll runs the tick).

An idle fleet polls all the time (10,000 agents on 25 s long-polls: 400 polls a second); one
UPDATE per poll would be most of what the server does. The batch writes each noted agent at
most once per tick and brings back online, in the same statement, those the sweep had
marked offline. A heartbeat waits at most one tick, far below the offline threshold (3
heartbeat intervals; the tick is at most half an interval).

A stopped agent is not revived here: a heartbeat noted just before the stop would undo it.
Its next poll after the stop sees `stopped` (set_agent_status drops the cached view) and
revives it at once, through record_heartbeat.
"""

import threading
import time

from django.conf import settings
from django.db.models import Case, F, Value, When
from django.utils import timezone

from .models import Agent
from .services import REVIVED_BY_SIGN_OF_LIFE, record_heartbeat, sign_of_life_changes

# What a batched heartbeat revives (REVIVED_BY_SIGN_OF_LIFE less `stopped`; see above).
REVIVED_IN_BATCH = REVIVED_BY_SIGN_OF_LIFE - {Agent.Status.STOPPED}

_lock = threading.Lock()
_noted: set[int] = set()
_flushed_at = 0.0
# Rows per UPDATE: well below SQLite's limit on bound parameters.
CHUNK = 900


def note(agent_id: int) -> None:
    """The agent showed a sign of life; written at the next flush (any thread)."""
    with _lock:
        _noted.add(agent_id)


def pending() -> int:
    return len(_noted)


def needs_write(
    agent: Agent, version: str | None, rpc_port: int | None, address: str | None
) -> bool:
    """Whether a sign of life changes the agent row beyond its heartbeat (a first one, a new
    version, port or address, a status it revives, as this process last saw the agent): that
    is written at once by record_heartbeat, with the apps above told. The rest is batched."""
    return agent.last_heartbeat is None or bool(
        sign_of_life_changes(agent, version=version, rpc_port=rpc_port, address=address)
    )


def sign_of_life(
    *,
    agent: Agent,
    version: str | None = None,
    rpc_port: int | None = None,
    address: str | None = None,
) -> None:
    """An agent is alive (a heartbeat call, a status check answered): written now if it
    changes the row, else noted for the next flush."""
    flusher_idle = time.monotonic() - _flushed_at > 4 * flush_interval() + 1
    if flusher_idle or needs_write(agent, version, rpc_port, address):
        # No tick has flushed lately (a process serving no long-poll): write it now.
        record_heartbeat(agent=agent, version=version, rpc_port=rpc_port, address=address)
    else:
        note(agent.pk)


def flush_interval() -> float:
    """How often the batch is written: half a heartbeat interval at most."""
    return max(0.05, min(settings.POLL_RECHECK, settings.HEARTBEAT_INTERVAL / 2))


def flush() -> int:
    """Write every noted agent's heartbeat (on a database thread); returns how many."""
    global _noted, _flushed_at
    _flushed_at = time.monotonic()
    with _lock:
        agent_ids, _noted = _noted, set()
    if not agent_ids:
        return 0
    now = timezone.now()
    ordered = sorted(agent_ids)
    for start in range(0, len(ordered), CHUNK):
        try:
            Agent.objects.filter(pk__in=ordered[start : start + CHUNK]).update(
                last_heartbeat=now,
                status=Case(
                    When(status__in=REVIVED_IN_BATCH, then=Value(Agent.Status.ONLINE)),
                    default=F("status"),
                ),
            )
        except Exception:
            with _lock:  # not lost: the next flush writes them
                _noted.update(ordered[start:])
            raise
    return len(agent_ids)


def discard() -> None:
    """Forget what is noted (a test rolled the database back under it)."""
    with _lock:
        _noted.clear()
