"""The AdaHessian core (Yao et al., arXiv 2006.00719): what every AdaHessian in hutch shares,
whoever owns which elements.

The update, per parameter, with ``t`` the parameter's step count and ``k`` the number of
Hessian estimates it has received::

    m ← β1·m + (1-β1)·g                                   every step
    v ← β2·v + (1-β2)·D⊙D                                 Hessian steps only
    θ ← θ - lr·wd·θ - lr · (m / (1-β1^t)) / ((v / (1-β2^k))^(p/2) + eps)

``D`` is the Hutchinson estimate of ``|diag(H)|`` (see :mod:`trainer.optim.hutchinson`).

Delayed Hessian: D is estimated on steps 1, 1+f, 1+2f, … (``f = hessian_update_freq``); on
those steps v is updated and ``k`` advances. In between, v and its bias correction
``1-β2^k`` stay exactly as the last Hessian step left them, so the denominator is frozen
while m and ``1-β1^t`` keep moving. v is an average over *estimates*, not over steps: no stale
D is stored or re-applied, which is why the state is m and v only. Because the first step is
always a Hessian step, ``k ≥ 1`` whenever an update is made and the bias correction never
divides by zero. A parameter that first receives a gradient on a non-Hessian step (e.g. one
unfrozen mid-run) waits for the next Hessian step before it moves.

Here, once each:

* :class:`AdaHessianHyperparameters`, checked when made, with the words the spec uses;
* :class:`HessianSchedule`: which steps estimate the Hessian, the counts a resumed run needs,
  the last trace estimate; :class:`OnHessianSchedule` shows it as the optimizer's attributes;
* :func:`check_finite`: the refusal of a non-finite loss, gradient or Hessian estimate;
* :func:`adahessian_update`, the math, a function over lists of tensors (as torch's ``adam.py``
  keeps its functional core);
* :func:`advance_counts` and :func:`update_fragments`: per-parameter counts and the update of a
  flat slice made of pieces of parameters, for both data-parallel paths.

Who owns what is the optimizers' own business: :class:`~trainer.optim.adahessian.AdaHessian`
holds whole tensors, :class:`~trainer.optim.sharded.ShardedAdaHessian` aligned chunks of one flat
buffer, :class:`~trainer.optim.partitioned.PartitionedAdaHessian` DeepSpeed's slices.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch.optim import Optimizer

from trainer.optim.hutchinson import param_key
from trainer.optim.partition import Fragment, averaging_units

if TYPE_CHECKING:
    from trainer.spec import OptimizerSpec


Curvature = torch.Tensor | Literal["loss", "none"]
"""What an optimizer's ``backward`` takes the Hutchinson products of on a Hessian step: the loss
it is given (``"loss"``), another loss (the mean loss of the examples ``hessian_batch_fraction``
chooses, weighted), or nothing (``"none"``: none of this call's examples is chosen)."""


class NonFiniteError(FloatingPointError):
    """A loss, gradient or Hessian estimate is NaN or infinite; the weights were not touched."""


def check_finite(
    step: int, *, loss: float | None = None, gradient: float | None = None, hessian: float | None = None
) -> None:
    """Raise :class:`NonFiniteError` for the first of ``loss``, ``gradient`` (any sum over the
    gradients, such as their norm) and ``hessian`` (the trace estimate) that is given and not
    finite; ``step`` is the step being made (1 for the first)."""
    untouched = f"at step {step}; the weights were not updated"
    if loss is not None and not math.isfinite(loss):
        raise NonFiniteError(f"loss is {loss} {untouched}")
    if gradient is not None and not math.isfinite(gradient):
        raise NonFiniteError(f"a gradient is not finite {untouched}")
    if hessian is not None and not math.isfinite(hessian):
        raise NonFiniteError(f"the Hessian estimate is not finite {untouched}")


@dataclass(frozen=True)
class AdaHessianHyperparameters:
    """Everything that sets an AdaHessian's trajectory, whoever owns the elements.

    ``lr``, ``betas``, ``eps``, ``weight_decay`` and ``hessian_power`` enter the update; the
    Hessian is estimated every ``hessian_update_freq`` steps with ``n_samples`` probes drawn from
    ``seed``; the estimate of a convolution kernel is averaged over its spatial block
    (``average_conv_kernel``), that of any other tensor over blocks of
    ``spatial_average_block_size`` elements (None: not at all; 1-D tensors only with
    ``spatial_average_1d``). ``update_clip`` bounds each coordinate of the preconditioned step
    before ``lr`` scales it (None: no bound). Out-of-range values raise ``ValueError`` naming
    the first of them.
    """

    lr: float = 0.15
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-4
    weight_decay: float = 0.0
    hessian_power: float = 1.0
    hessian_update_freq: int = 1
    n_samples: int = 1
    spatial_average_block_size: int | None = None
    spatial_average_1d: bool = True
    average_conv_kernel: bool = True
    update_clip: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        block = self.spatial_average_block_size
        _check("lr", self.lr, self.lr > 0.0, "must be positive")
        betas_ok = len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas)
        _check("betas", self.betas, betas_ok, "must be two numbers in [0, 1)")
        _check("eps", self.eps, self.eps > 0.0, "must be positive")
        _check("weight_decay", self.weight_decay, self.weight_decay >= 0.0, "must be non-negative")
        _check("hessian_power", self.hessian_power, 0.0 <= self.hessian_power <= 1.0, "must be in [0, 1]")
        freq = self.hessian_update_freq
        _check("hessian_update_freq", freq, _is_int(freq) and freq >= 1, "must be an integer ≥ 1")
        samples = self.n_samples
        _check("n_samples", samples, _is_int(samples) and samples >= 1, "must be an integer ≥ 1")
        block_ok = block is None or (_is_int(block) and block >= 1)
        _check("spatial_average_block_size", block, block_ok, "must be None or an integer ≥ 1")
        clip = self.update_clip
        _check("update_clip", clip, clip is None or clip > 0.0, "must be None or positive")
        object.__setattr__(self, "betas", tuple(self.betas))
        object.__setattr__(self, "seed", int(self.seed))

    @classmethod
    def from_spec(cls, optimizer: OptimizerSpec, seed: int) -> AdaHessianHyperparameters:
        """A job's values: its ``optimizer`` section and its training seed."""
        return cls(seed=seed, **optimizer.adahessian_kwargs())

    def update_options(self) -> dict[str, Any]:
        """What :func:`adahessian_update` takes from a parameter group (``betas`` as a pair):
        the per-group values of a torch-style optimizer, which a caller may change between steps
        (the worker sets ``lr``)."""
        return dict(
            lr=self.lr,
            betas=self.betas,
            eps=self.eps,
            weight_decay=self.weight_decay,
            hessian_power=self.hessian_power,
            update_clip=self.update_clip,
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check(name: str, value: Any, ok: bool, reason: str) -> None:
    if not ok:
        raise ValueError(f"AdaHessian {name}={value!r}: {reason}")


@dataclass
class HessianSchedule:
    """Which steps estimate the Hessian (1, 1+f, 1+2f, … with ``f = every``), how many steps and
    Hessian steps are done, and the last Hessian trace estimate (tr(H) ≈ Σ z⊙Hz).

    Kept in checkpoints (:meth:`state_dict`), so a resumed run makes its Hessian steps where the
    original would and draws the same probes (their seed includes the Hessian-step index).
    """

    every: int
    steps_done: int = 0
    hessian_steps_done: int = 0
    trace: float | None = None

    @property
    def hessian_due(self) -> bool:
        """Whether the next step estimates the Hessian."""
        return self.steps_done % self.every == 0

    def advance(self, hessian_step: bool) -> None:
        """Count one completed step (a Hessian step if ``hessian_step``)."""
        self.steps_done += 1
        if hessian_step:
            self.hessian_steps_done += 1

    def state_dict(self) -> dict[str, Any]:
        return {
            "steps_done": self.steps_done,
            "hessian_steps_done": self.hessian_steps_done,
            "hessian_trace": self.trace,
        }

    def load_state_dict(self, saved: Mapping[str, Any]) -> None:
        self.steps_done = int(saved["steps_done"])
        self.hessian_steps_done = int(saved["hessian_steps_done"])
        self.trace = saved["hessian_trace"]


class OnHessianSchedule:
    """An optimizer's :class:`HessianSchedule` and hyperparameters, read as its own attributes
    (what the backends, the worker and the tests ask of every AdaHessian)."""

    hyperparameters: AdaHessianHyperparameters
    schedule: HessianSchedule

    @property
    def hessian_due(self) -> bool:
        """Whether the next step estimates the Hessian (steps 1, 1+f, 1+2f, …)."""
        return self.schedule.hessian_due

    @property
    def steps_done(self) -> int:
        """Number of completed steps."""
        return self.schedule.steps_done

    @property
    def hessian_steps_done(self) -> int:
        """Number of completed Hessian steps."""
        return self.schedule.hessian_steps_done

    @property
    def hessian_trace(self) -> float | None:
        """The Hutchinson estimate of tr(H) at the last Hessian step (None before the first)."""
        return self.schedule.trace

    @property
    def hessian_update_freq(self) -> int:
        """Steps from one Hessian estimate to the next."""
        return self.hyperparameters.hessian_update_freq


class ScheduledOptimizer(OnHessianSchedule, Optimizer):
    """A torch optimizer whose state dict also carries its schedule (``state_dict()["schedule"]``),
    so a resumed run makes its Hessian steps where the original would."""

    def _schedule_state(self) -> dict[str, Any]:
        return self.schedule.state_dict()

    def _load_schedule_state(self, saved: Mapping[str, Any]) -> None:
        self.schedule.load_state_dict(saved)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["schedule"] = self._schedule_state()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        schedule = state_dict.pop("schedule", None)
        super().load_state_dict(state_dict)
        if schedule is not None:
            self._load_schedule_state(schedule)


def refuse_duplicates(params: Iterable[torch.Tensor]) -> None:
    """Raise ``ValueError`` if one tensor is given twice (it would be updated twice per step)."""
    seen: set[int] = set()
    for p in params:
        if id(p) in seen:
            raise ValueError(
                f"a parameter of shape {tuple(p.shape)} is given twice: pass each tensor once "
                "(model.parameters() and named_parameters() already drop tied duplicates)"
            )
        seen.add(id(p))


@dataclass(frozen=True, eq=False)
class TrainableParameters:
    """The parameters a data-parallel AdaHessian updates, in model order: the trainable ones, each
    tensor once, with the probe key and averaging unit of each."""

    names: list[str]
    tensors: list[torch.nn.Parameter]
    keys: list[int]
    units: list[int]

    @classmethod
    def collect(
        cls,
        named_params: Iterable[tuple[str, torch.nn.Parameter]],
        hyperparameters: AdaHessianHyperparameters,
        conv_kernels: Collection[str] | None,
        owner: str,
    ) -> TrainableParameters:
        """``conv_kernels`` names the parameters averaged over their spatial block
        (:func:`~trainer.optim.partition.conv_kernel_names`); without it, 4-D tensors are.
        ``owner`` names the optimizer in the error raised when nothing is trainable."""
        named = [(name, p) for name, p in named_params if p.requires_grad]
        if not named:
            raise ValueError(f"{owner} got no trainable parameters")
        refuse_duplicates(p for _, p in named)
        units = averaging_units(
            [(name, p.shape) for name, p in named],
            conv_kernels=conv_kernels,
            average_conv_kernel=hyperparameters.average_conv_kernel,
            block_size=hyperparameters.spatial_average_block_size,
            average_1d=hyperparameters.spatial_average_1d,
        )
        names = [name for name, _ in named]
        return cls(names, [p for _, p in named], [param_key(name) for name in names], units)


def adahessian_update(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_hessian_diag_sqs: list[torch.Tensor],
    hessian_diags: list[torch.Tensor] | None,
    *,
    steps: list[int],
    hessian_steps: list[int],
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    hessian_power: float,
    update_clip: float | None = None,
) -> None:
    """Apply one AdaHessian update in place.

    ``steps`` and ``hessian_steps`` are the counts *including* this step. ``hessian_diags`` is
    ``None`` on steps without a Hessian estimate, which leaves v untouched. ``update_clip``
    bounds each coordinate of ``m̂ / (v̂^(p/2) + eps)`` to ``[-update_clip, update_clip]``.
    """
    if not params:
        return
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    if hessian_diags is not None:
        torch._foreach_mul_(exp_hessian_diag_sqs, beta2)
        torch._foreach_addcmul_(exp_hessian_diag_sqs, hessian_diags, hessian_diags, value=1.0 - beta2)

    half_power = hessian_power / 2.0
    if hessian_power == 1.0:
        denom = torch._foreach_sqrt(exp_hessian_diag_sqs)
    else:
        denom = torch._foreach_pow(exp_hessian_diag_sqs, half_power)
    torch._foreach_div_(denom, [(1.0 - beta2**k) ** half_power for k in hessian_steps])
    torch._foreach_add_(denom, eps)

    if weight_decay != 0.0:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    if update_clip is None:
        torch._foreach_addcdiv_(params, exp_avgs, denom, [-lr / (1.0 - beta1**t) for t in steps])
        return
    direction = torch._foreach_div(exp_avgs, denom)
    torch._foreach_mul_(direction, [1.0 / (1.0 - beta1**t) for t in steps])
    torch._foreach_clamp_min_(direction, -update_clip)
    torch._foreach_clamp_max_(direction, update_clip)
    torch._foreach_add_(params, direction, alpha=-lr)


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
        update_clip=group.get("update_clip"),
    )
