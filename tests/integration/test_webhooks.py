"""Webhook deliveries from a real job store (a SQLite file) to a real HTTP receiver on loopback
(tests/webhook_receiver.py), without Ray: jobs are moved through their states with the store's
own compare-and-set moves, as the reconciler and the API move them.

The receiver checks each signature with README.md's code, fails the first sendings, and is
stopped and started again while deliveries wait; the service is "restarted" too (its store and
dispatcher closed and opened again on the same file). Every change of every job must arrive, in
the order of the job's changes, at least once. The same over HTTP, through `hutch serve`, is in
tests/e2e/test_webhooks_api.py.
"""

from __future__ import annotations

import hashlib
import hmac
import socket
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import delete, update

from benchmarks.harness import wait_for
from service.leader import Lease
from service.lifecycle import JobState
from service.store import DELIVERIES, WEBHOOKS, JobStore, utcnow
from service.webhooks import KEEP_FINISHED, DeliveryStatus, Dispatcher, Webhooks, signature
from tests.webhook_receiver import Receiver, readme_verifier

SECRET = "the-test's-secret-0123456789"
Q, S, R, OK, FAIL, STOP = (JobState.QUEUED, JobState.STARTING, JobState.RUNNING, JobState.SUCCEEDED,
                           JobState.FAILED, JobState.CANCELLED)  # fmt: skip
RETRY = "retry"
PATHS = {  # after QUEUED; RETRY is a new attempt, back to QUEUED
    "done": [S, R, OK],
    "flaky": [S, FAIL, RETRY, S, R, OK],
    "dropped": [STOP],
}


@pytest.fixture()
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'hutch.db'}"


@pytest.fixture()
def receiver() -> Iterator[Receiver]:
    server = Receiver(SECRET, fail_first=2)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def dispatcher(store: JobStore, lease: Lease | None = None, max_attempts: int = 100) -> Dispatcher:
    """A dispatcher that retries at once (20 ms, doubling) and looks for work every 20 ms."""
    sender = Dispatcher(
        Webhooks(store), lease, max_attempts=max_attempts, retry_s=0.02, timeout_s=5, poll_s=0.02, workers=4
    )
    sender.start()
    return sender


def steps(store: JobStore, jobs: dict[str, str]) -> Iterator[None]:
    """Each job's moves along its path, the jobs taking turns: one move per step."""

    def moves(job_id: str, path: list[JobState | str]) -> Iterator[None]:
        state, attempt = Q, 1
        for target in path:
            if target == RETRY:
                assert store.retry(job_id)
                state, attempt = Q, attempt + 1
            else:
                assert store.move(job_id, state, JobState(target), attempt=attempt, message=f"to {target}")
                state = JobState(target)
            yield

    walking = [moves(job_id, PATHS[kind]) for job_id, kind in jobs.items()]
    while walking:
        for walk in list(walking):
            if next(walk, "arrived") == "arrived":
                walking.remove(walk)
            else:
                yield


def expected_states(kind: str) -> list[str]:
    return ["QUEUED"] + ["QUEUED" if step == RETRY else str(step) for step in PATHS[kind]]


def pending(store: JobStore) -> int:
    return Webhooks(store).pending()


def test_every_change_arrives_signed_in_order_through_failures_and_restarts(
    url: str, receiver: Receiver
) -> None:
    store = JobStore(url)
    hooks = Webhooks(store)
    everything = hooks.add(receiver.url("/all"), None, SECRET)
    finished = hooks.add(receiver.url("/finished"), [OK, FAIL], SECRET)
    sender = dispatcher(store)
    jobs = {}
    for n, kind in enumerate(sorted(PATHS) * 2):
        job, _, _ = store.create(f"{kind}-{n}", {"name": kind, "labels": {"n": str(n)}})
        jobs[job.id] = kind
    walk = steps(store, jobs)
    for _ in range(8):  # the first moves, while the receiver answers (500 to the first two)
        next(walk)
        time.sleep(0.01)

    receiver.stop()
    for _ in walk:  # the rest of the moves, while the receiver is down
        pass

    def refused() -> bool:
        listed = hooks.deliveries(everything.id, [], 200, None).deliveries
        return any("ConnectError" in (delivery.last_error or "") for delivery in listed)

    wait_for(refused, 10, "a sending refused while the receiver is down")
    sender.stop()  # the service stops with deliveries pending, and starts again
    store.close()
    store = JobStore(url)
    hooks = Webhooks(store)
    assert pending(store) > 0
    sender = dispatcher(store)
    time.sleep(0.1)
    receiver.start()  # the same port again
    try:
        wait_for(lambda: pending(store) == 0, 20, "every delivery to be delivered")
    finally:
        sender.stop()

    assert receiver.refused == [] and receiver.failed == 2
    for hook, path in ((everything, "/all"), (finished, "/finished")):
        for job_id, kind in jobs.items():
            arrived = [r.body for r in receiver.accepted if r.path == path and r.body["job"]["id"] == job_id]
            firsts = {body["id"]: body for body in reversed(arrived)}  # each change's first arrival
            states = [body["job"]["state"] for body in sorted(firsts.values(), key=arrived.index)]
            wanted = [s for s in expected_states(kind) if hook.events is None or s in hook.events]
            assert states == wanted, (path, job_id, [b["job"]["state"] for b in arrived])
            for body in arrived:
                assert body["type"] == "job.state_changed" and body["webhook_id"] == hook.id
                assert body["job"]["name"] == kind and body["job"]["labels"] == {"n": job_id.split("-")[-1]}
            attempts = [body["job"]["attempt"] for body in arrived]
            assert attempts == sorted(attempts) and attempts[-1:] in ([], [2 if kind == "flaky" else 1])

    delivered = hooks.deliveries(everything.id, [], 200, None).deliveries
    assert {d.status for d in delivered} == {DeliveryStatus.DELIVERED}
    retried = [d for d in delivered if d.attempts > 1]
    errors = {d.last_error.split(":")[0] for d in retried if d.last_error}
    assert "ConnectError" in errors and any(error.startswith("HTTP 500") for error in errors), errors
    headers = receiver.accepted[0].headers
    assert headers["Hutch-Event"] == "job.state_changed" and headers["Content-Type"] == "application/json"
    store.close()


def test_a_receiver_with_another_secret_refuses_every_sending_until_given_up(url: str) -> None:
    """The counterpart that can fail: signed with one secret, checked with another. Each delivery
    is given up after its last sending, and the job's next change goes out only then."""
    receiver = Receiver("another-secret-0123456789")
    receiver.start()
    store = JobStore(url)
    hook = Webhooks(store).add(receiver.url(), None, SECRET)
    sender = dispatcher(store, max_attempts=3)
    try:
        job, _, _ = store.create("refused", {"name": "refused"})
        assert store.move(job.id, Q, STOP, attempt=1, message="cancelled while queued")
        wait_for(lambda: pending(store) == 0, 10, "both deliveries given up")
        assert sender.outcomes() == {"delivered": 0, "retried": 4, "failed": 2}
    finally:
        sender.stop()
        receiver.stop()
    assert receiver.accepted == []
    assert [r.body["job"]["state"] for r in receiver.refused] == ["QUEUED"] * 3 + ["CANCELLED"] * 3
    deliveries = Webhooks(store).deliveries(hook.id, [DeliveryStatus.FAILED], 10, None).deliveries
    assert [(d.state, d.attempts, d.last_error) for d in deliveries] == [
        (STOP, 3, "HTTP 401 Unauthorized"),
        (Q, 3, "HTTP 401 Unauthorized"),
    ]
    assert all(d.next_attempt_at is None and d.finished_at is not None for d in deliveries)
    store.close()


def test_the_readme_check_refuses_what_was_not_signed_so() -> None:
    verify = readme_verifier()
    body = b'{"id": "1"}'
    now = int(time.time())
    good = signature(SECRET, now, body)
    mac = hmac.new(SECRET.encode(), f"{now}.".encode() + body, hashlib.sha256).hexdigest()
    assert good == f"t={now},v1={mac}"  # the documented scheme, computed here independently
    assert verify(SECRET, good, body)
    assert not verify("another-secret-0123456789", good, body)
    assert not verify(SECRET, good, body + b" ")
    assert not verify(SECRET, signature(SECRET, now - 3600, body), body)  # an old one, replayed
    for header in ("", "t=x,v1=00", f"t={now}", f"v1={mac}", f"t={now},v1=é"):
        assert not verify(SECRET, header, body), header


def test_only_the_leader_sends_and_its_successor_carries_on(url: str, receiver: Receiver) -> None:
    """Two replicas on one database: the one holding the reconciler's lease sends; when it stops
    (giving the lease up), the other takes over the deliveries still to send."""
    receiver.fail_first = 0
    stores = [JobStore(url), JobStore(url)]
    leases = [Lease(store, name, ttl_s=2.0, renew_s=0.05) for store, name in zip(stores, "ab", strict=True)]
    leases[0].start()
    leases[1].start()
    senders = [dispatcher(store, lease) for store, lease in zip(stores, leases, strict=True)]
    leader = 0 if leases[0].current() is not None else 1
    follower = 1 - leader
    assert leases[follower].current() is None
    Webhooks(stores[0]).add(receiver.url(), None, SECRET)
    store = stores[follower]  # a change made on either replica is sent by the leader
    job, _, _ = store.create("led", {"name": "led"})
    wait_for(lambda: len(receiver.accepted) == 1, 10, "the first change")
    assert senders[leader].outcomes()["delivered"] == 1 and senders[follower].outcomes()["delivered"] == 0

    senders[leader].stop()
    leases[leader].stop()
    assert store.move(job.id, Q, S, attempt=1)
    assert store.move(job.id, S, R, attempt=1)
    try:
        wait_for(lambda: len(receiver.accepted) == 3, 10, "the changes after the handover")
        assert leases[follower].current() is not None
        assert senders[follower].outcomes()["delivered"] == 2
    finally:
        senders[follower].stop()
        leases[follower].stop()
        for each in stores:
            each.close()
    assert [r.body["job"]["state"] for r in receiver.accepted] == ["QUEUED", "STARTING", "RUNNING"]


def test_a_receiver_that_never_answers_holds_up_neither_the_store_nor_the_others(
    url: str, receiver: Receiver
) -> None:
    """A receiver that takes connections and never answers: each sending to it waits out its time
    limit on a thread of its own, half of the threads at most, while the job store's moves (the
    reconciler's) take no longer and another webhook gets every change."""
    receiver.fail_first = 0
    with socket.socket() as silent:  # listens, never accepts: requests go in, no answer comes out
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        store = JobStore(url)
        hooks = Webhooks(store)
        hung = hooks.add(f"http://127.0.0.1:{silent.getsockname()[1]}/", None, SECRET)
        hooks.add(receiver.url(), None, SECRET)
        sender = Dispatcher(hooks, None, max_attempts=5, retry_s=0.02, timeout_s=1.0, poll_s=0.02, workers=4)
        sender.start()
        try:
            slowest = 0.0
            for n in range(6):  # more jobs (pairs to send at once) than threads
                began = time.perf_counter()
                job, _, _ = store.create(f"job-{n}", {"name": "job"})
                for old, new in ((Q, S), (S, R), (R, OK)):
                    assert store.move(job.id, old, new, attempt=1)
                slowest = max(slowest, time.perf_counter() - began)
            wait_for(lambda: len(receiver.accepted) == 24, 5, "every change at the answering receiver")
            waiting = hooks.deliveries(hung.id, [DeliveryStatus.PENDING], 50, None).deliveries
            assert len(waiting) == 24 and all(d.attempts <= 1 for d in waiting)
        finally:
            sender.stop()
            store.close()
    assert slowest < 0.5, f"a job's create and 3 moves took {slowest:.3f} s"
    last_job = [r.body["job"]["state"] for r in receiver.accepted if r.body["job"]["id"] == job.id]
    assert last_job == ["QUEUED", "STARTING", "RUNNING", "SUCCEEDED"]


def test_finished_deliveries_are_kept_a_while_and_orphans_removed(url: str) -> None:
    store = JobStore(url)
    hooks = Webhooks(store)
    kept = hooks.add("http://127.0.0.1:9/kept", None, SECRET)
    gone = hooks.add("http://127.0.0.1:9/gone", None)  # a secret is made
    job, _, _ = store.create("pruned", {"name": "pruned"})
    assert store.move(job.id, Q, STOP, attempt=1)
    old = utcnow() - KEEP_FINISHED - timedelta(minutes=1)
    with store.engine.begin() as connection:  # the first change went out long ago, the second lately
        connection.execute(update(DELIVERIES).where(DELIVERIES.c.state == "QUEUED").values(
            status="delivered", finished_at=old, next_attempt_at=None))  # fmt: skip
        connection.execute(delete(WEBHOOKS).where(WEBHOOKS.c.id == gone.id))  # as a race would leave it
    assert hooks.prune(utcnow() - KEEP_FINISHED) == 3  # 2 long finished, 1 of a removed webhook
    left = hooks.deliveries(kept.id, [], 10, None).deliveries
    assert [(d.state, d.status) for d in left] == [(STOP, DeliveryStatus.PENDING)] and hooks.pending() == 1
    store.close()
