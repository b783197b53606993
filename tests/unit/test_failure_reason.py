"""A job failed by its storage reports that reason whatever its driver managed to write.

The case behind these tests (issue 30): with the storage full, the driver could write neither
``failure.json`` nor its log, so it printed ``error: …`` for Ray's copy of its output; then the
workers' lines that Ray relays, still in the driver's block-buffered stdout, came out after it at
exit (38 lines in the failing run), past the 5 lines the reconciler read and the 10 Ray quotes.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from service.launcher import RayJob
from service.lifecycle import JobState
from service.reconciler import Reconciler
from service.store import JobRecord
from trainer.metrics import MetricsSink
from trainer.outcome import FailureCause
from trainer.rundir import RunLayout

ROOT = Path(__file__).resolve().parents[2]
REASON = "training failed: the storage is full ([Errno 28] No space left on device)"


def test_the_drivers_unwritten_failure_is_its_last_line_after_buffered_output() -> None:
    script = textwrap.dedent(
        """
        import sys
        from trainer.launch import _failed_unwritten
        for i in range(40):  # what Ray relays from the workers, buffered: stdout is a pipe
            print(f"(RayTrainWorker pid=1) line {i}")
        sys.exit(_failed_unwritten("training failed: the storage is full"))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )  # one pipe for both streams, as Ray's job supervisor gives the driver
    assert done.returncode == 1
    assert done.stdout.splitlines()[-1] == "error: training failed: the storage is full", done.stdout[-300:]


class _RayLogs:
    """The launcher's answers the reconciler reads for a failed job; stands in for Ray's job
    API, which replays here the driver output recorded from the failing run."""

    def __init__(self, root: Path, output: list[str]) -> None:
        self.layout = RunLayout(root)
        self.output = output

    def driver_output_tail(self, submission_id: str, lines: int) -> list[str]:
        return self.output[-lines:]

    def checkpoints(self, job_id: str) -> list:
        return []


def _failed_as_ray_says(output: list[str]) -> RayJob:
    """Ray's answer for a driver that exited 1: its message quotes the output's last 10 lines."""
    message = "Job entrypoint command failed with exit code 1, last available logs:\n"
    return RayJob("FAILED", message + "\n".join(output[-10:]))


def _job() -> JobRecord:
    now = datetime.now(UTC)
    return JobRecord(
        seq=1, id="fault-full-1", name="fault-full", state=JobState.RUNNING, spec={}, labels={},
        created_at=now, updated_at=now, started_at=now, finished_at=None, attempt=1,
        ray_job_id="hutch-fault-full-1-1", failure_reason=None, cancel_requested=False,
        latest_metrics=None, idempotency_key=None, request_hash="",
    )  # fmt: skip


def test_the_drivers_error_line_is_found_under_the_workers_last_lines(tmp_path: Path) -> None:
    unwritten = f"{REASON} (the run directory {tmp_path} cannot be written: No space left on device)"
    output = ["[hutch] step 200/100000", f"error: {unwritten}"]
    output += [f"(RayTrainWorker pid=3209) traceback line {i}" for i in range(38)]
    reconciler = Reconciler(store=None, launcher=_RayLogs(tmp_path, output))  # type: ignore[arg-type]
    reason, cause = reconciler._failure(_job(), _failed_as_ray_says(output))
    assert reason == unwritten and cause == FailureCause.INFRASTRUCTURE


@pytest.fixture
def full_storage(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs filled to its last byte (needs root to mount; skips elsewhere)."""
    place = tmp_path / "storage"
    place.mkdir()
    mounted = (
        os.geteuid() == 0
        and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "hutch-full", str(place)], capture_output=True
        ).returncode
        == 0
    )
    if not mounted:
        pytest.skip("needs root to mount a tmpfs (here: not root, or mount refused)")
    try:
        RunLayout(place).run("fault-full-1").path.mkdir(parents=True)
        with (place / "filler").open("wb", buffering=0) as out:
            chunk = bytes(1 << 16)
            while chunk:
                try:
                    out.write(chunk)
                except OSError as error:
                    assert error.errno == errno.ENOSPC, error
                    chunk = chunk[: len(chunk) // 2]
        yield place
    finally:
        subprocess.run(["umount", "-l", str(place)], check=True)


def test_a_failure_without_a_reason_names_a_storage_that_refuses_writes(full_storage: Path) -> None:
    """Nothing from the driver but Ray's exit code and the workers' lines: the reconciler asks
    the storage itself, and the storage's state is the reason."""
    output = [f"(RayTrainWorker pid=3209) traceback line {i}" for i in range(12)]
    reconciler = Reconciler(store=None, launcher=_RayLogs(full_storage, output))  # type: ignore[arg-type]
    reason, cause = reconciler._failure(_job(), _failed_as_ray_says(output))
    assert reason.startswith(f"{REASON}; the job's driver (python -m trainer) exited with code 1"), reason
    assert cause == FailureCause.INFRASTRUCTURE


def test_a_restart_drops_a_metric_line_the_full_storage_cut_short(tmp_path: Path) -> None:
    """The second way a full storage's reason was lost (seen in the 20-run loop): rank 0's append
    to metrics.jsonl stopped mid-line, and the restarted run failed parsing it (JSONDecodeError)."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 10, "hessian_steps": 5}\n{"step": 20}\n{"step": 30, "lo')
    sink = MetricsSink(path, "fault-full-1", resume_step=10, export_to_ray=False)
    assert path.read_text() == '{"step": 10, "hessian_steps": 5}\n'
    assert sink.resumed_hessian_steps == 5
