"""The learning-rate schedule: a linear warm-up, then a constant, linear or cosine decay to a floor.

The spec's optimizer section chooses it (:meth:`trainer.spec.OptimizerSpec.lr_at` asks here);
the workers, the demo and the study set each step's learning rate from it. Plain arithmetic
without torch, because the control plane imports the spec and so this module.
"""

from __future__ import annotations

import math
from typing import Literal

ScheduleName = Literal["constant", "cosine", "linear"]


def scheduled_lr(
    step: int,
    total_steps: int,
    *,
    lr: float,
    warmup_steps: int,
    schedule: ScheduleName,
    min_lr_ratio: float,
) -> float:
    """Learning rate of the update made after ``step`` completed steps (``0 <= step``).

    With ``W = warmup_steps``, ``T = total_steps`` and ``lr_min = lr * min_lr_ratio``:

    - warm-up, ``step < W``: ``lr * (step + 1) / W`` (linear, reaching ``lr`` at ``W - 1``);
    - then, with ``p = clamp((step - W) / (T - W), 0, 1)``:
      ``constant``: ``lr``; ``linear``: ``lr_min + (lr - lr_min) * (1 - p)``;
      ``cosine``: ``lr_min + (lr - lr_min) * (1 + cos(pi * p)) / 2``.

    So the decay starts at ``lr`` right after warm-up and reaches ``lr_min`` at ``step = T``.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    decay_steps = total_steps - warmup_steps
    progress = 1.0 if decay_steps <= 0 else min(1.0, (step - warmup_steps) / decay_steps)
    lr_min = lr * min_lr_ratio
    if schedule == "linear":
        return lr_min + (lr - lr_min) * (1.0 - progress)
    return lr_min + (lr - lr_min) * 0.5 * (1.0 + math.cos(math.pi * progress))
