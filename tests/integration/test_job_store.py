"""The job store on real databases: a SQLite file and a throwaway Postgres server (pgserver).

The same tests run on both, since the service must work on either unchanged: idempotent creation
under concurrency, compare-and-set state changes racing from threads, retries as new attempts,
newest-first cursor paging with label filters, deletion.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from service.lifecycle import JobState
from service.store import BadCursor, Base, IdempotencyConflict, JobStore


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[JobStore]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'hutch.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    job_store = JobStore(url)
    if request.param == "postgres":  # one server for the session (the service tests use it too)
        Base.metadata.drop_all(job_store.engine)
        Base.metadata.create_all(job_store.engine)
    try:
        yield job_store
    finally:
        job_store.close()


def spec(name: str = "job", **labels: str) -> dict:
    return {"name": name, "labels": labels, "training": {"steps": 10}}


def test_idempotent_creation_under_concurrency(store: JobStore) -> None:
    def create(args: tuple[int, str | None]) -> tuple[str, bool]:
        index, key = args
        job, created, _ = store.create(f"job-{index}", spec(), key)
        return job.id, created

    with ThreadPoolExecutor(20) as pool:
        same = list(pool.map(create, [(i, "the-key") for i in range(20)]))
        different = list(pool.map(create, [(100 + i, f"key-{i}") for i in range(20)]))
    assert len({job_id for job_id, _ in same}) == 1 and sum(created for _, created in same) == 1
    assert len({job_id for job_id, _ in different}) == 20 and all(created for _, created in different)
    with pytest.raises(IdempotencyConflict, match="different spec"):
        store.create("job-x", spec("other"), "the-key")
    assert sum(store.count_by_state().values()) == 21


def test_state_changes_are_compare_and_set(store: JobStore) -> None:
    job, _, _ = store.create("race-1", spec())
    barrier = threading.Barrier(8)

    def advance(_: int) -> bool:
        barrier.wait()
        return store.move(job.id, JobState.QUEUED, JobState.STARTING, attempt=1, ray_job_id="r")

    with ThreadPoolExecutor(8) as pool:
        wins = list(pool.map(advance, range(8)))
    assert sum(wins) == 1
    assert store.move(job.id, JobState.STARTING, JobState.RUNNING, attempt=1)
    assert not store.move(job.id, JobState.RUNNING, JobState.SUCCEEDED, attempt=2), (
        "a stale attempt moved the job"
    )
    assert store.move(job.id, JobState.RUNNING, JobState.SUCCEEDED, attempt=1, message="succeeded")
    with pytest.raises(ValueError, match="cannot move"):
        store.move(job.id, JobState.SUCCEEDED, JobState.RUNNING)
    done = store.get(job.id)
    assert done is not None and done.state == JobState.SUCCEEDED
    assert (
        done.started_at is not None and done.finished_at is not None and done.finished_at >= done.started_at
    )
    assert [e.state for e in store.events(job.id)] == ["QUEUED", "STARTING", "RUNNING", "SUCCEEDED"]


def test_retry_is_a_new_attempt(store: JobStore) -> None:
    job, _, _ = store.create("retry-1", spec())
    assert not store.retry(job.id), "a queued job was retried"
    store.move(job.id, JobState.QUEUED, JobState.STARTING, ray_job_id="r-1")
    store.move(job.id, JobState.STARTING, JobState.FAILED, failure_reason="boom")
    assert store.retry(job.id) and not store.retry(job.id)
    again = store.get(job.id)
    assert again is not None
    assert (again.state, again.attempt, again.failure_reason, again.ray_job_id) == (
        JobState.QUEUED,
        2,
        None,
        None,
    )
    assert [(e.attempt, e.state) for e in store.events(job.id)] == [
        (1, "QUEUED"), (1, "STARTING"), (1, "FAILED"), (2, "QUEUED"),
    ]  # fmt: skip


def test_paging_newest_first_with_filters(store: JobStore) -> None:
    ids = [
        store.create(f"page-{i}", spec(f"p{i}", team="a" if i % 3 else "b", size="s"))[0].id
        for i in range(10)
    ]
    store.move(ids[9], JobState.QUEUED, JobState.CANCELLED)
    seen, cursor = [], None
    while True:
        page, cursor = store.list(limit=4, cursor=cursor)
        seen += [job.id for job in page]
        if cursor is None:
            break
    assert seen == ids[::-1]
    team_b, _ = store.list(labels={"team": "b", "size": "s"})
    assert [job.id for job in team_b] == [ids[9], ids[6], ids[3], ids[0]]
    queued_b, _ = store.list(states=[JobState.QUEUED], labels={"team": "b"})
    assert [job.id for job in queued_b] == [ids[6], ids[3], ids[0]]
    assert store.list(labels={"team": "c"})[0] == []
    with pytest.raises(BadCursor):
        store.list(cursor="bm9wZQ")


def test_delete_only_finished_jobs_and_everything_of_them(store: JobStore) -> None:
    job, _, _ = store.create("del-1", spec(team="x"))
    assert not store.delete(job.id)
    store.move(job.id, JobState.QUEUED, JobState.CANCELLED)
    assert store.delete(job.id)
    assert store.get(job.id) is None and store.events(job.id) == []
    assert store.list(labels={"team": "x"})[0] == []
    again, created, _ = store.create("del-1", spec(team="x"))  # the id can be used again
    assert created and again.labels == {"team": "x"}


def test_queue_is_highest_priority_first_then_oldest(store: JobStore) -> None:
    placed = {}  # the place each had when it was created, read in its creating transaction
    for name, priority in [("q-low", 0), ("q-high", 5), ("q-low-2", 0), ("q-neg", -3), ("q-high-2", 5)]:
        placed[name] = store.create(name, {**spec(name), "priority": priority}).queue_position
    assert placed == {"q-low": 1, "q-high": 1, "q-low-2": 3, "q-neg": 4, "q-high-2": 2}
    store.move("q-low-2", JobState.QUEUED, JobState.STARTING, ray_job_id="r")  # no longer waits
    order = ["q-high", "q-high-2", "q-low", "q-neg"]
    assert [job.id for job in store.queue()] == order
    read = {job_id: store.get(job_id) for job_id in ["q-low", "q-high", "q-low-2", "q-neg", "q-high-2"]}
    places = {job_id: place for place, job_id in enumerate(order, 1)}
    assert store.queue_positions(read[job_id] for job_id in order) == places
    assert store.queue_positions([read["q-neg"]]) == {"q-neg": 4}  # a page holds a few of them
    assert store.queue_positions([]) == {}
    # A page read q-low-2 while it still waited: it keeps its place, and the others theirs then.
    assert store.queue_positions([read["q-low-2"], read["q-neg"]]) == {"q-low-2": 4, "q-neg": 5}
    for place, job_id in enumerate(order, start=1):
        job = store.get(job_id)
        assert job is not None and job.priority in (5, 0, -3)
        assert store.queue_position(job) == place
    started = store.get("q-low-2")
    assert started is not None and store.queue_position(started) is None


def test_a_list_by_one_state_walks_an_index_newest_first(tmp_path: Path) -> None:
    """SQLite answers ``state=FAILED`` from ``ix_jobs_state_seq``, without reading and sorting every
    job in that state (what the queue's (state, priority, seq) index made it do)."""
    from sqlalchemy import event

    store = JobStore(f"sqlite:///{tmp_path / 'hutch.db'}")
    try:
        for i in range(6):
            store.create(f"job-{i}", spec(f"job-{i}"))
            if i % 2:
                store.move(f"job-{i}", JobState.QUEUED, JobState.CANCELLED, attempt=1)
        statements: list[tuple[str, object]] = []

        def seen(conn: object, cursor: object, sql: str, params: object, context: object, many: bool) -> None:
            statements.append((sql, params))

        event.listen(store.engine, "before_cursor_execute", seen)
        jobs, cursor = store.list([JobState.CANCELLED], limit=2)
        assert [job.id for job in jobs] == ["job-5", "job-3"] and cursor is not None
        (sql, params), *_ = (s for s in statements if s[0].lstrip().upper().startswith("SELECT"))
        with store.engine.connect() as connection:
            plan = " ".join(row[3] for row in connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}", params))
        assert "ix_jobs_state_seq" in plan and "TEMP B-TREE" not in plan, plan
        assert [job.id for job in store.list([JobState.CANCELLED], limit=2, cursor=cursor)[0]] == ["job-1"]
    finally:
        store.close()
