"""The reconciler's lease on real databases (a SQLite file, a pgserver Postgres): one holder at a
time, a token that grows at each handover, writes under a fallen lease refused, and the lease of
a replica that stopped or was killed taken at once. Two real `hutch serve` processes sharing a
database are in tests/e2e/test_replicas.py."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import delete

from benchmarks.harness import wait_for
from service.leader import Lease
from service.lifecycle import JobState
from service.store import LEASES, STALLED_TRANSACTION_S, JobStore

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'hutch.db'}"
        return
    url = request.getfixturevalue("postgres_url")
    store = JobStore(url)  # one server for the session: no lease left by another test
    with store.engine.begin() as connection:
        connection.execute(delete(LEASES))
    store.close()
    yield url


@pytest.fixture()
def store(url: str) -> Iterator[JobStore]:
    job_store = JobStore(url)
    try:
        yield job_store
    finally:
        job_store.close()


def lease(store: JobStore, replica: str, ttl_s: float = 1.0) -> Lease:
    held = Lease(store, replica, ttl_s=ttl_s, renew_s=0.2)
    held._ensure_row()
    return held


def test_one_replica_leads_and_a_fallen_lease_writes_nothing(store: JobStore) -> None:
    a, b = lease(store, "a"), lease(store, "b")
    assert a.renew() and not b.renew()
    assert a.current() is not None and b.current() is None and a.holder_now() == "a"
    first = a.current()
    assert a.renew() and a.current() == first  # a renewal keeps the token

    job, _, _ = store.create("fenced", {"name": "fenced"})
    assert store.move(job.id, JobState.QUEUED, JobState.STARTING, attempt=1, fence=first, ray_job_id="r1")

    wait_for(b.renew, 10, "b to take the lease once a's has ended", 0.2)  # a no longer renews
    second = b.current()
    assert second is not None and second.token == first.token + 1 and b.holder_now() == "b"
    assert a.current() is None  # a counts its lease as lost before the database ends it

    # a, waking with the lease it read under, changes nothing; b's writes count.
    assert not store.move(job.id, JobState.STARTING, JobState.RUNNING, attempt=1, fence=first)
    assert not store.update_fields(job.id, attempt=1, fence=first, latest_metrics={"step": 1})
    assert store.get(job.id).state == JobState.STARTING and store.get(job.id).latest_metrics is None
    assert store.move(job.id, JobState.STARTING, JobState.FAILED, attempt=1, fence=second)
    assert not store.retry(job.id, "by a", fence=first)
    assert store.get(job.id).attempt == 1
    assert store.retry(job.id, "by b", fence=second) and store.get(job.id).attempt == 2
    assert [e.state for e in store.events(job.id)] == ["QUEUED", "STARTING", "FAILED", "QUEUED"]

    assert not a.renew() and a.current() is None  # and a learns it follows now


def test_a_replica_that_stops_hands_its_lease_over_at_once(store: JobStore) -> None:
    a, b = lease(store, "a", ttl_s=60), lease(store, "b", ttl_s=60)
    a.start()
    assert a.current() is not None and not b.renew()
    a.stop()
    assert a.current() is None
    assert b.renew(), "b waited for a lease its holder gave up"


KEEP_LEASE = """
import sys, time
from service.leader import Lease
from service.store import JobStore
lease = Lease(JobStore(sys.argv[1]), "elsewhere", ttl_s=60)
lease.start()
print("led" if lease.current() else "follows", flush=True)
time.sleep(600)
"""


def test_the_lease_of_a_killed_replica_on_this_machine_is_taken_without_waiting(store: JobStore) -> None:
    """A replica SIGKILLed on this machine (the embedded default restarted after a crash) is
    followed at once; one still running is not, however long its lease has left."""
    url = store.engine.url.render_as_string(hide_password=False)
    holder = subprocess.Popen(
        [sys.executable, "-c", KEEP_LEASE, url], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "led"
        here = lease(store, "here", ttl_s=60)
        assert not here.renew() and here.holder_now() == "elsewhere"
        holder.kill()
        holder.wait(30)
        assert here.renew() and here.holder_now() == "here"
    finally:
        holder.kill()
        holder.wait(30)


def test_a_transaction_left_open_on_postgres_is_ended_by_the_server(postgres_url: str) -> None:
    """A replica paused inside a transaction must not hold the lease row's lock for ever: every
    connection of the service tells Postgres to end a session idle in a transaction. (On SQLite,
    one machine's store, a writer paused mid-write stalls the other writers until it resumes.)"""
    store = JobStore(postgres_url)
    try:
        with store.engine.connect() as connection:
            shown = connection.exec_driver_sql("SHOW idle_in_transaction_session_timeout").scalar()
    finally:
        store.close()
    assert shown == f"{STALLED_TRANSACTION_S}s"
