"""AdaHessian over flat partitions: the inner optimizer of DeepSpeed ZeRO stages 1 and 2.

Under ZeRO-1/2 DeepSpeed flattens each parameter group into one buffer, cuts it into equal
slices, one per data-parallel rank, and gives the client optimizer only its own slice: after
``deepspeed.initialize`` every group's ``params`` is ``[flat_slice]`` (fp32), ``flat_slice.grad``
holds the group-averaged gradient of that slice, and ``step()`` is called with no arguments,
once per group. A slice may begin or end inside a tensor.

AdaHessian needs whole averaging units for one part of its math: ``|·|`` and spatial averaging
of the Hutchinson estimate (a conv kernel's spatial mean, a block of b elements) must not stop at
a slice edge, and DeepSpeed's cuts ignore them. So the driver
(:class:`trainer.backends.deepspeed.DeepSpeedBackend`) hands this optimizer the signed products
``z⊙Hz`` of whole tensors, already averaged over the group (:meth:`PartitionedAdaHessian.prepare_step`),
and says which piece of which tensor lies where in each slice, as
:class:`~trainer.optim.partition.Fragment`s (:meth:`PartitionedAdaHessian.bind_partition`). The
optimizer widens each piece to whole units, takes ``D``, cuts out its piece and applies the
core's :func:`~trainer.optim.core.update_fragments` to the flat slice. Its state is m and v as
flat tensors the size of the slice, plus per-parameter step counts.

The DDP path (:class:`~trainer.optim.sharded.ShardedAdaHessian`) uses the same fragments, the
same per-parameter counts and the same update (:mod:`trainer.optim.core`) on its own aligned
chunks; probes are keyed by parameter name on every path, so all follow the
single-process trajectory.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

import torch

from trainer.optim.core import (
    AdaHessianHyperparameters,
    HessianSchedule,
    ScheduledOptimizer,
    TrainableParameters,
    advance_counts,
    check_finite,
    update_fragments,
)
from trainer.optim.partition import Fragment, unit_mean_abs


class PartitionedAdaHessian(ScheduledOptimizer):
    """AdaHessian whose parameters are flat slices that cut across tensors (see the module doc).

    Construct it on ``model.named_parameters()`` and pass it to ``deepspeed.initialize`` as the
    optimizer; then :meth:`bind_partition` once, and per training step :meth:`prepare_step`
    (which parameters had a gradient, and on Hessian steps the products) before the engine's
    step, and :meth:`finish_step` after it.
    """

    def __init__(
        self,
        named_params: Iterable[tuple[str, torch.nn.Parameter]],
        hyperparameters: AdaHessianHyperparameters,
        *,
        conv_kernels: Collection[str] | None = None,
    ) -> None:
        self.hyperparameters = hyperparameters
        self.trainable = TrainableParameters.collect(
            named_params, hyperparameters, conv_kernels, "PartitionedAdaHessian"
        )
        super().__init__(self.trainable.tensors, hyperparameters.update_options())
        self.schedule = HessianSchedule(hyperparameters.hessian_update_freq)
        count = len(self.trainable.tensors)
        self._steps = [0] * count
        self._hessian_steps = [0] * count
        self._fragments: dict[torch.Tensor, list[Fragment]] = {}
        self._products: Sequence[torch.Tensor] | None = None
        self._moving: list[bool] | None = None

    # DeepSpeed saves and loads this optimizer's state dict with its own checkpoints: the schedule
    # carries the per-parameter counts too.
    def _schedule_state(self) -> dict[str, Any]:
        return {
            **self.schedule.state_dict(),
            "param_steps": self._steps,
            "param_hessian_steps": self._hessian_steps,
        }

    def _load_schedule_state(self, saved: Mapping[str, Any]) -> None:
        self.schedule.load_state_dict(saved)
        self._steps = list(saved["param_steps"])
        self._hessian_steps = list(saved["param_hessian_steps"])

    def bind_partition(self, fragments: Mapping[torch.Tensor, Sequence[Fragment]]) -> None:
        """Say, for every flat slice now in the groups, which pieces of which parameters it holds.

        Called once after ``deepspeed.initialize`` replaced the groups' parameters; a slice with
        no entry holds padding only.
        """
        slices = {flat for group in self.param_groups for flat in group["params"]}
        unknown = [flat for flat in fragments if flat not in slices]
        if unknown:
            raise ValueError("bind_partition got a tensor that is not one of this optimizer's slices")
        self._fragments = {
            flat: sorted(pieces, key=lambda f: f.flat_start) for flat, pieces in fragments.items()
        }

    def prepare_step(self, used: Sequence[bool], products: Sequence[torch.Tensor] | None) -> None:
        """Before the engine's step: which model parameters had a gradient on any rank, and on
        Hessian steps the signed ``z⊙Hz`` of every model parameter (whole tensors, averaged over
        the group, identical on every rank). Raises :class:`NonFiniteError` before any state
        changes if the trace estimate is not finite."""
        count = len(self.trainable.tensors)
        if len(used) != count:
            raise ValueError(f"got {len(used)} usage flags for {count} parameters")
        if self.hessian_due:
            if products is None or len(products) != count:
                raise ValueError(
                    f"step {self.steps_done + 1} is a Hessian step: give one product per parameter"
                )
            trace = torch.stack([t.sum(dtype=torch.float32) for t in products]).sum().item()
            check_finite(self.steps_done + 1, hessian=trace)
            self.schedule.trace = trace
        elif products is not None:
            raise ValueError(f"step {self.steps_done + 1} is not a Hessian step: no products expected")
        self._products = products
        self._moving = advance_counts(used, self.hessian_due, self._steps, self._hessian_steps)

    def finish_step(self) -> None:
        """Advance the schedule after the engine's step (which calls :meth:`step` once per group)."""
        self.schedule.advance(hessian_step=self._products is not None)
        self._products = None
        self._moving = None

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        """Update every slice that has a gradient (DeepSpeed calls this with one group at a time)."""
        if closure is not None:
            raise ValueError("PartitionedAdaHessian.step takes no closure (DeepSpeed never passes one)")
        if self._moving is None:
            raise RuntimeError(f"step {self.steps_done + 1}: call prepare_step before the engine's step")
        for group in self.param_groups:
            for flat in group["params"]:
                if flat.grad is None:
                    continue
                state = self.state[flat]
                if not state:
                    state["exp_avg"] = torch.zeros_like(flat, memory_format=torch.preserve_format)
                    state["exp_hessian_diag_sq"] = torch.zeros_like(flat, memory_format=torch.preserve_format)
                pieces = self._fragments.get(flat, [])
                update_fragments(
                    flat,
                    flat.grad,
                    state["exp_avg"],
                    state["exp_hessian_diag_sq"],
                    None if self._products is None else self._slice_diagonal(flat, pieces),
                    pieces,
                    self._moving,
                    self._steps,
                    self._hessian_steps,
                    group,
                )

    def _slice_diagonal(self, flat: torch.Tensor, pieces: Sequence[Fragment]) -> torch.Tensor:
        """D for this slice. DeepSpeed cuts anywhere, so each piece is widened to whole averaging
        units of its tensor's (averaged) product before ``|·|`` and averaging, then cut out."""
        assert self._products is not None
        diagonal = torch.zeros_like(flat)  # padding keeps D = 0: its m stays 0, so it never moves
        for piece in pieces:
            unit = self.trainable.units[piece.param_index]
            whole = self._products[piece.param_index].reshape(-1).to(device=flat.device, dtype=flat.dtype)
            lo = (piece.param_start // unit) * unit
            hi = min(whole.numel(), -(-(piece.param_start + piece.numel) // unit) * unit)
            values = unit_mean_abs(whole[lo:hi], unit)
            begin = piece.param_start - lo
            diagonal[piece.flat_start : piece.flat_start + piece.numel] = values[begin : begin + piece.numel]
        return diagonal

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's, plus the schedule; a state saved before per-parameter counts (each slice's own
        ``step``/``hessian_step``) gives every parameter its slice's counts."""
        state_dict = dict(state_dict)
        schedule = dict(state_dict.get("schedule") or {})
        if schedule and "param_steps" not in schedule:
            slices = [s for s in state_dict.get("state", {}).values() if "step" in s]
            t, k = (int(slices[0]["step"]), int(slices[0]["hessian_step"])) if slices else (0, 0)
            schedule["param_steps"] = [t] * len(self.trainable.tensors)
            schedule["param_hessian_steps"] = [k] * len(self.trainable.tensors)
            state_dict["state"] = {
                key: {n: v for n, v in s.items() if n not in ("step", "hessian_step")}
                for key, s in state_dict.get("state", {}).items()
            }
            state_dict["schedule"] = schedule
        super().load_state_dict(state_dict)
