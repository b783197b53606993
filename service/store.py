"""The job store: jobs, their labels and their state changes, in SQL through SQLAlchemy.

SQLite by default (WAL, so readers never wait for the reconciler), any other SQLAlchemy URL
(Postgres) unchanged. Every state change is a compare-and-set (``UPDATE … WHERE state = old``)
recorded as an event in the same transaction, so two writers — a route and the reconciler, or
a restarted service and the remains of its predecessor — can never both move a job, and each
state is entered once per attempt.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

import pydantic_core
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    bindparam,
    create_engine,
    event,
    exists,
    extract,
    func,
    insert,
    literal,
    select,
    union,
    update,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.types import TypeDecorator

from service import migrations
from service.lifecycle import ALLOWED_MOVES, TERMINAL_STATES, JobState


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every database (SQLite drops the zone otherwise)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    pass


class JobRow(Base):
    __tablename__ = "jobs"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    state: Mapped[str] = mapped_column(String(16))  # indexed by the two indexes below
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    idempotency_key: Mapped[str | None] = mapped_column(String(200), unique=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    ray_job_id: Mapped[str | None] = mapped_column(String(128))
    failure_reason: Mapped[str | None] = mapped_column(Text)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    latest_metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    priority: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    submitted_by: Mapped[str | None] = mapped_column(String(100))  # the API token's name
    labels: Mapped[list[LabelRow]] = relationship(
        cascade="all, delete-orphan", lazy="selectin", passive_deletes=True
    )

    # The queue's order: the next job to start and a job's place in the queue read the first
    # index. A list filtered by one state walks the second newest first and stops after one page
    # (with the first, SQLite read and sorted every job in that state: 6 ms for 1,000 FAILED).
    __table_args__ = (
        Index("ix_jobs_state_priority_seq", "state", "priority", "seq"),
        Index("ix_jobs_state_seq", "state", "seq"),
    )


class LabelRow(Base):
    __tablename__ = "job_labels"

    job_seq: Mapped[int] = mapped_column(ForeignKey("jobs.seq", ondelete="CASCADE"), primary_key=True)
    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    value: Mapped[str] = mapped_column(String(200))

    # A label filter walks this index newest first and stops after one page (SQLite then needs no
    # scan of the jobs, nor a sort, however rare or common the label).
    __table_args__ = (Index("ix_job_labels_key_value_seq", "key", "value", "job_seq"),)


class EventRow(Base):
    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(64), index=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    attempt: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16))
    message: Mapped[str | None] = mapped_column(Text)


class LeaseRow(Base):
    """Who leads the reconciler (:mod:`service.leader`): one row per lease name. ``token`` is the
    fencing token, one more at every change of holder; ``expires_at`` is on the database's own
    clock (seconds since the epoch), so replicas on hosts whose clocks differ agree on it."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str | None] = mapped_column(String(200))
    token: Mapped[int] = mapped_column(BigInteger, default=0)
    expires_at: Mapped[float] = mapped_column(Float)


class WebhookRow(Base):
    """A subscription to job state changes (:mod:`service.webhooks` sends them)."""

    __tablename__ = "webhooks"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    url: Mapped[str] = mapped_column(Text)
    events: Mapped[list[str] | None] = mapped_column(JSON)  # the states it wants; null: every state
    secret: Mapped[str] = mapped_column(String(200))  # kept as given: the service signs with it
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class DeliveryRow(Base):
    """One state change of one job for one webhook: the outbox (written with the change, see
    :func:`_queue_deliveries`), then how its sending goes. ``attempts`` counts the sendings;
    ``job_attempt`` is the job's attempt. No foreign key to ``webhooks``: one would make a state
    change fail when its subscription is deleted meanwhile; deliveries without one are not sent."""

    __tablename__ = "webhook_deliveries"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    webhook_id: Mapped[str] = mapped_column(String(64))
    event_id: Mapped[str] = mapped_column(String(32))  # the same for every webhook and every sending
    job_id: Mapped[str] = mapped_column(String(64))
    job_name: Mapped[str] = mapped_column(String(200))
    labels: Mapped[dict[str, str]] = mapped_column(JSON)
    submitted_by: Mapped[str | None] = mapped_column(String(100))
    state: Mapped[str] = mapped_column(String(16))
    job_attempt: Mapped[int] = mapped_column(Integer)
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    message: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))  # pending, delivered or failed (given up)
    attempts: Mapped[int] = mapped_column(Integer)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    # The first finds what is due and whether an earlier change of the same job still waits (the
    # order of a job's changes); the second reads a webhook's deliveries newest first.
    __table_args__ = (
        Index("ix_webhook_deliveries_status_webhook_job_seq", "status", "webhook_id", "job_id", "seq"),
        Index("ix_webhook_deliveries_webhook_seq", "webhook_id", "seq"),
    )


@dataclass(frozen=True)
class JobRecord:
    """A detached snapshot of one job row."""

    seq: int
    id: str
    name: str
    state: JobState
    spec: dict[str, Any]
    labels: dict[str, str]
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    attempt: int
    ray_job_id: str | None
    failure_reason: str | None
    cancel_requested: bool
    latest_metrics: dict[str, Any] | None
    idempotency_key: str | None
    request_hash: str
    priority: int = 0
    submitted_by: str | None = None

    @classmethod
    def of_columns(cls, values: dict[str, Any]) -> JobRecord:
        """From the columns of a jobs row read without the ORM (as :meth:`JobStore._records` does).
        The labels are the spec's: job_labels holds the same pairs, as an index for filtering."""
        labels = dict(values["spec"].get("labels") or {})
        values.update(state=JobState(values["state"]), labels=labels, priority=values.get("priority") or 0)
        values.setdefault("submitted_by", None)
        return cls(**{name: values[name] for name in _RECORD_FIELDS})


class Created(NamedTuple):
    """What :meth:`JobStore.create` did: the job (new, or the one its key made before), whether it
    is new, and its place in the queue then (read in the creating transaction: no second query)."""

    job: JobRecord
    created: bool
    queue_position: int | None


_RECORD_FIELDS = tuple(JobRecord.__dataclass_fields__)
JOBS = JobRow.__table__
LABELS = LabelRow.__table__
EVENTS = EventRow.__table__
LEASES = LeaseRow.__table__
WEBHOOKS = WebhookRow.__table__
DELIVERIES = DeliveryRow.__table__


@dataclass(frozen=True)
class Fence:
    """The lease a reconciler held when it read a job (:mod:`service.leader`): a write that carries
    it is made only while the database still gives that lease, unexpired, to that holder."""

    lease: str
    holder: str
    token: int


def database_now(engine: Engine) -> ColumnElement[Any]:
    """Now on the database's own clock, in seconds since the epoch (what leases are timed by)."""
    if engine.dialect.name == "sqlite":
        return (func.julianday("now") - 2440587.5) * 86400.0
    if engine.dialect.name == "postgresql":
        return extract("epoch", func.clock_timestamp())
    raise NotImplementedError(f"leases need SQLite or Postgres, not {engine.dialect.name}")


# The statements of every request, built once: SQLAlchemy then reuses their compiled form without
# building and hashing them again (which cost more than running them).
_BY_ID = select(JOBS).where(JOBS.c.id == bindparam("job_id"))
_BY_KEY = select(JOBS).where(JOBS.c.idempotency_key == bindparam("key"))
_IN_STATES = select(JOBS).where(JOBS.c.state.in_(bindparam("states", expanding=True))).order_by(JOBS.c.seq)
_ANY_QUEUED = select(JOBS.c.seq).where(JOBS.c.state == str(JobState.QUEUED)).limit(1)
_AHEAD_IN_QUEUE = (
    select(func.count())
    .select_from(JOBS)
    .where(
        JOBS.c.state == str(JobState.QUEUED),
        (JOBS.c.priority > bindparam("priority"))
        | ((JOBS.c.priority == bindparam("priority")) & (JOBS.c.seq < bindparam("seq"))),
    )
)


@dataclass(frozen=True)
class EventRecord:
    at: datetime
    attempt: int
    state: JobState
    message: str | None


class IdempotencyConflict(Exception):
    """The idempotency key was used before with a different request body."""


class BadCursor(ValueError):
    """A pagination cursor this store did not issue."""


def request_hash(spec: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


CURSOR_PATTERN = r"^[A-Za-f][A-Za-z0-9_-]{9}[AEIMQUYcgkosw048]$"
"""Every cursor: a seq (0 to 2**63-1) as 8 big-endian bytes in unpadded URL-safe base64. Exactly the
strings :func:`decode_cursor` takes (the API's schema states it), each a valid place to resume."""
_CURSOR = re.compile(CURSOR_PATTERN)


def encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(seq.to_bytes(8, "big")).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    if not _CURSOR.fullmatch(cursor):
        raise BadCursor("not a cursor returned by this API")
    return int.from_bytes(base64.urlsafe_b64decode(cursor + "="), "big")


class JobStore:
    """All reads and writes of jobs; safe to share between threads."""

    def __init__(self, url: str, upgrade: bool = False) -> None:
        """Open the store at ``url``. An empty database gets this release's schema; one at an
        earlier revision is upgraded if ``upgrade`` (the embedded default's choice) and refused
        otherwise, as is one a newer release wrote (:class:`~service.migrations.SchemaError`)."""
        self.engine: Engine = _engine(url)
        try:
            migrations.prepare(self.engine, upgrade)
        except BaseException:
            self.engine.dispose()
            raise
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        # SQLite has one writer at a time. Writers that find it taken sleep in SQLite's busy
        # handler (1, 2, 5, … 100 ms steps), which made a tail of 0.7-1 s under 20 concurrent
        # submissions; a lock in the process lets them take turns without sleeping. Postgres
        # needs none (and may have other processes writing).
        self._one_writer: AbstractContextManager[Any] = (
            threading.Lock() if self.engine.dialect.name == "sqlite" else nullcontext()
        )

    @contextmanager
    def _session(self, write: bool = False) -> Iterator[Session]:
        with self._one_writer if write else nullcontext(), self._sessions.begin() as session:
            yield session

    def _fenced(self, session: Session, fence: Fence | None) -> ColumnElement[bool] | None:
        """The condition that makes a write count only under ``fence``; None if the fence has
        already fallen (nothing to write). On Postgres the lease row is also share-locked until
        the write commits, so a takeover waits for it rather than reading around it; SQLite has
        one writer at a time anyway."""
        if fence is None:
            return literal(True)
        holds = (
            (LEASES.c.name == fence.lease)
            & (LEASES.c.holder == fence.holder)
            & (LEASES.c.token == fence.token)
            & (LEASES.c.expires_at > database_now(self.engine))
        )
        if self.engine.dialect.name == "postgresql":
            locked = select(LEASES.c.token).where(holds).with_for_update(read=True)
            if session.execute(locked).first() is None:
                return None
        return exists().where(holds)

    def ping(self) -> None:
        with self.engine.connect() as connection:
            connection.exec_driver_sql("SELECT 1")

    def close(self) -> None:
        self.engine.dispose()

    # -- creation -------------------------------------------------------------------------
    def create(
        self,
        job_id: str,
        spec: Mapping[str, Any],
        idempotency_key: str | None = None,
        submitted_by: str | None = None,
    ) -> Created:
        """Store a new QUEUED job; with a key already used, return that job instead.

        Raises :class:`IdempotencyConflict` if the key was used with a different spec.
        """
        now = utcnow()
        labels = dict(spec.get("labels") or {})
        values: dict[str, Any] = {
            "id": job_id,
            "name": str(spec["name"]),
            "state": str(JobState.QUEUED),
            "spec": dict(spec),
            "idempotency_key": idempotency_key,
            "request_hash": request_hash(spec),
            "created_at": now,
            "updated_at": now,
            "attempt": 1,
            "cancel_requested": False,
            "priority": int(spec.get("priority") or 0),
            "submitted_by": submitted_by,
        }
        queued = {"job_id": job_id, "at": now, "attempt": 1, "state": values["state"], "message": "submitted"}
        try:
            # Plain SQL statements, no ORM unit of work. A key used before is found by its unique
            # index, not by a query first: the callers that check first (ControlPlane.submit) pay once.
            with self._one_writer, self.engine.begin() as connection:
                seq = connection.execute(insert(JOBS), values).inserted_primary_key[0]
                if labels:
                    rows = [{"job_seq": seq, "key": key, "value": value} for key, value in labels.items()]
                    connection.execute(insert(LABELS), rows)
                connection.execute(insert(EVENTS), queued)
                _queue_deliveries(connection, job_id, now, 1, values["state"], "submitted")
                ahead = connection.execute(_AHEAD_IN_QUEUE, {"priority": values["priority"], "seq": seq})
                place = int(ahead.scalar() or 0) + 1
        except IntegrityError:
            if idempotency_key is None:
                raise
            existing = self.replay(idempotency_key, spec)  # the key was used, maybe concurrently
            if existing is None:
                raise
            return Created(existing, False, self.queue_position(existing))
        unset = dict.fromkeys(("started_at", "finished_at", "ray_job_id", "failure_reason", "latest_metrics"))
        record = JobRecord(**{**values, **unset, "seq": seq, "state": JobState.QUEUED, "labels": labels})
        return Created(record, True, place)

    def replay(self, idempotency_key: str, spec: Mapping[str, Any]) -> JobRecord | None:
        """The job an earlier request with this key made (None if none did); raises
        :class:`IdempotencyConflict` if that request carried a different spec."""
        found = self._records(_BY_KEY, {"key": idempotency_key})
        existing = found[0] if found else None
        if existing is not None and existing.request_hash != request_hash(spec):
            raise IdempotencyConflict(
                f"Idempotency-Key was already used for job {existing.id} with a different spec"
            )
        return existing

    # -- reads ----------------------------------------------------------------------------
    def get(self, job_id: str) -> JobRecord | None:
        if "\x00" in job_id:  # no id has one, and Postgres refuses it in a query
            return None
        found = self._records(_BY_ID, {"job_id": job_id})
        return found[0] if found else None

    def _records(self, query: Any, parameters: Mapping[str, Any] | None = None) -> list[JobRecord]:
        """The jobs a select of the jobs table finds, read as plain rows: building ORM objects
        (and loading their labels) cost more than the queries."""
        with self.engine.connect() as connection:
            result = connection.execute(query, parameters)
            columns = tuple(result.keys())
            return [JobRecord.of_columns(dict(zip(columns, row))) for row in result.all()]

    def list(
        self,
        states: Sequence[JobState] = (),
        labels: Mapping[str, str] | None = None,
        limit: int = 50,
        cursor: str | None = None,
        submitted_by: str | None = None,
    ) -> tuple[list[JobRecord], str | None]:
        """Jobs newest first, filtered by any of ``states``, all of ``labels`` and who submitted them."""
        query, newest = select(JOBS), JOBS.c.seq
        filters = list((labels or {}).items())
        if any("\x00" in key + value for key, value in filters):  # as in get: no label has one
            return [], None
        if filters:  # the first label drives: its index is walked newest first (see LabelRow)
            (key, value), filters = filters[0], filters[1:]
            first = LABELS.alias("first_label")
            query = query.join(first, first.c.job_seq == JOBS.c.seq)
            query = query.where(first.c.key == key, first.c.value == value)
            newest = first.c.job_seq
        for key, value in filters:
            query = query.where(
                select(LABELS.c.job_seq)
                .where(LABELS.c.job_seq == JOBS.c.seq, LABELS.c.key == key, LABELS.c.value == value)
                .exists()
            )
        if states:
            query = query.where(JOBS.c.state.in_([str(s) for s in states]))
        if submitted_by is not None:
            query = query.where(JOBS.c.submitted_by == submitted_by)
        if cursor is not None:
            # BIGINT: a cursor goes up to 2**63-1, past Postgres's INTEGER of the column.
            query = query.where(newest < literal(decode_cursor(cursor), BigInteger))
        records = self._records(query.order_by(newest.desc()).limit(limit + 1))
        next_cursor = encode_cursor(records[limit - 1].seq) if len(records) > limit else None
        return records[:limit], next_cursor

    def in_states(self, states: Sequence[JobState]) -> list[JobRecord]:
        """Jobs in any of ``states``, oldest first (the reconciler's work list)."""
        return self._records(_IN_STATES, {"states": [str(s) for s in states]})

    def has_queued(self) -> bool:
        with self.engine.connect() as connection:
            return connection.execute(_ANY_QUEUED).first() is not None

    def oldest_queued_at(self) -> datetime | None:
        """When the job that has waited QUEUED longest was submitted (or retried); None if none waits."""
        query = select(func.min(JOBS.c.updated_at)).where(JOBS.c.state == str(JobState.QUEUED))
        with self.engine.connect() as connection:
            return connection.execute(query).scalar()

    def queue(self) -> list[JobRecord]:
        """QUEUED jobs in the order they start: highest priority first, then oldest first."""
        query = (
            select(JOBS)
            .where(JobRow.state == str(JobState.QUEUED))
            .order_by(JobRow.priority.desc(), JobRow.seq)
        )
        return self._records(query)

    def queue_positions(self, jobs: Iterable[JobRecord]) -> dict[str, int]:
        """The places in the queue (1 for the next to start) of ``jobs``, read as QUEUED just
        before: one pass over the queue's index in the database, however many are asked for.

        A job among them that started since keeps its place, so a page read a moment earlier
        never shows a QUEUED job without a place (nor any other job's place shifted by it)."""
        ids = {job.seq: job.id for job in jobs}
        if not ids:
            return {}
        waiting = union(
            select(JOBS.c.seq, JOBS.c.priority).where(JOBS.c.state == str(JobState.QUEUED)),  # the index
            select(JOBS.c.seq, JOBS.c.priority).where(JOBS.c.seq.in_(ids)),  # the primary key
        ).subquery()
        place = func.row_number().over(order_by=(waiting.c.priority.desc(), waiting.c.seq)).label("place")
        ranked = select(waiting.c.seq, place).subquery()
        query = select(ranked.c.seq, ranked.c.place).where(ranked.c.seq.in_(ids))
        with self.engine.connect() as connection:
            return {ids[seq]: int(place) for seq, place in connection.execute(query)}

    def queue_position(self, job: JobRecord) -> int | None:
        """``job``'s place in the queue (1 for the next to start); None unless it is QUEUED."""
        if job.state != JobState.QUEUED:
            return None
        with self.engine.connect() as connection:
            ahead = connection.execute(_AHEAD_IN_QUEUE, {"priority": job.priority, "seq": job.seq}).scalar()
        return int(ahead or 0) + 1

    def count_by_state(self) -> dict[JobState, int]:
        with self._session() as session:
            rows = session.execute(select(JobRow.state, func.count()).group_by(JobRow.state)).all()
        counts = {state: 0 for state in JobState}
        counts.update({JobState(state): n for state, n in rows})
        return counts

    def events(self, job_id: str) -> list[EventRecord]:
        query = select(EventRow).where(EventRow.job_id == job_id).order_by(EventRow.id)
        with self._session() as session:
            return [
                EventRecord(row.at, row.attempt, JobState(row.state), row.message)
                for row in session.scalars(query)
            ]

    # -- writes ---------------------------------------------------------------------------
    def move(
        self,
        job_id: str,
        expected: JobState | Sequence[JobState],
        new: JobState,
        *,
        attempt: int | None = None,
        message: str | None = None,
        fence: Fence | None = None,
        **fields: Any,
    ) -> bool:
        """Move a job from one of ``expected`` (and ``attempt``, if given) to ``new``; False if
        it was not there (someone else moved it first) or ``fence`` has fallen."""
        olds = [expected] if isinstance(expected, JobState) else list(expected)
        for old in olds:
            if new not in ALLOWED_MOVES[old]:
                raise ValueError(f"a job cannot move from {old} to {new}")
        now = utcnow()
        values: dict[str, Any] = {"state": str(new), "updated_at": now, **fields}
        if new == JobState.RUNNING:
            values.setdefault("started_at", now)
        if new in TERMINAL_STATES:
            values.setdefault("finished_at", now)
        where = [JobRow.id == job_id, JobRow.state.in_([str(s) for s in olds])]
        if attempt is not None:
            where.append(JobRow.attempt == attempt)
        with self._session(write=True) as session:
            if (held := self._fenced(session, fence)) is None:
                return False
            moved = session.execute(update(JobRow).where(*where, held).values(**values)).rowcount == 1
            if moved:
                current = session.scalar(select(JobRow.attempt).where(JobRow.id == job_id))
                session.add(EventRow(job_id=job_id, at=now, attempt=current, state=str(new), message=message))
                _queue_deliveries(session.connection(), job_id, now, current, str(new), message)
        return moved

    def retry(self, job_id: str, message: str = "retry", fence: Fence | None = None) -> bool:
        """FAILED/CANCELLED → QUEUED as a new attempt (its event says ``message``); False if the
        job was not in those states (or ``fence`` has fallen).

        Writes before it reads, so SQLite never has to upgrade a read transaction."""
        now = utcnow()
        retryable = [str(JobState.FAILED), str(JobState.CANCELLED)]
        with self._session(write=True) as session:
            if (held := self._fenced(session, fence)) is None:
                return False
            moved = (
                session.execute(
                    update(JobRow)
                    .where(JobRow.id == job_id, JobRow.state.in_(retryable), held)
                    .values(
                        state=str(JobState.QUEUED),
                        attempt=JobRow.attempt + 1,
                        updated_at=now,
                        started_at=None,
                        finished_at=None,
                        failure_reason=None,
                        cancel_requested=False,
                        ray_job_id=None,
                    )
                ).rowcount
                == 1
            )
            if moved:
                attempt = session.scalar(select(JobRow.attempt).where(JobRow.id == job_id))
                session.add(
                    EventRow(job_id=job_id, at=now, attempt=attempt, state=JobState.QUEUED, message=message)
                )
                _queue_deliveries(session.connection(), job_id, now, attempt, str(JobState.QUEUED), message)
        return moved

    def update_fields(
        self, job_id: str, attempt: int | None = None, fence: Fence | None = None, **fields: Any
    ) -> bool:
        """Change non-state fields (metrics, flags) of a job, of ``attempt`` if given (and while
        ``fence`` holds, if given)."""
        where = [JobRow.id == job_id]
        if attempt is not None:
            where.append(JobRow.attempt == attempt)
        with self._session(write=True) as session:
            if (held := self._fenced(session, fence)) is None:
                return False
            return session.execute(update(JobRow).where(*where, held).values(**fields)).rowcount == 1

    def delete(self, job_id: str) -> bool:
        """Remove a terminal job, its labels and events; False if it is missing or not terminal."""
        terminal = [str(state) for state in TERMINAL_STATES]
        with self._session(write=True) as session:
            deleted = session.execute(
                JobRow.__table__.delete().where(JobRow.id == job_id, JobRow.state.in_(terminal))
            ).rowcount
            if deleted:
                session.execute(EventRow.__table__.delete().where(EventRow.job_id == job_id))
        return deleted == 1


_SUBSCRIPTIONS = select(WEBHOOKS.c.id, WEBHOOKS.c.events)
_ANNOUNCED = select(JOBS.c.name, JOBS.c.spec, JOBS.c.submitted_by).where(JOBS.c.id == bindparam("job_id"))


def _queue_deliveries(
    connection: Connection, job_id: str, at: datetime, attempt: int, state: str, message: str | None
) -> None:
    """The webhooks' outbox: a pending delivery of this state change (the values of its
    ``job_events`` row) for each subscription that wants its state, written in the transaction of
    the change, so that a change that commits is announced even if the service stops at once, and
    one that does not commit never is. Without subscriptions: one read of a table of a few rows."""
    wanted = [hook for hook, states in connection.execute(_SUBSCRIPTIONS) if not states or state in states]
    if not wanted:
        return
    job = connection.execute(_ANNOUNCED, {"job_id": job_id}).one()
    change = {
        "event_id": uuid.uuid4().hex, "job_id": job_id, "job_name": job.name,
        "labels": dict(job.spec.get("labels") or {}), "submitted_by": job.submitted_by, "state": state,
        "job_attempt": attempt, "at": at, "message": message, "status": "pending", "attempts": 0,
        "next_attempt_at": at,
    }  # fmt: skip
    connection.execute(insert(DELIVERIES), [{**change, "webhook_id": hook} for hook in wanted])


def _json_loads(text: str | bytes) -> Any:
    """JSON columns are read with pydantic's parser, twice as fast as the standard library's (a
    page of jobs is mostly their specs); the rare text it refuses (a lone surrogate escape) by json."""
    try:
        return pydantic_core.from_json(text)
    except ValueError:
        return json.loads(text)


def _engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 30}, json_deserializer=_json_loads
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(connection: Any, _record: Any) -> None:
            cursor = connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        return engine
    engine = create_engine(url, pool_pre_ping=True, json_deserializer=_json_loads)
    if engine.dialect.name == "postgresql":

        @event.listens_for(engine, "connect")
        def _end_stalled_transactions(connection: Any, _record: Any) -> None:
            # A replica paused or cut off inside a transaction (none of ours waits between its
            # statements) would hold its row locks, the lease's among them, until its connection
            # died: the server ends such a session after this, and the lease can pass on.
            cursor = connection.cursor()
            cursor.execute(f"SET idle_in_transaction_session_timeout = '{STALLED_TRANSACTION_S}s'")
            cursor.close()
            connection.commit()

    return engine


STALLED_TRANSACTION_S = 5
"""Seconds a Postgres transaction of the service may sit idle before the server ends its session."""
