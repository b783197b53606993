"""Hutchinson estimation of the Hessian diagonal.

The estimator is ``diag(H) ≈ E[z ⊙ (H z)]`` for Rademacher probes ``z``. Everything here is a
small function over lists of tensors so that the single-process optimizer and the sharded one
share it: only *who* computes and *who* receives the products differs between them.

Probes are drawn from a generator re-seeded from ``(seed, hessian_index, param_index, sample)``,
so a given probe is the same on every rank, at every world size and after a resume from a
checkpoint, without any communication.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from trainer.seeding import mix_seed

_PROBE_DOMAIN = 0x70726F6265000000  # "probe"


def probe_seed(seed: int, hessian_index: int, param_index: int, sample: int = 0) -> int:
    """Seed of one probe, a pure function of its key (fits ``torch.Generator.manual_seed``)."""
    return mix_seed(seed, hessian_index, param_index, sample, domain=_PROBE_DOMAIN)


class ProbeSource:
    """Draws the Rademacher probe for a key, one cached generator per device."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self._generators: dict[torch.device, torch.Generator] = {}

    def probe(
        self, like: torch.Tensor, hessian_index: int, param_index: int, sample: int = 0
    ) -> torch.Tensor:
        """A tensor of ±1 shaped like ``like`` (same dtype and device)."""
        device = like.device
        generator = self._generators.get(device)
        if generator is None:
            generator = self._generators[device] = torch.Generator(device=device)
        generator.manual_seed(probe_seed(self.seed, hessian_index, param_index, sample))
        z = torch.randint(0, 2, like.shape, generator=generator, dtype=like.dtype, device=device)
        return z.mul_(2).sub_(1)


def hutchinson_products(
    grads: Sequence[torch.Tensor],
    params: Sequence[torch.Tensor],
    param_indices: Sequence[int],
    probes: ProbeSource,
    hessian_index: int,
    n_samples: int = 1,
) -> list[torch.Tensor]:
    """Signed ``z ⊙ (H z)`` per parameter, averaged over ``n_samples`` probes.

    ``grads`` must carry a graph (from ``torch.autograd.grad(..., create_graph=True)`` or
    ``backward(create_graph=True)``). ``H z`` is one more reverse pass over ``g · z``
    (Pearlmutter's trick). The graph is freed after the last probe.
    """
    # A gradient with no graph is constant in every parameter: its rows of H are zero, so it
    # is left out of the double backward (autograd refuses it) and contributes nothing.
    live = [k for k, g in enumerate(grads) if g.requires_grad]
    if not live:
        return [torch.zeros_like(p) for p in params]
    outputs = [grads[k] for k in live]
    products: list[torch.Tensor] = []
    for sample in range(n_samples):
        zs = [probes.probe(p, hessian_index, i, sample) for p, i in zip(params, param_indices)]
        hzs = torch.autograd.grad(
            outputs,
            params,
            grad_outputs=[zs[k] for k in live],
            retain_graph=sample < n_samples - 1,
            allow_unused=True,
        )
        hzs = [torch.zeros_like(p) if hz is None else hz for hz, p in zip(hzs, params)]
        if sample == 0:
            products = torch._foreach_mul(zs, hzs)
        else:
            torch._foreach_addcmul_(products, zs, hzs)
    if n_samples > 1:
        torch._foreach_div_(products, float(n_samples))
    return products


def hessian_diagonal(
    signed_product: torch.Tensor,
    block_size: int | None = None,
    average_conv_kernel: bool = True,
) -> torch.Tensor:
    """``D = |z ⊙ Hz|`` with the paper's spatial averaging, on one whole tensor.

    Tensors with three or more dimensions are convolution kernels ``(out, in, *spatial)``: with
    ``average_conv_kernel`` their estimate is averaged over the spatial dimensions. One- and
    two-dimensional tensors are averaged over contiguous blocks of ``block_size`` elements of
    their flattened form (a last, shorter block is averaged over its own length).
    Averaging happens *after* ``|·|``, as in the paper.
    """
    d = signed_product.abs()
    if d.dim() >= 3:
        if average_conv_kernel:
            spatial = tuple(range(2, d.dim()))
            d = d.mean(dim=spatial, keepdim=True).expand_as(signed_product)
        return d
    if block_size is None or block_size <= 1 or d.numel() <= 1:
        return d
    flat = d.reshape(-1)
    full = (flat.numel() // block_size) * block_size
    out = torch.empty_like(flat)
    if full:
        out[:full] = flat[:full].view(-1, block_size).mean(dim=1).repeat_interleave(block_size)
    if full < flat.numel():
        out[full:] = flat[full:].mean()
    return out.view_as(signed_product)
