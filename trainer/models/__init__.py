"""Built-in models: small nets for digits, ResNet-20 for CIFAR shapes, a small GPT-style LM."""

from trainer.models.resnet import resnet20
from trainer.models.small import cnn, mlp
from trainer.models.transformer import transformer_lm

__all__ = ["cnn", "mlp", "resnet20", "transformer_lm"]
