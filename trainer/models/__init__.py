"""Models used by the trainer and its benchmarks."""

from trainer.models.resnet import resnet20
from trainer.models.transformer import transformer_lm

__all__ = ["resnet20", "transformer_lm"]
