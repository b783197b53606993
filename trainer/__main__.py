"""The job entrypoint: ``python -m trainer SPEC [--run-dir DIR] [--job-id ID]``.

Exit codes: 0 the job succeeded, 1 it failed (reason in ``result.json``), 2 the spec or the
command line is invalid (nothing was started).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TextIO


class _Tee:
    """Writes to a console stream and to a log file, so the control plane can serve the log
    (tail, follow) from the shared storage while Ray still shows it on the dashboard."""

    def __init__(self, stream: TextIO, log: TextIO) -> None:
        self._stream, self._log = stream, log
        self._log_broken = False

    def write(self, text: str) -> int:
        if not self._log_broken:
            try:
                self._log.write(text)
                self._log.flush()
            except OSError as error:  # the storage is full or read-only: the console still gets it
                self._log_broken = True
                self._stream.write(f"[hutch] the log file stops here: {error.strerror or error}\n")
        return self._stream.write(text)

    def flush(self) -> None:
        self._stream.flush()
        if not self._log_broken:
            try:
                self._log.flush()
            except OSError:
                self._log_broken = True

    def __getattr__(self, name: str):  # isatty, fileno, encoding, …: the console's
        return getattr(self._stream, name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer", description="Run one hutch job spec on Ray.")
    parser.add_argument("spec", type=Path, help="job spec, YAML or JSON")
    parser.add_argument("--run-dir", type=Path, help="where metrics.jsonl and result.json go [runs/JOB_ID]")
    parser.add_argument("--job-id", help="the job's id (Ray Train run name, metric label) [NAME-random]")
    parser.add_argument("--storage-path", type=Path, help="checkpoint storage [$HUTCH_STORAGE_PATH]")
    parser.add_argument("--log-file", type=Path, help="also append everything printed to this file")
    args = parser.parse_args(argv)
    if args.log_file is not None:
        try:
            args.log_file.parent.mkdir(parents=True, exist_ok=True)
            log = args.log_file.open("a", buffering=1)
        except OSError as error:  # the storage is full or read-only: Ray still keeps the log
            print(f"[hutch] cannot write the log file {args.log_file}: {error.strerror or error}", flush=True)
        else:
            sys.stdout, sys.stderr = _Tee(sys.stdout, log), _Tee(sys.stderr, log)

    from trainer.launch import new_job_id, run_job
    from trainer.preflight import check_spec
    from trainer.spec import SpecError, load_spec

    try:
        spec = load_spec(args.spec)  # its errors name the file
    except SpecError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        check_spec(spec)
    except SpecError as error:
        print(f"error: {args.spec}: {error}", file=sys.stderr)
        return 2
    job_id = args.job_id or new_job_id(spec)
    run_dir = args.run_dir or Path("runs") / job_id
    return run_job(spec, run_dir, job_id, args.storage_path)


if __name__ == "__main__":
    sys.exit(main())
