"""First-order optimizers (AdamW, Adam, SGD) replicated on every data-parallel rank.

The counterpart of :class:`~trainer.optim.sharded.ShardedAdaHessian` for the baselines a job may
ask for: gradients are averaged with one all-reduce of a flat buffer, every rank applies the
same torch optimizer, so parameters stay identical without a broadcast. It offers the same
small interface (``backward``, ``step``, ``loss``, ``grad_norm``, shard-style state dicts), so
the backend and the worker loop do not care which one runs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from trainer.optim.core import Curvature, check_finite

if TYPE_CHECKING:
    from trainer.spec import OptimizerSpec

STATE_FORMAT = "hutch.replicated.v1"
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adamw": torch.optim.AdamW,
    "adam": torch.optim.Adam,
    "sgd": torch.optim.SGD,
}


def first_order_optimizer(params: Iterable[torch.Tensor], spec: OptimizerSpec) -> torch.optim.Optimizer:
    """The torch optimizer ``spec.name`` names, with the spec's values of its settings."""
    if spec.name not in OPTIMIZERS:
        raise ValueError(f"optimizer {spec.name!r}: must be 'adahessian' or one of {sorted(OPTIMIZERS)}")
    if spec.name == "sgd":
        settings = dict(lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
    else:
        settings = dict(lr=spec.lr, betas=tuple(spec.betas), eps=spec.eps, weight_decay=spec.weight_decay)
    return OPTIMIZERS[spec.name](params, **settings)


class TorchOptimizerOnRanks:
    """The torch optimizer ``spec`` names, over the trainable ``named_params`` of each rank of
    ``group``, clipping to ``spec.max_grad_norm``: what a backend asks of a first-order baseline
    (no Hessian steps; ``loss`` and ``grad_norm`` of the last step; ``param_groups`` for the lr)."""

    hessian_due = False
    hessian_trace: float | None = None

    def __init__(
        self,
        named_params: Iterable[tuple[str, torch.nn.Parameter]],
        spec: OptimizerSpec,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        named = [(n, p) for n, p in named_params if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.optimizer = first_order_optimizer(self.params, spec)
        self.max_grad_norm = spec.max_grad_norm
        self.loss: float | None = None
        self.grad_norm: float | None = None

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups


class ReplicatedOptimizer(TorchOptimizerOnRanks):
    """The torch optimizer on whole parameters, the same on every rank, with all-reduced
    gradients."""

    def __init__(
        self,
        named_params: Iterable[tuple[str, torch.nn.Parameter]],
        spec: OptimizerSpec,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__(named_params, spec, group)
        self.rank = dist.get_rank(group)
        self._steps_done = 0
        self._loss_sum: torch.Tensor | None = None

    @property
    def steps_done(self) -> int:
        return self._steps_done

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor, curvature: Curvature = "loss") -> None:
        """Accumulate ``loss``'s gradients (``curvature`` is for AdaHessian's signature: unused)."""
        detached = loss.detach().float()
        self._loss_sum = detached if self._loss_sum is None else self._loss_sum + detached
        loss.backward()

    @torch.no_grad()
    def step(self) -> None:
        if self._loss_sum is None:
            raise RuntimeError("step() without backward(): call opt.backward(loss) first")
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        had = [float(p.grad is not None) for p in self.params]
        flat = torch.cat(
            [g.reshape(-1) for g in grads]
            + [self._loss_sum.reshape(1).to(grads[0]), torch.tensor(had).to(grads[0])]
        )
        dist.all_reduce(flat, group=self.group)
        flat.div_(self.world_size)
        offset = 0
        used_anywhere = (flat[-len(self.params) :] > 0).tolist()
        for p, used in zip(self.params, used_anywhere):
            n = p.numel()
            # A parameter no rank had a gradient for is left alone, as torch's optimizers do.
            p.grad = flat[offset : offset + n].view_as(p) if used else None
            offset += n
        gradients = flat[:offset]
        loss = flat[offset].item()
        norm = torch.linalg.vector_norm(gradients).item()
        self._loss_sum = None
        check_finite(self._steps_done + 1, loss=loss, gradient=norm)
        if self.max_grad_norm is not None and norm > self.max_grad_norm:
            gradients.mul_(self.max_grad_norm / (norm + 1e-6))  # clip_grad_norm_'s factor; .grad are views
        self.optimizer.step()
        self.loss, self.grad_norm = loss, norm
        self._steps_done += 1

    def state_dict(self) -> dict[str, Any]:
        """The full state (every rank holds it), keyed by parameter name."""
        state = self.optimizer.state_dict()
        return {
            "format": STATE_FORMAT,
            "steps_done": self._steps_done,
            "param_groups": state["param_groups"],
            "params": {self.names[i]: s for i, s in state["state"].items()},
        }

    def load_state_dict(self, shards: Sequence[Mapping[str, Any]]) -> None:
        """Load the state saved by rank 0 of any earlier world size."""
        saved = shards[0]
        if saved.get("format") != STATE_FORMAT:
            raise ValueError(f"not a {STATE_FORMAT} state: format={saved.get('format')!r}")
        index = {name: i for i, name in enumerate(self.names)}
        self.optimizer.load_state_dict(
            {
                "state": {index[name]: s for name, s in saved["params"].items()},
                "param_groups": saved["param_groups"],
            }
        )
        self._steps_done = int(saved["steps_done"])
