"""The reconciler: moves every unfinished job one step closer to what Ray says about it.

It is the only writer of Ray-driven state changes and holds no state of its own: everything it
needs is in the store and in Ray, so a service killed at any moment and restarted simply runs
it again. Each move is a compare-and-set on (job, state, attempt), and a submission id is
deterministic per attempt, so no job is submitted twice or finishes twice.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

from service.launcher import RayJob, RayLauncher, RayRefused, RayUnavailable
from service.lifecycle import JobState
from service.runfiles import last_record, tail_lines
from service.store import JobRecord, JobStore

log = logging.getLogger("hutch.reconciler")

UNFINISHED = (JobState.QUEUED, JobState.STARTING, JobState.RUNNING)


class Reconciler:
    """Runs :meth:`reconcile_once` every ``interval_s`` seconds on a daemon thread."""

    def __init__(self, store: JobStore, launcher: RayLauncher, interval_s: float = 1.0) -> None:
        self.store = store
        self.launcher = launcher
        self.interval_s = interval_s
        self.last_error: str | None = None
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
            self.reconcile_once()
            self._wake.wait(self.interval_s)
            self._wake.clear()

    def reconcile_once(self) -> None:
        error = None
        for job in self.store.in_states(UNFINISHED):
            if self._stop.is_set():
                return
            try:
                self._reconcile(job)
            except RayUnavailable as unavailable:  # the same for every job: try again next tick
                error = str(unavailable)
                break
            except Exception:  # one bad job must not stop the others
                log.exception("reconciling job %s failed", job.id)
        if error and error != self.last_error:
            log.warning("Ray is unavailable; jobs wait: %s", error)
        self.last_error = error

    def _reconcile(self, job: JobRecord) -> None:
        if job.state == JobState.QUEUED:
            self._submit(job)
            return
        assert job.ray_job_id is not None
        ray_job = self.launcher.status(job.ray_job_id)
        # Read after Ray's answer: a job Ray calls finished has written its last record.
        self._refresh_metrics(job)
        if ray_job is None:
            reason = f"the Ray job {job.ray_job_id} is gone (was the Ray cluster restarted?)"
            self._finish(job, JobState.FAILED, reason)
            return
        if job.cancel_requested and ray_job.status in ("PENDING", "RUNNING"):
            self.launcher.stop(job.ray_job_id)  # repeated each tick until Ray reports it stopped
        if ray_job.status == "RUNNING" and job.state == JobState.STARTING:
            self.store.move(
                job.id, JobState.STARTING, JobState.RUNNING, attempt=job.attempt, message="running"
            )
        elif ray_job.status in ("SUCCEEDED", "FAILED", "STOPPED"):
            self._finish_from_ray(job, ray_job)

    def _submit(self, job: JobRecord) -> None:
        submission_id = self.launcher.submission_id(job.id, job.attempt)
        if self.launcher.status(submission_id) is None:  # not submitted before a crash
            self._clear_outcome(job.id)
            try:
                self.launcher.submit(job.id, job.attempt, job.spec, job.name)
            except RayRefused as refused:
                self.store.move(
                    job.id, JobState.QUEUED, JobState.FAILED, attempt=job.attempt,
                    message=str(refused), failure_reason=str(refused),
                )  # fmt: skip
                return
        moved = self.store.move(
            job.id, JobState.QUEUED, JobState.STARTING, attempt=job.attempt,
            message=f"submitted as Ray job {submission_id}", ray_job_id=submission_id,
        )  # fmt: skip
        if not moved:  # cancelled between our read and the submission: stop what we started
            self.launcher.stop(submission_id)

    def _finish_from_ray(self, job: JobRecord, ray_job: RayJob) -> None:
        if job.cancel_requested and ray_job.status != "SUCCEEDED":
            self._finish(job, JobState.CANCELLED, None, message="cancelled")
        elif ray_job.status == "SUCCEEDED":
            self._finish(job, JobState.SUCCEEDED, None, message="succeeded")
        elif ray_job.status == "STOPPED":
            self._finish(job, JobState.FAILED, "the Ray job was stopped outside hutch")
        else:
            self._finish(job, JobState.FAILED, self._failure_reason(job, ray_job))

    def _finish(
        self, job: JobRecord, state: JobState, reason: str | None, message: str | None = None
    ) -> None:
        self.store.move(
            job.id, (JobState.STARTING, JobState.RUNNING), state, attempt=job.attempt,
            message=message or reason, failure_reason=reason,
        )  # fmt: skip

    def _refresh_metrics(self, job: JobRecord) -> None:
        record = last_record(self.launcher.layout.run_dir(job.id) / "metrics.jsonl")
        if record is not None and record != job.latest_metrics:
            self.store.update_fields(job.id, attempt=job.attempt, latest_metrics=record)

    def _clear_outcome(self, job_id: str) -> None:
        """Remove the previous attempt's outcome files, so they are not mistaken for this one's."""
        run_dir = self.launcher.layout.run_dir(job_id)
        for name in ("result.json", "failure.json"):
            (run_dir / name).unlink(missing_ok=True)

    def _failure_reason(self, job: JobRecord, ray_job: RayJob) -> str:
        """The trainer's own reason if it wrote one, else the end of the log, else Ray's message."""
        run_dir = self.launcher.layout.run_dir(job.id)
        result = _read_json(run_dir / "result.json")
        if result and result.get("status") == "failed" and result.get("reason"):
            return str(result["reason"])
        lines, _ = tail_lines(self.launcher.layout.log_file(job.id, job.attempt), 5)
        errors = [line.strip() for line in lines if line.strip().startswith("error:")]
        if errors:
            return errors[-1].removeprefix("error:").strip()
        return ray_job.message or "the Ray job failed (see the job's logs)"


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
