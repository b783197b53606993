"""AdaHessian (Yao et al., arXiv 2006.00719) with a delayed Hessian.

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

The math lives in :func:`adahessian_update`, a function over lists of tensors; the
:class:`AdaHessian` class only keeps state, counters and the probe schedule.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable
from typing import Any, ClassVar

import torch
from torch.optim import Optimizer

from trainer.optim.hutchinson import ProbeSource, hessian_diagonal, hutchinson_products, param_key
from trainer.optim.partition import averaging_units


class NonFiniteError(FloatingPointError):
    """A loss, gradient or Hessian estimate is NaN or infinite; the weights were not touched."""


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
) -> None:
    """Apply one AdaHessian update in place.

    ``steps`` and ``hessian_steps`` are the counts *including* this step. ``hessian_diags`` is
    ``None`` on steps without a Hessian estimate, which leaves v untouched.
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
    torch._foreach_addcdiv_(params, exp_avgs, denom, [-lr / (1.0 - beta1**t) for t in steps])


class ScheduleInStateDict(Optimizer):
    """Adds the Hessian schedule (steps done, Hessian estimates made, last trace) to torch's
    optimizer state dict, so a resumed run makes its Hessian steps where the original would."""

    _schedule_attributes: ClassVar[dict[str, str]]
    """Key in ``state_dict()["schedule"]`` → the attribute holding it."""

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["schedule"] = {key: getattr(self, name) for key, name in self._schedule_attributes.items()}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        schedule = state_dict.pop("schedule", None)
        super().load_state_dict(state_dict)
        if schedule is not None:
            for key, name in self._schedule_attributes.items():
                setattr(self, name, schedule[key])


class AdaHessian(ScheduleInStateDict):
    """AdaHessian with delayed, seeded Hutchinson estimates.

    Two ways to drive it:

    * efficient (recommended)::

          opt.zero_grad()
          loss = loss_fn(model(x), y)
          opt.backward(loss)   # plain backward, or gradient + Hessian products when due
          opt.step()

      ``backward`` builds the double-backward graph only on Hessian steps, with
      ``torch.autograd.grad``; other steps cost what an Adam step costs.
    * drop-in, as other AdaHessian implementations::

          loss.backward(create_graph=True)   # or create_graph=opt.hessian_due
          opt.step()

    After each Hessian step :attr:`hessian_trace` holds the Hutchinson estimate of tr(H).

    Pass ``model.named_parameters()`` (as torch's optimizers accept) to key each parameter's
    probe by its name, as the data-parallel paths do, so their runs equal this one; bare tensors
    are keyed by their position over all groups. ``conv_kernels`` names the parameters whose
    estimate is spatially averaged (:func:`trainer.optim.partition.conv_kernel_names` of the
    model); without it, 4-D tensors are taken as convolution kernels.
    """

    _schedule_attributes: ClassVar[dict[str, str]] = {
        "steps_done": "_steps_done",
        "hessian_steps_done": "_hessian_steps_done",
        "hessian_trace": "hessian_trace",
    }

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
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
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            hessian_power=hessian_power,
            spatial_average_block_size=spatial_average_block_size,
            average_conv_kernel=average_conv_kernel,
        )
        self.conv_kernels = None if conv_kernels is None else frozenset(conv_kernels)
        self._keys: dict[torch.Tensor, int] = {}
        self._units: dict[torch.Tensor, int] = {}
        super().__init__(params, defaults)
        self.hessian_update_freq = int(hessian_update_freq)
        self.n_samples = int(n_samples)
        self.seed = int(seed)
        self.hessian_trace: float | None = None
        self._probes = ProbeSource(self.seed)
        self._steps_done = 0
        self._hessian_steps_done = 0
        # Signed z⊙Hz from `backward`, keyed by parameter, consumed by the next `step`.
        self._pending_products: dict[torch.Tensor, torch.Tensor] = {}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's, plus each parameter's probe key and averaging unit; a tensor given twice is
        refused."""
        position = len(self._keys)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        refuse_duplicates(group["params"])
        names = group.get("param_names") or [str(position + k) for k in range(len(group["params"]))]
        units = averaging_units(
            [(name, p.shape) for name, p in zip(names, group["params"])],
            conv_kernels=self.conv_kernels,
            average_conv_kernel=group["average_conv_kernel"],
            block_size=group["spatial_average_block_size"],
        )
        for name, p, unit in zip(names, group["params"], units):
            self._keys[p] = param_key(name)
            self._units[p] = unit

    # -- schedule ---------------------------------------------------------------------------

    @property
    def hessian_due(self) -> bool:
        """Whether the next :meth:`step` estimates the Hessian (steps 1, 1+f, 1+2f, …)."""
        return self._steps_done % self.hessian_update_freq == 0

    @property
    def steps_done(self) -> int:
        """Number of completed :meth:`step` calls."""
        return self._steps_done

    def _indexed_params(self) -> list[tuple[int, torch.Tensor]]:
        """Parameters that require a gradient now, with their probe keys."""
        return [(self._keys[p], p) for group in self.param_groups for p in group["params"] if p.requires_grad]

    # -- gradients and Hessian products ------------------------------------------------------

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate ``loss``; on Hessian steps also take the Hutchinson products.

        Gradients accumulate into ``.grad`` as with ``loss.backward()`` (only for this
        optimizer's parameters on Hessian steps); products accumulate until :meth:`step`, so
        gradient accumulation over micro-batches works unchanged.
        """
        if not bool(torch.isfinite(loss.detach()).all()):
            raise NonFiniteError(
                f"loss is {loss.detach().float().sum().item()} at step {self._steps_done + 1}; "
                "the weights were not updated"
            )
        if not self.hessian_due:
            loss.backward()
            return
        indexed = self._indexed_params()
        params = [p for _, p in indexed]
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        used = [(i, p, g) for (i, p), g in zip(indexed, grads) if g is not None]
        if not used:
            return
        products = hutchinson_products(
            [g for _, _, g in used],
            [p for _, p, _ in used],
            [i for i, _, _ in used],
            self._probes,
            self._hessian_steps_done,
            self.n_samples,
        )
        for _, p, g in used:
            g = g.detach()
            p.grad = g if p.grad is None else p.grad.add_(g)
        for (_, p, _), product in zip(used, products):  # micro-batches add up until step()
            pending = self._pending_products.get(p)
            self._pending_products[p] = product if pending is None else pending.add_(product)

    def _products_from_graph_grads(self) -> dict[torch.Tensor, torch.Tensor]:
        """Drop-in path: Hessian products from ``.grad`` tensors that carry a graph."""
        used = [(i, p) for i, p in self._indexed_params() if p.grad is not None]
        if not any(p.grad.requires_grad for _, p in used):
            raise RuntimeError(
                f"step {self._steps_done + 1} is a Hessian step but the gradients carry no graph: "
                "use opt.backward(loss), or loss.backward(create_graph=True) before opt.step()"
            )
        with torch.enable_grad():
            products = hutchinson_products(
                [p.grad for _, p in used],
                [p for _, p in used],
                [i for i, _ in used],
                self._probes,
                self._hessian_steps_done,
                self.n_samples,
            )
        return {p: product for (_, p), product in zip(used, products)}

    def _has_grads(self) -> bool:
        return any(p.grad is not None for group in self.param_groups for p in group["params"])

    def _detach_grads(self) -> None:
        """Drop the graph that drop-in use leaves on ``.grad`` (it pins a param↔grad cycle)."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and p.grad.requires_grad:
                    p.grad = p.grad.detach()

    # -- the step ---------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """Update the parameters; estimate the Hessian first when this is a Hessian step.

        ``closure``, if given, re-evaluates the model and runs the backward pass itself
        (typically through :meth:`backward`); its loss is returned.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        hessian_step = self.hessian_due
        try:
            products: dict[torch.Tensor, torch.Tensor] | None = None
            if hessian_step:
                products = self._pending_products
                if not products and self._has_grads():
                    products = self._products_from_graph_grads()
                self._check_products(products)
            elif self._pending_products:
                raise RuntimeError("Hessian products were taken on a step that is not a Hessian step")
            self._detach_grads()
            self._check_grads()
            for group in self.param_groups:
                self._step_group(group, products)
        finally:
            self._pending_products = {}

        self._steps_done += 1
        if hessian_step:
            self._hessian_steps_done += 1
        return loss

    def _check_products(self, products: dict[torch.Tensor, torch.Tensor]) -> None:
        """Record tr(H) ≈ Σ z⊙Hz and refuse a non-finite estimate before any state changes."""
        if not products:
            self.hessian_trace = 0.0
            return
        trace = torch.stack([t.sum(dtype=torch.float32) for t in products.values()]).sum().item()
        if not math.isfinite(trace):
            raise NonFiniteError(
                f"the Hessian estimate is not finite at step {self._steps_done + 1}; "
                "the weights were not updated"
            )
        self.hessian_trace = trace

    def _check_grads(self) -> None:
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        if grads and not math.isfinite(torch.stack(torch._foreach_norm(grads)).sum().item()):
            raise NonFiniteError(
                f"a gradient is not finite at step {self._steps_done + 1}; the weights were not updated"
            )

    def _step_group(self, group: dict[str, Any], products: dict[torch.Tensor, torch.Tensor] | None) -> None:
        """Update one group: parameters with a fresh Hessian product, then those without."""
        fresh: dict[str, list] = {k: [] for k in ("params", "grads", "m", "v", "d", "t", "k")}
        stale: dict[str, list] = {k: [] for k in ("params", "grads", "m", "v", "t", "k")}
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("AdaHessian does not support sparse gradients")
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["hessian_step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_hessian_diag_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            product = None if products is None else products.get(p)
            if product is None and state["hessian_step"] == 0:
                continue  # no curvature seen yet: wait for the next Hessian step
            state["step"] += 1
            bucket = stale
            if product is not None:
                state["hessian_step"] += 1
                bucket = fresh
                fresh["d"].append(hessian_diagonal(product, self._units[p]))
            bucket["params"].append(p)
            bucket["grads"].append(p.grad)
            bucket["m"].append(state["exp_avg"])
            bucket["v"].append(state["exp_hessian_diag_sq"])
            bucket["t"].append(state["step"])
            bucket["k"].append(state["hessian_step"])
        beta1, beta2 = group["betas"]
        for bucket in (fresh, stale):
            adahessian_update(
                bucket["params"],
                bucket["grads"],
                bucket["m"],
                bucket["v"],
                bucket.get("d"),
                steps=bucket["t"],
                hessian_steps=bucket["k"],
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                hessian_power=group["hessian_power"],
            )


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


def check_hyperparameters(
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    hessian_power: float,
    hessian_update_freq: int,
    n_samples: int,
    spatial_average_block_size: int | None,
) -> None:
    """Raise ``ValueError`` naming the first AdaHessian hyperparameter out of range (shared by
    every AdaHessian variant, so they refuse the same values with the same words)."""
    _check("lr", lr, lr > 0.0, "must be positive")
    _check(
        "betas",
        betas,
        len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas),
        "must be two numbers in [0, 1)",
    )
    _check("eps", eps, eps > 0.0, "must be positive")
    _check("weight_decay", weight_decay, weight_decay >= 0.0, "must be non-negative")
    _check("hessian_power", hessian_power, 0.0 <= hessian_power <= 1.0, "must be in [0, 1]")
    _check(
        "hessian_update_freq",
        hessian_update_freq,
        _is_int(hessian_update_freq) and hessian_update_freq >= 1,
        "must be an integer ≥ 1",
    )
    _check("n_samples", n_samples, _is_int(n_samples) and n_samples >= 1, "must be an integer ≥ 1")
    _check(
        "spatial_average_block_size",
        spatial_average_block_size,
        spatial_average_block_size is None
        or (_is_int(spatial_average_block_size) and spatial_average_block_size >= 1),
        "must be None or an integer ≥ 1",
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check(name: str, value: Any, ok: bool, reason: str) -> None:
    if not ok:
        raise ValueError(f"AdaHessian {name}={value!r}: {reason}")
