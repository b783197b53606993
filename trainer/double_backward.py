"""What a Hessian step needs of the model and the loss: a backward pass that can itself be
differentiated, and a reason people can act on when it cannot.

AdaHessian's Hessian-vector products differentiate the gradient once more, so every operation
in the model and the loss needs a differentiable backward. Most of torch has one. The common
exception is fused attention: ``F.scaled_dot_product_attention`` picks a flash or
memory-efficient kernel by default (on the CPU as on CUDA), and those kernels have no double
backward. Its *math* kernel has one, so :func:`twice_differentiable` runs a Hessian step with
scaled-dot-product attention on that kernel; ordinary steps keep the fused kernels. The worker
loop wraps every backend's Hessian steps in it, so models that call
``F.scaled_dot_product_attention`` (Hugging Face models with their default
``attn_implementation="sdpa"`` among them) train unchanged. The math kernel writes the attention
matrix out, which costs time and memory on Hessian steps only.

The context covers the backward passes too: non-reentrant activation checkpointing
(``torch.utils.checkpoint(..., use_reentrant=False)``) recomputes the forward during backward,
and the recomputation must choose the same kernel as the forward did. Reentrant checkpointing
cannot be differentiated twice at all (nor used with ``torch.autograd.grad``).

What remains, :func:`explain_double_backward` turns into a reason that names the field and the
operation: custom ``autograd.Function``\\ s marked ``@once_differentiable`` or whose backward
leaves autograd, attention kernels called other than through ``F.scaled_dot_product_attention``
(flash-attn, xformers), reentrant checkpointing.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

from torch.nn.attention import SDPBackend, sdpa_kernel


@contextmanager
def twice_differentiable() -> Iterator[None]:
    """Within: ``F.scaled_dot_product_attention`` runs on its math kernel, which has a double
    backward. Enter it around a whole Hessian step (forward and both backward passes)."""
    with sdpa_kernel([SDPBackend.MATH]):
        yield


_REENTRANT = re.compile(r"use_reentrant=True|Checkpointing is not compatible with \.grad\(\)")
_NOT_DIFFERENTIABLE = (
    re.compile(r"derivative for (?P<op>\S+) is not implemented"),
    re.compile(r"(?P<op>)differentiate twice a function that was marked with @once_differentiable"),
    re.compile(r"(?P<op>)does not require grad and does not have a grad_fn"),
)


def explain_double_backward(error: BaseException, field: str) -> str | None:
    """A reason for the job's failure when ``error`` (raised in a Hessian step) is torch refusing
    to differentiate a backward pass; ``None`` for any other error.

    ``field`` is what computes the loss: ``training.loss`` or ``model``.
    """
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if _REENTRANT.search(message):
        return (
            f"{field}: reentrant activation checkpointing (torch.utils.checkpoint with "
            "use_reentrant=True) cannot be differentiated twice, which the Hessian-vector product "
            "needs; pass use_reentrant=False (Hugging Face: gradient_checkpointing_enable("
            "gradient_checkpointing_kwargs={'use_reentrant': False})), or train with a first-order "
            f"optimizer (optimizer.name: adamw): {message}"
        )
    for pattern in _NOT_DIFFERENTIABLE:
        match = pattern.search(message)
        if match is None:
            continue
        op = match.group("op")
        which = f"{op} does" if op else "an operation in the model or the loss does"
        return (
            f"{field}: the Hessian-vector product needs double backward (the gradient is "
            f"differentiated once more), which {which} not support: {message}. Known cases: custom "
            "autograd Functions marked @once_differentiable or whose backward leaves autograd; "
            "attention kernels called directly rather than through F.scaled_dot_product_attention "
            "(which hutch switches to its math kernel on Hessian steps); or train with a "
            "first-order optimizer (optimizer.name: adamw)"
        )
    return None
