"""Commands an agent holds in its local queue keep their lease while the agent polls.

Tether's agent runs up to --max-concurrent commands at once and queues the rest locally,
accepted (journaled) but not started; the server sees them `delivered`. Without a word from
the agent each would be handed out again at every lease (under load, half of all commands
were). So the agent lists the ids it holds on its poll (`holding=12,13`), and the lease of
each is extended to cover that poll and the lease after it: while the agent polls, nothing
it holds is handed out again; once it stops (a crash, a restart that lost its journal), the
leases run out and the commands are handed out again as before. Agents of the original
dialect never send `holding` and are served exactly as before.

Noted by the poll and written in batches by the poll hub's tick (as heartbeats are): an
idle poll costs nothing here, and a busy agent's poll one row in one UPDATE per tick.
"""

import threading
from datetime import timedelta

from django.conf import settings
from django.db.models import Q
from django.utils import timezone
from rest_framework import exceptions

from tether.fleet.services import effective_long_poll_timeout

from .models import Command

# Ids one poll may list (the agent sends at most 100: the oldest it holds).
MAX_IDS = 200
# Ids per UPDATE: well below SQLite's limit on bound parameters (each id is bound twice).
CHUNK = 400
BIGINT = 2**63

_lock = threading.Lock()
_noted: dict[int, frozenset[int]] = {}
_writing: dict[int, frozenset[int]] = {}  # taken by the flush under way, until committed


def parse(value: str | None) -> frozenset[int]:
    """The poll's `holding`: up to MAX_IDS command ids, comma-separated; anything else is a
    400 and the poll changes nothing."""
    if not value:
        return frozenset()
    parts = value.split(",")
    if len(parts) > MAX_IDS or not all(p.isascii() and p.isdigit() for p in parts):
        raise exceptions.ValidationError(
            f"holding must be up to {MAX_IDS} command ids, comma-separated"
        )
    ids = frozenset(int(p) for p in parts)
    if max(ids) >= BIGINT:
        raise exceptions.ValidationError("holding: no such command id")
    return ids


def note(agent_id: int, ids: frozenset[int]) -> None:
    """The agent holds these commands; their leases are extended at the next flush (any
    thread). The newest poll's list is the agent's word."""
    if ids:
        with _lock:
            _noted[agent_id] = ids


def held_by(agent_ids: list[int]) -> Q | None:
    """The commands these agents said they hold and whose lease extension is not written
    yet, as a condition (None: none): a claim leaves them alone, so a poll that lists a
    command whose lease already ran out (the agent was cut off for longer than a lease) does
    not get it handed out again before the flush extends it."""
    with _lock:
        pairs = [
            (a, (_noted.get(a) or frozenset()) | (_writing.get(a) or frozenset()))
            for a in agent_ids
        ]
    held = Q()
    for agent_id, ids in pairs:
        if ids:
            held |= Q(agent_id=agent_id, id__in=sorted(ids))
    return held or None


def flush() -> int:
    """Extend the leases of every held command noted since the last flush, for the agent
    that holds it and only while it is `delivered` (on a database thread); returns how many
    rows changed. The lease covers a whole long-poll and a lease beyond it: the agent's
    next poll lists the ids again before it runs out."""
    global _noted, _writing
    with _lock:
        noted, _noted = _noted, {}
        _writing = noted
    if not noted:
        return 0
    try:
        return _extend(noted)
    finally:
        with _lock:
            _writing = {}


def _extend(noted: dict[int, frozenset[int]]) -> int:
    until = timezone.now() + timedelta(
        seconds=effective_long_poll_timeout() + settings.COMMAND_LEASE
    )
    pairs = sorted((agent_id, pk) for agent_id, ids in noted.items() for pk in ids)
    changed = 0
    for start in range(0, len(pairs), CHUNK):
        chunk = pairs[start : start + CHUNK]
        by_agent: dict[int, list[int]] = {}
        for agent_id, pk in chunk:
            by_agent.setdefault(agent_id, []).append(pk)
        # The ids by primary key, each claimed only by the agent it was handed to.
        mine = Q()
        for agent_id, ids in by_agent.items():
            mine |= Q(agent_id=agent_id, id__in=ids)
        changed += (
            Command.objects.filter(mine, id__in=[pk for _, pk in chunk])
            .filter(status=Command.Status.DELIVERED)
            .update(lease_expires_at=until)
        )
    return changed


def discard() -> None:
    """Forget what is noted (a test rolled the database back under it)."""
    global _writing
    with _lock:
        _noted.clear()
        _writing = {}
