"""Parameter sets of real models, as (name, shape) lists: sizing the sharded optimizer's state and
traffic needs the shapes only, not the model or its weights."""

from __future__ import annotations

import torch


def gpt2_small_shapes() -> list[tuple[str, torch.Size]]:
    """GPT-2 small (124M): 12 layers, d=768, vocabulary 50257 (the embedding, tied to the output
    layer, is 31% of the model), 1024 positions; names as in Hugging Face's ``GPT2Model``."""
    d, vocab, positions, layers = 768, 50257, 1024, 12
    shapes = [("wte.weight", (vocab, d)), ("wpe.weight", (positions, d))]
    for layer in range(layers):
        block = f"h.{layer}"
        shapes += [
            (f"{block}.ln_1.weight", (d,)),
            (f"{block}.ln_1.bias", (d,)),
            (f"{block}.attn.c_attn.weight", (d, 3 * d)),
            (f"{block}.attn.c_attn.bias", (3 * d,)),
            (f"{block}.attn.c_proj.weight", (d, d)),
            (f"{block}.attn.c_proj.bias", (d,)),
            (f"{block}.ln_2.weight", (d,)),
            (f"{block}.ln_2.bias", (d,)),
            (f"{block}.mlp.c_fc.weight", (d, 4 * d)),
            (f"{block}.mlp.c_fc.bias", (4 * d,)),
            (f"{block}.mlp.c_proj.weight", (4 * d, d)),
            (f"{block}.mlp.c_proj.bias", (d,)),
        ]
    shapes += [("ln_f.weight", (d,)), ("ln_f.bias", (d,))]
    return [(name, torch.Size(shape)) for name, shape in shapes]
