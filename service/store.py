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
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    create_engine,
    event,
    func,
    select,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker
from sqlalchemy.types import TypeDecorator

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
    state: Mapped[str] = mapped_column(String(16), index=True)
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

    labels: Mapped[list[LabelRow]] = relationship(
        cascade="all, delete-orphan", lazy="selectin", passive_deletes=True
    )


class LabelRow(Base):
    __tablename__ = "job_labels"

    job_seq: Mapped[int] = mapped_column(ForeignKey("jobs.seq", ondelete="CASCADE"), primary_key=True)
    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    value: Mapped[str] = mapped_column(String(200))

    __table_args__ = (Index("ix_job_labels_key_value", "key", "value"),)


class EventRow(Base):
    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(64), index=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    attempt: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16))
    message: Mapped[str | None] = mapped_column(Text)


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

    @classmethod
    def of(cls, row: JobRow) -> JobRecord:
        return cls(
            seq=row.seq,
            id=row.id,
            name=row.name,
            state=JobState(row.state),
            spec=row.spec,
            labels={label.key: label.value for label in row.labels},
            created_at=row.created_at,
            updated_at=row.updated_at,
            started_at=row.started_at,
            finished_at=row.finished_at,
            attempt=row.attempt,
            ray_job_id=row.ray_job_id,
            failure_reason=row.failure_reason,
            cancel_requested=row.cancel_requested,
            latest_metrics=row.latest_metrics,
            idempotency_key=row.idempotency_key,
            request_hash=row.request_hash,
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


def encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"seq:{seq}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        kind, _, value = text.partition(":")
        if kind != "seq":
            raise ValueError
        return int(value)
    except ValueError as error:
        raise BadCursor("not a cursor returned by this API") from error


class JobStore:
    """All reads and writes of jobs; safe to share between threads."""

    def __init__(self, url: str) -> None:
        self.engine: Engine = _engine(url)
        Base.metadata.create_all(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def _session(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session

    def ping(self) -> None:
        with self.engine.connect() as connection:
            connection.exec_driver_sql("SELECT 1")

    def close(self) -> None:
        self.engine.dispose()

    # -- creation -------------------------------------------------------------------------
    def create(
        self, job_id: str, spec: Mapping[str, Any], idempotency_key: str | None = None
    ) -> tuple[JobRecord, bool]:
        """Store a new QUEUED job; with a key already used, return that job instead.

        Returns (job, created). Raises :class:`IdempotencyConflict` if the key was used with a
        different spec.
        """
        digest = request_hash(spec)
        if idempotency_key is not None and (existing := self.replay(idempotency_key, spec)) is not None:
            return existing, False
        now = utcnow()
        labels = dict(spec.get("labels") or {})
        row = JobRow(
            id=job_id,
            name=str(spec["name"]),
            state=JobState.QUEUED,
            spec=dict(spec),
            idempotency_key=idempotency_key,
            request_hash=digest,
            created_at=now,
            updated_at=now,
            attempt=1,
            cancel_requested=False,
            labels=[LabelRow(key=k, value=v) for k, v in labels.items()],
        )
        try:
            with self._session() as session:
                session.add(row)
                session.flush()
                session.add(
                    EventRow(job_id=job_id, at=now, attempt=1, state=JobState.QUEUED, message="submitted")
                )
                record = JobRecord.of(row)
        except IntegrityError:
            if idempotency_key is None:
                raise
            existing = self.replay(idempotency_key, spec)  # a concurrent request with the same key won
            if existing is None:
                raise
            return existing, False
        return record, True

    def replay(self, idempotency_key: str, spec: Mapping[str, Any]) -> JobRecord | None:
        """The job an earlier request with this key made (None if none did); raises
        :class:`IdempotencyConflict` if that request carried a different spec."""
        with self._session() as session:
            row = session.scalar(select(JobRow).where(JobRow.idempotency_key == idempotency_key))
            existing = JobRecord.of(row) if row is not None else None
        if existing is not None and existing.request_hash != request_hash(spec):
            raise IdempotencyConflict(
                f"Idempotency-Key was already used for job {existing.id} with a different spec"
            )
        return existing

    # -- reads ----------------------------------------------------------------------------
    def get(self, job_id: str) -> JobRecord | None:
        with self._session() as session:
            row = session.scalar(select(JobRow).where(JobRow.id == job_id))
            return JobRecord.of(row) if row is not None else None

    def list(
        self,
        states: Sequence[JobState] = (),
        labels: Mapping[str, str] | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> tuple[list[JobRecord], str | None]:
        """Jobs newest first, filtered by any of ``states`` and all of ``labels``."""
        query = select(JobRow).order_by(JobRow.seq.desc()).limit(limit + 1)
        if states:
            query = query.where(JobRow.state.in_([str(s) for s in states]))
        for key, value in (labels or {}).items():
            query = query.where(
                select(LabelRow.job_seq)
                .where(LabelRow.job_seq == JobRow.seq, LabelRow.key == key, LabelRow.value == value)
                .exists()
            )
        if cursor is not None:
            query = query.where(JobRow.seq < decode_cursor(cursor))
        with self._session() as session:
            rows = list(session.scalars(query))
            records = [JobRecord.of(row) for row in rows[:limit]]
        next_cursor = encode_cursor(records[-1].seq) if len(rows) > limit else None
        return records, next_cursor

    def in_states(self, states: Sequence[JobState]) -> list[JobRecord]:
        """Jobs in any of ``states``, oldest first (the reconciler's work list)."""
        query = select(JobRow).where(JobRow.state.in_([str(s) for s in states])).order_by(JobRow.seq)
        with self._session() as session:
            return [JobRecord.of(row) for row in session.scalars(query)]

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
        **fields: Any,
    ) -> bool:
        """Move a job from one of ``expected`` (and ``attempt``, if given) to ``new``; False if
        it was not there (someone else moved it first)."""
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
        with self._session() as session:
            moved = session.execute(update(JobRow).where(*where).values(**values)).rowcount == 1
            if moved:
                current = session.scalar(select(JobRow.attempt).where(JobRow.id == job_id))
                session.add(EventRow(job_id=job_id, at=now, attempt=current, state=str(new), message=message))
        return moved

    def retry(self, job_id: str) -> bool:
        """FAILED/CANCELLED → QUEUED as a new attempt; False if the job was not in those states.

        Writes before it reads, so SQLite never has to upgrade a read transaction."""
        now = utcnow()
        retryable = [str(JobState.FAILED), str(JobState.CANCELLED)]
        with self._session() as session:
            moved = (
                session.execute(
                    update(JobRow)
                    .where(JobRow.id == job_id, JobRow.state.in_(retryable))
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
                    EventRow(job_id=job_id, at=now, attempt=attempt, state=JobState.QUEUED, message="retry")
                )
        return moved

    def update_fields(self, job_id: str, attempt: int | None = None, **fields: Any) -> bool:
        """Change non-state fields (metrics, flags) of a job, of ``attempt`` if given."""
        where = [JobRow.id == job_id]
        if attempt is not None:
            where.append(JobRow.attempt == attempt)
        with self._session() as session:
            return session.execute(update(JobRow).where(*where).values(**fields)).rowcount == 1

    def delete(self, job_id: str) -> bool:
        """Remove a terminal job, its labels and events; False if it is missing or not terminal."""
        terminal = [str(state) for state in TERMINAL_STATES]
        with self._session() as session:
            deleted = session.execute(
                JobRow.__table__.delete().where(JobRow.id == job_id, JobRow.state.in_(terminal))
            ).rowcount
            if deleted:
                session.execute(EventRow.__table__.delete().where(EventRow.job_id == job_id))
        return deleted == 1


def _engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(connection: Any, _record: Any) -> None:
            cursor = connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True)
