"""A small GPT-style causal language model (decoder-only transformer).

Token and learned position embeddings, ``n_layer`` pre-LayerNorm blocks of causal
self-attention and a GELU MLP, a final LayerNorm and a linear head tied to the token
embedding. Attention is :func:`torch.nn.functional.scaled_dot_product_attention` with
``is_causal``: its fused kernels on ordinary steps, its math kernel on Hessian steps (the fused
ones have no double backward; :mod:`trainer.double_backward`).

``checkpoint_activations`` recomputes each block's activations in the backward pass instead of
keeping them (``torch.utils.checkpoint``, non-reentrant, which can be differentiated twice):
less memory for one more forward per block, and the same parameters as without it.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention (fused QKV projection, scaled-dot-product attention).

    ``attend`` computes the attention itself, ``F.scaled_dot_product_attention``'s signature; a
    benchmark replaces it on an instance to compare against attention written out.
    """

    attend = staticmethod(F.scaled_dot_product_attention)

    def __init__(self, n_embd: int, n_head: int, dropout: float) -> None:
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd={n_embd} must be divisible by n_head={n_head}")
        self.n_head = n_head
        self.dropout = dropout
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        dropout = self.dropout if self.training else 0.0
        y = self.attend(q, k, v, dropout_p=dropout, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_drop(self.proj(y))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, n_embd: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout)
        self.ln2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TransformerLM(nn.Module):
    """Decoder-only LM: ``forward(idx (B, T)) -> logits (B, T, vocab_size)`` with ``T <= block_size``."""

    def __init__(
        self,
        vocab_size: int,
        block_size: int,
        n_layer: int,
        n_head: int,
        n_embd: int,
        dropout: float,
        checkpoint_activations: bool = False,
    ) -> None:
        super().__init__()
        self.block_size = block_size
        self.checkpoint_activations = checkpoint_activations
        self.tok_emb = nn.Embedding(vocab_size, n_embd)
        self.pos_emb = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight  # weight tying
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        """GPT-2 style init: N(0, 0.02) weights, zero biases."""
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        seq_len = idx.shape[1]
        if seq_len > self.block_size:
            raise ValueError(f"sequence length {seq_len} exceeds block_size {self.block_size}")
        pos = torch.arange(seq_len, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        for block in self.blocks:
            if self.checkpoint_activations and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.head(self.ln_f(x))


def transformer_lm(
    vocab_size: int = 96,
    block_size: int = 64,
    n_layer: int = 2,
    n_head: int = 4,
    n_embd: int = 128,
    dropout: float = 0.0,
    checkpoint_activations: bool = False,
) -> nn.Module:
    """A small GPT-style LM (about 0.4 M parameters with the defaults); ``checkpoint_activations``
    recomputes each block in the backward pass (see the module docstring)."""
    return TransformerLM(vocab_size, block_size, n_layer, n_head, n_embd, dropout, checkpoint_activations)
