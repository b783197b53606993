"""Seeds derived from integer keys, identical on every machine and process.

Hessian probes and data order are keyed by tuples such as (seed, step) or (seed, Hessian step,
parameter index); SplitMix64 turns a key into a seed for ``torch.Generator.manual_seed``.
Python's ``hash`` is salted per process and not meant for this. Each user passes its own
``domain`` so that equal keys in different places give independent streams.
"""

from __future__ import annotations

_MASK64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    """One round of SplitMix64: a bijective, well-mixed 64-bit hash."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_seed(*parts: int, domain: int = 0) -> int:
    """A 63-bit seed (``manual_seed`` takes a signed 64-bit value) from ``domain`` and ``parts``."""
    h = splitmix64(domain & _MASK64)
    for part in parts:
        h = splitmix64(h ^ (int(part) & _MASK64))
    return h >> 1


_STEP_DOMAIN = 0x7374657072616E6B  # "steprank"


def seed_step(seed: int, step: int, rank: int) -> None:
    """Seed torch's generators (CPU and every CUDA device) for ``step`` on ``rank``.

    Dropout and any other randomness of the forward pass then differ between ranks (each draws
    its own masks) and are a pure function of (seed, step, rank), so a resumed run draws what the
    uninterrupted one drew without any RNG state in the checkpoint.
    """
    import torch  # the control plane imports this module without torch

    torch.manual_seed(mix_seed(seed, step, rank, domain=_STEP_DOMAIN))
