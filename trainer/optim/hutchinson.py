"""Hutchinson estimation of the Hessian diagonal.

The estimator is ``diag(H) ≈ E[z ⊙ (H z)]`` for Rademacher probes ``z``. Everything here is a
small function over lists of tensors so that the single-process optimizer and the sharded one
share it: only *who* computes and *who* receives the products differs between them.

Probes are drawn from a generator re-seeded from ``(seed, hessian_index, key, sample)``, where
``key`` is :func:`param_key` of the parameter's name, so a given probe is the same on every rank,
at every world size, on every data-parallel path, after a resume from a checkpoint and after
other parameters were frozen, without any communication.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

from trainer.optim.partition import unit_mean_abs
from trainer.seeding import mix_seed

_PROBE_DOMAIN = 0x70726F6265000000  # "probe"


def param_key(name: str) -> int:
    """The probe key of a parameter: a stable 64-bit digest of its name."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")


def probe_seed(seed: int, hessian_index: int, key: int, sample: int = 0) -> int:
    """Seed of one probe, a pure function of its key (fits ``torch.Generator.manual_seed``)."""
    return mix_seed(seed, hessian_index, key, sample, domain=_PROBE_DOMAIN)


class ProbeSource:
    """Draws the Rademacher probe for a key, one cached generator per device."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self._generators: dict[torch.device, torch.Generator] = {}

    def probe(self, like: torch.Tensor, hessian_index: int, key: int, sample: int = 0) -> torch.Tensor:
        """A tensor of ±1 shaped like ``like`` (same dtype and device)."""
        device = like.device
        generator = self._generators.get(device)
        if generator is None:
            generator = self._generators[device] = torch.Generator(device=device)
        generator.manual_seed(probe_seed(self.seed, hessian_index, key, sample))
        z = torch.randint(0, 2, like.shape, generator=generator, dtype=like.dtype, device=device)
        return z.mul_(2).sub_(1)


def hutchinson_products(
    grads: Sequence[torch.Tensor],
    params: Sequence[torch.Tensor],
    keys: Sequence[int],
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
        zs = [probes.probe(p, hessian_index, key, sample) for p, key in zip(params, keys)]
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


def hessian_diagonal(signed_product: torch.Tensor, unit: int = 1) -> torch.Tensor:
    """``D = |z ⊙ Hz|`` of one whole tensor, averaged over consecutive blocks of ``unit`` elements
    of its flattened form (:func:`trainer.optim.partition.averaging_unit` says which unit a
    parameter has: its spatial block for a convolution kernel, ``spatial_average_block_size``
    otherwise). Averaging happens *after* ``|·|``, as in the paper."""
    return unit_mean_abs(signed_product.reshape(-1), unit).view_as(signed_product)
