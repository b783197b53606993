"""One job's run directory on the shared storage: its files' names, their writers and readers.

    runs/<job id>/spec.json             the spec the trainer runs (the service writes it at
                                        submission; ``python -m trainer`` when run by hand)
    runs/<job id>/metrics.jsonl         one record per logged step (rank 0, trainer.metrics)
    runs/<job id>/failure.json          why a run stopped (rank 0, or the driver), read by the driver
    runs/<job id>/result.json           the outcome: succeeded (rank 0) or failed (the driver)
    runs/<job id>/logs/attempt-<n>.log  the driver's output, one file per attempt
    runs/<job id>/workers/rank-<r>.pid  each rank's process id, for the fault tests and operators

Beside them, under the same storage: ``checkpoints/<job id>/`` (Ray Train's run) and
``packages/<sha256>.zip`` (uploaded working directories, :mod:`service.packages`).

Every name above is spelled here only; the trainer, the service and the API go through
:class:`RunLayout` and :class:`RunDir`. The files are read without loading them whole (the
newest metric record, records past a step, a log's last lines, new lines as they come). A full
or read-only storage is the usual reason a write here fails, so the words for that reason live
here too, for the driver and the reconciler alike.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.outcome import FailureCause

STORAGE_ERRORS = {
    errno.ENOSPC: "full",
    errno.EDQUOT: "full (over its quota)",
    errno.EROFS: "read-only",
}
"""The errors that say the storage itself cannot be written, and how a reason words each."""


def storage_error_code(text: str) -> int | None:
    """The storage error named in an error's text (Ray passes a worker's OSError on as text)."""
    return next((c for c in STORAGE_ERRORS if f"[Errno {c}]" in text or os.strerror(c) in text), None)


def storage_reason(code: int) -> str:
    """``the storage is full ([Errno 28] No space left on device)``, for a code of STORAGE_ERRORS."""
    return f"the storage is {STORAGE_ERRORS[code]} ([Errno {code}] {os.strerror(code)})"


@dataclass(frozen=True)
class RunLayout:
    """Where each job's files live under the shared storage (seen by the service and every node)."""

    storage: Path

    def run(self, job_id: str) -> RunDir:
        return RunDir(self.storage / "runs" / job_id)

    @property
    def checkpoint_root(self) -> Path:
        return self.storage / "checkpoints"

    def checkpoint_dir(self, job_id: str) -> Path:
        return self.checkpoint_root / job_id

    @property
    def package_root(self) -> Path:
        return self.storage / "packages"

    def remove(self, job_id: str) -> None:
        shutil.rmtree(self.run(job_id).path, ignore_errors=True)
        shutil.rmtree(self.checkpoint_dir(job_id), ignore_errors=True)


@dataclass(frozen=True)
class RunDir:
    """The files of one job's runs (all attempts share the directory)."""

    path: Path

    @property
    def spec_file(self) -> Path:
        return self.path / "spec.json"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def result_file(self) -> Path:
        return self.path / "result.json"

    @property
    def failure_file(self) -> Path:
        return self.path / "failure.json"

    def log_file(self, attempt: int) -> Path:
        return self.path / "logs" / f"attempt-{attempt}.log"

    def pid_file(self, rank: int) -> Path:
        return self.path / "workers" / f"rank-{rank}.pid"

    def pid_files(self) -> list[Path]:
        return sorted((self.path / "workers").glob("rank-*.pid"))

    def write_spec(self, text: str) -> None:
        """The spec the trainer will run, and the folder for the attempts' logs; raises OSError."""
        (self.path / "logs").mkdir(parents=True, exist_ok=True)
        self.spec_file.write_text(text)

    def clear_outcome(self) -> None:
        """Remove a previous attempt's outcome, so it is not taken for the next one's; raises
        OSError (on read-only storage even when there is nothing to remove)."""
        for stale in (self.result_file, self.failure_file):
            stale.unlink(missing_ok=True)

    def write_pid(self, rank: int, pid: int) -> None:
        self.pid_file(rank).parent.mkdir(parents=True, exist_ok=True)
        self.pid_file(rank).write_text(str(pid))

    def read_result(self) -> dict[str, Any] | None:
        return _read_object(self.result_file)

    def write_result(self, result: dict[str, Any]) -> None:
        self.result_file.write_text(json.dumps(result, indent=2))

    def read_failure(self) -> dict[str, Any] | None:
        return _read_object(self.failure_file)

    def write_failure(self, reason: str, cause: FailureCause, step: int | None = None) -> None:
        """Why the run stopped (the first to know writes it; the driver turns it into the result)."""
        failure: dict[str, Any] = {"reason": reason, "cause": str(cause)}
        if step is not None:
            failure["step"] = step
        self.failure_file.write_text(json.dumps(failure))

    def storage_problem(self) -> str | None:
        """Whether the storage refuses a write here now, in a reason's words (None if it takes
        one): a probe file written and removed."""
        probe = self.path / ".write-probe"
        try:
            probe.write_bytes(b"\n")
            probe.unlink()
        except OSError as failed:
            if failed.errno in STORAGE_ERRORS:
                return storage_reason(failed.errno)
        return None


def _read_object(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path``; None if it is missing, unreadable or not an object."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


BLOCK = 64 * 1024


def _backwards_blocks(path: Path) -> Iterator[bytes]:
    """The file's bytes in blocks from the end towards the start."""
    with path.open("rb") as handle:
        position = handle.seek(0, os.SEEK_END)
        while position > 0:
            size = min(BLOCK, position)
            position -= size
            handle.seek(position)
            yield handle.read(size)


def tail_lines(path: Path, count: int) -> tuple[list[str], int]:
    """The last ``count`` complete lines of a text file and the offset just past them (its size).

    Reads blocks from the end until enough newlines are found, so the cost follows ``count``,
    not the file's size.
    """
    if not path.exists():
        return [], 0
    size = path.stat().st_size
    if count <= 0:
        return [], size
    data = b""
    for block in _backwards_blocks(path):
        data = block + data
        if data.count(b"\n") > count:
            break
    lines = data.decode("utf-8", errors="replace").splitlines(keepends=True)
    return lines[-count:], size


def last_record(path: Path) -> dict[str, Any] | None:
    """The newest record of a ``metrics.jsonl`` (None before the first)."""
    lines, _ = tail_lines(path, 2)
    for line in reversed(lines):
        if line.strip() and line.endswith("\n"):  # a half-written last line is skipped
            return json.loads(line)
    return None


def records_after(path: Path, since: int | None) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` with ``step > since``, in order, read line by line."""
    if not path.exists():
        return []
    records = []
    with path.open() as handle:
        for line in handle:
            if not line.strip() or not line.endswith("\n"):
                continue
            record = json.loads(line)
            if since is None or record.get("step", 0) > since:
                records.append(record)
    return records


async def follow_lines(
    path: Path, offset: int, finished: Callable[[], bool], poll_s: float = 0.5
) -> AsyncIterator[str]:
    """Lines appended to ``path`` after ``offset``, as they are written, until ``finished()``
    is true and everything written before that has been sent."""
    pending = b""
    while True:
        # Checked before reading, so lines written before the end are never cut off.
        done = await asyncio.to_thread(finished)
        if path.exists():
            with path.open("rb") as handle:
                handle.seek(offset)
                while chunk := handle.read(BLOCK):
                    offset += len(chunk)
                    *complete, pending = (pending + chunk).split(b"\n")
                    for line in complete:
                        yield line.decode("utf-8", errors="replace") + "\n"
        if done:
            if pending:
                yield pending.decode("utf-8", errors="replace")
            return
        await asyncio.sleep(poll_s)
