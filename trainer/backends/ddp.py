"""Data parallelism over torch.distributed with a sharded AdaHessian.

The model is *not* wrapped in ``DistributedDataParallel``: DDP's reducer does not support
double backward, and the sharded optimizer already moves gradients with one reduce-scatter, so
there is nothing left for DDP to do. Every rank starts from the same initial parameters
(broadcast from rank 0) and the optimizer keeps them identical.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from trainer.backends.base import (
    LossFn,
    Precision,
    StepStats,
    autocast,
    average_buffers,
    evaluation_mode,
    hessian_precision_of,
    weighted,
)
from trainer.batches import Batch, StepChunk, step_chunks
from trainer.checkpoint import TrainingState, read_checkpoint, write_checkpoint
from trainer.optim.core import AdaHessianHyperparameters, Curvature
from trainer.optim.partition import conv_kernel_names
from trainer.optim.replicated import ReplicatedOptimizer
from trainer.optim.sharded import ShardedAdaHessian
from trainer.spec import JobSpec, OptimizerSpec


def build_optimizer(
    model: nn.Module, spec: OptimizerSpec, seed: int, group: dist.ProcessGroup | None = None
) -> ShardedAdaHessian | ReplicatedOptimizer:
    """The optimizer ``spec`` names: the sharded AdaHessian (probes drawn from ``seed``), or a
    replicated first-order baseline."""
    if spec.name == "adahessian":
        return ShardedAdaHessian(
            model.named_parameters(),
            AdaHessianHyperparameters.from_spec(spec, seed),
            group=group,
            hessian_scope=spec.hessian_scope,
            conv_kernels=conv_kernel_names(model),
            max_grad_norm=spec.max_grad_norm,
        )
    return ReplicatedOptimizer(model.named_parameters(), spec, group)


class DDPBackend:
    """One data-parallel rank training ``model``: sharded AdaHessian, or a replicated baseline.

    ``precision="bf16"`` is mixed precision: forward passes run under bf16 autocast
    (:func:`~trainer.backends.base.autocast`) while parameters, gradients and optimizer state stay
    fp32. So gradients accumulate over chunks and are reduced across ranks in fp32: reducing them
    in bf16 would halve those bytes but round every partial sum to 8 bits of mantissa, which
    grows with the number of chunks and ranks. ``hessian_precision`` says whether Hessian steps run
    in fp32 (the default: training then follows fp32's path to 1e-3) or autocast too (``"bf16"``).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        optimizer: OptimizerSpec,
        seed: int = 0,
        group: dist.ProcessGroup | None = None,
        precision: Precision = "fp32",
        hessian_precision: Precision = "fp32",
    ) -> None:
        hessian: Precision = hessian_precision_of(precision, hessian_precision)
        self.model = model
        self.loss_fn = loss_fn
        self.group = group
        self.precision: Precision = precision
        self.hessian_precision = hessian
        self.hessian_batch_fraction = optimizer.hessian_batch_fraction
        self._device = next(model.parameters()).device
        self._root = dist.get_global_rank(group, 0) if group else 0  # the group's rank 0
        with torch.no_grad():
            for tensor in [*model.parameters(), *model.buffers()]:
                dist.broadcast(tensor, src=self._root, group=group)
        self.optimizer = build_optimizer(model, optimizer, seed, group)

    @classmethod
    def from_spec(cls, spec: JobSpec, model: nn.Module, loss_fn: LossFn) -> DDPBackend:
        return cls(
            model,
            loss_fn,
            spec.optimizer,
            seed=spec.training.seed,
            precision=spec.backend.precision,
            hessian_precision=spec.backend.hessian_precision,
        )

    @property
    def hessian_due(self) -> bool:
        return self.optimizer.hessian_due

    def train_step(self, batch: Batch, chunk_size: int | None = None) -> StepStats:
        """One step on this rank's micro-batch, in chunks of ``chunk_size`` examples if given.

        Each chunk's mean loss is weighted by its share of the micro-batch, so gradients and
        Hessian products accumulate to those of the whole micro-batch.
        """
        hessian_step = self.hessian_due
        precision = self.hessian_precision if hessian_step else self.precision
        self.model.train()
        self.optimizer.zero_grad()
        fraction = self.hessian_batch_fraction if hessian_step else 1.0
        rank, world = dist.get_rank(self.group), dist.get_world_size(self.group)
        for chunk in step_chunks(batch, chunk_size, rank, world, fraction):
            with autocast(self._device, precision):
                loss = weighted(self.loss_fn(self.model, chunk.batch), chunk.weight)
                curvature = self._curvature(chunk) if fraction < 1.0 else "loss"
            self.optimizer.backward(loss, curvature)
        self.optimizer.step()
        return StepStats(
            step=self.optimizer.steps_done,
            loss=float(self.optimizer.loss),
            grad_norm=float(self.optimizer.grad_norm),
            hessian_step=hessian_step,
            hessian_trace=self.optimizer.hessian_trace,
        )

    def _curvature(self, chunk: StepChunk) -> Curvature:
        """The weighted mean loss of the chunk's examples the Hutchinson products use."""
        if chunk.curvature is None:
            return "none"
        return weighted(self.loss_fn(self.model, chunk.curvature), chunk.curvature_weight)

    def average_buffers(self) -> None:
        average_buffers(self.model, self.group)

    @contextmanager
    def evaluation(self) -> Iterator[nn.Module]:
        """The model in eval mode, its forward passes in the training precision."""
        with evaluation_mode(self.model) as model, autocast(self._device, self.precision):
            yield model

    # -- checkpoints ---------------------------------------------------------------------------

    def optimizer_state(self) -> dict[str, Any]:
        """This rank's optimizer state, keyed by parameter name."""
        return self.optimizer.state_dict()

    def load_optimizer_state(self, shards: Sequence[dict[str, Any]]) -> None:
        """Load the optimizer states of every rank of a saved run, at any world size then and now."""
        self.optimizer.load_state_dict(shards)

    def save_checkpoint(self, directory: Path, step: int) -> bool:
        """Collective: the group's rank 0 gathers every rank's optimizer state and writes them with
        the model (:func:`trainer.checkpoint.write_checkpoint`); the other ranks write nothing."""
        rank = dist.get_rank(self.group)
        shards: list[Any] | None = [None] * dist.get_world_size(self.group) if rank == 0 else None
        dist.gather_object(self.optimizer_state(), shards, dst=self._root, group=self.group)
        if rank != 0:
            return False
        assert shards is not None
        write_checkpoint(directory, TrainingState(step, self.model.state_dict(), shards))
        return True

    def load_checkpoint(self, directory: Path) -> int:
        """Load a checkpoint written by :meth:`save_checkpoint` at any world size."""
        state = read_checkpoint(directory)
        self.model.load_state_dict(state.model)  # copies onto the model's device
        self.load_optimizer_state(state.optimizer_shards)
        return state.step
