"""A tiny Hugging Face-style encoder: ``model(input_ids=…, attention_mask=…)`` returns a dict
with ``logits``, like a ``…ForSequenceClassification`` model.

One self-attention layer with the attention written out (softmax of q·kᵀ), to show every step;
``F.scaled_dot_product_attention`` trains just as well (hutch runs AdaHessian's Hessian steps on
its math kernel, which can be differentiated twice; see hutch's README).
"""

from __future__ import annotations

import math

import torch
from torch import nn


class TinyEncoder(nn.Module):
    """Token + position embeddings, one masked self-attention block, masked mean pooling, a head."""

    def __init__(self, vocab_size: int, max_len: int, dim: int = 32, num_labels: int = 2) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, dim)
        self.positions = nn.Embedding(max_len, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        mask = attention_mask.bool()
        x = self.tokens(input_ids) + self.positions(torch.arange(input_ids.size(1), device=input_ids.device))
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        scores = (q @ k.transpose(1, 2)) / math.sqrt(q.size(-1))
        scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
        x = self.norm(x + torch.softmax(scores, dim=-1) @ v)
        weights = mask.unsqueeze(-1).to(x.dtype)
        pooled = (x * weights).sum(dim=1) / weights.sum(dim=1)
        return {"logits": self.head(pooled)}


def encoder(vocab_size: int, max_len: int, dim: int = 32) -> TinyEncoder:
    """The factory the spec names (``model.name: reviews.model:encoder``)."""
    return TinyEncoder(vocab_size, max_len, dim)
