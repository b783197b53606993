"""The reconciler's retry policy on a real (SQLite) job store: an attempt that failed for an
infrastructure cause is queued again as the next attempt, after a backoff, while the spec's
``retry.max_attempts`` allows; a job's own errors, cancelled jobs and spent attempts stay FAILED.
Ray is not involved: these are the moves the reconciler makes once it knows why an attempt
ended (the fault tests in ``tests/e2e/test_faults.py`` run the whole path with a real Ray head).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.lifecycle import JobState
from service.reconciler import Reconciler
from service.store import JobRecord, JobStore
from trainer.outcome import FailureCause


@pytest.fixture
def store(tmp_path: Path) -> Iterator[JobStore]:
    job_store = JobStore(f"sqlite:///{tmp_path / 'hutch.db'}")
    try:
        yield job_store
    finally:
        job_store.close()


def running(store: JobStore, name: str, **retry: float) -> JobRecord:
    job, _, _ = store.create(name, {"name": name, "retry": retry} if retry else {"name": name})
    store.move(job.id, JobState.QUEUED, JobState.STARTING, ray_job_id=f"{name}-1")
    store.move(job.id, JobState.STARTING, JobState.RUNNING)
    record = store.get(job.id)
    assert record is not None
    return record


def fail(reconciler: Reconciler, job: JobRecord, cause: FailureCause) -> JobRecord:
    reconciler._finish(job, JobState.FAILED, "the Ray cluster restarted", cause=cause)
    record = reconciler.store.get(job.id)
    assert record is not None
    return record


def test_infrastructure_failures_are_retried_until_the_attempts_are_spent(store: JobStore) -> None:
    reconciler = Reconciler(store, launcher=None)  # type: ignore[arg-type]
    job = running(store, "infra", max_attempts=2, backoff_s=30)
    began = time.monotonic()
    again = fail(reconciler, job, FailureCause.INFRASTRUCTURE)
    assert (again.state, again.attempt) == (JobState.QUEUED, 2)
    events = store.events(job.id)
    assert [(e.attempt, e.state) for e in events][-2:] == [(1, "FAILED"), (2, "QUEUED")]
    assert events[-1].message.startswith("retried automatically (attempt 2 of 2, starting in 30 s)")
    assert "after an infrastructure failure: the Ray cluster restarted" in events[-1].message
    assert 29 < reconciler._backoff[job.id] - began <= 30.5  # held back from the queue until then
    assert reconciler.stats.retried_jobs == 1
    store.move(job.id, JobState.QUEUED, JobState.STARTING, attempt=2, ray_job_id="infra-2")
    last = fail(reconciler, store.get(job.id), FailureCause.INFRASTRUCTURE)  # type: ignore[arg-type]
    assert (last.state, last.attempt) == (JobState.FAILED, 2)  # attempts spent
    assert reconciler.stats.retried_jobs == 1


def test_the_backoff_doubles_and_the_default_allows_three_attempts(store: JobStore) -> None:
    reconciler = Reconciler(store, launcher=None)  # type: ignore[arg-type]
    job = running(store, "default")
    fail(reconciler, job, FailureCause.INFRASTRUCTURE)
    store.move(job.id, JobState.QUEUED, JobState.STARTING, attempt=2, ray_job_id="default-2")
    store.move(job.id, JobState.STARTING, JobState.RUNNING, attempt=2)
    third = fail(reconciler, store.get(job.id), FailureCause.INFRASTRUCTURE)  # type: ignore[arg-type]
    assert (third.state, third.attempt) == (JobState.QUEUED, 3)
    assert "attempt 3 of 3, starting in 20 s" in store.events(job.id)[-1].message  # 10 s, then 20 s


@pytest.mark.parametrize("cause", [FailureCause.JOB_ERROR, FailureCause.NON_FINITE_LOSS])
def test_a_jobs_own_errors_are_never_retried(store: JobStore, cause: FailureCause) -> None:
    reconciler = Reconciler(store, launcher=None)  # type: ignore[arg-type]
    final = fail(reconciler, running(store, f"own-{cause.value.replace('_', '-')}"), cause)
    assert (final.state, final.attempt) == (JobState.FAILED, 1)
    assert reconciler.stats.retried_jobs == 0


def test_a_job_asked_to_stop_or_with_one_attempt_is_not_retried(store: JobStore) -> None:
    reconciler = Reconciler(store, launcher=None)  # type: ignore[arg-type]
    once = fail(reconciler, running(store, "once", max_attempts=1), FailureCause.INFRASTRUCTURE)
    assert (once.state, once.attempt) == (JobState.FAILED, 1)
    job = running(store, "stopping")
    store.update_fields(job.id, attempt=1, cancel_requested=True)
    stopped = fail(reconciler, store.get(job.id), FailureCause.INFRASTRUCTURE)  # type: ignore[arg-type]
    assert (stopped.state, stopped.attempt) == (JobState.FAILED, 1)
