"""The per-worker training loop that Ray Train runs on every rank.

Every rank builds the same model from the same seed, takes its equal slice of the global batch
of each step (a pure function of seed and step), and calls the backend's ``train_step`` (``ddp``
or ``deepspeed``, from the spec). Rank 0 writes metric records and checkpoints (under DeepSpeed
every rank adds its own partition's files); every rank calls ``ray.train.report`` at the same
steps, as Ray Train requires. A restarted group resumes from ``ray.train.get_checkpoint()``.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch.nn import functional as F

from trainer.backends import DDPBackend, DeepSpeedBackend, StepStats
from trainer.checkpoint import (
    DEEPSPEED_DIR,
    TrainingState,
    param_checksum,
    read_checkpoint,
    read_deepspeed_progress,
    write_checkpoint,
    write_deepspeed_progress,
)
from trainer.data import Dataset, build_dataset
from trainer.metrics import MetricsSink, read_metrics
from trainer.models.registry import build_model
from trainer.optim.adahessian import NonFiniteError
from trainer.spec import JobSpec

Backend = DDPBackend | DeepSpeedBackend


def loss_function(task: str):
    """Mean cross-entropy over examples (classification) or tokens (language model)."""

    def classification(model: torch.nn.Module, batch: Any) -> torch.Tensor:
        inputs, targets = batch
        return F.cross_entropy(model(inputs), targets)

    def language_model(model: torch.nn.Module, batch: Any) -> torch.Tensor:
        inputs, targets = batch
        logits = model(inputs)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))

    return classification if task == "classification" else language_model


def optimizer_options(spec: JobSpec) -> dict[str, Any]:
    """Keyword arguments for the backend's optimizer, from the spec."""
    o = spec.optimizer
    if o.name == "adahessian":
        return dict(
            name="adahessian", hessian_scope=o.hessian_scope, seed=spec.training.seed, **o.adahessian_kwargs()
        )
    if o.name == "sgd":
        return dict(name="sgd", lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    return dict(name=o.name, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)


def build_backend(spec: JobSpec, model: torch.nn.Module, task: str) -> Backend:
    """The spec's backend around ``model``: ``ddp``, or ``deepspeed`` with its ZeRO stage and precision."""
    loss_fn, options, b = loss_function(task), optimizer_options(spec), spec.backend
    if b.name == "deepspeed":
        return DeepSpeedBackend(model, loss_fn, options, zero_stage=b.zero_stage, precision=b.precision)
    return DDPBackend(model, loss_fn, options)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, dataset: Dataset, rank: int, world: int, batch_size: int
) -> dict[str, float]:
    """Held-out loss and accuracy (or perplexity), each rank taking every world-th batch."""
    model.eval()
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    for index, (inputs, targets) in enumerate(dataset.eval_batches(batch_size)):
        if index % world != rank:
            continue
        logits = model(_to_model(inputs, device, dtype))
        targets = targets.to(device)
        flat_logits = logits.reshape(-1, logits.size(-1))
        flat_targets = targets.reshape(-1)
        totals[0] += F.cross_entropy(flat_logits, flat_targets, reduction="sum").double()
        totals[1] += (flat_logits.argmax(dim=1) == flat_targets).sum().double()
        totals[2] += flat_targets.numel()
    model.train()
    dist.all_reduce(totals)
    loss = (totals[0] / totals[2]).item()
    accuracy = (totals[1] / totals[2]).item()
    if dataset.task == "language_model":
        perplexity = float(torch.tensor(loss).exp())
        return {"eval_loss": loss, "eval_perplexity": perplexity, "eval_accuracy": accuracy}
    return {"eval_loss": loss, "eval_accuracy": accuracy}


def _record(step: int, stats: StepStats, lr: float, seconds: float, batch_size: int) -> dict[str, Any]:
    return {
        "step": step,
        "time": time.time(),
        "loss": stats.loss,
        "lr": lr,
        "hessian_step": stats.hessian_step,
        "hessian_trace": stats.hessian_trace,
        "grad_norm": stats.grad_norm,
        "step_time_s": seconds,
        "samples_per_s": batch_size / seconds if seconds > 0 else None,
    }


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's entry on each worker: ``config`` holds the spec, run directory and job id."""
    spec = JobSpec.model_validate(config["spec"])
    run_dir, job_id = Path(config["run_dir"]), config["job_id"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    (run_dir / "workers").mkdir(parents=True, exist_ok=True)
    (run_dir / "workers" / f"rank-{rank}.pid").write_text(str(os.getpid()))

    t = spec.training
    torch.manual_seed(t.seed)
    dataset = build_dataset(spec.data.name, spec.data.args)
    device = ray.train.torch.get_device()  # the worker's GPU, or the CPU
    model = build_model(spec.model.name, spec.model.args, dataset.model_args()).to(device)
    backend = build_backend(spec, model, dataset.task)
    model = backend.model  # DeepSpeed trains the same module, in bf16 if asked
    dtype = next(model.parameters()).dtype

    start = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            start = _restore(backend, model, Path(directory))
        if rank == 0:
            print(f"[hutch] resumed from the checkpoint at step {start}", flush=True)
    sink = MetricsSink(run_dir / "metrics.jsonl", job_id, resume_step=start) if rank == 0 else None

    micro = t.global_batch_size // world
    latest: dict[str, Any] = {}
    for step in range(start, t.steps):
        done = step + 1
        lr = spec.optimizer.lr_at(step, t.steps)
        for group in backend.optimizer.param_groups:
            group["lr"] = lr
        inputs, targets = dataset.train_batch(step, t.seed, t.global_batch_size)
        mine = slice(rank * micro, (rank + 1) * micro)
        batch = (_to_model(inputs[mine], device, dtype), targets[mine].to(device))
        began = time.perf_counter()
        try:
            stats = backend.train_step(batch, t.chunk_size)
        except NonFiniteError as error:  # raised on every rank alike: stop without retrying
            if rank == 0:
                reason = f"training stopped: {error}"
                (run_dir / "failure.json").write_text(json.dumps({"step": done, "reason": reason}))
                print(f"[hutch] {reason}", flush=True)
            return
        seconds = time.perf_counter() - began

        logging_step = done % t.log_every == 0 or done == t.steps
        eval_step = done % t.eval_every == 0 or done == t.steps
        checkpoint_step = done % t.checkpoint_every == 0 or done == t.steps
        if not (logging_step or eval_step or checkpoint_step):
            continue
        record = _record(done, stats, lr, seconds, t.global_batch_size)
        if eval_step:
            record.update(evaluate(model, dataset, rank, world, t.global_batch_size))
        latest.update({k: v for k, v in record.items() if v is not None})
        if sink is not None:
            sink.write(record)
            print(_progress_line(record, t.steps), flush=True)
        if checkpoint_step:
            _save_checkpoint(record, backend, model, done, rank)

    if rank == 0:
        if not latest:  # resumed from the final checkpoint: nothing left to train
            latest = (read_metrics(run_dir / "metrics.jsonl") or [{}])[-1]
        checksum = param_checksum(model)
        result = {"status": "succeeded", "job_id": job_id, "metrics": latest, "param_checksum": checksum}
        (run_dir / "result.json").write_text(json.dumps(result, indent=2))


def _to_model(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Onto the model's device; floating inputs also in the model's dtype (bf16 under DeepSpeed)."""
    return tensor.to(device, dtype) if tensor.is_floating_point() else tensor.to(device)


def _restore(backend: Backend, model: torch.nn.Module, directory: Path) -> int:
    """Load a checkpoint written by :func:`_save_checkpoint`; return its completed steps."""
    if isinstance(backend, DeepSpeedBackend):
        backend.load_checkpoint(directory / DEEPSPEED_DIR)
        step, rng_state = read_deepspeed_progress(directory)
    else:
        state = read_checkpoint(directory)
        model.load_state_dict(state.model)  # copies onto the model's device
        backend.load_optimizer_state(state.optimizer_shards)
        step, rng_state = state.step, state.rng_state
    torch.set_rng_state(rng_state)
    return step


def _save_checkpoint(
    record: dict[str, Any], backend: Backend, model: torch.nn.Module, done: int, rank: int
) -> None:
    """Every rank reports (Ray Train requires it); rank 0 attaches the checkpoint (``ddp``), or
    every rank attaches its own files and Ray merges them into one directory (``deepspeed``).

    Only checkpoint steps go through ``ray.train.report``: each call waits for the controller to
    take the previous one (about a second here), so per-step records go to ``metrics.jsonl``
    and the Ray gauges instead.
    """
    metrics = {k: v for k, v in record.items() if v is not None}
    if isinstance(backend, DeepSpeedBackend):
        with tempfile.TemporaryDirectory() as directory:
            backend.save_checkpoint(Path(directory) / DEEPSPEED_DIR)
            if rank == 0:
                write_deepspeed_progress(Path(directory), done, dist.get_world_size(), torch.get_rng_state())
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
        return
    shards: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(shards, backend.optimizer_state())
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = None
        if rank == 0:
            state = TrainingState(done, model.state_dict(), shards, torch.get_rng_state())
            write_checkpoint(Path(directory), state)
            checkpoint = ray.train.Checkpoint.from_directory(directory)
        ray.train.report(metrics, checkpoint=checkpoint)


def _progress_line(record: dict[str, Any], total: int) -> str:
    parts = [f"step {record['step']}/{total}", f"loss {record['loss']:.4f}", f"lr {record['lr']:.4g}"]
    if record.get("hessian_trace") is not None:
        parts.append(f"trace {record['hessian_trace']:.4g}")
    if record.get("samples_per_s"):
        parts.append(f"{record['samples_per_s']:.0f} samples/s")
    for key in ("eval_loss", "eval_accuracy", "eval_perplexity"):
        if key in record:
            parts.append(f"{key} {record[key]:.4f}")
    return "[hutch] " + "  ".join(parts)
