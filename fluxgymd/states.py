"""Job states and the transitions allowed between them.

Stdlib only, no I/O: the store validates every transition here before it persists it, so
an impossible move (a succeeded job going back to running, say) is refused in one place.
"""
from __future__ import annotations

import enum


class JobState(str, enum.Enum):
    QUEUED = "queued"
    STARTING = "starting"
    RUNNING = "running"
    STALLED = "stalled"
    RECOVERING = "recovering"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"

    def __str__(self) -> str:  # so f-strings and JSON show "running", not JobState.RUNNING
        return self.value


S = JobState

# A job with a process of its own (or about to have one).
ACTIVE = frozenset({S.STARTING, S.RUNNING, S.STALLED, S.RECOVERING})
# Nothing will happen to these without a user asking (retry).
FINISHED = frozenset({S.SUCCEEDED, S.FAILED, S.CANCELLED})

TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    # FAILED: a job it waits for failed or was cancelled, so it never runs
    S.QUEUED: frozenset({S.STARTING, S.CANCELLED, S.FAILED}),
    # SUCCEEDED: a run whose final result already exists is not run again (kohya)
    S.STARTING: frozenset({S.RUNNING, S.FAILED, S.CANCELLED, S.INTERRUPTED, S.SUCCEEDED}),
    S.RUNNING: frozenset(
        {S.SUCCEEDED, S.FAILED, S.CANCELLED, S.STALLED, S.RECOVERING, S.INTERRUPTED}
    ),
    S.STALLED: frozenset({S.RECOVERING, S.FAILED, S.CANCELLED, S.INTERRUPTED, S.SUCCEEDED}),
    S.RECOVERING: frozenset({S.STARTING, S.QUEUED, S.FAILED, S.CANCELLED, S.INTERRUPTED}),
    S.INTERRUPTED: frozenset({S.QUEUED, S.CANCELLED}),
    # retry: a user may send a failed or cancelled job round again.
    S.FAILED: frozenset({S.QUEUED}),
    S.CANCELLED: frozenset({S.QUEUED}),
    # A finished job is never restarted.
    S.SUCCEEDED: frozenset(),
}


# Jobs that nothing runs or will run by itself: `remove` and `clean` may forget them.
REMOVABLE = frozenset({S.QUEUED, S.INTERRUPTED}) | FINISHED


class InvalidTransition(Exception):
    def __init__(self, old: JobState, new: JobState | None):
        if new is None:  # a removal
            super().__init__(f"a {old.value} job cannot be removed; cancel it first (only "
                             f"{', '.join(sorted(s.value for s in REMOVABLE))} jobs can be)")
        else:
            allowed = ", ".join(sorted(s.value for s in TRANSITIONS[old])) or "none"
            super().__init__(f"a {old.value} job cannot become {new.value} (allowed: {allowed})")
        self.old, self.new = old, new


def check_transition(old: JobState | str, new: JobState | str) -> tuple[JobState, JobState]:
    old, new = JobState(old), JobState(new)
    if new not in TRANSITIONS[old]:
        raise InvalidTransition(old, new)
    return old, new


def check_removal(state: JobState | str) -> JobState:
    state = JobState(state)
    if state not in REMOVABLE:
        raise InvalidTransition(state, None)
    return state
