"""Sharded AdaHessian for a data-parallel group (ZeRO stage 1 over torch.distributed).

Each rank owns whole parameter tensors (a :class:`~trainer.optim.sharding.ShardPlan`) and keeps
m and v only for them, in a local :class:`~trainer.optim.AdaHessian`. One step:

1. every rank runs forward/backward on its micro-batch (:meth:`ShardedAdaHessian.backward`);
   on Hessian steps it also takes the Hutchinson products ``z⊙Hz`` for *all* parameters with
   the shared probe (keyed by seed, Hessian-step index and parameter index), through
   ``torch.autograd.grad`` on the bare module, so no DDP hook is involved;
2. one ``reduce_scatter`` averages gradients (and, on Hessian steps, the signed products) and
   leaves each rank with its own shard only;
3. one small ``all_reduce`` of loss, trace and squared gradient norm, so every rank sees the
   same statistics and raises the same error for non-finite values;
4. the owner applies ``|·|``, spatial averaging and the AdaHessian update to its shard;
5. one ``all_gather`` shares the updated parameters.

Because the products are averaged *signed* before ``|·|``, the estimate equals the
single-process estimate on the global batch, at any world size. ``hessian_scope="local"``
instead differentiates each rank's gradient only with respect to its own shard, on its own
micro-batch, and sends no products: one collective less, a noisier estimate.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist

from trainer.optim.adahessian import AdaHessian, NonFiniteError
from trainer.optim.hutchinson import ProbeSource, hutchinson_products
from trainer.optim.sharding import ShardPlan

HessianScope = Literal["global", "local"]
STATE_FORMAT = "hutch.sharded_adahessian.v1"


class ShardedAdaHessian:
    """AdaHessian whose optimizer state is partitioned over the ranks of ``group``.

    Use it like :class:`AdaHessian`'s efficient path::

        opt.zero_grad(); opt.backward(loss_fn(model(x_local), y_local)); opt.step()

    Every rank must call :meth:`backward` and :meth:`step` the same number of times. After a
    step, :attr:`loss`, :attr:`grad_norm` and :attr:`hessian_trace` hold group-wide values.
    """

    def __init__(
        self,
        named_params: Iterable[tuple[str, torch.nn.Parameter]],
        *,
        group: dist.ProcessGroup | None = None,
        owners: Sequence[int] | None = None,
        hessian_scope: HessianScope = "global",
        lr: float = 0.15,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-4,
        weight_decay: float = 0.0,
        hessian_power: float = 1.0,
        hessian_update_freq: int = 1,
        n_samples: int = 1,
        spatial_average_block_size: int | None = None,
        average_conv_kernel: bool = True,
        seed: int = 0,
    ) -> None:
        if hessian_scope not in ("global", "local"):
            raise ValueError(f"hessian_scope={hessian_scope!r}: must be 'global' or 'local'")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        named = [(name, p) for name, p in named_params if p.requires_grad]
        if not named:
            raise ValueError("ShardedAdaHessian got no trainable parameters")
        dtypes = {p.dtype for _, p in named}
        if len(dtypes) != 1:
            raise ValueError(f"all parameters must share one dtype for the flat buffers, got {dtypes}")
        self.names = [name for name, _ in named]
        self.params = [p for _, p in named]
        shapes = [(name, p.shape) for name, p in named]
        self.plan = (
            ShardPlan.balanced(shapes, self.world_size)
            if owners is None
            else ShardPlan.explicit(shapes, owners, self.world_size)
        )
        self.owned = self.plan.owned(self.rank)
        self.hessian_scope: HessianScope = hessian_scope
        self.hessian_update_freq = hessian_update_freq
        self.n_samples = n_samples
        self.local = AdaHessian(
            [self.params[i] for i in self.owned] or [torch.nn.Parameter(torch.zeros(0))],
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            hessian_power=hessian_power,
            hessian_update_freq=hessian_update_freq,
            n_samples=n_samples,
            spatial_average_block_size=spatial_average_block_size,
            average_conv_kernel=average_conv_kernel,
            seed=seed,
        )
        self._probes = ProbeSource(seed)
        self._steps_done = 0
        self._hessian_steps_done = 0
        self._loss_sum: torch.Tensor | None = None
        self._products: list[torch.Tensor | None] = [None] * len(self.params)
        self.loss: float | None = None
        self.grad_norm: float | None = None
        self.hessian_trace: float | None = None
        self.bytes_sent_last_step = 0

    # -- schedule ---------------------------------------------------------------------------

    @property
    def hessian_due(self) -> bool:
        """Whether the next :meth:`step` estimates the Hessian (steps 1, 1+f, 1+2f, …)."""
        return self._steps_done % self.hessian_update_freq == 0

    @property
    def steps_done(self) -> int:
        return self._steps_done

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The local optimizer's groups (learning-rate schedulers adjust ``lr`` here)."""
        return self.local.param_groups

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    # -- local work -------------------------------------------------------------------------

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate this rank's micro-batch loss; take Hessian products when due."""
        detached = loss.detach().float()
        self._loss_sum = detached if self._loss_sum is None else self._loss_sum + detached
        if not self.hessian_due:
            loss.backward()
            return
        grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, self.params)]
        # global: every rank's products for every parameter, averaged later; local: own shard only.
        indices = list(range(len(self.params))) if self.hessian_scope == "global" else self.owned
        products = hutchinson_products(
            [grads[i] for i in indices],
            [self.params[i] for i in indices],
            indices,
            self._probes,
            self._hessian_steps_done,
            self.n_samples,
        )
        for i, product in zip(indices, products):
            pending = self._products[i]
            self._products[i] = product if pending is None else pending.add_(product)
        for p, g in zip(self.params, grads):
            g = g.detach()
            p.grad = g if p.grad is None else p.grad.add_(g)

    # -- the collective step ----------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> None:
        """Average, update the owned shard, share parameters; see the module docstring."""
        if self._loss_sum is None:
            raise RuntimeError("step() without backward(): call opt.backward(loss) first")
        hessian_step = self.hessian_due
        send_products = hessian_step and self.hessian_scope == "global"
        plan, segment, world = self.plan, self.plan.segment, self.world_size
        width = segment * (2 if send_products else 1)
        p0 = self.params[0]

        # 1. reduce-scatter gradients (+ products) so each owner gets the group average.
        send = torch.zeros(world, width, dtype=p0.dtype, device=p0.device)
        for rank in range(world):
            offset = 0
            for i in plan.owned(rank):
                n = plan.numels[i]
                grad = self.params[i].grad
                if grad is not None:
                    send[rank, offset : offset + n] = grad.reshape(-1)
                if send_products:
                    send[rank, segment + offset : segment + offset + n] = self._products[i].reshape(-1)
                offset += n
        received = torch.empty(width, dtype=p0.dtype, device=p0.device)
        dist.reduce_scatter_single(received, send.view(-1), group=self.group)
        received.div_(world)

        owned_grads: dict[torch.Tensor, torch.Tensor] = {}
        owned_products: dict[torch.Tensor, torch.Tensor] = {}
        offset = 0
        for i in self.owned:
            p, n = self.params[i], plan.numels[i]
            owned_grads[p] = received[offset : offset + n].view_as(p)
            if send_products:
                owned_products[p] = received[segment + offset : segment + offset + n].view_as(p)
            elif hessian_step:
                owned_products[p] = self._products[i]
            offset += n
        for p in self.params:
            p.grad = owned_grads.get(p)

        # 2. group-wide statistics, and one verdict on finiteness for every rank.
        trace_part = sum((t.sum(dtype=torch.float32) for t in owned_products.values()), torch.zeros(()))
        norm_part = sum((g.float().pow(2).sum() for g in owned_grads.values()), torch.zeros(()))
        stats = torch.stack([self._loss_sum.cpu().reshape(()), trace_part.cpu(), norm_part.cpu()])
        stats = stats.to(p0.device)
        dist.all_reduce(stats, group=self.group)
        loss, trace, norm_sq = stats.tolist()
        self._loss_sum = None
        self._products = [None] * len(self.params)
        untouched = f"at step {self._steps_done + 1}; the weights were not updated"
        if not math.isfinite(loss):
            raise NonFiniteError(f"loss is {loss / world} {untouched}")
        if not math.isfinite(norm_sq):
            raise NonFiniteError(f"a gradient is not finite {untouched}")
        if hessian_step and not math.isfinite(trace):
            raise NonFiniteError(f"the Hessian estimate is not finite {untouched}")

        # 3. the owner's update (the local optimizer applies |·| and spatial averaging).
        if owned_products:
            self.local.add_hessian_products(owned_products)
        self.local._loss_checked = True  # finiteness was checked collectively above
        self.local.step()

        # 4. all-gather the updated shards into every rank's parameters.
        mine = torch.zeros(segment, dtype=p0.dtype, device=p0.device)
        offset = 0
        for i in self.owned:
            n = plan.numels[i]
            mine[offset : offset + n] = self.params[i].reshape(-1)
            offset += n
        gathered = torch.empty(world * segment, dtype=p0.dtype, device=p0.device)
        dist.all_gather_single(gathered, mine, group=self.group)
        for rank in range(world):
            offset = rank * segment
            for i in plan.owned(rank):
                n = plan.numels[i]
                if rank != self.rank:
                    self.params[i].copy_(gathered[offset : offset + n].view_as(self.params[i]))
                offset += n

        # Algorithmic bytes of ring collectives: (N-1) chunks in reduce-scatter and in all-gather,
        # 2(N-1)/N of the stats in all-reduce. NCCL sends this; gloo's reduce-scatter sends as
        # much as an all-reduce of its input (measured in benchmarks/sharded_cost.py).
        element = p0.element_size()
        stats_bytes = 2 * (world - 1) * 3 * 4 // world
        self.bytes_sent_last_step = (world - 1) * (width + segment) * element + stats_bytes
        self.loss = loss / world
        self.grad_norm = math.sqrt(norm_sq)
        if hessian_step:
            self.hessian_trace = trace  # owners' partial traces add up to Σ z⊙Hz
            self._hessian_steps_done += 1
        self._steps_done += 1

    # -- state ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """This rank's shard of the state, keyed by parameter name (world-size independent)."""
        params = {}
        for i in self.owned:
            state = self.local.state.get(self.params[i])
            if state:
                params[self.names[i]] = {
                    k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in state.items()
                }
        return {
            "format": STATE_FORMAT,
            "world_size": self.world_size,
            "rank": self.rank,
            "schedule": {
                "steps_done": self._steps_done,
                "hessian_steps_done": self._hessian_steps_done,
                "hessian_trace": self.hessian_trace,
            },
            "param_groups": [
                {k: v for k, v in group.items() if k != "params"} for group in self.local.param_groups
            ],
            "params": params,
        }

    def load_state_dict(self, shards: Sequence[Mapping[str, Any]]) -> None:
        """Load from the shards of *all* ranks of a saved run, at any world size."""
        if not shards:
            raise ValueError("no optimizer shards to load")
        for shard in shards:
            if shard.get("format") != STATE_FORMAT:
                raise ValueError(f"not a {STATE_FORMAT} shard: format={shard.get('format')!r}")
        merged: dict[str, dict[str, Any]] = {}
        for shard in shards:
            merged.update(shard["params"])
        schedule = shards[0]["schedule"]
        self._steps_done = int(schedule["steps_done"])
        self._hessian_steps_done = int(schedule["hessian_steps_done"])
        self.hessian_trace = schedule["hessian_trace"]
        self.local._steps_done = self._steps_done
        self.local._hessian_steps_done = self._hessian_steps_done
        self.local.hessian_trace = self.hessian_trace
        for group, saved in zip(self.local.param_groups, shards[0]["param_groups"]):
            group.update({k: v for k, v in saved.items() if k in group})
        self.local.state.clear()
        for i in self.owned:
            saved = merged.get(self.names[i])
            if saved is None:
                continue
            p = self.params[i]
            self.local.state[p] = {
                k: (v.to(device=p.device, dtype=p.dtype).clone() if torch.is_tensor(v) else v)
                for k, v in saved.items()
            }

    def state_bytes(self) -> int:
        """Bytes of optimizer state (m and v) held by this rank."""
        return sum(
            t.numel() * t.element_size()
            for state in self.local.state.values()
            for t in state.values()
            if torch.is_tensor(t)
        )
