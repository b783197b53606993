"""Optimizers for parameters sharded on dim 0 (FSDP2's DTensors): AdaHessian on each rank's rows
with the one core, and torch's first-order optimizers.

Under ``fully_shard`` a parameter of ``R`` rows is cut as ``torch.chunk`` cuts it: rank r holds
rows ``[r·c, (r+1)·c)`` with ``c = ceil(R/N)`` (the last ranks fewer, or none). Each rank keeps
m and v for its own rows only, as DTensors laid out like the parameter, so
``torch.distributed.checkpoint`` saves one file set per rank and reshards them for any world
size. A step is handed, per parameter, this rank's rows of the group-mean gradient and, on
Hessian steps, of the group-mean signed Hutchinson products (the backend reduce-scatters them);
one small all-reduce makes the loss, the gradient norm, the trace and which parameters had a
gradient anywhere group-wide, so every rank clips alike and raises the same error.

Averaging units: a convolution kernel's spatial blocks lie inside one row, so no cut falls in
one; blocks of ``spatial_average_block_size`` elements of another tensor must not cross a
shard boundary, and a size that would is refused (:func:`check_units_fit_shards`).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from trainer.optim.core import (
    AdaHessianHyperparameters,
    HessianSchedule,
    OnHessianSchedule,
    TrainableParameters,
    adahessian_update,
    advance_counts,
    check_finite,
)
from trainer.optim.partition import unit_mean_abs
from trainer.optim.replicated import TorchOptimizerOnRanks

if TYPE_CHECKING:
    from trainer.spec import OptimizerSpec

STATE_FORMAT = "hutch.dtensor_adahessian.v1"


def rows_per_rank(rows: int, world_size: int) -> int:
    """``c``: the rows of a full shard when ``rows`` are cut over ``world_size`` ranks."""
    return max(1, math.ceil(rows / world_size))


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a DTensor (a view), or the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def check_units_fit_shards(
    names: Sequence[str], shapes: Sequence[torch.Size], units: Sequence[int], world_size: int
) -> None:
    """Raise ``ValueError`` where a block of ``unit`` averaged elements would cross the boundary
    between two ranks' rows (the first such parameter named)."""
    for name, shape, unit in zip(names, shapes, units):
        if unit <= 1 or not shape:
            continue
        rows = shape[0]
        row = math.prod(shape[1:])
        shard = rows_per_rank(rows, world_size) * row
        if rows_per_rank(rows, world_size) < rows and shard % unit:
            raise ValueError(
                f"spatial_average_block_size={unit} would cut parameter {name!r} (shape "
                f"{tuple(shape)}) where {world_size} ranks split its rows ({shard} elements per "
                f"rank): choose a block size that divides {shard}, or the ddp backend"
            )


def group_statistics(
    grads: Sequence[torch.Tensor],
    products: Sequence[torch.Tensor] | None,
    used: Sequence[bool],
    loss: torch.Tensor,
    group: dist.ProcessGroup | None,
) -> tuple[float, float, float, list[bool]]:
    """One all-reduce of this rank's loss, squared gradient norm, product sum and usage flags:
    the group's mean loss, squared gradient norm and trace, and which parameters had a gradient
    on any rank (sums in fp32 at least)."""
    sample = grads[0]
    wide = torch.promote_types(sample.dtype, torch.float32)
    norm_sq = torch.stack([g.square().sum(dtype=wide) for g in grads]).sum()
    trace = torch.stack([h.sum(dtype=wide) for h in products]).sum() if products else norm_sq.new_zeros(())
    head = torch.stack([loss.detach().to(sample.device, wide).reshape(()), norm_sq, trace])
    stats = torch.cat([head, torch.tensor([float(u) for u in used], dtype=wide, device=sample.device)])
    world = dist.get_world_size(group)
    if world > 1:
        dist.all_reduce(stats, group=group)
    values = stats.tolist()
    return values[0] / world, values[1], values[2], [v > 0 for v in values[3:]]


class DTensorAdaHessian(OnHessianSchedule):
    """AdaHessian on dim-0 shards: every rank updates its own rows of every parameter.

    ``named_params`` are DTensor parameters sharded on dim 0 (or plain tensors on one rank);
    :meth:`step` takes their local gradient and product rows. After a step :attr:`loss`,
    :attr:`grad_norm` (before clipping) and :attr:`hessian_trace` are group-wide.
    """

    def __init__(
        self,
        named_params: Iterable[tuple[str, torch.nn.Parameter]],
        hyperparameters: AdaHessianHyperparameters,
        *,
        group: dist.ProcessGroup | None = None,
        conv_kernels: Collection[str] | None = None,
        max_grad_norm: float | None = None,
    ) -> None:
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm={max_grad_norm!r}: must be positive (or None: no clipping)")
        self.hyperparameters = hyperparameters
        self.schedule = HessianSchedule(hyperparameters.hessian_update_freq)
        self.group = group
        self.world_size = dist.get_world_size(group)
        owner = "DTensorAdaHessian"
        trainable = TrainableParameters.collect(named_params, hyperparameters, conv_kernels, owner)
        self.names, self.params = trainable.names, trainable.tensors
        self.keys, self.units = trainable.keys, trainable.units
        check_units_fit_shards(self.names, [p.shape for p in self.params], self.units, self.world_size)
        self.param_groups: list[dict[str, Any]] = [
            dict(hyperparameters.update_options(), max_grad_norm=max_grad_norm)
        ]
        with torch.no_grad():
            self.exp_avg = [torch.zeros_like(p) for p in self.params]
            self.exp_hessian_diag_sq = [torch.zeros_like(p) for p in self.params]
        self._steps = [0] * len(self.params)
        self._hessian_steps = [0] * len(self.params)
        self.loss: float | None = None
        self.grad_norm: float | None = None

    @torch.no_grad()
    def step(
        self,
        grads: Sequence[torch.Tensor],
        products: Sequence[torch.Tensor] | None,
        used: Sequence[bool],
        loss: torch.Tensor,
    ) -> None:
        """One update. ``grads[i]`` and ``products[i]`` (Hessian steps only) are this rank's rows
        of the group means for ``params[i]``; ``used[i]`` whether this rank had a gradient for it;
        ``loss`` this rank's mean loss. Collective."""
        hessian_step = self.hessian_due
        if hessian_step != (products is not None):
            raise RuntimeError(f"step {self.steps_done + 1}: Hessian products given on the wrong step")
        loss_mean, norm_sq, trace, anywhere = group_statistics(grads, products, used, loss, self.group)
        check_finite(
            self.steps_done + 1, loss=loss_mean, gradient=norm_sq, hessian=trace if hessian_step else None
        )
        norm = math.sqrt(norm_sq)

        group = self.param_groups[0]
        max_norm = group["max_grad_norm"]
        factor = max_norm / (norm + 1e-6) if max_norm is not None and norm > max_norm else None
        moving = advance_counts(anywhere, hessian_step, self._steps, self._hessian_steps)
        chosen = [i for i, moves in enumerate(moving) if moves]
        grad_rows = [grads[i] if factor is None else grads[i] * factor for i in chosen]
        diagonals = None
        if products is not None:
            diagonals = [
                unit_mean_abs(products[i].reshape(-1), self.units[i]).view_as(products[i]) for i in chosen
            ]
        beta1, beta2 = group["betas"]
        adahessian_update(
            [local(self.params[i]) for i in chosen],
            grad_rows,
            [local(self.exp_avg[i]) for i in chosen],
            [local(self.exp_hessian_diag_sq[i]) for i in chosen],
            diagonals,
            steps=[self._steps[i] for i in chosen],
            hessian_steps=[self._hessian_steps[i] for i in chosen],
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            hessian_power=group["hessian_power"],
            update_clip=group.get("update_clip"),
        )
        self.loss, self.grad_norm = loss_mean, norm
        if hessian_step:
            self.schedule.trace = trace
        self.schedule.advance(hessian_step)

    # -- state ------------------------------------------------------------------------------

    def sharded_state(self) -> dict[str, Any]:
        """m and v by parameter name, as DTensors (for ``torch.distributed.checkpoint``, which
        loads them in place at any world size)."""
        return {
            "exp_avg": dict(zip(self.names, self.exp_avg)),
            "exp_hessian_diag_sq": dict(zip(self.names, self.exp_hessian_diag_sq)),
        }

    def plain_state(self) -> dict[str, Any]:
        """The rest, equal on every rank: schedule, settings, per-parameter counts."""
        return {
            "format": STATE_FORMAT,
            "schedule": self.schedule.state_dict(),
            "param_groups": [dict(self.param_groups[0], betas=list(self.param_groups[0]["betas"]))],
            "counts": {n: [self._steps[i], self._hessian_steps[i]] for i, n in enumerate(self.names)},
        }

    def load_plain_state(self, saved: Mapping[str, Any]) -> None:
        """Restore :meth:`plain_state` (m and v are loaded in place through :meth:`sharded_state`)."""
        if saved.get("format") != STATE_FORMAT:
            raise ValueError(f"optimizer state format {saved.get('format')!r} is not {STATE_FORMAT!r}")
        self.schedule.load_state_dict(saved["schedule"])
        group = dict(saved["param_groups"][0], betas=tuple(saved["param_groups"][0]["betas"]))
        self.param_groups[0].update({k: v for k, v in group.items() if k in self.param_groups[0]})
        counts = saved["counts"]
        for i, name in enumerate(self.names):
            self._steps[i], self._hessian_steps[i] = (int(c) for c in counts.get(name, (0, 0)))


class DTensorFirstOrder(TorchOptimizerOnRanks):
    """A torch first-order optimizer (AdamW, Adam, SGD) on DTensor parameters, as FSDP2 runs
    them: its state is sharded like the parameters. Gradients arrive group-averaged on the
    parameters' ``.grad``; a parameter no rank had a gradient for is skipped (its ``.grad`` set
    to None), and clipping is by the global norm, as on the DDP path."""

    def __init__(
        self,
        named_params: Iterable[tuple[str, torch.nn.Parameter]],
        spec: OptimizerSpec,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__(named_params, spec, group)
        self.steps_done = 0

    @torch.no_grad()
    def step(
        self,
        grads: Sequence[torch.Tensor],
        products: Sequence[torch.Tensor] | None,
        used: Sequence[bool],
        loss: torch.Tensor,
    ) -> None:
        """As :meth:`DTensorAdaHessian.step`; ``grads`` are views of the parameters' ``.grad``."""
        loss_mean, norm_sq, _, anywhere = group_statistics(grads, None, used, loss, self.group)
        norm = math.sqrt(norm_sq)
        check_finite(self.steps_done + 1, loss=loss_mean, gradient=norm)
        for p, had in zip(self.params, anywhere):
            if not had:
                p.grad = None
        if self.max_grad_norm is not None and norm > self.max_grad_norm:
            torch._foreach_mul_(grads, self.max_grad_norm / (norm + 1e-6))  # clip_grad_norm_'s factor
        self.optimizer.step()
        self.loss, self.grad_norm = loss_mean, norm
        self.steps_done += 1
