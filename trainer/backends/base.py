"""The training-step interface that the worker loop calls, whatever the backend."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from trainer.batches import Batch

LossFn = Callable[[nn.Module, Batch], torch.Tensor]
"""Computes the mean loss over the examples of a (micro-)batch: ``loss_fn(model, batch)``.

A batch is a tensor or a tuple/list/dict of tensors (:mod:`trainer.batches`); backends split it
into chunks along dim 0 and weight each chunk's loss by its share of the examples, so the loss
must be a mean over examples for chunked and distributed runs to equal one run on the whole
batch."""


@dataclass(frozen=True)
class StepStats:
    """Group-wide results of one step (identical on every rank)."""

    step: int
    loss: float
    grad_norm: float
    hessian_step: bool
    hessian_trace: float | None


def average_buffers(module: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """Average the floating-point buffers (BatchNorm's running mean and variance) over the group,
    so evaluation and checkpoints see one set; each rank's statistics come from its own
    micro-batches. Integer buffers (``num_batches_tracked``) are equal on every rank already."""
    buffers = [b for b in module.buffers() if b.is_floating_point()]
    world = dist.get_world_size(group)
    if not buffers or world == 1:
        return
    with torch.no_grad():
        flat = torch.cat([b.reshape(-1) for b in buffers])
        dist.all_reduce(flat, group=group)
        flat.div_(world)
        torch._foreach_copy_(
            buffers, [piece.view_as(b) for piece, b in zip(flat.split([b.numel() for b in buffers]), buffers)]
        )


class TrainingBackend(Protocol):
    """Forward, backward, Hessian products when due, and the optimizer step, for one rank.

    This is what the worker loop calls every step. Checkpoints are the backend's own:
    :class:`~trainer.backends.DDPBackend` gives name-keyed optimizer shards that load at any
    world size; :class:`~trainer.backends.deepspeed.DeepSpeedBackend` writes the engine's files.
    """

    model: nn.Module

    @property
    def optimizer(self) -> Any:
        """Has ``param_groups``, where the worker sets each step's learning rate."""
        ...

    def train_step(self, batch: Batch, chunk_size: int | None = None) -> StepStats:
        """Run one step on this rank's micro-batch (in chunks of ``chunk_size`` examples if given);
        collective: every rank calls it."""
        ...

    def average_buffers(self) -> None:
        """Collective: make the model's floating-point buffers equal on every rank (their mean)."""
        ...
