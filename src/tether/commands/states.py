"""Command state transitions in one table (DESIGN §3).

A result may arrive for a command the server still thinks is queued or delivered (the ack
was lost, or the lease ran out and it was handed out again); it is final all the same.
"""

from .models import Command

S = Command.Status
FINAL = frozenset({S.SUCCEEDED, S.FAILED, S.TIMED_OUT, S.CANCELLED, S.LOST, S.SKIPPED, S.EXPIRED})
ACTIVE = frozenset({S.DELIVERED, S.RUNNING})
# What an agent may report of a command (`skipped` and `expired` are the server's word,
# before any agent had the command).
AGENT_OUTCOMES = FINAL - {S.SKIPPED, S.EXPIRED}
# Failures that count against a run's max_errors (an expired target's agent never came).
ERRORS = frozenset({S.FAILED, S.TIMED_OUT, S.LOST, S.EXPIRED})

ALLOWED: dict[str, frozenset[str]] = {
    # A run's target: released into the queue, or cancelled before it ever was.
    S.HELD: frozenset({S.QUEUED, S.CANCELLED}),
    # Only a queued command expires: once an agent has it, the lease and the lost sweep decide.
    S.QUEUED: frozenset({S.DELIVERED, S.RUNNING, S.CANCELLED}) | FINAL,
    # delivered -> delivered: handed out again after its lease ran out.
    S.DELIVERED: frozenset({S.DELIVERED, S.RUNNING}) | FINAL - {S.EXPIRED},
    S.RUNNING: FINAL - {S.EXPIRED},
    # `lost` is the server's guess, not the agent's word: an agent that comes back from a
    # partition and reports the real outcome is believed.
    S.LOST: FINAL - {S.LOST, S.EXPIRED},
}


def can_transition(current: str, new: str) -> bool:
    return new in ALLOWED.get(current, frozenset())


def is_final(status: str) -> bool:
    return status in FINAL


def takes_agent_reports(status: str) -> bool:
    """Whether progress and results from the agent still change the command (never one it
    was not handed: a held target is not the agent's yet)."""
    return (not is_final(status) and status != S.HELD) or status == S.LOST
