"""Training backends: one training step, whatever runs it (plain torch.distributed, DeepSpeed).

Importing them needs no DeepSpeed: :class:`DeepSpeedBackend` imports it when one is built.
"""

from trainer.backends.base import Batch, LossFn, StepStats, TrainingBackend
from trainer.backends.ddp import DDPBackend
from trainer.backends.deepspeed import DeepSpeedBackend

__all__ = ["Batch", "DDPBackend", "DeepSpeedBackend", "LossFn", "StepStats", "TrainingBackend"]
