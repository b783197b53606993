"""Training checkpoints: one directory with the model, every rank's optimizer shard and progress.

Each backend writes and reads its own format (``save_checkpoint``/``load_checkpoint`` of
:class:`~trainer.backends.base.TrainingBackend`) with the helpers here; the worker loop only hands
the directories to its runner and back.

Layout with the ``ddp`` backend (what rank 0 hands to ``ray.train.report(checkpoint=...)``)::

    model.pt            model state_dict (parameters and buffers), from rank 0
    optimizer-<r>.pt    the optimizer state of rank r, keyed by parameter name
    progress.json       {"step": completed steps, "world_size": N}

No RNG state is kept: every step reseeds each rank from (seed, step, rank)
(:func:`trainer.seeding.seed_step`), on the CPU and on every CUDA device alike. Checkpoints of
earlier versions carry ``rng.pt``; it is ignored.

Optimizer shards are keyed by parameter name, so a checkpoint written by N workers loads into
a group of any size.

With the ``deepspeed`` backend every rank reports a directory and Ray merges them into one::

    deepspeed/          the engine's ``save_checkpoint`` files: the model (rank 0) and every
                        rank's ZeRO partition, which carries the AdaHessian state
    progress.json       {"step": …, "world_size": N, "backend": "deepspeed"}   (rank 0)

DeepSpeed's partitions are laid out for one world size: such a checkpoint resumes a group of
the same size (which a restarted Ray Train group is).

With the ``fsdp`` backend every rank reports a directory too::

    fsdp/               torch.distributed.checkpoint's files: every rank's rows of the
                        parameters and of m and v (``__<rank>_0.distcp``), and ``.metadata``
    progress.json       {"step": …, "world_size": N, "backend": "fsdp", "optimizer": counts}

DCP reshards on load, so such a checkpoint resumes a group of any size. A checkpoint loads only
into the backend that wrote it; another is refused with the reason (:class:`CheckpointMismatch`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


@dataclass
class TrainingState:
    """Everything a restarted worker needs to continue exactly where the run stopped."""

    step: int
    model: dict[str, torch.Tensor]
    optimizer_shards: list[dict[str, Any]]


def write_checkpoint(directory: Path, state: TrainingState) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(state.model, directory / "model.pt")
    for rank, shard in enumerate(state.optimizer_shards):
        torch.save(shard, directory / f"optimizer-{rank}.pt")
    progress = {"step": state.step, "world_size": len(state.optimizer_shards)}
    (directory / "progress.json").write_text(json.dumps(progress))


DEEPSPEED_DIR = "deepspeed"
"""Sub-directory of a checkpoint that holds the DeepSpeed engine's own files."""


def write_engine_progress(
    directory: Path, step: int, world_size: int, backend: str, extra: dict[str, Any] | None = None
) -> None:
    """Rank 0's part of a checkpoint in a backend's own format (``deepspeed``, ``fsdp``) next
    to that format's files: the progress, the backend's name and anything it adds."""
    directory.mkdir(parents=True, exist_ok=True)
    progress = {"step": step, "world_size": world_size, "backend": backend, **(extra or {})}
    (directory / "progress.json").write_text(json.dumps(progress))


def read_engine_progress(directory: Path, backend: str) -> dict[str, Any]:
    """The progress :func:`write_engine_progress` wrote, refused unless ``backend`` wrote it."""
    progress = _read_progress(directory)
    if progress.get("backend") != backend:
        raise CheckpointMismatch(directory, progress, backend)
    return progress


class CheckpointMismatch(ValueError):
    """A checkpoint written by another backend than the one asked to load it."""

    def __init__(self, directory: Path, progress: dict[str, Any], backend: str) -> None:
        written = progress.get("backend", "ddp")
        super().__init__(
            f"the checkpoint at step {progress.get('step')} was written by the {written!r} backend, "
            f"whose files the {backend!r} backend cannot read (each keeps its own format): resume "
            f"with backend.name: {written!r}, or start a new job"
        )


def _read_progress(directory: Path) -> dict[str, Any]:
    return json.loads((directory / "progress.json").read_text())


def read_checkpoint(directory: Path) -> TrainingState:
    """What :func:`write_checkpoint` wrote (the ``ddp`` backend's format)."""
    progress = _read_progress(directory)
    if progress.get("backend", "ddp") != "ddp":
        raise CheckpointMismatch(directory, progress, "ddp")
    shards = [
        torch.load(directory / f"optimizer-{rank}.pt", weights_only=False)
        for rank in range(progress["world_size"])
    ]
    return TrainingState(
        step=int(progress["step"]),
        model=torch.load(directory / "model.pt", weights_only=True),
        optimizer_shards=shards,
    )


def param_checksum(model: torch.nn.Module) -> dict[str, float]:
    """Float64 sum and L2 norm over all parameters: a cheap fingerprint of a trained model.

    DTensor (FSDP-sharded) parameters are summed over their local shards and all-reduced, so
    with such a model every rank must call this (it is a collective) and all get the same value.
    """
    total = torch.zeros((), dtype=torch.float64)
    squares = torch.zeros((), dtype=torch.float64)
    sharded = torch.zeros(2, dtype=torch.float64)
    any_sharded = False
    for p in model.parameters():
        if isinstance(p, DTensor):
            any_sharded = True
            values = p.to_local().detach().double()
            sharded[0] += values.sum().cpu()
            sharded[1] += values.pow(2).sum().cpu()
            continue
        values = p.detach().double()
        total += values.sum().cpu()
        squares += values.pow(2).sum().cpu()
    if any_sharded:
        dist.all_reduce(sharded)
        total += sharded[0]
        squares += sharded[1]
    return {"sum": total.item(), "l2": squares.sqrt().item()}
