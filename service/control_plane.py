"""The control plane as one object: store, Ray launcher, reconciler, and the local Ray head of
the embedded default. The API's routes call its methods; they hold no logic of their own."""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from service.admission import check_fits
from service.launcher import RayLauncher, RayUnavailable, RunLayout
from service.lifecycle import ACTIVE_STATES, RETRYABLE_STATES, TERMINAL_STATES, JobState
from service.local_ray import LocalRayHead, ensure_local_head, stop_local_head
from service.packages import Package
from service.reconciler import PassStats, Reconciler
from service.settings import Settings
from service.store import JobRecord, JobStore, utcnow
from trainer.spec import PACKAGE_URI, JobSpec

log = logging.getLogger("hutch.control_plane")


class JobNotFound(LookupError):
    def __init__(self, job_id: str) -> None:
        super().__init__(f"no job with id {job_id!r}")


class WrongState(Exception):
    """The action does not apply to the job in its current state."""


@dataclass(frozen=True)
class Submitted:
    job: JobRecord
    created: bool


@dataclass(frozen=True)
class Telemetry:
    jobs_by_state: Mapping[JobState, int]
    oldest_queued_s: float | None  # the longest wait of a QUEUED job (0 with none; None: unknown)
    ray_up: bool
    reconciler: PassStats


class ControlPlane:
    """Everything behind the REST API; start with :meth:`open`, end with :meth:`close`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = JobStore(settings.resolved_database_url)
        self.layout = RunLayout(settings.resolved_storage_path)
        self.local_head: LocalRayHead | None = None
        address = settings.ray_address
        if address is None:
            self.local_head = self._ensure_local_head()
            address = self.local_head.dashboard_url
        token = settings.ray_auth_token
        self.launcher = RayLauncher(
            address,
            self.layout,
            settings.ray_dashboard_url,
            local=self.local_head is not None,
            auth_token=token.get_secret_value() if token else None,
        )
        self.packages = self.launcher.packages
        self._head_lock = threading.Lock()  # a restart of the local head and close() take turns
        self._admission_skipped = False  # said once per stretch of Ray being unreachable
        revive = self.revive_local_head if self.local_head is not None else None
        limits = {"CPU": settings.max_cluster_cpus, "GPU": settings.max_cluster_gpus}
        self.reconciler = Reconciler(
            self.store,
            self.launcher,
            settings.reconcile_interval_s,
            revive,
            autoscaling_limits={resource: n for resource, n in limits.items() if n is not None},
        )

    @classmethod
    def open(cls, settings: Settings) -> ControlPlane:
        plane = cls(settings)
        plane.reconciler.start()
        return plane

    def close(self) -> None:
        """Stop following jobs; with a local head, stop it too and say so on the jobs it ran."""
        self.reconciler.stop()
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
    def submit(self, spec: JobSpec, idempotency_key: str | None = None) -> Submitted:
        """Queue a job; a key used before returns that job (even if the cluster has shrunk since)."""
        body = spec.model_dump(mode="json")
        if idempotency_key is not None and (earlier := self.store.replay(idempotency_key, body)) is not None:
            return Submitted(earlier, created=False)
        working_dir = spec.runtime_env.working_dir if spec.runtime_env else None
        if working_dir is not None and PACKAGE_URI.fullmatch(working_dir):
            self.packages.path(working_dir)  # raises UnknownPackage: refused now, not failed later
        self.check_fits(spec)
        job_id = f"{spec.name}-{uuid.uuid4().hex[:8]}"
        job, created = self.store.create(job_id, body, idempotency_key)
        if created:
            self.reconciler.wake()
        return Submitted(job, created)

    def get(self, job_id: str) -> JobRecord:
        job = self.store.get(job_id)
        if job is None:
            raise JobNotFound(job_id)
        return job

    def cancel(self, job_id: str) -> JobRecord:
        """Queued jobs end at once; started ones are stopped in Ray and end when Ray says so."""
        job = self.get(job_id)
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

    def retry(self, job_id: str) -> JobRecord:
        job = self.get(job_id)
        if job.state not in RETRYABLE_STATES or not self.store.retry(job_id):
            raise WrongState(f"job {job_id} is {job.state}; only FAILED or CANCELLED jobs can be retried")
        self.reconciler.wake()
        return self.get(job_id)

    def delete(self, job_id: str) -> None:
        job = self.get(job_id)
        if job.state not in TERMINAL_STATES or not self.store.delete(job_id):
            raise WrongState(
                f"job {job_id} is {job.state}; cancel it first, only finished jobs can be deleted"
            )
        for attempt in range(1, job.attempt + 1):
            self.launcher.delete(self.launcher.submission_id(job_id, attempt))
        self.layout.remove(job_id)

    # -- packages -------------------------------------------------------------------------
    def keep_package(self, spooled: Path) -> tuple[Package, bool]:
        """Check an uploaded working directory and keep it by content; ``(package, created)``."""
        return self.packages.adopt(spooled)

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
        check_fits(spec, capacity, self.settings.max_cluster_cpus, self.settings.max_cluster_gpus)

    # -- views ----------------------------------------------------------------------------
    def dashboard_url(self, job: JobRecord) -> str | None:
        return self.launcher.dashboard_job_url(job.ray_job_id) if job.ray_job_id else None

    def readiness(self) -> dict[str, str]:
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

    def telemetry(self) -> Telemetry:
        """The service's own numbers for its metrics endpoint, read now. The database's part is
        empty while it is out of reach (a scrape still answers; /readyz says what is wrong)."""
        counts: Mapping[JobState, int] = {}
        waited = None
        try:
            counts = self.store.count_by_state()  # every state, zeros included
            oldest = self.store.oldest_queued_at()
            waited = (utcnow() - oldest).total_seconds() if oldest is not None else 0.0
        except SQLAlchemyError as error:
            log.warning("job counts unknown: %s", type(error).__name__)
        try:
            self.launcher.ping()
            ray_up = True
        except RayUnavailable:
            ray_up = False
        return Telemetry(counts, waited, ray_up, self.reconciler.stats)
