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
optimizer widens each piece to whole units, takes ``D``, cuts out its piece and applies
:func:`update_fragments` to the flat slice. Its state is m and v as flat tensors the size of the
slice, plus per-parameter step counts.

The DDP path (:class:`~trainer.optim.sharded.ShardedAdaHessian`) uses the same fragments, the
same per-parameter counts (:func:`advance_counts`) and the same update (:func:`update_fragments`)
on its own aligned chunks; probes are keyed by parameter name on every path, so all follow the
single-process trajectory.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any, ClassVar

import torch

from trainer.optim.adahessian import (
    NonFiniteError,
    ScheduleInStateDict,
    adahessian_update,
    check_hyperparameters,
    refuse_duplicates,
)
from trainer.optim.hutchinson import param_key
from trainer.optim.partition import Fragment, averaging_units, unit_mean_abs


def advance_counts(
    used: Sequence[bool], hessian_step: bool, steps: list[int], hessian_steps: list[int]
) -> list[bool]:
    """Advance each used parameter's step counts (in place) and say which ones move this step.

    A parameter without a gradient this step is left alone; one that has never had a Hessian
    estimate waits for the next Hessian step (as in :class:`~trainer.optim.AdaHessian`).
    """
    moving = []
    for i, was_used in enumerate(used):
        moves = was_used and (hessian_step or hessian_steps[i] > 0)
        if moves:
            steps[i] += 1
            hessian_steps[i] += hessian_step
        moving.append(moves)
    return moving


def update_fragments(
    flat: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_hessian_diag_sq: torch.Tensor,
    diagonal: torch.Tensor | None,
    fragments: Sequence[Fragment],
    moving: Sequence[bool],
    steps: Sequence[int],
    hessian_steps: Sequence[int],
    group: Mapping[str, Any],
) -> None:
    """:func:`adahessian_update` on the moving fragments of one flat slice.

    Consecutive moving fragments with equal step counts form one run, updated as one tensor
    (usually the whole slice: one set of fused ops however many parameters it holds). Elements
    between fragments are padding, zero in every buffer, so a run may span them.
    """
    runs: list[list[int]] = []  # [start, end, t, k]
    extend = False  # whether the last run ends at the previous fragment (nothing still in between)
    for piece in fragments:
        i = piece.param_index
        if not moving[i]:
            extend = False
            continue
        start, end = piece.flat_start, piece.flat_start + piece.numel
        if extend and runs[-1][2] == steps[i] and runs[-1][3] == hessian_steps[i]:
            runs[-1][1] = end
        else:
            runs.append([start, end, steps[i], hessian_steps[i]])
        extend = True
    if not runs:
        return
    cut = [slice(a, b) for a, b, _, _ in runs]
    beta1, beta2 = group["betas"]
    adahessian_update(
        [flat[c] for c in cut],
        [grad[c] for c in cut],
        [exp_avg[c] for c in cut],
        [exp_hessian_diag_sq[c] for c in cut],
        None if diagonal is None else [diagonal[c] for c in cut],
        steps=[t for _, _, t, _ in runs],
        hessian_steps=[k for _, _, _, k in runs],
        lr=group["lr"],
        beta1=beta1,
        beta2=beta2,
        eps=group["eps"],
        weight_decay=group["weight_decay"],
        hessian_power=group["hessian_power"],
    )


class PartitionedAdaHessian(ScheduleInStateDict):
    """AdaHessian whose parameters are flat slices that cut across tensors (see the module doc).

    Construct it on ``model.named_parameters()`` and pass it to ``deepspeed.initialize`` as the
    optimizer; then :meth:`bind_partition` once, and per training step :meth:`prepare_step`
    (which parameters had a gradient, and on Hessian steps the products) before the engine's
    step, and :meth:`finish_step` after it.
    """

    # DeepSpeed saves and loads this optimizer's state dict with its own checkpoints.
    _schedule_attributes: ClassVar[dict[str, str]] = {
        "steps_done": "steps_done",
        "hessian_steps_done": "hessian_steps_done",
        "hessian_trace": "hessian_trace",
        "param_steps": "_steps",
        "param_hessian_steps": "_hessian_steps",
    }

    def __init__(
        self,
        named_params: Iterable[tuple[str, torch.nn.Parameter]],
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
        conv_kernels: Collection[str] | None = None,
    ) -> None:
        check_hyperparameters(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            hessian_power=hessian_power,
            hessian_update_freq=hessian_update_freq,
            n_samples=n_samples,
            spatial_average_block_size=spatial_average_block_size,
        )
        named = [(name, p) for name, p in named_params if p.requires_grad]
        if not named:
            raise ValueError("PartitionedAdaHessian got no trainable parameters")
        refuse_duplicates(p for _, p in named)
        self.model_names = [name for name, _ in named]
        self.model_params = [p for _, p in named]
        self.keys = [param_key(name) for name in self.model_names]
        self.units = averaging_units(
            [(name, p.shape) for name, p in named],
            conv_kernels=conv_kernels,
            average_conv_kernel=average_conv_kernel,
            block_size=spatial_average_block_size,
        )
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, hessian_power=hessian_power
        )
        super().__init__(self.model_params, defaults)
        self.hessian_update_freq = int(hessian_update_freq)
        self.n_samples = int(n_samples)
        self.seed = int(seed)
        self.steps_done = 0
        self.hessian_steps_done = 0
        self.hessian_trace: float | None = None
        self._steps = [0] * len(self.model_params)
        self._hessian_steps = [0] * len(self.model_params)
        self._fragments: dict[torch.Tensor, list[Fragment]] = {}
        self._products: Sequence[torch.Tensor] | None = None
        self._moving: list[bool] | None = None

    @property
    def hessian_due(self) -> bool:
        """Whether the next step estimates the Hessian (steps 1, 1+f, 1+2f, …)."""
        return self.steps_done % self.hessian_update_freq == 0

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
        if len(used) != len(self.model_params):
            raise ValueError(f"got {len(used)} usage flags for {len(self.model_params)} parameters")
        if self.hessian_due:
            if products is None or len(products) != len(self.model_params):
                raise ValueError(
                    f"step {self.steps_done + 1} is a Hessian step: give one product per parameter"
                )
            trace = torch.stack([t.sum(dtype=torch.float32) for t in products]).sum().item()
            if not math.isfinite(trace):
                raise NonFiniteError(
                    f"the Hessian estimate is not finite at step {self.steps_done + 1}; "
                    "the weights were not updated"
                )
            self.hessian_trace = trace
        elif products is not None:
            raise ValueError(f"step {self.steps_done + 1} is not a Hessian step: no products expected")
        self._products = products
        self._moving = advance_counts(used, self.hessian_due, self._steps, self._hessian_steps)

    def finish_step(self) -> None:
        """Advance the schedule after the engine's step (which calls :meth:`step` once per group)."""
        if self._products is not None:
            self.hessian_steps_done += 1
        self._products = None
        self._moving = None
        self.steps_done += 1

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
            unit = self.units[piece.param_index]
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
            schedule["param_steps"] = [t] * len(self.model_params)
            schedule["param_hessian_steps"] = [k] * len(self.model_params)
            state_dict["state"] = {
                key: {n: v for n, v in s.items() if n not in ("step", "hessian_step")}
                for key, s in state_dict.get("state", {}).items()
            }
            state_dict["schedule"] = schedule
        super().load_state_dict(state_dict)
