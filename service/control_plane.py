"""The control plane as one object: store, Ray launcher, reconciler, and the local Ray head of
the embedded default. The API's routes call its methods only (never its store, launcher or the
run files underneath); they hold no logic of their own."""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from service.admission import Unschedulable, check_fits
from service.identity import Caller
from service.launcher import CheckpointInfo, RayLauncher, RayUnavailable
from service.leader import Lease
from service.lifecycle import ACTIVE_STATES, RETRYABLE_STATES, TERMINAL_STATES, JobState
from service.local_ray import LocalRayHead, ensure_local_head, stop_local_head
from service.packages import Package, UnknownPackage
from service.reconciler import PassStats, Reconciler
from service.settings import Settings
from service.store import EventRecord, JobRecord, JobStore, utcnow
from service.webhooks import DeliveryPage, DeliveryStatus, Dispatcher, Webhook, Webhooks
from trainer.rundir import RunLayout, follow_lines, records_after, tail_lines
from trainer.spec import PACKAGE_URI, JobSpec

log = logging.getLogger("hutch.control_plane")


class JobNotFound(LookupError):
    def __init__(self, job_id: str) -> None:
        super().__init__(f"no job with id {job_id!r}")


class AttemptNotFound(JobNotFound):
    """The job exists, but not the attempt asked for: answered as a missing job is."""

    def __init__(self, job_id: str, attempt: int, attempts: int) -> None:
        LookupError.__init__(self, f"job {job_id} has no attempt {attempt} (it has {attempts})")


class WrongState(Exception):
    """The action does not apply to the job in its current state."""


class NotYours(Exception):
    """The caller may not change this job: another submitted it, and the caller is no admin."""

    def __init__(self, job: JobRecord, caller: Caller, action: str) -> None:
        owner = f"submitted by {job.submitted_by}" if job.submitted_by else "submitted without a name"
        super().__init__(
            f"job {job.id} was {owner}; the token of {caller.name} may {action} only its own jobs "
            "(an admin token may change any)"
        )


@dataclass(frozen=True)
class Submitted:
    job: JobRecord
    created: bool
    queue_position: int | None


@dataclass(frozen=True)
class JobPage:
    """One page of jobs, newest first, with the queue places of its QUEUED jobs (by job id)."""

    jobs: list[JobRecord]
    next_cursor: str | None
    queue_positions: Mapping[str, int]


@dataclass(frozen=True)
class Telemetry:
    jobs_by_state: Mapping[JobState, int]
    oldest_queued_s: float | None  # the longest wait of a QUEUED job (0 with none; None: unknown)
    ray_up: bool
    reconciler: PassStats
    queue_held: bool
    leading: bool  # this replica holds the reconciler's lease
    webhook_outcomes: Mapping[str, int]  # this replica's webhook sendings by outcome
    webhooks_pending: int | None  # deliveries waiting to be sent (None: unknown)


class ControlPlane:
    """Everything behind the REST API; start with :meth:`open`, end with :meth:`close`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        ray_token = settings.ray_token()  # a SettingError now, before anything starts, if unreadable
        self.store = JobStore(settings.resolved_database_url, upgrade=settings.upgrades_database)
        self.layout = RunLayout(settings.resolved_storage_path)
        self.local_head: LocalRayHead | None = None
        address = settings.ray_address
        if address is None:
            self.local_head = self._ensure_local_head()
            address = self.local_head.dashboard_url
        self.launcher = RayLauncher(
            address,
            self.layout,
            settings.ray_dashboard_url,
            local=self.local_head is not None,
            auth_token=ray_token,
            auth_token_file=settings.ray_auth_token_file,
            driver_resources=settings.driver_resources,
        )
        self.packages = self.launcher.packages
        self._head_lock = threading.Lock()  # a restart of the local head and close() take turns
        self._admission_skipped = False  # said once per stretch of Ray being unreachable
        revive = self.revive_local_head if self.local_head is not None else None
        limits = {"CPU": settings.max_cluster_cpus, "GPU": settings.max_cluster_gpus}
        # Replicas on one database take turns at reconciling (service/leader.py); alone, this one
        # leads from its first tick (or once its killed predecessor's lease ends).
        self.lease = Lease(self.store, settings.replica_name, ttl_s=settings.leader_lease_s)
        self.reconciler = Reconciler(
            self.store,
            self.launcher,
            settings.reconcile_interval_s,
            revive,
            autoscaling_limits={resource: n for resource, n in limits.items() if n is not None},
            driver_resources=settings.driver_resources,
            hold_queue=settings.hold_queue,
            lease=self.lease,
        )
        # Webhooks: any replica records subscriptions and deliveries; the leader sends them.
        self.webhooks = Webhooks(self.store)
        self.dispatcher = Dispatcher(
            self.webhooks,
            self.lease,
            max_attempts=settings.webhook_max_attempts,
            retry_s=settings.webhook_retry_s,
            timeout_s=settings.webhook_timeout_s,
        )

    @classmethod
    def open(cls, settings: Settings) -> ControlPlane:
        plane = cls(settings)
        plane.lease.start()
        plane.reconciler.start()
        plane.dispatcher.start()
        return plane

    def close(self) -> None:
        """Stop following jobs; with a local head, stop it too and say so on the jobs it ran."""
        self.reconciler.stop()
        self.dispatcher.stop()  # sendings under way end; pending deliveries wait in the database
        self.lease.stop()  # the next replica takes over at once, not when the lease would end
        self.launcher.close()
        with self._head_lock:  # after a restart in progress, so the head it started is the one stopped
            head, self.local_head = self.local_head, None
        if head is not None:
            stop_local_head(head, self.settings.resolved_data_dir)
            reason = (
                "interrupted: the service stopped, and with it its local Ray head; "
                "retry the job to resume from its last checkpoint"
            )
            for job in self.store.in_states([JobState.STARTING, JobState.RUNNING]):
                self.store.move(
                    job.id,
                    job.state,
                    JobState.FAILED,
                    attempt=job.attempt,
                    message=reason,
                    failure_reason=reason,
                )
        self.store.close()

    def _ensure_local_head(self) -> LocalRayHead:
        settings = self.settings
        head = ensure_local_head(
            settings.resolved_data_dir, settings.local_ray_num_cpus, settings.local_ray_dashboard_port,
            settings.local_ray_metrics_port,
        )  # fmt: skip
        log.info("local Ray head: dashboard %s, metrics on port %s", head.dashboard_url, head.metrics_port)
        return head

    def revive_local_head(self) -> bool:
        """Start a new local Ray head if ours is gone (killed, crashed); True if it did.

        Its jobs died with it: the reconciler then finds their Ray jobs missing on the new head
        and fails them with that reason (a retry resumes from the last checkpoint). The new head
        may listen on other ports, so the launcher is pointed at it."""
        with self._head_lock:
            head = self.local_head
            if head is None or head.running():
                return False
            log.error("the local Ray head (pid %d) is gone; starting a new one", head.pid)
            stop_local_head(head, self.settings.resolved_data_dir)  # what is left of its group, its record
            self.local_head = self._ensure_local_head()
            self.launcher.reconnect(self.local_head.dashboard_url)
            log.warning("a new local Ray head runs at %s", self.local_head.dashboard_url)
            return True

    # -- jobs -----------------------------------------------------------------------------
    def submit(
        self, spec: JobSpec, idempotency_key: str | None = None, submitted_by: str | None = None
    ) -> Submitted:
        """Queue a job as ``submitted_by``'s; a key used before returns that job (even if the
        cluster has shrunk since or its package was removed).

        A used key is found by the store's unique index when the job is created, so a new
        submission pays no lookup; only a refused one asks whether its key made a job before."""
        body = spec.model_dump(mode="json")
        try:
            working_dir = spec.runtime_env.working_dir if spec.runtime_env else None
            if working_dir is not None and PACKAGE_URI.fullmatch(working_dir):
                self.packages.path(working_dir)  # raises UnknownPackage: refused now, not failed later
            self.check_fits(spec)
        except (UnknownPackage, Unschedulable):
            earlier = self.store.replay(idempotency_key, body) if idempotency_key is not None else None
            if earlier is None:
                raise
            return Submitted(earlier, False, self.store.queue_position(earlier))
        job_id = f"{spec.name}-{uuid.uuid4().hex[:8]}"
        job, created, place = self.store.create(job_id, body, idempotency_key, submitted_by)
        if created:
            self.reconciler.wake()
        return Submitted(job, created, place)

    def get(self, job_id: str) -> JobRecord:
        job = self.store.get(job_id)
        if job is None:
            raise JobNotFound(job_id)
        return job

    def list_jobs(
        self,
        states: Sequence[JobState],
        labels: Mapping[str, str],
        limit: int,
        cursor: str | None,
        submitted_by: str | None = None,
    ) -> JobPage:
        """Jobs in any of ``states`` carrying all of ``labels`` (and ``submitted_by`` someone),
        newest first, ``limit`` at most; ``cursor`` is the previous page's ``next_cursor``. Queue
        places cost one query a page."""
        jobs, next_cursor = self.store.list(states, labels, limit, cursor, submitted_by)
        positions = self.store.queue_positions(job for job in jobs if job.state == JobState.QUEUED)
        return JobPage(jobs, next_cursor, positions)

    def queue_position(self, job: JobRecord) -> int | None:
        """``job``'s place in the queue (1 for the next to start); None unless it is QUEUED."""
        return self.store.queue_position(job)

    def events(self, job_id: str) -> list[EventRecord]:
        """Every state change of the job, oldest first."""
        self.get(job_id)
        return self.store.events(job_id)

    def _changeable(self, job_id: str, caller: Caller | None, action: str) -> JobRecord:
        """The job, if ``caller`` (None: the service itself) may ``action`` it."""
        job = self.get(job_id)
        if caller is not None and not caller.may_change(job.submitted_by):
            raise NotYours(job, caller, action)
        return job

    def cancel(self, job_id: str, caller: Caller | None = None) -> JobRecord:
        """Queued jobs end at once; started ones are stopped in Ray and end when Ray says so."""
        job = self._changeable(job_id, caller, "cancel")
        if job.state in TERMINAL_STATES:
            raise WrongState(f"job {job_id} is already {job.state}; only unfinished jobs can be cancelled")
        if job.state == JobState.QUEUED and self.store.move(
            job_id, JobState.QUEUED, JobState.CANCELLED, attempt=job.attempt, message="cancelled while queued"
        ):
            return self.get(job_id)
        self.store.update_fields(job_id, attempt=job.attempt, cancel_requested=True)
        job = self.get(job_id)
        if job.ray_job_id is not None and job.state in ACTIVE_STATES:
            try:
                self.launcher.stop(job.ray_job_id)
            except RayUnavailable as error:  # the reconciler asks again on every tick
                log.warning("stopping %s: %s", job.ray_job_id, error)
        self.reconciler.wake()
        return job

    def retry(self, job_id: str, caller: Caller | None = None) -> JobRecord:
        job = self._changeable(job_id, caller, "retry")
        if job.state not in RETRYABLE_STATES or not self.store.retry(job_id):
            raise WrongState(f"job {job_id} is {job.state}; only FAILED or CANCELLED jobs can be retried")
        self.reconciler.wake()
        return self.get(job_id)

    def delete(self, job_id: str, caller: Caller | None = None) -> None:
        job = self._changeable(job_id, caller, "delete")
        if job.state not in TERMINAL_STATES or not self.store.delete(job_id):
            raise WrongState(
                f"job {job_id} is {job.state}; cancel it first, only finished jobs can be deleted"
            )
        for attempt in range(1, job.attempt + 1):
            self.launcher.delete(self.launcher.submission_id(job_id, attempt))
        self.layout.remove(job_id)

    # -- a job's files --------------------------------------------------------------------
    def job_log(
        self, job_id: str, attempt: int | None = None, tail: int | None = None, follow: bool = False
    ) -> AsyncIterator[str]:
        """The lines of one attempt's log (the latest without ``attempt``): all of them, or the
        last ``tail``; with ``follow``, then new ones as they are written, until the attempt ends.

        A missing job or attempt raises now, before a line is sent; the log itself is never read
        whole (see :mod:`trainer.rundir`)."""
        job = self.get(job_id)
        attempt = attempt or job.attempt
        if attempt > job.attempt:
            raise AttemptNotFound(job_id, attempt, job.attempt)
        path = self.layout.run(job_id).log_file(attempt)
        head, offset = tail_lines(path, tail) if tail is not None else ([], 0)

        def finished() -> bool:
            current = self.store.get(job_id)
            return current is None or current.attempt != attempt or current.state.terminal

        async def lines() -> AsyncIterator[str]:
            for line in head:
                yield line
            if tail is not None and not follow:
                return
            async for line in follow_lines(path, offset, finished if follow else lambda: True):
                yield line

        return lines()

    def metric_records(self, job_id: str, since: int | None = None) -> list[dict[str, Any]]:
        """The job's metric records with ``step > since`` (all without it), in step order."""
        self.get(job_id)
        return records_after(self.layout.run(job_id).metrics_file, since)

    def checkpoints(self, job_id: str) -> list[CheckpointInfo]:
        """The checkpoints kept for the job, oldest first; a retry resumes from the newest."""
        self.get(job_id)
        return self.launcher.checkpoints(job_id)

    # -- packages -------------------------------------------------------------------------
    async def receive_package(self, chunks: AsyncIterable[bytes]) -> tuple[Package, bool]:
        """Spool an uploaded working directory's zip as it arrives, check it and keep it by
        content; ``(package, created)``. A refused or interrupted upload leaves nothing behind."""
        spooled = self.packages.spool()
        path = Path(spooled.name)
        try:
            with spooled:
                async for chunk in chunks:
                    spooled.write(chunk)
            # In a thread of its own, not one of the API's (HUTCH_API_THREADS): checking a large
            # archive takes a while.
            return await asyncio.to_thread(self.packages.adopt, path)
        finally:
            path.unlink(missing_ok=True)

    # -- webhooks -------------------------------------------------------------------------
    def subscribe(self, url: str, events: Sequence[JobState] | None, secret: str | None) -> Webhook:
        """A new webhook: every later change of a job into one of ``events`` (None: any state) is
        POSTed to ``url``, signed with ``secret`` (one is made without it)."""
        return self.webhooks.add(url, events, secret)

    def list_webhooks(self) -> list[Webhook]:
        return self.webhooks.all()

    def webhook(self, webhook_id: str) -> Webhook:
        """The webhook; :class:`~service.webhooks.WebhookNotFound` if there is none."""
        return self.webhooks.get(webhook_id)

    def unsubscribe(self, webhook_id: str) -> None:
        """Remove the webhook and its deliveries (pending ones are not sent)."""
        self.webhooks.remove(webhook_id)

    def deliveries(
        self, webhook_id: str, statuses: Sequence[DeliveryStatus], limit: int, cursor: str | None
    ) -> DeliveryPage:
        """The webhook's deliveries newest first, in any of ``statuses``, one page at a time."""
        return self.webhooks.deliveries(webhook_id, statuses, limit, cursor)

    # -- admission ------------------------------------------------------------------------
    def check_fits(self, spec: JobSpec) -> None:
        """Refuse a job that can never be scheduled (see :mod:`service.admission`); when Ray
        cannot be asked, accept it: it waits QUEUED and Ray decides."""
        try:
            capacity = self.launcher.capacity()
        except RayUnavailable as error:
            if not self._admission_skipped:
                log.warning("admission checks skipped until Ray answers again: %s", error)
            self._admission_skipped = True
            return
        self._admission_skipped = False
        settings = self.settings
        check_fits(
            spec, capacity, settings.max_cluster_cpus, settings.max_cluster_gpus,
            driver_resources=settings.driver_resources,
        )  # fmt: skip

    # -- views ----------------------------------------------------------------------------
    def dashboard_url(self, job: JobRecord) -> str | None:
        """The job's page on the Ray dashboard; None before Ray has it."""
        return self.launcher.dashboard_job_url(job.ray_job_id) if job.ray_job_id else None

    def readiness(self) -> dict[str, str]:
        """``ok``, or why not, for the database, Ray, and job submission (what kept the leading
        reconciler's last pass from following or starting jobs). Only the database decides
        whether this replica is ready (:meth:`ready`): without Ray, the API still answers and
        submissions queue."""
        checks = {}
        try:
            self.store.ping()
            checks["database"] = "ok"
        except Exception as error:  # any driver error means "not ready"
            checks["database"] = f"error: {type(error).__name__}"
        try:
            self.launcher.ping()
            checks["ray"] = "ok"
        except RayUnavailable as error:
            checks["ray"] = f"error: {error}"
        # Ray can answer and still refuse jobs (e.g. no job agent): the reconciler's last try says so.
        last_error = self.reconciler.last_error
        checks["job_submission"] = f"error: {last_error}" if last_error else "ok"
        return checks

    @staticmethod
    def ready(checks: Mapping[str, str]) -> bool:
        """Whether a replica with these :meth:`readiness` checks can serve the API: it needs its
        database; Ray's state is reported, and alerted on, but does not take it out of service."""
        return checks.get("database") == "ok"

    def leader(self) -> str | None:
        """The replica that reconciles now (this one or another), None if none does or the
        database cannot say."""
        if self.lease.current() is not None:
            return self.lease.replica
        try:
            return self.lease.holder_now()
        except SQLAlchemyError:
            return None

    def telemetry(self) -> Telemetry:
        """The service's own numbers for its metrics endpoint, read now. The database's part is
        empty while it is out of reach (a scrape still answers; /readyz says what is wrong)."""
        counts: Mapping[JobState, int] = {}
        waited = pending = None
        try:
            counts = self.store.count_by_state()  # every state, zeros included
            oldest = self.store.oldest_queued_at()
            waited = (utcnow() - oldest).total_seconds() if oldest is not None else 0.0
            pending = self.webhooks.pending()
        except SQLAlchemyError as error:
            log.warning("job counts unknown: %s", type(error).__name__)
        try:
            self.launcher.ping()
            ray_up = True
        except RayUnavailable:
            ray_up = False
        stats, held = self.reconciler.stats, self.reconciler.hold_queue
        leading, sent = self.lease.current() is not None, self.dispatcher.outcomes()
        return Telemetry(counts, waited, ray_up, stats, held, leading, sent, pending)
