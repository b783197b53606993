"""Training backends: one training step, whatever runs it (plain torch.distributed, DeepSpeed)."""

from trainer.backends.base import Batch, LossFn, StepStats, TrainingBackend
from trainer.backends.ddp import DDPBackend

__all__ = ["Batch", "DDPBackend", "LossFn", "StepStats", "TrainingBackend"]
