"""Data parallelism over torch.distributed with a sharded AdaHessian.

The model is *not* wrapped in ``DistributedDataParallel``: DDP's reducer does not support
double backward, and the sharded optimizer already moves gradients with one reduce-scatter, so
there is nothing left for DDP to do. Every rank starts from the same initial parameters
(broadcast from rank 0) and the optimizer keeps them identical.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from trainer.backends.base import LossFn, StepStats, average_buffers
from trainer.batches import Batch, batch_size, split_batch
from trainer.optim.core import AdaHessianHyperparameters
from trainer.optim.partition import conv_kernel_names
from trainer.optim.replicated import ReplicatedOptimizer
from trainer.optim.sharded import ShardedAdaHessian


def build_optimizer(
    model: nn.Module, options: dict[str, Any], group: dist.ProcessGroup | None = None
) -> ShardedAdaHessian | ReplicatedOptimizer:
    """``options["name"]`` (default ``adahessian``) picks the optimizer; the rest are its keywords."""
    options = dict(options)
    name = options.pop("name", "adahessian")
    max_grad_norm = options.pop("max_grad_norm", None)
    if name == "adahessian":
        scope = options.pop("hessian_scope", "global")
        return ShardedAdaHessian(
            model.named_parameters(),
            AdaHessianHyperparameters(**options),
            group=group,
            hessian_scope=scope,
            conv_kernels=conv_kernel_names(model),
            max_grad_norm=max_grad_norm,
        )
    return ReplicatedOptimizer(model.named_parameters(), name, options, group, max_grad_norm=max_grad_norm)


class DDPBackend:
    """One data-parallel rank training ``model``: sharded AdaHessian, or a replicated baseline."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        optimizer_options: dict[str, Any],
        group: dist.ProcessGroup | None = None,
    ) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.group = group
        with torch.no_grad():
            for tensor in [*model.parameters(), *model.buffers()]:
                dist.broadcast(tensor, src=dist.get_global_rank(group, 0) if group else 0, group=group)
        self.optimizer = build_optimizer(model, optimizer_options, group)

    def train_step(self, batch: Batch, chunk_size: int | None = None) -> StepStats:
        """One step on this rank's micro-batch, in chunks of ``chunk_size`` examples if given.

        Each chunk's mean loss is weighted by its share of the micro-batch, so gradients and
        Hessian products accumulate to those of the whole micro-batch.
        """
        hessian_step = self.optimizer.hessian_due
        self.model.train()
        self.optimizer.zero_grad()
        size = batch_size(batch)
        for chunk in split_batch(batch, chunk_size):
            weight = batch_size(chunk) / size
            loss = self.loss_fn(self.model, chunk)
            self.optimizer.backward(loss if weight == 1.0 else loss * weight)
        self.optimizer.step()
        return StepStats(
            step=self.optimizer.steps_done,
            loss=float(self.optimizer.loss),
            grad_norm=float(self.optimizer.grad_norm),
            hessian_step=hessian_step,
            hessian_trace=self.optimizer.hessian_trace,
        )

    def average_buffers(self) -> None:
        average_buffers(self.model, self.group)

    def optimizer_state(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_optimizer_state(self, shards: Sequence[dict[str, Any]]) -> None:
        self.optimizer.load_state_dict(shards)
