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

from django.conf import settings
from django.db.models import Case, F, Value, When
from django.utils import timezone

from .models import Agent
from .services import REVIVED_BY_SIGN_OF_LIFE

# What a batched heartbeat revives (REVIVED_BY_SIGN_OF_LIFE less `stopped`; see above).
REVIVED_IN_BATCH = REVIVED_BY_SIGN_OF_LIFE - {Agent.Status.STOPPED}

_lock = threading.Lock()
_noted: set[int] = set()
# Rows per UPDATE: well below SQLite's limit on bound parameters.
CHUNK = 900


def note(agent_id: int) -> None:
    """The agent showed a sign of life; written at the next flush (any thread)."""
    with _lock:
        _noted.add(agent_id)


def pending() -> int:
    return len(_noted)


def flush_interval() -> float:
    """How often the batch is written: half a heartbeat interval at most."""
    return max(0.05, min(settings.POLL_RECHECK, settings.HEARTBEAT_INTERVAL / 2))


def flush() -> int:
    """Write every noted agent's heartbeat (on a database thread); returns how many."""
    global _noted
    with _lock:
        agent_ids, _noted = _noted, set()
    if not agent_ids:
        return 0
    now = timezone.now()
    ordered = sorted(agent_ids)
    for start in range(0, len(ordered), CHUNK):
        Agent.objects.filter(pk__in=ordered[start : start + CHUNK]).update(
            last_heartbeat=now,
            status=Case(
                When(status__in=REVIVED_IN_BATCH, then=Value(Agent.Status.ONLINE)),
                default=F("status"),
            ),
        )
    return len(agent_ids)


def discard() -> None:
    """Forget what is noted (a test rolled the database back under it)."""
    with _lock:
        _noted.clear()
