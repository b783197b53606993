"""One job's run directory on the shared storage: its files' names, their writers and readers.

    runs/<job id>/spec.json             the spec the trainer runs (the service writes it at
                                        submission; ``python -m trainer`` when run by hand)
    runs/<job id>/metrics.jsonl         one record per logged step (rank 0, trainer.metrics)
    runs/<job id>/failure.json          why a run stopped (rank 0, or the driver), read by the driver
    runs/<job id>/result.json           the outcome: succeeded (rank 0) or failed (the driver)
    runs/<job id>/logs/attempt-<n>.log  the driver's output, one file per attempt
    runs/<job id>/workers/rank-<r>.pid  each rank's process id, for the fault tests and operators

Every name above is spelled here only; the trainer, the service and the API go through
:class:`RunDir`. A full or read-only storage is the usual reason a write here fails, so the
words for that reason live here too, for the driver and the reconciler alike.
"""

from __future__ import annotations

import errno
import json
import os
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
