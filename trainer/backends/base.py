"""The contract between the worker loop and a training backend, and what backends share."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch
import torch.distributed as dist
from torch import nn

from trainer.batches import Batch

if TYPE_CHECKING:
    from trainer.spec import JobSpec

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


Precision = Literal["fp32", "bf16"]
"""What a backend computes in: ``fp32``, or ``bf16`` (mixed: bf16 arithmetic where autocast
allows it, fp32 master parameters and optimizer state)."""


def weighted(loss: torch.Tensor, weight: float) -> torch.Tensor:
    """A chunk's mean loss times its weight (its share of the micro-batch); unchanged at 1."""
    return loss if weight == 1.0 else loss * weight


def hessian_precision_of(precision: Precision, hessian_precision: Precision) -> Precision:
    """What Hessian steps compute in: ``hessian_precision`` under bf16 training, fp32 otherwise;
    ``ValueError`` naming both where either is not ``fp32`` or ``bf16``."""
    if precision not in ("fp32", "bf16") or hessian_precision not in ("fp32", "bf16"):
        raise ValueError(
            f"precision={precision!r}, hessian_precision={hessian_precision!r}: each must be 'fp32' or 'bf16'"
        )
    return hessian_precision if precision == "bf16" else "fp32"


def autocast(device: torch.device, precision: Precision) -> AbstractContextManager[Any]:
    """Within: forward passes on ``device`` compute in bf16 where torch's autocast allows it
    (matrix products, convolutions) and in fp32 where it keeps precision (softmax, norms,
    losses), with ``precision == "bf16"``; nothing changes with ``"fp32"``. Parameters stay fp32,
    so their gradients come out in fp32 (the backward of autocast's casts); backward passes need
    not run inside (autograd repeats the forward's dtypes)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


@contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode (dropout off, BatchNorm on its running statistics), back in train
    mode afterwards: what :meth:`TrainingBackend.evaluation` gives for a module trained in place."""
    model.eval()
    try:
        yield model
    finally:
        model.train()


class TrainingBackend(Protocol):
    """Everything the worker loop asks of a backend, for one rank: the whole contract.

    A backend trains ``model`` (forward, backward, Hessian products when due, the optimizer
    step), says whether the coming step is a Hessian step, gives the model for evaluation, averages
    buffers, and saves and restores its own checkpoint format. The worker never asks which backend
    it has: a new backend is a class with these members, registered by name in
    :data:`trainer.backends.BACKENDS`. :class:`~trainer.backends.DDPBackend` writes name-keyed
    optimizer shards that load at any world size; :class:`~trainer.backends.DeepSpeedBackend`
    writes the engine's files.
    """

    model: nn.Module
    """The module being trained (its parameters are the ones a checkpoint holds)."""

    @classmethod
    def from_spec(cls, spec: JobSpec, model: nn.Module, loss_fn: LossFn) -> TrainingBackend:
        """The backend the job ``spec`` asks for around ``model`` (collective: every rank builds
        one, after ``torch.distributed`` is initialized)."""
        ...

    @property
    def optimizer(self) -> Any:
        """Has ``param_groups``, where the worker sets each step's learning rate."""
        ...

    @property
    def hessian_due(self) -> bool:
        """Whether the next :meth:`train_step` takes Hessian products (and so differentiates the
        loss twice); False for first-order optimizers."""
        ...

    def train_step(self, batch: Batch, chunk_size: int | None = None) -> StepStats:
        """Run one step on this rank's micro-batch (in chunks of ``chunk_size`` examples if given);
        collective: every rank calls it."""
        ...

    def average_buffers(self) -> None:
        """Collective: make the model's floating-point buffers equal on every rank (their mean)."""
        ...

    def evaluation(self) -> AbstractContextManager[nn.Module]:
        """The model to evaluate, in eval mode; back in training mode afterwards."""
        ...

    def save_checkpoint(self, directory: Path, step: int) -> bool:
        """Collective: write this rank's part of the checkpoint after ``step`` completed steps into
        ``directory`` (empty, this rank's own); return whether this rank wrote any file there. The
        runner merges the directories of the ranks that did (Ray Train does)."""
        ...

    def load_checkpoint(self, directory: Path) -> int:
        """Collective: restore the model and optimizer from what :meth:`save_checkpoint` wrote (the
        ranks' directories merged); return the completed steps it holds."""
        ...
