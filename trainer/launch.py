"""Run one job spec as a Ray Train ``TorchTrainer`` and write its outcome to the run directory.

This is what the job entrypoint (``python -m trainer``) calls, on the Ray cluster named by
``RAY_ADDRESS`` or on a local one it starts. The driver turns a run's failure record into its
failed result; where the storage refuses even that, its last output line says why
(``error: …``), and Ray keeps that line (see :mod:`trainer.rundir` for the files).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import uuid
from pathlib import Path
from typing import Any

from trainer.outcome import FailureCause
from trainer.rundir import RunDir, storage_error_code, storage_reason
from trainer.spec import JobSpec

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# Workers print their own progress lines; Ray's print patch would log each one twice.
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")


def new_job_id(spec: JobSpec) -> str:
    return f"{spec.name}-{uuid.uuid4().hex[:8]}"


def default_storage_path() -> Path:
    """Where Ray Train keeps checkpoints: ``HUTCH_STORAGE_PATH`` or ``~/.hutch/storage``."""
    return Path(os.environ.get("HUTCH_STORAGE_PATH", Path.home() / ".hutch" / "storage")).absolute()


ONE_MACHINE_RAY_ENV = {
    # Ray Train's preemption watcher (one actor per run: ~2.5 s of CPU to start, a poll every 5 s)
    # follows nodes being drained, as spot reclaims do; a cluster of this one machine has none.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    # The controller polls its workers every 2 s by default, and a run's end takes two polls (the
    # final report, then the finished workers): 4-5 s of idle cluster after the last step. One
    # machine's few workers are cheap to poll; 0.5 s took a 24-step job from 18 to 13 s.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
}
"""Environment of a Ray cluster on this machine alone (the trainer's own, ``hutch serve``'s
local head; worth setting for your own one-machine ``ray start`` too). Ray Train's controller
takes these from the driver. A variable the user set wins."""


def _connect_ray(spec: JobSpec) -> bool:
    """Join ``RAY_ADDRESS`` if set, else start a local cluster; True if this call connected
    (False when the caller had connected already: it disconnects, not us)."""
    import ray

    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return True
    for name, value in ONE_MACHINE_RAY_ENV.items():  # read by Ray Train's controller
        os.environ.setdefault(name, value)
    needed = spec.scaling.max_workers * spec.scaling.cpus_per_worker
    options: dict[str, Any] = dict(
        num_cpus=max(os.cpu_count() or 1, int(needed + 0.999)),
        object_store_memory=256 * 2**20,
        include_dashboard=os.environ.get("HUTCH_RAY_DASHBOARD", "1") != "0",
    )
    if os.environ.get("HUTCH_METRICS_EXPORT_PORT"):
        options["_metrics_export_port"] = int(os.environ["HUTCH_METRICS_EXPORT_PORT"])
    if options["include_dashboard"]:
        # Ray's State API, asked without an address inside the cluster (Ray Train's
        # placement-group cleaner does), finds "the latest Ray" on the machine: another cluster,
        # where our controller does not exist, so the cleaner took it for dead and removed the
        # run's placement group. Naming our dashboard for the cluster's processes prevents it.
        port = _free_port()
        options["dashboard_port"] = port
        options["runtime_env"] = {"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}}
    # address="local": a new cluster of our own, even if another one (or the stale record of
    # one killed without `ray stop`) is on this machine.
    ray.init(address="local", **options)
    return True


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_job(spec: JobSpec, run_dir: Path, job_id: str, storage_path: Path | None = None) -> int:
    """Train ``spec``; return the process exit code (0 succeeded, 1 failed)."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from trainer.worker import train_loop_per_worker

    run = RunDir(run_dir.absolute())
    try:
        run.write_spec(spec.model_dump_json(indent=2))
        run.clear_outcome()
    except OSError as error:  # nothing started; the reason goes where Ray keeps the driver's log
        return _failed_unwritten(_unwritable(run.path, error))
    try:
        connected = _connect_ray(spec)
    except Exception as error:  # unreachable cluster, bad token, …: say so, no traceback
        reason = f"cannot reach the Ray cluster ({os.environ.get('RAY_ADDRESS') or 'local'}): {error}"
        return _outcome(run, job_id, _write_failure(run, reason))
    trainer = TorchTrainer(
        train_loop_per_worker,
        torch_config=_torch_config_taking_notice(),
        train_loop_config={"spec": spec.model_dump(mode="json"), "run_dir": str(run.path), "job_id": job_id},
        scaling_config=_scaling_config(spec),
        run_config=ray.train.RunConfig(
            name=job_id,
            storage_path=str(storage_path or default_storage_path()),
            failure_config=ray.train.FailureConfig(max_failures=spec.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=3),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )
    unwritten = None
    try:
        trainer.fit()
    except Exception as error:  # Ray's TrainingFailedError and friends: report, don't trace back
        unwritten = _after_fit_error(run, error)
    finally:
        # Disconnected, the driver gets no more of the workers' lines from Ray, so the outcome
        # printed next is its last line: the reconciler reads it from Ray's tail of the log.
        if connected:
            ray.shutdown()
    return _outcome(run, job_id, unwritten)


def _scaling_config(spec: JobSpec) -> Any:
    """Ray Train's ScalingConfig: a fixed count, or Ray Train's elastic ``(min, max)``."""
    import ray.train

    from trainer.spec import WorkerRange

    s = spec.scaling
    resources = {"CPU": s.cpus_per_worker}
    if s.use_gpu:
        resources["GPU"] = s.gpus_per_worker
    if isinstance(s.num_workers, WorkerRange):
        elastic = s.num_workers
        return ray.train.ScalingConfig(
            num_workers=(elastic.min, elastic.max),
            elastic_resize_monitor_interval_s=elastic.resize_interval_s,
            use_gpu=s.use_gpu,
            resources_per_worker=resources,
        )
    return ray.train.ScalingConfig(
        num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker=resources
    )


def _torch_config_taking_notice() -> Any:
    """Ray Train's torch set-up, after which each worker takes its first SIGTERM as a notice to
    checkpoint and stop (:mod:`trainer.notice`). A signal handler is installed on the process's
    main thread, which is where Ray Train runs a backend's set-up on each worker (the training
    function runs on another thread)."""
    from ray.train.torch import TorchConfig

    from trainer.notice import take_sigterm_as_notice

    class TorchConfigTakingNotice(TorchConfig):
        @property
        def backend_cls(self) -> type:
            torch_backend = super().backend_cls

            class TorchBackendTakingNotice(torch_backend):  # type: ignore[valid-type,misc]
                def on_start(self, worker_group: Any, backend_config: Any) -> None:
                    super().on_start(worker_group, backend_config)
                    worker_group.execute(take_sigterm_as_notice)

            return TorchBackendTakingNotice

    return TorchConfigTakingNotice()


def _outcome(run: RunDir, job_id: str, unwritten: str | None = None) -> int:
    """Write ``result.json`` for a failed run, print the outcome, return the exit code.

    ``unwritten`` is a failure whose ``failure.json`` the storage refused: it becomes the
    driver's last line (``error: …``), which Ray keeps wherever the storage is."""
    if unwritten is not None:
        return _failed_unwritten(unwritten)
    stopped = run.read_failure()
    if stopped is not None:
        reason, cause = stopped["reason"], stopped.get("cause", FailureCause.INFRASTRUCTURE)
        try:
            run.write_result({"status": "failed", "job_id": job_id, "reason": reason, "cause": cause})
        except OSError as error:
            return _failed_unwritten(f"{reason} ({_unwritable(run.path, error)})")
        print(f"[hutch] job {job_id} failed: {reason}")
        return 1
    result = run.read_result()
    if result is None:
        unwritten = _write_failure(run, "the run ended without writing result.json (see the Ray logs)")
        return _outcome(run, job_id, unwritten)
    print(f"[hutch] job {job_id} succeeded: {json.dumps(result['metrics'])}")
    print(f"[hutch] param_checksum {json.dumps(result['param_checksum'])}; results in {run.path}")
    return 0


def _failed_unwritten(reason: str) -> int:
    """Print a failure the storage would not take as the driver's last line; exit code 1.

    stdout is flushed first: lines still in its buffer (the workers' output that Ray relays)
    would otherwise come out after this one at exit and push it out of the tail Ray keeps."""
    sys.stdout.flush()
    print(f"error: {reason}", file=sys.stderr, flush=True)
    return 1


PLACEMENT_GROUP_REMOVED = "placement group was removed"


def _after_fit_error(run: RunDir, error: Exception) -> str | None:
    """Decide what an error out of ``fit()`` means for the job.

    Rank 0 writes a succeeded ``result.json`` only after the final checkpoint is registered, so
    an error after that comes from Ray's teardown and the job has succeeded. The known case:
    Ray Train 2.60's placement-group cleaner takes a State API answer without the controller
    (a busy dashboard) for a dead controller and removes the run's placement group, which
    destroys its workers (ray-project/ray#65447). Mid-run, that is a worker-group failure that
    ``max_failures`` retries; past them the job fails with that reason rather than Ray's
    per-rank dump. The job's own code that raised (its loss or metrics) fails it as a job
    error, which is never retried; a group stopped on notice (:mod:`trainer.notice`) says at
    which step its checkpoint is.

    Returns the reason if the storage refused its ``failure.json`` (see :func:`_outcome`)."""
    result = run.read_result()
    if result is not None and result.get("status") == "succeeded":
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        print(
            f"[hutch] training completed and its final checkpoint is registered; ignoring an error "
            f"from Ray's teardown: {type(error).__name__}: {first_line}",
            flush=True,
        )
        return None
    from trainer.losses import UserCodeRaised
    from trainer.notice import StoppedOnNotice

    if UserCodeRaised.MARK in str(error):
        return _write_failure(
            run, f"training stopped: {_marked_line(error, UserCodeRaised.MARK)}", FailureCause.JOB_ERROR
        )
    if StoppedOnNotice.MARK in str(error):
        reason = f"training {_marked_line(error, StoppedOnNotice.MARK)}"
    elif PLACEMENT_GROUP_REMOVED in str(error):
        reason = (
            "training failed: Ray removed the job's placement group, which destroyed its workers "
            "(Ray Train's placement-group cleaner does this when it takes a slow Ray State API answer "
            "for a dead controller, ray-project/ray#65447); retry the job to resume from its last "
            "checkpoint, or raise max_failures to let Ray restart it by itself"
        )
    else:
        reason = _storage_failure(error, run) or f"training failed: {type(error).__name__}: {error}"
    return _write_failure(run, reason)


def _marked_line(error: Exception, mark: str) -> str:
    """The line of Ray's error (a per-rank dump) that starts at ``mark``."""
    text = str(error)
    return text[text.index(mark) :].splitlines()[0]


def _storage_failure(error: Exception, run: RunDir) -> str | None:
    """The reason for a run that failed because the storage cannot be written, or None.

    Ray Train passes a worker's OSError on as text; but after ``max_failures`` restarts the
    last error can be a secondary one (an actor gone), so the run directory is also tried."""
    code = storage_error_code(str(error))
    problem = storage_reason(code) if code is not None else run.storage_problem()
    return f"training failed: {problem}" if problem else None


UNWRITABLE = "cannot be written"
"""In the driver's last ``error:`` line when it could not write the run directory."""


def _unwritable(run_dir: Path, error: OSError) -> str:
    return f"the run directory {run_dir} {UNWRITABLE}: {error.strerror or error}"


def _write_failure(run: RunDir, reason: str, cause: FailureCause = FailureCause.INFRASTRUCTURE) -> str | None:
    """Record why the run failed; the reason again if the storage refused it (full or read-only)."""
    try:
        run.write_failure(reason, cause)
    except OSError as error:
        return f"{reason} ({_unwritable(run.path, error)})"
    return None
