"""AdaHessian on one process, as a drop-in torch optimizer, with a delayed Hessian.

The update, its delayed-Hessian rule and its hyperparameters are the core's
(:mod:`trainer.optim.core`); this class only keeps the state of whole tensors, the schedule and
the probes, as torch's ``Adam`` class only manages state around its functional core.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from typing import Any

import torch

from trainer.optim.core import (
    AdaHessianHyperparameters,
    Curvature,
    HessianSchedule,
    ScheduledOptimizer,
    adahessian_update,
    check_finite,
    refuse_duplicates,
)
from trainer.optim.hutchinson import ProbeSource, hessian_diagonal, hutchinson_products, param_key
from trainer.optim.partition import averaging_units


class AdaHessian(ScheduledOptimizer):
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

    The keywords are the fields of :class:`~trainer.optim.core.AdaHessianHyperparameters`
    (``lr=0.1, hessian_update_freq=2, seed=3``, …), checked there; ``lr``, ``betas``, ``eps``,
    ``weight_decay``, ``hessian_power``, ``update_clip``, ``spatial_average_block_size``,
    ``spatial_average_1d`` and ``average_conv_kernel`` are also per-group values, as in torch's optimizers.

    Pass ``model.named_parameters()`` (as torch's optimizers accept) to key each parameter's
    probe by its name, as the data-parallel paths do, so their runs equal this one; bare tensors
    are keyed by their position over all groups. ``conv_kernels`` names the parameters whose
    estimate is spatially averaged (:func:`trainer.optim.partition.conv_kernel_names` of the
    model); without it, 4-D tensors are taken as convolution kernels.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        *,
        conv_kernels: Collection[str] | None = None,
        **hyperparameters: Any,
    ) -> None:
        self.hyperparameters = hp = AdaHessianHyperparameters(**hyperparameters)
        defaults = dict(
            hp.update_options(),
            spatial_average_block_size=hp.spatial_average_block_size,
            spatial_average_1d=hp.spatial_average_1d,
            average_conv_kernel=hp.average_conv_kernel,
        )
        self.conv_kernels = None if conv_kernels is None else frozenset(conv_kernels)
        self._keys: dict[torch.Tensor, int] = {}
        self._units: dict[torch.Tensor, int] = {}
        super().__init__(params, defaults)
        self.schedule = HessianSchedule(hp.hessian_update_freq)
        self._probes = ProbeSource(hp.seed)
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
            average_1d=group.get("spatial_average_1d", True),
        )
        for name, p, unit in zip(names, group["params"], units):
            self._keys[p] = param_key(name)
            self._units[p] = unit

    def _indexed_params(self) -> list[tuple[int, torch.Tensor]]:
        """Parameters that require a gradient now, with their probe keys."""
        return [(self._keys[p], p) for group in self.param_groups for p in group["params"] if p.requires_grad]

    # -- gradients and Hessian products ------------------------------------------------------

    def backward(self, loss: torch.Tensor, curvature: Curvature = "loss") -> None:
        """Backpropagate ``loss``; on Hessian steps also take the Hutchinson products.

        Gradients accumulate into ``.grad`` as with ``loss.backward()`` (only for this
        optimizer's parameters on Hessian steps); products accumulate until :meth:`step`, so
        gradient accumulation over micro-batches works unchanged. ``curvature`` says what the
        products differentiate: ``"loss"`` itself, another loss (the mean loss of a subset of
        the examples: ``hessian_batch_fraction``), or ``"none"`` (none of these examples); with
        either of the last two, a parameter with a gradient but no product gets a zero one.
        """
        if not bool(torch.isfinite(loss.detach()).all()):
            check_finite(self.steps_done + 1, loss=loss.detach().float().sum().item())
        if not self.hessian_due:
            loss.backward()
            return
        indexed = self._indexed_params()
        params = [p for _, p in indexed]
        separate = not isinstance(curvature, str) or curvature != "loss"
        grads = torch.autograd.grad(loss, params, create_graph=not separate, allow_unused=True)
        for p, g in zip(params, grads):
            if g is not None:
                g = g.detach()
                p.grad = g if p.grad is None else p.grad.add_(g)
                if separate and p not in self._pending_products:
                    self._pending_products[p] = torch.zeros_like(g)
        if separate:
            if isinstance(curvature, str):
                return
            grads = torch.autograd.grad(curvature, params, create_graph=True, allow_unused=True)
        used = [(i, p, g) for (i, p), g in zip(indexed, grads) if g is not None]
        if not used:
            return
        products = hutchinson_products(
            [g for _, _, g in used],
            [p for _, p, _ in used],
            [i for i, _, _ in used],
            self._probes,
            self.hessian_steps_done,
            self.hyperparameters.n_samples,
        )
        for (_, p, _), product in zip(used, products):  # micro-batches add up until step()
            pending = self._pending_products.get(p)
            self._pending_products[p] = product if pending is None else pending.add_(product)

    def _products_from_graph_grads(self) -> dict[torch.Tensor, torch.Tensor]:
        """Drop-in path: Hessian products from ``.grad`` tensors that carry a graph."""
        used = [(i, p) for i, p in self._indexed_params() if p.grad is not None]
        if not any(p.grad.requires_grad for _, p in used):
            raise RuntimeError(
                f"step {self.steps_done + 1} is a Hessian step but the gradients carry no graph: "
                "use opt.backward(loss), or loss.backward(create_graph=True) before opt.step()"
            )
        with torch.enable_grad():
            products = hutchinson_products(
                [p.grad for _, p in used],
                [p for _, p in used],
                [i for i, _ in used],
                self._probes,
                self.hessian_steps_done,
                self.hyperparameters.n_samples,
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

        self.schedule.advance(hessian_step)
        return loss

    def _check_products(self, products: dict[torch.Tensor, torch.Tensor]) -> None:
        """Record tr(H) ≈ Σ z⊙Hz and refuse a non-finite estimate before any state changes."""
        if not products:
            self.schedule.trace = 0.0
            return
        trace = torch.stack([t.sum(dtype=torch.float32) for t in products.values()]).sum().item()
        check_finite(self.steps_done + 1, hessian=trace)
        self.schedule.trace = trace

    def _check_grads(self) -> None:
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        if grads:
            check_finite(self.steps_done + 1, gradient=torch.stack(torch._foreach_norm(grads)).sum().item())

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
                update_clip=group.get("update_clip"),
            )
