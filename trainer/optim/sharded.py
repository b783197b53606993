"""Sharded AdaHessian for a data-parallel group (ZeRO stage 1 over torch.distributed).

All trainable parameters live in one flat buffer (the parameters become views of it), cut
into ``N`` equal chunks on averaging-unit boundaries (:class:`~trainer.optim.partition.FlatLayout`);
rank r owns chunk r and keeps m and v for it only. Gradients (and, on Hessian steps, the signed
Hutchinson products) accumulate into persistent buffers of the same layout, with ``.grad`` as
views. One step:

1. every rank runs forward/backward on its micro-batch (:meth:`ShardedAdaHessian.backward`)
   through ``torch.autograd.grad`` on the bare module, so no DDP hook is involved; on Hessian
   steps it also takes ``z⊙Hz`` for every parameter with the shared probe (keyed by seed,
   Hessian-step index and parameter name);
2. ``reduce_scatter`` straight from the gradient buffer (and the product buffer) leaves each
   rank the group average of its chunk;
3. one small ``all_reduce`` of loss, trace, squared gradient norm and which parameters had a
   gradient on any rank: the step's only host synchronisation, so every rank sees the same
   statistics and raises the same error for non-finite values;
4. the owner clips (``max_grad_norm``, by the global norm), applies ``|·|`` and the spatial
   averaging to its chunk (no neighbour's data: the cuts lie between averaging units) and the
   AdaHessian update to the parameters that had a gradient;
5. ``all_gather`` of the chunks straight into the parameters' flat buffer.

Because the products are averaged *signed* before ``|·|``, the estimate equals the
single-process estimate on the global batch, at any world size. ``hessian_scope="local"``
instead averages no products: each owner uses its own micro-batch's products for its chunk
(one collective less, a noisier estimate).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist

from trainer.optim.core import (
    AdaHessianHyperparameters,
    Curvature,
    HessianSchedule,
    OnHessianSchedule,
    TrainableParameters,
    advance_counts,
    check_finite,
    update_fragments,
)
from trainer.optim.hutchinson import ProbeSource, hutchinson_products
from trainer.optim.partition import FlatLayout, average_blocks_

HessianScope = Literal["global", "local"]
STATE_FORMAT = "hutch.sharded_adahessian.v2"
"""v2: pieces of parameters (``start`` in the flattened tensor); v1 (whole tensors per owner)
still loads."""
_READABLE_FORMATS = (STATE_FORMAT, "hutch.sharded_adahessian.v1")


class ShardedAdaHessian(OnHessianSchedule):
    """AdaHessian whose optimizer state is partitioned over the ranks of ``group``.

    Use it like :class:`AdaHessian`'s efficient path::

        opt.zero_grad(); opt.backward(loss_fn(model(x_local), y_local)); opt.step()

    Build it after the model is on its device: the parameters become views of one flat buffer.
    Every rank must call :meth:`backward` and :meth:`step` the same number of times. After a
    step, :attr:`loss`, :attr:`grad_norm` (before clipping) and :attr:`hessian_trace` hold
    group-wide values. ``conv_kernels`` names the parameters averaged over their spatial block
    (:func:`~trainer.optim.partition.conv_kernel_names`); without it, 4-D tensors are.
    ``max_grad_norm`` clips the averaged gradient by its global norm (None: no clipping).
    """

    def __init__(
        self,
        named_params: Iterable[tuple[str, torch.nn.Parameter]],
        hyperparameters: AdaHessianHyperparameters,
        *,
        group: dist.ProcessGroup | None = None,
        hessian_scope: HessianScope = "global",
        conv_kernels: Collection[str] | None = None,
        max_grad_norm: float | None = None,
    ) -> None:
        if hessian_scope not in ("global", "local"):
            raise ValueError(f"hessian_scope={hessian_scope!r}: must be 'global' or 'local'")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm={max_grad_norm!r}: must be positive (or None: no clipping)")
        self.hyperparameters = hyperparameters
        self.schedule = HessianSchedule(hyperparameters.hessian_update_freq)
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        trainable = TrainableParameters.collect(
            named_params, hyperparameters, conv_kernels, "ShardedAdaHessian"
        )
        kinds = {(p.dtype, p.device) for p in trainable.tensors}
        if len(kinds) != 1:
            raise ValueError(f"all parameters must share one dtype and device (flat buffers), got {kinds}")
        self.names = trainable.names
        self.params = trainable.tensors
        self._keys = trainable.keys
        units = trainable.units
        self.layout = FlatLayout.build(self.names, [p.shape for p in self.params], units, self.world_size)
        self.fragments = self.layout.fragments(self.rank)
        self._touched = {f.param_index for f in self.fragments}  # parameters with a piece here
        self._averaged = [  # (start, numel, unit) of the pieces whose estimate is block-averaged
            (f.flat_start, f.numel, units[f.param_index]) for f in self.fragments if units[f.param_index] > 1
        ]
        self.hessian_scope: HessianScope = hessian_scope
        self.param_groups: list[dict[str, Any]] = [
            dict(hyperparameters.update_options(), max_grad_norm=max_grad_norm)
        ]

        p0, size, chunk = self.params[0], self.layout.size, self.layout.chunk
        like = dict(dtype=p0.dtype, device=p0.device)
        self._flat_params = torch.zeros(size, **like)
        self._flat_grads = torch.zeros(size, **like)
        self._flat_products: torch.Tensor | None = None  # allocated at the first Hessian step
        self._product_views: list[torch.Tensor] = []
        self._param_views, self._grad_views = [], []
        with torch.no_grad():
            for p, offset in zip(self.params, self.layout.offsets):
                view = self._flat_params[offset : offset + p.numel()].view_as(p)
                view.copy_(p)
                p.data = view
                self._param_views.append(view)
                grad = self._flat_grads[offset : offset + p.numel()].view_as(p)
                p.grad = grad
                self._grad_views.append(grad)
        self._grad_flat_views = self._views_of(self._flat_grads)
        mine = slice(self.rank * chunk, (self.rank + 1) * chunk)
        self._own_params = self._flat_params[mine]
        self._own_grads = self._flat_grads if self.world_size == 1 else torch.zeros(chunk, **like)
        self._exp_avg = torch.zeros(chunk, **like)
        self._exp_hessian_diag_sq = torch.zeros(chunk, **like)
        self._steps = [0] * len(self.params)  # per parameter, identical on every rank
        self._hessian_steps = [0] * len(self.params)

        self._probes = ProbeSource(hyperparameters.seed)
        self._loss_sum: torch.Tensor | None = None
        self._used = [False] * len(self.params)
        self.loss: float | None = None
        self.grad_norm: float | None = None
        self.bytes_sent_last_step = 0
        self._products_fresh = True

    def zero_grad(self) -> None:
        """Start a new step: the next :meth:`backward` overwrites the gradient buffer."""
        self._loss_sum = None
        self._products_fresh = True

    # -- local work -------------------------------------------------------------------------

    def backward(self, loss: torch.Tensor, curvature: Curvature = "loss") -> None:
        """Accumulate this rank's micro-batch gradients (and Hessian products when due, of
        ``curvature``: see :data:`~trainer.optim.core.Curvature`)."""
        first = self._loss_sum is None
        detached = loss.detach().float()
        self._loss_sum = detached if first else self._loss_sum + detached
        if first:
            self._used = [False] * len(self.params)
            self._products_fresh = True
        # Parameters frozen since construction (requires_grad_(False)) are left out: no gradient.
        live = [i for i, p in enumerate(self.params) if p.requires_grad]
        hessian = self.hessian_due
        separate = not isinstance(curvature, str) or curvature != "loss"
        grads = torch.autograd.grad(
            loss, [self.params[i] for i in live], create_graph=hessian and not separate, allow_unused=True
        )
        got = [(i, g) for i, g in zip(live, grads) if g is not None]
        curved = got
        if hessian and separate:
            curved = []
            if not isinstance(curvature, str):
                grads = torch.autograd.grad(
                    curvature, [self.params[i] for i in live], create_graph=True, allow_unused=True
                )
                curved = [(i, g) for i, g in zip(live, grads) if g is not None]
        if hessian and (curved or self._products_fresh):
            # local scope: only the parameters this rank owns a piece of
            local = self.hessian_scope == "local"
            wanted = [(i, g) for i, g in curved if i in self._touched] if local else curved
            products = hutchinson_products(
                [g for _, g in wanted],
                [self.params[i] for i, _ in wanted],
                [self._keys[i] for i, _ in wanted],
                self._probes,
                self.hessian_steps_done,
                self.hyperparameters.n_samples,
            )
            if self._flat_products is None:
                self._flat_products = torch.zeros_like(self._flat_grads)
                self._product_views = self._views_of(self._flat_products)
            self._accumulate(self._product_views, [i for i, _ in wanted], products, self._products_fresh)
            self._products_fresh = False
        self._accumulate(self._grad_flat_views, [i for i, _ in got], [g.detach() for _, g in got], first)
        for i, _ in got:
            self._used[i] = True

    def _views_of(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Each parameter's 1-D view of a buffer laid out like the parameters."""
        return [flat[o : o + n] for o, n in zip(self.layout.offsets, self.layout.numels)]

    def _accumulate(
        self, views: list[torch.Tensor], indices: list[int], values: list[torch.Tensor], first: bool
    ) -> None:
        """Copy (first micro-batch) or add ``values`` into their flat ``views``; on the first,
        zero the views of parameters without a value, so nothing of the last step remains."""
        flat_values = [v.reshape(-1) for v in values]
        if first:
            given = set(indices)
            stale = [view for i, view in enumerate(views) if i not in given]
            if stale:
                torch._foreach_zero_(stale)
            if indices:
                torch._foreach_copy_([views[i] for i in indices], flat_values)
        elif indices:
            torch._foreach_add_([views[i] for i in indices], flat_values)

    # -- the collective step ----------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> None:
        """Average, update the owned chunk, share parameters; see the module docstring."""
        if self._loss_sum is None:
            raise RuntimeError("step() without backward(): call opt.backward(loss) first")
        hessian_step = self.hessian_due
        world, chunk = self.world_size, self.layout.chunk
        element = self._flat_params.element_size()

        # 1. reduce-scatter gradients (and products) so each owner gets the group average.
        grads = self._own_grads
        products: torch.Tensor | None = None
        if world > 1:
            dist.reduce_scatter_single(grads, self._flat_grads, group=self.group)
            grads.div_(world)
        if hessian_step:
            assert self._flat_products is not None
            own = self._flat_products[self.rank * chunk : (self.rank + 1) * chunk]
            if self.hessian_scope == "global" and world > 1:
                products = torch.empty_like(own)
                dist.reduce_scatter_single(products, self._flat_products, group=self.group)
                products.div_(world)
            else:
                products = own

        # 2. group-wide statistics and usage: the step's one host synchronisation.
        wide = torch.promote_types(grads.dtype, torch.float32)  # sums in fp32 at least
        flags = torch.tensor(self._used, dtype=wide).to(grads.device, non_blocking=True)
        trace = grads.new_zeros((), dtype=wide) if products is None else products.sum(dtype=wide)
        norm_sq = torch.linalg.vector_norm(grads, dtype=wide).square()
        loss_sum = self._loss_sum.to(grads.device, wide).reshape(())
        stats = torch.cat([torch.stack([loss_sum, trace, norm_sq]), flags])
        if world > 1:
            dist.all_reduce(stats, group=self.group)
        values = stats.tolist()
        loss, trace_sum, norm_sq_sum = values[0] / world, values[1], values[2]
        used = [flag > 0 for flag in values[3:]]
        self._loss_sum = None
        check_finite(
            self.steps_done + 1, loss=loss, gradient=norm_sq_sum, hessian=trace_sum if hessian_step else None
        )
        norm = math.sqrt(norm_sq_sum)

        # 3. the owner's update: clip, D = |·| with spatial averaging, AdaHessian on moving pieces.
        group = self.param_groups[0]
        max_norm = group["max_grad_norm"]
        if max_norm is not None and norm > max_norm:
            grads.mul_(max_norm / (norm + 1e-6))  # torch.nn.utils.clip_grad_norm_'s factor
        if products is not None:
            diagonal = products.abs_()
            for start, numel, unit in self._averaged:
                average_blocks_(diagonal[start : start + numel], unit)
        else:
            diagonal = None
        moving = advance_counts(used, hessian_step, self._steps, self._hessian_steps)
        update_fragments(
            self._own_params,
            grads,
            self._exp_avg,
            self._exp_hessian_diag_sq,
            diagonal,
            self.fragments,
            moving,
            self._steps,
            self._hessian_steps,
            group,
        )

        # 4. all-gather the updated chunks straight into the parameters' flat buffer.
        if world > 1:
            dist.all_gather_single(self._flat_params, self._own_params.clone(), group=self.group)

        # Algorithmic bytes of ring collectives: (N-1) chunks per reduce-scatter and all-gather,
        # 2(N-1)/N of the statistics in the all-reduce.
        collectives = 2 + (hessian_step and self.hessian_scope == "global")
        stats_bytes = 2 * (world - 1) * stats.numel() * 4 // world
        self.bytes_sent_last_step = (world - 1) * chunk * element * collectives + stats_bytes
        self.loss, self.grad_norm = loss, norm
        if hessian_step:
            self.schedule.trace = trace_sum
        self.schedule.advance(hessian_step)

    # -- state ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """This rank's pieces of the state, keyed by parameter name (loads at any world size)."""
        params = {}
        for piece in self.fragments:
            i, where = piece.param_index, slice(piece.flat_start, piece.flat_start + piece.numel)
            params[self.names[i]] = {
                "start": piece.param_start,
                "step": self._steps[i],
                "hessian_step": self._hessian_steps[i],
                "exp_avg": self._exp_avg[where].clone(),
                "exp_hessian_diag_sq": self._exp_hessian_diag_sq[where].clone(),
            }
        return {
            "format": STATE_FORMAT,
            "world_size": self.world_size,
            "rank": self.rank,
            "schedule": self.schedule.state_dict(),
            "param_groups": [dict(self.param_groups[0])],
            "counts": {name: (self._steps[i], self._hessian_steps[i]) for i, name in enumerate(self.names)},
            "params": params,
        }

    def load_state_dict(self, shards: Sequence[Mapping[str, Any]]) -> None:
        """Load from the shards of *all* ranks of a saved run, at any world size (v1 or v2)."""
        if not shards:
            raise ValueError("no optimizer shards to load")
        for shard in shards:
            if shard.get("format") not in _READABLE_FORMATS:
                raise ValueError(
                    f"optimizer state format {shard.get('format')!r} is not one this version reads "
                    f"({', '.join(_READABLE_FORMATS)})"
                )
        pieces: dict[str, list[tuple[int, Mapping[str, Any]]]] = {}
        for shard in shards:
            for name, saved in shard["params"].items():
                pieces.setdefault(name, []).append((int(saved.get("start", 0)), saved))
        self.schedule.load_state_dict(shards[0]["schedule"])
        saved_group = shards[0]["param_groups"][0]
        self.param_groups[0].update({k: v for k, v in saved_group.items() if k in self.param_groups[0]})
        counts = shards[0].get("counts", {})
        for i, name in enumerate(self.names):
            found = counts.get(name) or next(
                ((saved["step"], saved["hessian_step"]) for _, saved in pieces.get(name, [])), (0, 0)
            )
            self._steps[i], self._hessian_steps[i] = int(found[0]), int(found[1])
        self._exp_avg.zero_()
        self._exp_hessian_diag_sq.zero_()
        for piece in self.fragments:
            lo, hi = piece.param_start, piece.param_start + piece.numel
            for start, saved in pieces.get(self.names[piece.param_index], []):
                targets = (("exp_avg", self._exp_avg), ("exp_hessian_diag_sq", self._exp_hessian_diag_sq))
                for key, target in targets:
                    values = saved[key].reshape(-1)
                    a, b = max(lo, start), min(hi, start + values.numel())
                    if a < b:
                        at = piece.flat_start + a - lo
                        target[at : at + b - a] = values[a - start : b - start].to(target)

    def state_bytes(self) -> int:
        """Bytes of optimizer state (m and v) held by this rank."""
        return (self._exp_avg.numel() + self._exp_hessian_diag_sq.numel()) * self._exp_avg.element_size()
