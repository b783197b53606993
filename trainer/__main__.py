"""The job entrypoint: ``python -m trainer SPEC [--run-dir DIR] [--job-id ID]``.

Exit codes: 0 the job succeeded, 1 it failed (reason in ``result.json``), 2 the spec or the
command line is invalid (nothing was started).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer", description="Run one hutch job spec on Ray.")
    parser.add_argument("spec", type=Path, help="job spec, YAML or JSON")
    parser.add_argument("--run-dir", type=Path, help="where metrics.jsonl and result.json go [runs/JOB_ID]")
    parser.add_argument("--job-id", help="the job's id (Ray Train run name, metric label) [NAME-random]")
    parser.add_argument("--storage-path", type=Path, help="checkpoint storage [$HUTCH_STORAGE_PATH]")
    args = parser.parse_args(argv)

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
