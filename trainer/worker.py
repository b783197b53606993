"""The per-worker training loop that Ray Train runs on every rank.

Every rank builds the same model from the same seed, takes its equal slice of the global batch
of each step (a pure function of seed and step), and calls the backend's ``train_step``. Rank 0
writes metric records and checkpoints; every rank calls ``ray.train.report`` at the same steps,
as Ray Train requires. A restarted group resumes from ``ray.train.get_checkpoint()``.
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

from trainer.backends import DDPBackend, StepStats
from trainer.checkpoint import TrainingState, param_checksum, read_checkpoint, write_checkpoint
from trainer.data import Dataset, build_dataset
from trainer.metrics import MetricsSink, read_metrics
from trainer.models.registry import build_model
from trainer.optim.adahessian import NonFiniteError
from trainer.spec import JobSpec


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


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, dataset: Dataset, rank: int, world: int, batch_size: int
) -> dict[str, float]:
    """Held-out loss and accuracy (or perplexity), each rank taking every world-th batch."""
    model.eval()
    device = next(model.parameters()).device
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    for index, (inputs, targets) in enumerate(dataset.eval_batches(batch_size)):
        if index % world != rank:
            continue
        logits = model(inputs.to(device))
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
    backend = DDPBackend(model, loss_function(dataset.task), optimizer_options(spec))

    start = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = read_checkpoint(Path(directory))
        model.load_state_dict(state.model)  # copies onto the model's device
        backend.load_optimizer_state(state.optimizer_shards)
        torch.set_rng_state(state.rng_state)
        start = state.step
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
        batch = (inputs[mine].to(device), targets[mine].to(device))
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


def _save_checkpoint(
    record: dict[str, Any], backend: DDPBackend, model: torch.nn.Module, done: int, rank: int
) -> None:
    """Every rank reports (Ray Train requires it); rank 0 attaches the checkpoint.

    Only checkpoint steps go through ``ray.train.report``: each call waits for the controller to
    take the previous one (about a second here), so per-step records go to ``metrics.jsonl``
    and the Ray gauges instead.
    """
    metrics = {k: v for k, v in record.items() if v is not None}
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
