"""Build the model a spec names: a built-in or a ``"package.module:factory"`` import path.

The data set supplies defaults the model needs to fit it (``num_classes``, ``in_channels``,
``vocab_size``, ``block_size``, …, from ``Dataset.model_args()``); the spec's ``model.args``
override them. Defaults go only to factories that take them, so one data set serves several
models; a user argument the factory does not take is an error that lists what it does take.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from trainer.models.hf import hf
from trainer.models.resnet import resnet20
from trainer.models.small import cnn, mlp
from trainer.models.transformer import transformer_lm
from trainer.spec import BUILTIN_MODELS, SpecError, check_component_name
from trainer.user_code import call_factory, import_factory

MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": mlp,
    "cnn": cnn,
    "resnet20": resnet20,
    "transformer_lm": transformer_lm,
    "hf": hf,
}
"""The built-in factories, by the name a spec uses (the same names as :data:`trainer.spec.BUILTIN_MODELS`)."""


def build_model(
    name: str, args: Mapping[str, Any] | None = None, defaults: Mapping[str, Any] | None = None
) -> nn.Module:
    """``factory(**accepted defaults, **args)``, checked to be an ``nn.Module``.

    Raises :class:`~trainer.spec.SpecError` for a bad name, a failed import or rejected arguments.
    """
    what = f"model {name!r}"
    try:
        check_component_name(name, "model", BUILTIN_MODELS)
    except ValueError as exc:
        raise SpecError(f"{what}: {exc}") from None
    factory = MODELS[name] if name in MODELS else import_factory(name, what)
    model = call_factory(factory, args or {}, defaults or {}, what)
    if not isinstance(model, nn.Module):
        raise SpecError(f"{what}: the factory returned a {type(model).__name__}, not a torch.nn.Module")
    return model
