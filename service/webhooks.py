"""Webhooks: subscriptions to job state changes, and the dispatcher that sends them.

**Outbox.** The job store writes a pending delivery for every subscription that wants a state
change in the transaction that makes the change (:func:`service.store._queue_deliveries`): what
commits is sent even if the service stops the next instant, and nothing is sent for a change
that did not commit. Rows of their own rather than a cursor over ``job_events``: on Postgres an
event's id is drawn before its transaction commits, so a cursor could pass an event that commits
later, and deleting a job deletes its events, possibly before they were sent. A delivery row also
is the record the API shows (status, sendings, last error, next try).

**At least once, in a job's order.** A delivery stays pending until a receiver answers 2xx (then
delivered) or its sendings reach the limit (then failed: given up); after a failed sending the next
waits ``retry_s``, doubled at each sending, up to :data:`MAX_BACKOFF_S`. Only the oldest pending
delivery of a (webhook, job) pair is ever due, so a job's change N+1 is not sent to a webhook before
its change N was delivered or given up; a pair is sent by one thread at a time. The result of a
sending is written as a compare-and-set on the count of sendings, so a sending whose result is lost
(the service stopped, the database was away) is sent again: a receiver may see a change twice, and
tells by its ``id``.

**One sender.** Every replica may add subscriptions and, through the job store, deliveries; only
the replica that holds the reconciler's lease (:mod:`service.leader`) sends, and it checks the
lease again before each sending. A sending itself cannot be fenced: a replica paused in the middle
of one may complete it after another took over and sent that change and the next; the receiver
then sees a late duplicate, which its ``id`` tells apart (its result is not recorded).

**Never in the reconciler's way.** Deliveries go out on threads of their own, with a time limit
each; a slow or dead receiver holds one of them, never the reconciler or the API.

**Signature.** ``Hutch-Signature: t=<unix seconds>,v1=<hex>``, the hex being HMAC-SHA256, keyed by
the subscription's secret, of ``<t>.`` followed by the exact body (README.md shows how to check it).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import threading
import time
from collections import Counter
from collections.abc import Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

import httpx
import pydantic_core
from sqlalchemy import BigInteger, delete, func, literal, select, update
from sqlalchemy.exc import SQLAlchemyError

from service.leader import Lease
from service.lifecycle import JobState
from service.store import DELIVERIES, WEBHOOKS, JobStore, decode_cursor, encode_cursor, utcnow

log = logging.getLogger("hutch.webhooks")

SIGNATURE_HEADER = "Hutch-Signature"
EVENT_TYPE = "job.state_changed"
MAX_BACKOFF_S = 600.0
"""The longest wait between two sendings of one delivery."""
KEEP_FINISHED = timedelta(days=7)
"""How long delivered and given-up deliveries stay listed before they are removed."""
POLL_S = 0.5
WORKERS = 8
_PRUNE_EVERY_S = 3600.0


class DeliveryStatus(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"  # given up after the last sending


OUTCOMES = {
    DeliveryStatus.DELIVERED: "delivered",
    DeliveryStatus.PENDING: "retried",
    DeliveryStatus.FAILED: "failed",
}
"""What a sending led to, by the status it left its delivery in (the ``outcome`` label of
``hutch_webhook_deliveries_total``): delivered; failed, to be sent again; failed for the last time."""


class WebhookNotFound(LookupError):
    def __init__(self, webhook_id: str) -> None:
        super().__init__(f"no webhook with id {webhook_id!r}")


@dataclass(frozen=True)
class Webhook:
    id: str
    url: str
    events: tuple[JobState, ...] | None  # None: every state
    secret: str
    created_at: datetime

    @property
    def secret_hint(self) -> str:
        """Enough of the secret to tell which one it is, not enough to sign with."""
        return "****" + self.secret[-4:]


@dataclass(frozen=True)
class Delivery:
    """One state change of one job for one webhook, and how its sending goes."""

    seq: int
    webhook_id: str
    event_id: str
    job_id: str
    job_name: str
    labels: dict[str, str]
    submitted_by: str | None
    state: JobState
    job_attempt: int
    at: datetime
    message: str | None
    status: DeliveryStatus
    attempts: int
    next_attempt_at: datetime | None
    last_error: str | None
    finished_at: datetime | None

    def body(self) -> bytes:
        """What is POSTed: the same bytes at every sending, for every webhook but its id."""
        return pydantic_core.to_json(
            {
                "id": self.event_id,
                "type": EVENT_TYPE,
                "at": self.at,
                "webhook_id": self.webhook_id,
                "job": {
                    "id": self.job_id,
                    "name": self.job_name,
                    "state": self.state.value,
                    "attempt": self.job_attempt,
                    "labels": self.labels,
                    "submitted_by": self.submitted_by,
                },
                "message": self.message,
            }
        )


@dataclass(frozen=True)
class DeliveryPage:
    deliveries: list[Delivery]
    next_cursor: str | None


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """The value of :data:`SIGNATURE_HEADER` for ``body`` sent at ``timestamp`` (unix seconds)."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def _webhook(row: Any) -> Webhook:
    events = tuple(JobState(state) for state in row.events) if row.events else None
    return Webhook(row.id, row.url, events, row.secret, row.created_at)


def _delivery(row: Any) -> Delivery:
    values = {name: getattr(row, name) for name in Delivery.__dataclass_fields__}
    values.update(state=JobState(row.state), status=DeliveryStatus(row.status))
    return Delivery(**values)


class Webhooks:
    """The subscriptions and their deliveries, in the job store's database."""

    def __init__(self, store: JobStore) -> None:
        self.engine = store.engine

    # -- subscriptions --------------------------------------------------------------------
    def add(self, url: str, events: Sequence[JobState] | None, secret: str | None = None) -> Webhook:
        """Subscribe ``url`` to the changes into ``events`` (None: every state), signed with
        ``secret`` (one is made without it). Changes from now on are delivered, none before."""
        wanted = sorted(set(events), key=list(JobState).index) if events else None
        hook = Webhook(
            id=f"wh-{secrets.token_hex(6)}",
            url=url,
            events=tuple(wanted) if wanted else None,
            secret=secret or secrets.token_urlsafe(32),
            created_at=utcnow(),
        )
        row = {**vars(hook), "events": [str(state) for state in wanted] if wanted else None}
        with self.engine.begin() as connection:
            connection.execute(WEBHOOKS.insert(), row)
        return hook

    def all(self) -> list[Webhook]:
        with self.engine.connect() as connection:
            rows = connection.execute(select(WEBHOOKS).order_by(WEBHOOKS.c.created_at, WEBHOOKS.c.id))
            return [_webhook(row) for row in rows]

    def get(self, webhook_id: str) -> Webhook:
        if "\x00" not in webhook_id:  # no id has one, and Postgres refuses it in a query
            with self.engine.connect() as connection:
                row = connection.execute(select(WEBHOOKS).where(WEBHOOKS.c.id == webhook_id)).first()
            if row is not None:
                return _webhook(row)
        raise WebhookNotFound(webhook_id)

    def remove(self, webhook_id: str) -> None:
        """Unsubscribe: the webhook and its deliveries, the pending ones too, are gone."""
        self.get(webhook_id)
        with self.engine.begin() as connection:
            connection.execute(delete(DELIVERIES).where(DELIVERIES.c.webhook_id == webhook_id))
            if connection.execute(delete(WEBHOOKS).where(WEBHOOKS.c.id == webhook_id)).rowcount != 1:
                raise WebhookNotFound(webhook_id)  # removed by another request meanwhile

    # -- deliveries -----------------------------------------------------------------------
    def deliveries(
        self, webhook_id: str, statuses: Sequence[DeliveryStatus], limit: int, cursor: str | None
    ) -> DeliveryPage:
        """The webhook's deliveries newest first, in any of ``statuses``; ``cursor`` is the
        previous page's ``next_cursor``."""
        self.get(webhook_id)
        query = select(DELIVERIES).where(DELIVERIES.c.webhook_id == webhook_id)
        if statuses:
            query = query.where(DELIVERIES.c.status.in_([str(status) for status in statuses]))
        if cursor is not None:
            query = query.where(DELIVERIES.c.seq < literal(decode_cursor(cursor), BigInteger))
        with self.engine.connect() as connection:
            rows = connection.execute(query.order_by(DELIVERIES.c.seq.desc()).limit(limit + 1)).all()
        found = [_delivery(row) for row in rows]
        next_cursor = encode_cursor(found[limit - 1].seq) if len(found) > limit else None
        return DeliveryPage(found[:limit], next_cursor)

    def due(self, now: datetime, limit: int, skip: Collection[str] = ()) -> list[tuple[Delivery, str, str]]:
        """Deliveries to send now, oldest first, with their webhook's URL and secret: those whose
        time has come and that are the oldest pending one of their (webhook, job) pair; none of
        the webhooks in ``skip``."""
        earlier = DELIVERIES.alias("earlier")
        earlier_waits = (
            select(earlier.c.seq)
            .where(
                earlier.c.status == DeliveryStatus.PENDING.value,
                earlier.c.webhook_id == DELIVERIES.c.webhook_id,
                earlier.c.job_id == DELIVERIES.c.job_id,
                earlier.c.seq < DELIVERIES.c.seq,
            )
            .exists()
        )
        query = (
            select(DELIVERIES, WEBHOOKS.c.url, WEBHOOKS.c.secret)
            .join(WEBHOOKS, WEBHOOKS.c.id == DELIVERIES.c.webhook_id)
            .where(
                DELIVERIES.c.status == DeliveryStatus.PENDING.value,
                DELIVERIES.c.next_attempt_at <= now,
                DELIVERIES.c.webhook_id.not_in(list(skip)),
                ~earlier_waits,
            )
            .order_by(DELIVERIES.c.seq)
            .limit(limit)
        )
        with self.engine.connect() as connection:
            return [(_delivery(row), row.url, row.secret) for row in connection.execute(query)]

    def record(
        self, delivery: Delivery, error: str | None, max_attempts: int, retry_s: float
    ) -> DeliveryStatus | None:
        """Write how a sending of ``delivery`` went (``error`` None: delivered) and return the
        delivery's new status; None if another sender recorded one first (nothing written)."""
        now = utcnow()
        attempts = delivery.attempts + 1
        values: dict[str, Any] = {"attempts": attempts, "next_attempt_at": None, "finished_at": now}
        if error is None:
            values["status"] = DeliveryStatus.DELIVERED
        else:
            values["last_error"] = error
            values["status"] = DeliveryStatus.FAILED if attempts >= max_attempts else DeliveryStatus.PENDING
        if values["status"] == DeliveryStatus.PENDING:
            wait = min(retry_s * 2 ** (attempts - 1), MAX_BACKOFF_S)
            values.update(next_attempt_at=now + timedelta(seconds=wait), finished_at=None)
        values["status"] = values["status"].value
        with self.engine.begin() as connection:
            written = connection.execute(
                update(DELIVERIES)
                .where(
                    DELIVERIES.c.seq == delivery.seq,
                    DELIVERIES.c.status == DeliveryStatus.PENDING.value,
                    DELIVERIES.c.attempts == delivery.attempts,
                )
                .values(values)
            ).rowcount
        return DeliveryStatus(values["status"]) if written == 1 else None

    def pending(self) -> int:
        """Deliveries waiting to be sent or sent again."""
        query = select(func.count()).where(DELIVERIES.c.status == DeliveryStatus.PENDING.value)
        with self.engine.connect() as connection:
            return int(connection.execute(query).scalar() or 0)

    def prune(self, finished_before: datetime) -> int:
        """Remove the deliveries finished before ``finished_before``, and those of webhooks removed
        while the change was being recorded; how many were removed."""
        subscribed = select(WEBHOOKS.c.id)
        with self.engine.begin() as connection:
            old = connection.execute(delete(DELIVERIES).where(DELIVERIES.c.finished_at < finished_before))
            orphans = connection.execute(delete(DELIVERIES).where(DELIVERIES.c.webhook_id.not_in(subscribed)))
        return old.rowcount + orphans.rowcount


class Dispatcher:
    """Sends the pending deliveries on threads of its own while this replica leads (always,
    without a ``lease``); start with :meth:`start`, end with :meth:`stop`."""

    def __init__(
        self,
        webhooks: Webhooks,
        lease: Lease | None,
        *,
        max_attempts: int,
        retry_s: float,
        timeout_s: float,
        poll_s: float = POLL_S,
        workers: int = WORKERS,
    ) -> None:
        self.webhooks = webhooks
        self.lease = lease
        self.max_attempts = max_attempts
        self.retry_s = retry_s
        self.poll_s = poll_s
        self.workers = workers
        # Redirects are not followed: a receiver answers 2xx itself, or the sending failed.
        self.http = httpx.Client(timeout=timeout_s, headers={"User-Agent": "hutch-webhooks/1"})
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="hutch-webhook")
        self._lock = threading.Lock()
        self._in_flight: set[tuple[str, str]] = set()  # (webhook, job) pairs being sent
        self._outcomes = dict.fromkeys(OUTCOMES.values(), 0)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._pruned_at = -_PRUNE_EVERY_S
        self._thread: threading.Thread | None = None

    def outcomes(self) -> dict[str, int]:
        """Sendings of this replica so far, by outcome (see :data:`OUTCOMES`)."""
        with self._lock:
            return dict(self._outcomes)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="hutch-webhooks", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop sending: the sendings under way finish (within the time limit of one), the
        deliveries still pending wait in the database for the next leader."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.http.close()

    def _leads(self) -> bool:
        return self.lease is None or self.lease.current() is not None

    def _loop(self) -> None:
        while True:
            self._wake.wait(self.poll_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            if not self._leads():
                continue
            try:
                self._dispatch()
                if time.monotonic() - self._pruned_at >= _PRUNE_EVERY_S:
                    self._pruned_at = time.monotonic()
                    if removed := self.webhooks.prune(utcnow() - KEEP_FINISHED):
                        log.info("removed %d finished webhook deliveries (kept %s)", removed, KEEP_FINISHED)
            except SQLAlchemyError as error:  # the database is away: ask again next time
                log.warning("webhook deliveries not read: %s", type(error).__name__)

    def _dispatch(self) -> None:
        """Hand each due delivery whose pair is not being sent to a free thread; one webhook gets
        half of the threads at most, so a receiver that never answers leaves the others some."""
        with self._lock:
            busy = set(self._in_flight)
        free = self.workers - len(busy)
        if free <= 0:
            return
        most = max(1, self.workers // 2)
        per_webhook = Counter(webhook for webhook, _ in busy)
        full = {webhook for webhook, sending in per_webhook.items() if sending >= most}
        for delivery, url, secret in self.webhooks.due(utcnow(), free + len(busy), full):
            pair = (delivery.webhook_id, delivery.job_id)
            if pair in busy or per_webhook[delivery.webhook_id] >= most:
                continue
            busy.add(pair)
            per_webhook[delivery.webhook_id] += 1
            with self._lock:
                self._in_flight.add(pair)
            self._pool.submit(self._send, delivery, url, secret)
            free -= 1
            if free == 0:
                return

    def _send(self, delivery: Delivery, url: str, secret: str) -> None:
        """One sending of ``delivery``, and its result written."""
        recorded = False
        try:
            if not self._leads():  # lost the lead since it was read: the next leader sends it
                return
            body = delivery.body()
            headers = {
                "Content-Type": "application/json",
                SIGNATURE_HEADER: signature(secret, int(time.time()), body),
                "Hutch-Event": EVENT_TYPE,
                "Hutch-Delivery": str(delivery.seq),
            }
            try:
                with self.http.stream("POST", url, content=body, headers=headers) as answer:
                    ok = answer.is_success
                    error = None if ok else f"HTTP {answer.status_code} {answer.reason_phrase}".strip()
            except (httpx.HTTPError, httpx.InvalidURL) as failure:
                error = f"{type(failure).__name__}: {failure}"[:500]
            status = self.webhooks.record(delivery, error, self.max_attempts, self.retry_s)
            if status is None:
                return
            recorded = True
            with self._lock:
                self._outcomes[OUTCOMES[status]] += 1
            if error is not None:
                level = logging.WARNING if status == DeliveryStatus.FAILED else logging.INFO
                log.log(
                    level, "webhook %s: %s of job %s, sending %d of %d: %s%s", delivery.webhook_id,
                    delivery.state.value, delivery.job_id, delivery.attempts + 1, self.max_attempts, error,
                    "; given up" if status == DeliveryStatus.FAILED else "",
                )  # fmt: skip
        except SQLAlchemyError as failure:  # the result is unknown: the delivery is sent again
            log.warning("webhook delivery %d not recorded: %s", delivery.seq, type(failure).__name__)
        except Exception:  # a bug: logged, and the delivery stays pending
            log.exception("webhook delivery %d", delivery.seq)
        finally:
            with self._lock:
                self._in_flight.discard((delivery.webhook_id, delivery.job_id))
            if recorded:
                self._wake.set()  # the pair's next change may be due now
