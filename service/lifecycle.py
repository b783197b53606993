"""A job's states and the moves between them.

``QUEUED → STARTING → RUNNING → SUCCEEDED | FAILED | CANCELLED``; a queued or starting job can
also fail or be cancelled directly, and a failed or cancelled job can be retried (a new
attempt, back to QUEUED, resuming from its latest checkpoint).
"""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    QUEUED = "QUEUED"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})
ACTIVE_STATES = frozenset({JobState.QUEUED, JobState.STARTING, JobState.RUNNING})
RETRYABLE_STATES = frozenset({JobState.FAILED, JobState.CANCELLED})

ALLOWED_MOVES: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.STARTING, JobState.FAILED, JobState.CANCELLED}),
    JobState.STARTING: frozenset({JobState.RUNNING, *TERMINAL_STATES}),
    JobState.RUNNING: TERMINAL_STATES,
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset({JobState.QUEUED}),
    JobState.CANCELLED: frozenset({JobState.QUEUED}),
}
