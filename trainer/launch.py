"""Run one job spec as a Ray Train ``TorchTrainer`` and write its outcome to the run directory.

This is what the job entrypoint (``python -m trainer``) calls, on the Ray cluster named by
``RAY_ADDRESS`` or on a local one it starts. Outcome files in the run directory:
``metrics.jsonl`` (records), ``result.json`` (status, final metrics, ``param_checksum``),
``failure.json`` (why a run stopped, when it did).
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

from trainer.spec import JobSpec

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# Workers print their own progress lines; Ray's print patch would log each one twice.
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")


def new_job_id(spec: JobSpec) -> str:
    return f"{spec.name}-{uuid.uuid4().hex[:8]}"


def default_storage_path() -> Path:
    """Where Ray Train keeps checkpoints: ``HUTCH_STORAGE_PATH`` or ``~/.hutch/storage``."""
    return Path(os.environ.get("HUTCH_STORAGE_PATH", Path.home() / ".hutch" / "storage")).absolute()


def _connect_ray(spec: JobSpec) -> bool:
    """Join ``RAY_ADDRESS`` if set, else start a local cluster; True if this call started Ray."""
    import ray

    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return False
    needed = spec.scaling.num_workers * spec.scaling.cpus_per_worker
    options: dict[str, Any] = dict(
        num_cpus=max(os.cpu_count() or 1, int(needed + 0.999)),
        object_store_memory=256 * 2**20,
        include_dashboard=os.environ.get("HUTCH_RAY_DASHBOARD", "1") != "0",
    )
    if os.environ.get("HUTCH_METRICS_EXPORT_PORT"):
        options["_metrics_export_port"] = int(os.environ["HUTCH_METRICS_EXPORT_PORT"])
    # address="local": a new cluster of our own, even if another one (or the stale record of
    # one killed without `ray stop`) is on this machine.
    ray.init(address="local", **options)
    return True


def run_job(spec: JobSpec, run_dir: Path, job_id: str, storage_path: Path | None = None) -> int:
    """Train ``spec``; return the process exit code (0 succeeded, 1 failed)."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from trainer.worker import train_loop_per_worker

    run_dir = run_dir.absolute()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "spec.json").write_text(spec.model_dump_json(indent=2))
    for stale in ("result.json", "failure.json"):
        (run_dir / stale).unlink(missing_ok=True)
    try:
        started = _connect_ray(spec)
    except Exception as error:  # unreachable cluster, bad token, …: say so, no traceback
        reason = f"cannot reach the Ray cluster ({os.environ.get('RAY_ADDRESS') or 'local'}): {error}"
        _write_failure(run_dir, reason)
        return _outcome(run_dir, job_id)
    s = spec.scaling
    resources = {"CPU": s.cpus_per_worker}
    if s.use_gpu:
        resources["GPU"] = s.gpus_per_worker
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec.model_dump(mode="json"), "run_dir": str(run_dir), "job_id": job_id},
        scaling_config=ray.train.ScalingConfig(
            num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=job_id,
            storage_path=str(storage_path or default_storage_path()),
            failure_config=ray.train.FailureConfig(max_failures=spec.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=3),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )
    try:
        trainer.fit()
    except Exception as error:  # Ray's TrainingFailedError and friends: report, don't trace back
        _write_failure(run_dir, f"training failed: {type(error).__name__}: {error}")
    finally:
        if started:
            ray.shutdown()
    return _outcome(run_dir, job_id)


def _outcome(run_dir: Path, job_id: str) -> int:
    """Write ``result.json`` for a failed run, print the outcome, return the exit code."""
    failure = run_dir / "failure.json"
    if failure.exists():
        reason = json.loads(failure.read_text())["reason"]
        (run_dir / "result.json").write_text(
            json.dumps({"status": "failed", "job_id": job_id, "reason": reason}, indent=2)
        )
        print(f"[hutch] job {job_id} failed: {reason}")
        return 1
    result_path = run_dir / "result.json"
    if not result_path.exists():
        _write_failure(run_dir, "the run ended without writing result.json (see the Ray logs)")
        return _outcome(run_dir, job_id)
    result = json.loads(result_path.read_text())
    print(f"[hutch] job {job_id} succeeded: {json.dumps(result['metrics'])}")
    print(f"[hutch] param_checksum {json.dumps(result['param_checksum'])}; results in {run_dir}")
    return 0


def _write_failure(run_dir: Path, reason: str) -> None:
    (run_dir / "failure.json").write_text(json.dumps({"reason": reason}))
