"""Command state transitions in one table (DESIGN §3).

A result may arrive for a command the server still thinks is queued or delivered (the ack
was lost, or the lease ran out and it was handed out again); it is final all the same.
"""

from .models import Command

S = Command.Status
FINAL = frozenset({S.SUCCEEDED, S.FAILED, S.TIMED_OUT, S.CANCELLED, S.LOST})
ACTIVE = frozenset({S.DELIVERED, S.RUNNING})

ALLOWED: dict[str, frozenset[str]] = {
    S.QUEUED: frozenset({S.DELIVERED, S.RUNNING, S.CANCELLED}) | FINAL,
    # delivered -> delivered: handed out again after its lease ran out.
    S.DELIVERED: frozenset({S.DELIVERED, S.RUNNING}) | FINAL,
    S.RUNNING: FINAL,
    # `lost` is the server's guess, not the agent's word: an agent that comes back from a
    # partition and reports the real outcome is believed.
    S.LOST: FINAL - {S.LOST},
}


def can_transition(current: str, new: str) -> bool:
    return new in ALLOWED.get(current, frozenset())


def is_final(status: str) -> bool:
    return status in FINAL


def takes_agent_reports(status: str) -> bool:
    """Whether progress and results from the agent still change the command."""
    return not is_final(status) or status == S.LOST
