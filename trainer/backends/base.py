"""The training-step interface that the worker loop calls, whatever the backend."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

Batch = Sequence[torch.Tensor]
"""One rank's micro-batch: the tensors the loss function takes."""

LossFn = Callable[[nn.Module, Batch], torch.Tensor]
"""Computes the mean loss of a micro-batch: ``loss_fn(model, batch)``."""


@dataclass(frozen=True)
class StepStats:
    """Group-wide results of one step (identical on every rank)."""

    step: int
    loss: float
    grad_norm: float
    hessian_step: bool
    hessian_trace: float | None


class TrainingBackend(Protocol):
    """Forward, backward, Hessian products when due, and the optimizer step, for one rank."""

    model: nn.Module

    def train_step(self, batch: Batch, chunk_size: int | None = None) -> StepStats:
        """Run one step on this rank's micro-batch (in chunks of ``chunk_size`` examples if given);
        collective: every rank calls it."""
        ...

    def optimizer_state(self) -> dict[str, Any]:
        """This rank's part of the optimizer state, loadable at another world size."""
        ...

    def load_optimizer_state(self, shards: Sequence[dict[str, Any]]) -> None:
        """Load from the parts saved by every rank of an earlier run."""
        ...
