"""The built-in ``hf`` model: Hugging Face causal LMs from a config or a save_pretrained directory
(nothing downloaded), their own loss against hutch's cross-entropy, Hessian steps through their
default (sdpa) attention with and without gradient checkpointing, and errors that name the field."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from trainer.backends import DDPBackend
from trainer.double_backward import twice_differentiable
from trainer.losses import build_loss, language_model_loss
from trainer.models.registry import build_model
from trainer.preflight import check_spec
from trainer.spec import OptimizerSpec, SpecError, validate_spec

transformers = pytest.importorskip("transformers", reason="the hf extra is not installed")

pytestmark = pytest.mark.usefixtures("one_process_group")  # tests/conftest.py

VOCAB, BLOCK = 24, 16
LLAMA = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 64,
         "num_attention_heads": 4, "num_key_value_heads": 2}  # fmt: skip
GPT2 = {"model_type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 32}
DATA_DEFAULTS = {"vocab_size": VOCAB, "block_size": BLOCK}


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, VOCAB, (4, BLOCK + 1), generator=torch.Generator().manual_seed(step))
    return tokens[:, :-1], tokens[:, 1:]


def hf_model(config: dict, **args: object) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("hf", {"config": config, **args}, DATA_DEFAULTS)


@pytest.mark.parametrize("config", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_a_config_builds_a_model_whose_own_loss_is_the_token_cross_entropy(config: dict) -> None:
    model = hf_model(config).eval()  # no dropout: both losses see the same forward
    assert model.model.config.vocab_size == VOCAB and model.model.config.max_position_embeddings == BLOCK
    assert model.model.config._attn_implementation == "sdpa"
    inputs, targets = batch(0)
    assert model(inputs).shape == (4, BLOCK, VOCAB)
    own = build_loss(None, "language_model", "hf")
    torch.testing.assert_close(own(model, (inputs, targets)), language_model_loss(model, (inputs, targets)))


def train(model: torch.nn.Module, steps: int) -> list[float]:
    backend = DDPBackend(model, build_loss(None, "language_model", "hf"), OptimizerSpec(lr=0.02), seed=1)
    with twice_differentiable():  # as the worker runs Hessian steps (every step here)
        return [backend.train_step(batch(0)).loss for _ in range(steps)]  # fitting one batch


def test_llama_with_default_attention_and_gradient_checkpointing_trains_the_same() -> None:
    """The default sdpa attention takes Hessian steps; checkpointing changes no parameter."""
    plain, checkpointed = hf_model(LLAMA), hf_model(LLAMA, checkpoint_activations=True)
    assert checkpointed.model.is_gradient_checkpointing
    plain_losses, checkpointed_losses = train(plain, 3), train(checkpointed, 3)
    assert checkpointed_losses == pytest.approx(plain_losses, rel=1e-6)
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6, msg=name)
    assert plain_losses[-1] < plain_losses[0]


def test_a_save_pretrained_directory_loads_its_weights(tmp_path: Path) -> None:
    saved = hf_model(GPT2)
    saved.model.save_pretrained(tmp_path / "tiny")
    loaded = build_model("hf", {"pretrained": str(tmp_path / "tiny")}, DATA_DEFAULTS)
    for (name, a), (_, b) in zip(saved.state_dict().items(), loaded.state_dict().items()):
        torch.testing.assert_close(b, a, msg=name)


def hf_spec(**args: object) -> dict:
    return {"name": "hf-job", "model": {"name": "hf", "args": args}, "data": "text_chars"}


def test_a_missing_or_malformed_directory_is_refused_before_anything_starts(tmp_path: Path) -> None:
    (tmp_path / "not-a-model").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    cases = {
        str(tmp_path / "nowhere"): "is not a directory",
        str(tmp_path / "not-a-model"): "is not a save_pretrained directory: cannot read config.json",
        str(tmp_path / "broken"): "is not a save_pretrained directory: cannot read config.json",
    }
    for path, reason in cases.items():
        with pytest.raises(SpecError, match=re.escape(f"model.args.pretrained: {path} {reason}")):
            check_spec(validate_spec(hf_spec(pretrained=path)))
    with pytest.raises(SpecError, match=re.escape("model.args.config.model_type: unknown model type 'gpt5'")):
        check_spec(validate_spec(hf_spec(config={"model_type": "gpt5"})))
    with pytest.raises(SpecError, match=re.escape("model: hf takes exactly one of args.config")):
        validate_spec(hf_spec(config=GPT2, pretrained=str(tmp_path)))
