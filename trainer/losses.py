"""The loss a job trains on and the metrics it evaluates: built-in by task, or the user's own.

A spec's ``training.loss`` names ``"package.module:function"``, called as ``loss(model, batch)``
with this rank's (chunk of the) batch, whatever its structure (a tensor, tuples, lists or dicts
of tensors; :mod:`trainer.batches`); it returns the *mean* loss over the batch's examples as a
scalar tensor. Left out, the data set's ``task`` picks cross-entropy over examples
(``classification``) or tokens (``language_model``).

``training.metrics`` names ``metrics(model, batch) -> dict[str, float]``, run on held-out
batches; :func:`reduce_weighted` turns the per-batch values into means over all held-out
examples across ranks.

The user's functions are checked on every call (cheap: no synchronisation): a loss that is not
a floating scalar tensor, or that does not depend on the parameters, is a :class:`UserCodeError`
naming the field and the function, e.g. ``training.loss: pkg.losses:bad returned a tensor of
shape (8, 10); a loss must be a scalar``.

Double backward: AdaHessian differentiates the loss twice; :mod:`trainer.double_backward` says
what that asks of the model and the loss, and explains torch's refusals.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from trainer.backends.base import LossFn
from trainer.batches import Batch
from trainer.spec import SpecError
from trainer.user_code import import_factory

LOSS_FIELD = "training.loss"
METRICS_FIELD = "training.metrics"

MetricsFn = Callable[[nn.Module, Batch], dict[str, float]]
"""``metrics(model, batch)``: named values for one held-out batch (means over its examples)."""

_METRIC_NAME = re.compile(r"[A-Za-z0-9_]+")


class UserCodeError(SpecError):
    """A function the spec names returned something the loop cannot use; the message names the field."""


class UserCodeRaised(Exception):
    """A function the spec names raised: the job's own error, never retried.

    Raised on (it is not returned from), so that Ray Train stops the whole group even when only
    some ranks' data made it raise; the driver finds :attr:`MARK` in Ray's error and fails the
    job with this message as a job error (``trainer.launch``)."""

    MARK = "the job's own code raised"

    @classmethod
    def wrapping(cls, field: str, path: str, error: Exception) -> UserCodeRaised:
        first_line = (str(error).strip().splitlines() or [""])[0]
        return cls(f"{cls.MARK}: {field}: {path} raised {type(error).__name__}: {first_line}")


# -- built-in losses -------------------------------------------------------------------------


def classification_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy over examples: ``batch = (inputs, labels)``."""
    inputs, targets = batch
    return F.cross_entropy(model(inputs), targets)


def language_model_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy over tokens: ``batch = (tokens, next_tokens)``."""
    inputs, targets = batch
    logits = model(inputs)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))


TASK_LOSSES: dict[str, LossFn] = {
    "classification": classification_loss,
    "language_model": language_model_loss,
}


# -- the user's functions --------------------------------------------------------------------


class CheckedLoss:
    """The user's ``loss(model, batch)``, with its result checked on every call."""

    def __init__(self, function: Callable[..., Any], path: str) -> None:
        self.function, self.path = function, path

    def __call__(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        try:
            value = self.function(model, batch)
        except Exception as error:
            raise UserCodeRaised.wrapping(LOSS_FIELD, self.path, error) from error
        check_loss_value(value, self.path)
        return value


def check_loss_value(value: Any, path: str) -> None:
    """Raise :class:`UserCodeError` unless ``value`` is a floating scalar tensor (with a graph
    when gradients are on)."""
    where = f"{LOSS_FIELD}: {path} returned"
    if not isinstance(value, torch.Tensor):
        raise UserCodeError(
            f"{where} a {type(value).__name__}, not a tensor; a loss must be a scalar tensor computed "
            "from the model's output (return the tensor, not .item())"
        )
    if value.dim() != 0:
        raise UserCodeError(
            f"{where} a tensor of shape {tuple(value.shape)}; a loss must be a scalar "
            "(the mean over the batch's examples, e.g. .mean())"
        )
    if not value.is_floating_point():
        raise UserCodeError(f"{where} a {value.dtype} tensor; a loss must be a floating-point scalar")
    if torch.is_grad_enabled() and not value.requires_grad:
        raise UserCodeError(
            f"{where} a tensor that does not depend on the model's parameters (no autograd graph): "
            "compute it from model(...) without .detach(), .item() or torch.no_grad()"
        )


class CheckedMetrics:
    """The user's ``metrics(model, batch)``, its result checked and turned into plain floats."""

    def __init__(self, function: Callable[..., Any], path: str) -> None:
        self.function, self.path = function, path

    def __call__(self, model: nn.Module, batch: Batch) -> dict[str, float]:
        try:
            values = self.function(model, batch)
        except Exception as error:
            raise UserCodeRaised.wrapping(METRICS_FIELD, self.path, error) from error
        where = f"{METRICS_FIELD}: {self.path} returned"
        if not isinstance(values, Mapping):
            kind = type(values).__name__
            raise UserCodeError(f"{where} a {kind}; metrics must be a dict of names to numbers")
        out: dict[str, float] = {}
        for name, value in values.items():
            if not isinstance(name, str) or not _METRIC_NAME.fullmatch(name):
                raise UserCodeError(f"{where} the name {name!r}; names must be letters, digits and '_'")
            if name == "loss":
                raise UserCodeError(f"{where} 'loss', which is reserved: eval_loss is the training loss")
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.item()
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise UserCodeError(f"{where} {name}={_shown(value)}; each metric must be a number")
            out[name] = float(value)
        return out


def build_loss(path: str | None, task: str, model: str | None = None) -> LossFn:
    """The loss a job trains on: the user's ``path``, or the built-in one of ``task`` (for a
    language model built by ``model: hf``, the model's own ``.loss``, the same cross-entropy).

    Raises :class:`~trainer.spec.SpecError` naming ``training.loss`` when the path cannot be
    imported, or when a ``custom`` data set comes without one.
    """
    if path is None and model == "hf" and task == "language_model":
        from trainer.models.hf import own_loss

        return own_loss
    if path is None:
        if task not in TASK_LOSSES:
            raise SpecError(
                f"{LOSS_FIELD}: the data set's task is {task!r}, which has no built-in loss; "
                "name your loss function, 'package.module:function'"
            )
        return TASK_LOSSES[task]
    return CheckedLoss(import_factory(path, f"{LOSS_FIELD} {path!r}"), path)


def build_metrics(path: str | None) -> MetricsFn | None:
    """The user's metrics function, or ``None``; raises :class:`SpecError` naming ``training.metrics``."""
    if path is None:
        return None
    return CheckedMetrics(import_factory(path, f"{METRICS_FIELD} {path!r}"), path)


def reduce_weighted(per_rank: Sequence[Mapping[str, tuple[float, float]]]) -> dict[str, float]:
    """``{name: Σ value·weight / Σ weight}`` over every rank's ``{name: (Σ value·weight, Σ weight)}``.

    Weights are numbers of examples, so a metric is its mean over all held-out examples however
    the batches fell on the ranks. Ranks are added in rank order (the same result at any
    world size, up to float64 rounding).
    """
    sums: dict[str, list[float]] = {}
    for totals in per_rank:
        for name, (total, weight) in totals.items():
            entry = sums.setdefault(name, [0.0, 0.0])
            entry[0] += total
            entry[1] += weight
    return {name: total / weight for name, (total, weight) in sums.items() if weight > 0}


def _shown(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
