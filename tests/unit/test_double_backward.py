"""Hessian steps through fused attention and activation checkpointing, on the DDP backend at
world size 1 (a one-process gloo group): the math-kernel switch gives the Hessian products of
written-out attention, checkpointed and plain models train to the same parameters, and what
truly cannot be differentiated twice fails with a reason that names it."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from benchmarks.workloads import write_attention_out
from trainer.backends import DDPBackend
from trainer.double_backward import explain_double_backward, twice_differentiable
from trainer.losses import language_model_loss
from trainer.models import transformer_lm
from trainer.optim import AdaHessian
from trainer.optim.hutchinson import ProbeSource, hutchinson_products, param_key
from trainer.spec import OptimizerSpec

pytestmark = pytest.mark.usefixtures("one_process_group")  # tests/conftest.py

VOCAB, BLOCK = 20, 12


def lm_batch(step: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(0, VOCAB, (6, BLOCK + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def small_lm(dtype: torch.dtype = torch.float64, **args: object) -> nn.Module:
    torch.manual_seed(0)
    model = transformer_lm(vocab_size=VOCAB, block_size=BLOCK, n_layer=2, n_head=2, n_embd=16, **args)
    return model.to(dtype)


def hessian_products(model: nn.Module) -> list[torch.Tensor]:
    names, params = zip(*model.named_parameters())
    loss = language_model_loss(model, lm_batch(0))
    grads = torch.autograd.grad(loss, params, create_graph=True)
    return hutchinson_products(grads, params, [param_key(n) for n in names], ProbeSource(7), 0)


def test_sdpa_on_the_math_kernel_gives_the_hessian_products_of_written_out_attention() -> None:
    model = small_lm()
    with pytest.raises(RuntimeError) as caught:  # the CPU's default (flash) kernel refuses
        hessian_products(model)
    assert "scaled_dot_product" in str(caught.value)
    with twice_differentiable():
        switched = hessian_products(model)
    reference = hessian_products(write_attention_out(model))
    for got, want in zip(switched, reference):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert sum(float(p.abs().sum()) for p in reference) > 0


def train(model: nn.Module, steps: int, **optimizer: object) -> list[float]:
    """``steps`` steps of the DDP backend as the worker runs them (Hessian steps switched)."""
    spec = OptimizerSpec(name="adahessian", lr=0.05, hessian_update_freq=2, **optimizer)
    backend = DDPBackend(model, language_model_loss, spec, seed=3)
    losses = []
    for step in range(steps):
        with twice_differentiable():
            losses.append(backend.train_step(lm_batch(step), chunk_size=3).loss)
    return losses


@pytest.mark.parametrize(
    ("dtype", "tolerance"), [(torch.float64, 1e-10), (torch.float32, 1e-6)], ids=["float64", "float32"]
)
def test_activation_checkpointing_trains_to_the_same_parameters(dtype: torch.dtype, tolerance: float) -> None:
    plain = small_lm(dtype, dropout=0.1)
    checkpointed = small_lm(dtype, dropout=0.1, checkpoint_activations=True)
    torch.manual_seed(11)  # dropout masks: recomputation replays them (the RNG state is kept)
    plain_losses = train(plain, 4)
    torch.manual_seed(11)
    checkpointed_losses = train(checkpointed, 4)
    assert checkpointed_losses == pytest.approx(plain_losses, rel=tolerance)
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        torch.testing.assert_close(b, a, rtol=tolerance, atol=tolerance, msg=name)
    assert not torch.equal(plain.tok_emb.weight, small_lm(dtype).tok_emb.weight)  # it trained


class ReentrantCheckpointed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.body, self.head = nn.Embedding(VOCAB, 8), nn.Linear(8, 8), nn.Linear(8, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(checkpoint(self.body, self.embed(tokens), use_reentrant=True).tanh())


def test_reentrant_checkpointing_is_refused_at_the_first_hessian_step_with_its_reason() -> None:
    backend = DDPBackend(ReentrantCheckpointed(), language_model_loss, OptimizerSpec(name="adahessian"))
    assert backend.hessian_due
    with pytest.raises(RuntimeError) as caught:
        backend.train_step(lm_batch(0, torch.float32))
    reason = explain_double_backward(caught.value, "model")
    assert reason is not None, str(caught.value)
    assert reason.startswith("model: reentrant activation checkpointing (torch.utils.checkpoint with ")
    assert "use_reentrant=False" in reason


def flash_attention_called_directly(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """A fused kernel called as its op, not through ``F.scaled_dot_product_attention`` (as the
    flash-attn package is): the switch cannot reach it, and its backward has no derivative."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)[0]


def test_an_op_without_double_backward_fails_the_hessian_step_readably() -> None:
    torch.manual_seed(0)
    qkv = nn.Linear(8, 24)
    opt = AdaHessian(qkv.parameters(), seed=0)
    q, k, v = (t[:, None] for t in qkv(torch.randn(4, 5, 8)).chunk(3, dim=-1))
    loss = flash_attention_called_directly(q, k, v).square().mean()
    with pytest.raises(RuntimeError) as caught, twice_differentiable():
        opt.backward(loss)  # a Hessian step: grad, then grad of g·z
    reason = explain_double_backward(caught.value, "training.loss")
    assert reason is not None, str(caught.value)
    assert reason.startswith(
        "training.loss: the Hessian-vector product needs double backward (the gradient is differentiated "
        "once more), which aten::_scaled_dot_product_flash_attention_for_cpu_backward does not support"
    )
    assert "called directly" in reason and "optimizer.name: adamw" in reason
    assert explain_double_backward(RuntimeError("CUDA out of memory"), "model") is None
