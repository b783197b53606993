"""What the cost benchmarks train: a model factory and a fixed pool of random batches.

``optimizer_cost.py`` and ``sharded_cost.py`` time steps of ResNet-20 on CIFAR-shaped images and
of a small GPT-style LM on random tokens. The batches are drawn from a generator the caller
seeds, so every configuration (and every rank) sees the same data. Kept apart from
:mod:`benchmarks.harness` because it needs torch, which the service-latency benchmark does not load.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trainer.models import transformer_lm
from trainer.models.transformer import CausalSelfAttention

LM_VOCAB = 96
"""Vocabulary of the random-token LM (about the printable characters)."""


@dataclass
class Workload:
    """A model factory, a fixed pool of (input, target) batches and the loss to train on them."""

    name: str
    description: str
    make_model: Callable[[], nn.Module]
    batches: list[tuple[torch.Tensor, torch.Tensor]]

    @staticmethod
    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))

    def micro_batch(self, index: int, rank: int, world: int) -> list[torch.Tensor]:
        """Rank ``rank``'s equal, contiguous slice of batch ``index``."""
        size = self.batches[index][0].shape[0] // world
        return [t[rank * size : (rank + 1) * size].contiguous() for t in self.batches[index]]


def image_batches(
    generator: torch.Generator, batch_size: int, count: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` batches of random CIFAR-shaped images (3x32x32) with labels of 10 classes."""
    return [
        (
            torch.randn(batch_size, 3, 32, 32, generator=generator),
            torch.randint(0, 10, (batch_size,), generator=generator),
        )
        for _ in range(count)
    ]


def token_batches(
    generator: torch.Generator, batch_size: int, seq_len: int, count: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` batches of random token sequences and their next tokens (inputs shifted by one)."""
    batches = []
    for _ in range(count):
        tokens = torch.randint(0, LM_VOCAB, (batch_size, seq_len + 1), generator=generator)
        batches.append((tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()))
    return batches


def written_out_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0, is_causal: bool = False
) -> torch.Tensor:
    """``softmax(q·kᵀ/√d + causal mask)·v`` in plain ops (what the LM did before it used
    ``F.scaled_dot_product_attention``); no dropout."""
    if dropout_p:
        raise ValueError("written-out attention has no dropout")
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    if is_causal:
        future = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    return scores.softmax(dim=-1) @ v


def write_attention_out(model: nn.Module) -> nn.Module:
    """``model`` (the built-in LM) with every attention layer's ``attend`` written out, in place."""
    for module in model.modules():
        if isinstance(module, CausalSelfAttention):
            module.attend = written_out_attention
    return model


def lm_factory(seq_len: int, layers: int, heads: int, embd: int) -> Callable[[], nn.Module]:
    """A factory of the GPT-style LM over :data:`LM_VOCAB` with this shape (a fresh model per call)."""

    def make_lm() -> nn.Module:
        return transformer_lm(
            vocab_size=LM_VOCAB, block_size=seq_len, n_layer=layers, n_head=heads, n_embd=embd
        )

    return make_lm
