"""The per-worker training loop that Ray Train runs on every rank.

Every rank builds the same model from the same seed, loads only its own equal share of the
global batch of each step (a pure function of seed and step; :func:`trainer.data.rank_batch`),
and calls the backend's ``train_step`` with the loss the spec names (:mod:`trainer.losses`). The
backend is the one the spec names (:data:`trainer.backends.BACKENDS`), and the loop asks of it only
what :class:`~trainer.backends.base.TrainingBackend` declares: it never asks which one it has.
Rank 0 writes metric records; checkpoints are the backend's own files; every rank reports at the
same steps, as Ray Train requires. A restarted group resumes from the last checkpoint.

The loop talks to its runner through a :class:`WorkerSession` (rank, world size, device, the
checkpoint to resume from, reports): :class:`RaySession` under Ray Train, or any plain
``torch.distributed`` group (tests run the same loop on gloo processes).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch.nn import functional as F

from trainer.backends import StepStats, TrainingBackend, build_backend
from trainer.backends.base import LossFn
from trainer.batches import batch_size as examples_in
from trainer.batches import to_device
from trainer.checkpoint import CheckpointMismatch, param_checksum
from trainer.data import AnyDataset, build_dataset, dataset_model_args, dataset_task, rank_batch
from trainer.double_backward import explain_double_backward, twice_differentiable
from trainer.losses import (
    LOSS_FIELD,
    MetricsFn,
    build_loss,
    build_metrics,
    reduce_weighted,
)
from trainer.metrics import MetricsSink, WorkerGauges
from trainer.models.registry import build_model
from trainer.notice import StoppedOnNotice, rank_given_notice
from trainer.optim import NonFiniteError
from trainer.outcome import FailureCause
from trainer.rundir import RunDir, last_record
from trainer.seeding import seed_step
from trainer.spec import JobSpec, SpecError


class WorkerSession(Protocol):
    """What the loop needs from whatever runs it on each rank."""

    rank: int
    world: int
    device: torch.device
    export_metrics: bool
    """Whether metric records are also Ray gauges."""

    def restored(self) -> AbstractContextManager[Path | None]:
        """The directory of the checkpoint to resume from, or ``None`` for a fresh start."""
        ...

    def report(self, metrics: dict[str, Any], directory: Path | None) -> None:
        """Collective: hand over this rank's checkpoint files (or none) with the step's metrics."""
        ...

    def wait_until_registered(self) -> None:
        """Block until every checkpoint reported so far is registered (what a retry resumes from)."""
        ...

    def drain_notice(self) -> str | None:
        """Collective: what the runner says of a node of the group being drained, or None."""
        ...


class RaySession:
    """A Ray Train worker: its context, device, ``get_checkpoint`` and ``report``."""

    export_metrics = True

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()  # the worker's GPU, or the CPU

    @contextmanager
    def restored(self) -> Iterator[Path | None]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as directory:
            yield Path(directory)

    def report(self, metrics: dict[str, Any], directory: Path | None) -> None:
        import ray.train

        checkpoint = None if directory is None else ray.train.Checkpoint.from_directory(directory)
        ray.train.report(metrics, checkpoint=checkpoint)

    def wait_until_registered(self) -> None:
        import ray.train

        # The controller registers a report when it next polls the workers (every 2 s); until then
        # the final checkpoint is only files, and a teardown in that window would lose it.
        ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)

    def drain_notice(self) -> str | None:
        import ray.train

        info = ray.train.get_preemption_info()  # Ray Train's preemption watcher (trainer.notice)
        if info is None:
            return None
        ranks = ", ".join(str(rank) for rank in info.preempted_ranks)
        deadline = ""
        if info.deadline_ms is not None:
            deadline = f", to be stopped in {info.deadline_ms / 1000 - time.time():.0f} s"
        return f"Ray is draining the node of rank {ranks}{deadline}"


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    dataset: AnyDataset,
    rank: int,
    world: int,
    batch_size: int,
    loss_fn: LossFn | None = None,
    metrics_fn: MetricsFn | None = None,
) -> dict[str, float]:
    """Held-out metrics of ``model`` (in eval mode), each rank taking every world-th batch.

    With the built-in loss (``loss_fn`` None): loss and accuracy (or perplexity) of the task.
    With the user's loss: ``eval_loss`` is that loss, the mean over held-out examples. The
    user's ``metrics_fn`` adds ``eval_<name>`` means over examples (:func:`reduce_weighted`).
    """
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    weighted: dict[str, tuple[float, float]] = {}
    for index, batch in enumerate(dataset.eval_batches(batch_size)):
        if index % world != rank:
            continue
        batch = to_device(batch, device, dtype)
        if loss_fn is None:
            inputs, targets = batch
            logits = model(inputs)
            flat_logits = logits.reshape(-1, logits.size(-1))
            flat_targets = targets.reshape(-1)
            totals[0] += F.cross_entropy(flat_logits, flat_targets, reduction="sum").double()
            totals[1] += (flat_logits.argmax(dim=1) == flat_targets).sum().double()
            totals[2] += flat_targets.numel()
        values = {} if loss_fn is None else {"loss": float(loss_fn(model, batch))}
        if metrics_fn is not None:
            values.update(metrics_fn(model, batch))
        examples = float(examples_in(batch))
        for name, value in values.items():
            total, weight = weighted.get(name, (0.0, 0.0))
            weighted[name] = (total + value * examples, weight + examples)
    out: dict[str, float] = {}
    if loss_fn is None:
        dist.all_reduce(totals)
        loss = (totals[0] / totals[2]).item()
        out = {"eval_loss": loss, "eval_accuracy": (totals[1] / totals[2]).item()}
        if dataset_task(dataset) == "language_model":
            out["eval_perplexity"] = float(torch.tensor(loss).exp())
    if loss_fn is not None or metrics_fn is not None:
        per_rank: list[Any] = [None] * world
        dist.all_gather_object(per_rank, weighted)  # small, and only at evaluation steps
        out.update({f"eval_{name}": value for name, value in reduce_weighted(per_rank).items()})
    return out


def _record(
    step: int, stats: StepStats, lr: float, seconds: float, batch_size: int, hessian_steps: int, world: int
) -> dict[str, Any]:
    return {
        "step": step,
        "workers": world,
        "time": time.time(),
        "loss": stats.loss,
        "lr": lr,
        "hessian_step": stats.hessian_step,
        "hessian_steps": hessian_steps,
        "hessian_trace": stats.hessian_trace,
        "grad_norm": stats.grad_norm,
        "step_time_s": seconds,
        "samples_per_s": batch_size / seconds if seconds > 0 else None,
    }


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's entry on each worker: ``config`` holds the spec, run directory and job id."""
    run_worker(config, RaySession())


def run_worker(config: dict[str, Any], session: WorkerSession) -> None:
    """The loop on one rank of an initialised ``torch.distributed`` group (see the module doc)."""
    spec = JobSpec.model_validate(config["spec"])
    run, job_id = RunDir(Path(config["run_dir"])), config["job_id"]
    rank, world, device = session.rank, session.world, session.device
    run.write_pid(rank, os.getpid())

    t = spec.training
    torch.manual_seed(t.seed)
    try:  # the same on every rank, before any collective: every rank stops alike
        dataset = build_dataset(spec.data.name, spec.data.args)
        loss_fn = build_loss(t.loss, dataset_task(dataset), spec.model.name)
        metrics_fn = build_metrics(t.metrics)
        model = build_model(spec.model.name, spec.model.args, dataset_model_args(dataset)).to(device)
        backend = build_backend(spec, model, loss_fn)
    except SpecError as error:
        _stop(run, rank, None, f"cannot start: {error}")
        return
    dtype = next(backend.model.parameters()).dtype  # a backend may train in bf16
    eval_loss = loss_fn if t.loss is not None else None
    computes_loss = LOSS_FIELD if t.loss is not None else "model"

    start = 0
    with session.restored() as directory:
        if directory is not None:
            try:
                start = backend.load_checkpoint(directory)
            except CheckpointMismatch as error:  # every rank reads the same progress.json
                _stop(run, rank, None, f"cannot resume: {error}")
                return
            if rank == 0:
                print(f"[hutch] resumed from the checkpoint at step {start}", flush=True)
    sink = None
    if rank == 0:
        path, export = run.metrics_file, session.export_metrics
        sink = MetricsSink(path, job_id, resume_step=start, export_to_ray=export)
    hessian_steps = sink.resumed_hessian_steps if sink is not None else 0  # rank 0 reports it
    own_gauges = WorkerGauges(job_id, rank) if session.export_metrics else None
    rank_samples = t.global_batch_size // world

    latest: dict[str, Any] = {}
    drain_saved = False  # one checkpoint per drain notice
    for step in range(start, t.steps):
        done = step + 1
        lr = spec.optimizer.lr_at(step, t.steps)
        for group in backend.optimizer.param_groups:
            group["lr"] = lr
        try:
            batch = rank_batch(dataset, step, t.seed, t.global_batch_size, rank, world)
        except ValueError as error:
            _stop(run, rank, done, f"training stopped: data set {spec.data.name!r}: {error}")
            return
        batch = to_device(batch, device, dtype)
        seed_step(t.seed, step, rank)  # each rank its own dropout masks, reproducibly
        hessian_step = backend.hessian_due  # a Hessian step differentiates the loss twice
        began = time.perf_counter()
        # These errors are raised on every rank alike (the same code on equally shaped shares,
        # before the step's first collective), so each rank stops without a retry.
        try:
            with twice_differentiable() if hessian_step else nullcontext():
                stats = backend.train_step(batch, t.chunk_size)
        except NonFiniteError as error:
            _stop(run, rank, done, f"training stopped: {error}", FailureCause.NON_FINITE_LOSS)
            return
        except SpecError as error:  # the user's loss returned something unusable
            _stop(run, rank, done, f"training stopped: {error}")
            return
        except RuntimeError as error:
            reason = explain_double_backward(error, computes_loss) if hessian_step else None
            if reason is None:
                raise
            _stop(run, rank, done, f"training stopped: {reason}")
            return
        seconds = time.perf_counter() - began
        hessian_steps += stats.hessian_step

        logging_step = done % t.log_every == 0 or done == t.steps
        eval_step = done % t.eval_every == 0 or done == t.steps
        checkpoint_step = done % t.checkpoint_every == 0 or done == t.steps
        # Notices (trainer.notice): a SIGTERM is checked every step, a drain at logging steps.
        noticed = rank_given_notice(device)
        stopping = noticed is not None and done < t.steps
        drained = session.drain_notice() if logging_step and not drain_saved else None
        if stopping or drained:
            why = f"rank {noticed} got SIGTERM" if stopping else drained
            then = "stopping; a retry resumes from it" if stopping else "training on"
            if rank == 0:
                print(f"[hutch] {why}: saving a checkpoint at step {done}, then {then}", flush=True)
            drain_saved = drain_saved or drained is not None
            checkpoint_step, eval_step = True, eval_step and not stopping
        if not (logging_step or eval_step or checkpoint_step):
            continue
        if own_gauges is not None and logging_step:
            own_gauges.set(seconds, rank_samples)
        record = _record(done, stats, lr, seconds, t.global_batch_size, hessian_steps, world)
        backend.average_buffers()  # BatchNorm statistics: one set, for evaluation and checkpoints
        if eval_step:
            try:
                with backend.evaluation() as model:
                    record.update(
                        evaluate(model, dataset, rank, world, t.global_batch_size, eval_loss, metrics_fn)
                    )
            except SpecError as error:  # the user's metrics returned something unusable
                _stop(run, rank, done, f"evaluation failed: {error}")
                return
        latest.update({k: v for k, v in record.items() if v is not None})
        if sink is not None:
            sink.write(record)
            print(_progress_line(record, t.steps), flush=True)
        if checkpoint_step:
            _save_checkpoint(session, record, backend, done)
        if stopping or drained:  # the node may go any moment: the checkpoint must be Ray's already
            session.wait_until_registered()
        if stopping:
            raise StoppedOnNotice(noticed, done)

    checksum = param_checksum(backend.model)  # a collective where parameters are sharded
    if rank == 0:
        if not latest:  # resumed from the final checkpoint: nothing left to train
            latest = last_record(run.metrics_file) or {}
        # result.json means "trained, and the final checkpoint is registered": whatever Ray's
        # teardown does after it, the job succeeded (trainer.launch holds to that).
        session.wait_until_registered()
        result = {"status": "succeeded", "job_id": job_id, "metrics": latest, "param_checksum": checksum}
        run.write_result(result)


def _stop(
    run: RunDir, rank: int, step: int | None, reason: str, cause: FailureCause = FailureCause.JOB_ERROR
) -> None:
    """Record why the run stopped (rank 0 writes; the job fails with this reason, no retry)."""
    if rank == 0:
        run.write_failure(reason, cause, step)
        print(f"[hutch] {reason}", flush=True)


def _save_checkpoint(
    session: WorkerSession, record: dict[str, Any], backend: TrainingBackend, done: int
) -> None:
    """Every rank reports (Ray Train requires it), with the checkpoint files it wrote if any: the
    backend says which ranks write (``ddp``: rank 0; ``deepspeed``: every rank its own partition,
    and Ray merges the directories into one).

    Only checkpoint steps go through ``ray.train.report`` (``session.report``): each call waits
    for the controller to take the previous one (about a second here), so per-step records go
    to ``metrics.jsonl`` and the Ray gauges instead.
    """
    metrics = {k: v for k, v in record.items() if v is not None}
    with tempfile.TemporaryDirectory() as directory:
        wrote = backend.save_checkpoint(Path(directory), done)
        session.report(metrics, Path(directory) if wrote else None)


def _progress_line(record: dict[str, Any], total: int) -> str:
    parts = [f"step {record['step']}/{total}", f"loss {record['loss']:.4f}", f"lr {record['lr']:.4g}"]
    if record.get("hessian_trace") is not None:
        parts.append(f"trace {record['hessian_trace']:.4g}")
    if record.get("samples_per_s"):
        parts.append(f"{record['samples_per_s']:.0f} samples/s")
    for key, value in record.items():
        if key.startswith("eval_") and isinstance(value, float):
            parts.append(f"{key} {value:.4f}")
    return "[hutch] " + "  ".join(parts)
