"""The reconciler: moves every unfinished job one step closer to what Ray says about it.

It is the only writer of Ray-driven state changes and holds no state of its own but the backoff
of automatic retries (a restarted service starts them at once): everything else it needs is in
the store and in Ray, so a service killed at any moment and restarted simply runs it again.
Each move is a compare-and-set on (job, state, attempt), and a submission id is deterministic
per attempt, so no job is submitted twice or finishes twice. An attempt that failed for an
infrastructure cause is queued again as the next attempt while the spec's ``retry`` allows.

With a :class:`~service.leader.Lease`, it reconciles only while this replica leads, and every
write carries the lease it read under (a former leader that wakes changes nothing).
"""

from __future__ import annotations

import logging
import re
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from service.admission import missing_driver_resources, startable
from service.launcher import RayJob, RayLauncher, RayRefused, RayUnavailable, StorageUnavailable, unwritable
from service.leader import Lease
from service.lifecycle import JobState
from service.store import Fence, JobRecord, JobStore
from trainer.launch import UNWRITABLE
from trainer.outcome import FailureCause
from trainer.rundir import last_record, storage_error_code, tail_lines
from trainer.spec import RetrySpec

log = logging.getLogger("hutch.reconciler")

STARTED = (JobState.STARTING, JobState.RUNNING)


@dataclass
class PassStats:
    """What the reconciler has done since the service started, for its metrics."""

    passes: int = 0
    failed_passes: int = 0  # the pass raised (the database out of reach, …)
    seconds: float = 0.0  # spent in passes, all together
    failed_jobs: dict[FailureCause, int] = field(default_factory=lambda: dict.fromkeys(FailureCause, 0))
    retried_jobs: int = 0  # attempts the service started again by itself after an infrastructure failure


class Reconciler:
    """Runs :meth:`reconcile_once` every ``interval_s`` seconds on a daemon thread.

    ``revive_ray``, called before each tick, is the control plane's chance to bring back a Ray
    head of its own that died (see :meth:`service.control_plane.ControlPlane.revive_local_head`).

    ``driver_resources`` (HUTCH_DRIVER_RESOURCES) count as part of every job's demand, unless
    the cluster autoscales (``autoscaling_limits``): then Ray and its autoscaler place drivers.
    While no node offers them, queued jobs wait, and :attr:`last_error` (so ``/readyz``) says why.

    ``lease``: reconcile only while it is held (several replicas on one database); None for a
    reconciler that owns its store alone."""

    def __init__(
        self,
        store: JobStore,
        launcher: RayLauncher,
        interval_s: float = 1.0,
        revive_ray: Callable[[], bool] | None = None,
        autoscaling_limits: Mapping[str, float] | None = None,
        driver_resources: Mapping[str, float] | None = None,
        hold_queue: bool = False,
        lease: Lease | None = None,
    ) -> None:
        self.store = store
        self.lease = lease
        self._fence: Fence | None = None  # the lease the current pass reads and writes under
        self.hold_queue = hold_queue  # HUTCH_HOLD_QUEUE: follow started jobs, start none
        self.launcher = launcher
        self.interval_s = interval_s
        self.revive_ray = revive_ray
        self.autoscaling_limits = dict(autoscaling_limits or {})
        # Without autoscaling limits the cluster is what it is, drivers' resources included.
        self.driver_resources = {} if self.autoscaling_limits else dict(driver_resources or {})
        self.last_error: str | None = None
        self.stats = PassStats()
        self._tick_error: str | None = None
        self._backoff: dict[str, float] = {}  # job id → when its automatic retry may start (monotonic)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="hutch-reconciler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def wake(self) -> None:
        """Reconcile now rather than at the next tick (after a submission, cancel or retry)."""
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            began = time.perf_counter()
            try:
                if self.revive_ray is not None:
                    self.revive_ray()
                self.reconcile_once()
            except Exception as error:  # the database out of reach, …: the loop must not die
                self.stats.failed_passes += 1
                self._tick_failed(error)
            else:
                if self._tick_error is not None:
                    log.warning("reconciling again after: %s", self._tick_error)
                    self._tick_error = None
            self.stats.passes += 1
            self.stats.seconds += time.perf_counter() - began
            self._wake.wait(self.interval_s)
            self._wake.clear()

    def _tick_failed(self, error: Exception) -> None:
        """Log a failed tick once per distinct error (a database outage fails every tick alike)."""
        text = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        if text != self._tick_error:
            every = self.interval_s
            log.error("a reconciler tick failed; trying again every %.1fs: %s", every, text, exc_info=error)
            self._tick_error = text

    @property
    def leading(self) -> bool:
        """Whether this reconciler acts: it has no lease, or it still holds the one its pass
        began under."""
        return self.lease is None or (self._fence is not None and self.lease.current() == self._fence)

    def reconcile_once(self) -> None:
        """Follow the started jobs, then start the queued ones that fit beside them (none while
        the queue is held); nothing unless this replica leads."""
        if self.lease is not None:
            self._fence = self.lease.current()
            if self._fence is None:  # another replica reconciles; its /readyz says how it goes
                self.last_error = None
                return
        error, blocked = self._each(self.store.in_states(STARTED))
        if error is None and not self._stop.is_set() and not self.hold_queue:
            try:
                queued, waiting = self._startable()
            except RayUnavailable as unavailable:
                error = str(unavailable)
            else:
                error, blocked_start = self._each(queued)
                blocked = blocked or blocked_start or waiting
        if error and error != self.last_error:
            log.warning("Ray is unavailable; jobs wait: %s", error)
        elif blocked and not error and blocked != self.last_error:
            log.warning("jobs wait QUEUED: %s", blocked)
        self.last_error = error or blocked

    def _each(self, jobs: list[JobRecord]) -> tuple[str | None, str | None]:
        """Reconcile ``jobs`` in turn; (Ray's error, which stops the pass; the storage's error)."""
        blocked = None
        for job in jobs:
            if self._stop.is_set() or not self.leading:
                break
            try:
                self._reconcile(job)
            except RayUnavailable as unavailable:  # the same for every job: try again next tick
                return str(unavailable), blocked
            except StorageUnavailable as unwritable_storage:  # this job waits QUEUED; follow the others
                blocked = str(unwritable_storage)
            except Exception:  # one bad job must not stop the others
                log.exception("reconciling job %s failed", job.id)
        return None, blocked

    def _startable(self) -> tuple[list[JobRecord], str | None]:
        """The head of the queue that fits in the cluster (or its autoscaling limits) now, and
        why none can start if no node offers the drivers' resources."""
        if not self.store.has_queued():
            return [], None
        # Before the queue is read: with Ray out of reach (its answer is kept a while), a tick,
        # which every submission asks for, costs no more than this.
        capacity = self.launcher.capacity()
        room = {**capacity.total, **self.autoscaling_limits}
        missing = missing_driver_resources(self.driver_resources, capacity)
        now = time.monotonic()
        self._backoff = {job_id: at for job_id, at in self._backoff.items() if at > now}
        queue = [job for job in self.store.queue() if job.id not in self._backoff]
        waiting = missing if missing and queue else None
        return startable(queue, self.store.in_states(STARTED), room, self.driver_resources), waiting

    def _reconcile(self, job: JobRecord) -> None:
        if job.state == JobState.QUEUED:
            self._submit(job)
            return
        assert job.ray_job_id is not None
        ray_job = self.launcher.status(job.ray_job_id)
        # Read after Ray's answer: a job Ray calls finished has written its last record.
        self._refresh_metrics(job)
        if ray_job is None:
            reason = (
                f"the Ray job {job.ray_job_id} no longer exists: the Ray cluster restarted (its head "
                f"was lost) while the job ran; {self._resume_hint(job)}"
            )
            self._finish(job, JobState.FAILED, reason, cause=FailureCause.INFRASTRUCTURE)
            return
        if job.cancel_requested and ray_job.status in ("PENDING", "RUNNING"):
            self.launcher.stop(job.ray_job_id)  # repeated each tick until Ray reports it stopped
        if ray_job.status == "RUNNING" and job.state == JobState.STARTING:
            self.store.move(
                job.id, JobState.STARTING, JobState.RUNNING, attempt=job.attempt, message="running",
                fence=self._fence,
            )  # fmt: skip
        elif ray_job.status in ("SUCCEEDED", "FAILED", "STOPPED"):
            self._finish_from_ray(job, ray_job)

    def _submit(self, job: JobRecord) -> None:
        submission_id = self.launcher.submission_id(job.id, job.attempt)
        if self.launcher.status(submission_id) is None and self.leading:  # not submitted before a crash
            self._clear_outcome(job.id)
            try:
                self.launcher.submit(job.id, job.attempt, job.spec, job.name)
            except RayRefused as refused:
                if self.store.move(
                    job.id, JobState.QUEUED, JobState.FAILED, attempt=job.attempt,
                    message=str(refused), failure_reason=str(refused), fence=self._fence,
                ):  # fmt: skip
                    self.stats.failed_jobs[FailureCause.JOB_ERROR] += 1  # Ray refused its runtime_env
                return
        moved = self.store.move(
            job.id, JobState.QUEUED, JobState.STARTING, attempt=job.attempt,
            message=f"submitted as Ray job {submission_id}", ray_job_id=submission_id, fence=self._fence,
        )  # fmt: skip
        if moved or not self.leading:  # a lease lost meanwhile: the next leader adopts the submission
            return
        current = self.store.get(job.id)
        if current is None or current.ray_job_id != submission_id:  # cancelled (or deleted) meanwhile
            self.launcher.stop(submission_id)

    def _finish_from_ray(self, job: JobRecord, ray_job: RayJob) -> None:
        if job.cancel_requested and ray_job.status != "SUCCEEDED":
            self._finish(job, JobState.CANCELLED, None, message="cancelled")
        elif ray_job.status == "SUCCEEDED":
            self._finish(job, JobState.SUCCEEDED, None, message="succeeded")
        elif ray_job.status == "STOPPED":
            reason = "the Ray job was stopped outside hutch"
            self._finish(job, JobState.FAILED, reason, cause=FailureCause.INFRASTRUCTURE)
        else:
            reason, cause = self._failure(job, ray_job)
            self._finish(job, JobState.FAILED, reason, cause=cause)

    def _finish(
        self,
        job: JobRecord,
        state: JobState,
        reason: str | None,
        message: str | None = None,
        cause: FailureCause | None = None,
    ) -> None:
        moved = self.store.move(
            job.id, (JobState.STARTING, JobState.RUNNING), state, attempt=job.attempt,
            message=message or reason, failure_reason=reason, fence=self._fence,
        )  # fmt: skip
        if moved and cause is not None:
            self.stats.failed_jobs[cause] += 1
            if cause == FailureCause.INFRASTRUCTURE and state == JobState.FAILED:
                self._retry_automatically(job, reason)

    def _retry_automatically(self, job: JobRecord, reason: str | None) -> None:
        """Queue the job's next attempt, to start after its backoff (kept in memory: after a
        service restart it starts at once), if its spec's ``retry`` allows one more."""
        retry = RetrySpec.model_validate(job.spec.get("retry") or {})
        if job.cancel_requested or job.attempt >= retry.max_attempts:
            return
        delay = retry.backoff_s * 2 ** (job.attempt - 1)
        message = (
            f"retried automatically (attempt {job.attempt + 1} of {retry.max_attempts}, starting in "
            f"{delay:g} s) after an infrastructure failure: {reason}"
        )
        if self.store.retry(job.id, message, fence=self._fence):
            self._backoff[job.id] = time.monotonic() + delay
            self.stats.retried_jobs += 1
            log.warning("job %s: %s", job.id, message)

    def _refresh_metrics(self, job: JobRecord) -> None:
        record = last_record(self.launcher.layout.run(job.id).metrics_file)
        if record is not None and record != job.latest_metrics:
            self.store.update_fields(job.id, attempt=job.attempt, fence=self._fence, latest_metrics=record)

    def _clear_outcome(self, job_id: str) -> None:
        """Remove the previous attempt's outcome files, so they are not mistaken for this one's."""
        run = self.launcher.layout.run(job_id)
        try:
            run.clear_outcome()
        except OSError as error:  # read-only storage: nothing can start (EROFS even if missing)
            raise unwritable(run.path, error) from error

    def _failure(self, job: JobRecord, ray_job: RayJob) -> tuple[str, FailureCause]:
        """Why the job failed, and the cause in a word: the trainer's own reason if it wrote one,
        else the driver's last ``error:`` line, else the storage's state if it refuses writes,
        else Ray's message."""
        run = self.launcher.layout.run(job.id)
        result = run.read_result()
        if result and result.get("status") == "failed" and result.get("reason"):
            try:
                cause = FailureCause(result.get("cause"))
            except ValueError:  # written by a trainer from before causes
                cause = FailureCause.INFRASTRUCTURE
            return str(result["reason"]), cause
        lines, _ = tail_lines(run.log_file(job.attempt), DRIVER_LINES)
        error = _last_error_line(lines)
        if error is None and job.ray_job_id:  # the storage may have refused the line: ask Ray's copy
            error = _last_error_line(self.launcher.driver_output_tail(job.ray_job_id, DRIVER_LINES))
        if error is not None:  # a spec the driver refused, or a storage it could not write
            unwritten = UNWRITABLE in error or storage_error_code(error) is not None
            return error, FailureCause.INFRASTRUCTURE if unwritten else FailureCause.JOB_ERROR
        reason = driver_failure(ray_job.message)
        if ENTRYPOINT_FAILED.match(ray_job.message or ""):  # the driver died without a result
            storage = run.storage_problem()
            if storage is not None:  # whatever the driver managed to say, this is why
                reason = f"training failed: {storage}; {reason}"
            reason = f"{reason}; {self._resume_hint(job)}"
        return reason, FailureCause.INFRASTRUCTURE

    def _resume_hint(self, job: JobRecord) -> str:
        """What a retry of a job that died without a reason of its own would do."""
        saved = self.launcher.checkpoints(job.id)
        if not saved:
            return "no checkpoint was saved, so a retry starts from the beginning"
        return f"retry it to resume from its last checkpoint at step {saved[-1].step}"


DRIVER_LINES = 200
"""How much of the end of the driver's output is searched for its ``error:`` line: it prints
that line last, but a driver killed mid-exit can be followed by the workers' last lines."""


def _last_error_line(lines: list[str]) -> str | None:
    """The reason in the driver's last ``error: …`` line (the workers' lines carry a prefix)."""
    errors = [line.strip() for line in lines if line.strip().startswith("error:")]
    return errors[-1].removeprefix("error:").strip() if errors else None


ENTRYPOINT_FAILED = re.compile(r"Job entrypoint command failed with exit code (-?\d+)")


def driver_failure(message: str | None) -> str:
    """Why the job's driver (``python -m trainer``) ended, from Ray's message about the job:
    the trainer's own ``error:`` line in the log Ray quotes (it could not write one to the
    storage), a signal that killed it, or its exit code and last log line."""
    if not message:
        return "the Ray job failed (see the job's logs)"
    first, _, logs = message.partition("\n")
    lines = [line.strip() for line in logs.splitlines() if line.strip()]
    error = _last_error_line(lines)
    if error is not None:
        return error
    match = ENTRYPOINT_FAILED.match(first)
    if match is None:  # a failure of Ray's own (the supervisor died, the runtime_env failed, …)
        return message.strip()
    code = int(match.group(1))
    number = -code if code < 0 else code - 128  # killed: -N from Python, 128+N from the shell
    try:
        name = signal.Signals(number).name if number > 0 else None
    except ValueError:
        name = None
    if name is not None:
        return f"the job's driver (python -m trainer) was killed by {name} (exit code {code})"
    last = f"; its last log line: {lines[-1]}" if lines else ""
    return f"the job's driver (python -m trainer) exited with code {code} without a reason{last}"
