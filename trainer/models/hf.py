"""Hugging Face causal language models as a built-in (``model: {name: hf, ...}``), from a config
or from a ``save_pretrained`` directory on shared storage; nothing is fetched from a hub.

``args.config`` is a Hugging Face config as a mapping with its ``model_type`` (``gpt2``,
``llama``, …): a model with random weights. ``args.pretrained`` is the path of a directory
written by ``save_pretrained``: its config and weights. Exactly one of the two. The data set's
``vocab_size`` and ``block_size`` fill the config's ``vocab_size`` and
``max_position_embeddings`` when the config does not give them (every Hugging Face config maps
that name to its own, ``n_positions`` for GPT-2). ``checkpoint_activations: true`` turns on the
model's gradient checkpointing, non-reentrant (AdaHessian differentiates through it twice).
Attention is the model's default (``sdpa``); hutch runs its Hessian steps on SDPA's math kernel.

The module returns logits, so evaluation reports loss, accuracy and perplexity as for the
built-in LM; its training loss is the model's own ``.loss`` (:func:`own_loss`), given the
next tokens as ``shift_labels`` (the data set's batches are already shifted). ``transformers`` is
the optional extra ``pip install 'hutch[hf]'``, imported only when such a model is built.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.batches import Batch
from trainer.spec import SpecError

FIELD = "model.args"


class HuggingFaceCausalLM(nn.Module):
    """A Hugging Face ``…ForCausalLM`` as ``forward(input_ids (B, T)) -> logits (B, T, vocab)``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


def own_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The model's own ``.loss`` on ``batch = (tokens, next_tokens)``: mean cross-entropy over
    tokens, computed by the model (``labels`` with ``shift_labels``, so it shifts nothing)."""
    inputs, targets = batch
    assert isinstance(model, HuggingFaceCausalLM)
    targets = targets.contiguous()  # the model views them flat
    return model.model(input_ids=inputs, labels=targets, shift_labels=targets, use_cache=False).loss


def transformers_module() -> Any:
    """``transformers``, or a :class:`SpecError` saying how to install it."""
    try:
        import transformers
    except ImportError:
        raise SpecError(
            "model 'hf' needs the transformers package, which is not installed; "
            "pip install 'hutch[hf]' (on the workers too)"
        ) from None
    return transformers


def check_args(args: Mapping[str, Any]) -> None:
    """Raise :class:`SpecError` naming the field unless ``args`` give a usable config or a
    ``save_pretrained`` directory (checked on the file system: run where the workers' storage is)."""
    config, pretrained = args.get("config"), args.get("pretrained")
    if (config is None) == (pretrained is None):
        raise SpecError(f"{FIELD}: give exactly one of config (a Hugging Face config with its "
                        "model_type) or pretrained (a save_pretrained directory)")  # fmt: skip
    if config is not None:
        model_type = config.get("model_type") if isinstance(config, Mapping) else None
        if not isinstance(model_type, str):
            raise SpecError(f"{FIELD}.config: must be a mapping with a model_type (gpt2, llama, …)")
        known = transformers_module().CONFIG_MAPPING
        if model_type not in known:
            raise SpecError(f"{FIELD}.config.model_type: unknown model type {model_type!r}")
        return
    where = Path(str(pretrained))
    config_file = where / "config.json"
    if not where.is_dir():
        raise SpecError(f"{FIELD}.pretrained: {where} is not a directory (a save_pretrained directory "
                        "on storage every worker sees)")  # fmt: skip
    try:
        saved = json.loads(config_file.read_text())
    except (OSError, ValueError) as error:
        raise SpecError(f"{FIELD}.pretrained: {where} is not a save_pretrained directory: cannot read "
                        f"config.json ({error})") from None  # fmt: skip
    if not isinstance(saved, dict) or not isinstance(saved.get("model_type"), str):
        raise SpecError(f"{FIELD}.pretrained: {config_file} has no model_type")


def hf(
    config: Mapping[str, Any] | None = None,
    pretrained: str | None = None,
    vocab_size: int | None = None,
    block_size: int | None = None,
    checkpoint_activations: bool = False,
) -> nn.Module:
    """The causal LM ``config`` or ``pretrained`` describes (see the module docstring), in fp32."""
    check_args({"config": config, "pretrained": pretrained})
    transformers = transformers_module()
    if pretrained is not None:
        model = transformers.AutoModelForCausalLM.from_pretrained(pretrained, dtype=torch.float32)
    else:
        assert config is not None
        settings = {k: v for k, v in config.items() if k != "model_type"}
        if vocab_size is not None:
            settings.setdefault("vocab_size", vocab_size)
        defaults = transformers.CONFIG_MAPPING[config["model_type"]]()
        vocabulary = settings.get("vocab_size", defaults.vocab_size)
        for token in ("bos_token_id", "eos_token_id", "pad_token_id"):  # GPT-2's 50256, say
            value = getattr(defaults, token, None)
            if token not in settings and isinstance(value, int) and value >= vocabulary:
                settings[token] = None  # a special token the data's vocabulary does not have
        built = transformers.AutoConfig.for_model(config["model_type"], **settings)
        own_name = built.attribute_map.get("max_position_embeddings", "max_position_embeddings")
        if block_size is not None and not {own_name, "max_position_embeddings"} & set(settings):
            built.max_position_embeddings = block_size
        try:
            model = transformers.AutoModelForCausalLM.from_config(built, dtype=torch.float32)
        except (ValueError, TypeError) as error:
            raise SpecError(f"{FIELD}.config: {error}") from None
    if checkpoint_activations:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return HuggingFaceCausalLM(model)
