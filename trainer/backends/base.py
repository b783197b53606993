"""The training-step interface that the worker loop calls, whatever the backend."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
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
