"""The loss and the evaluation metrics, named in the spec as ``training.loss`` and ``training.metrics``.

Both take ``(model, batch)`` with the data set's dict batch. The loss is a *mean over examples*
(what hutch needs for chunked and multi-worker runs to equal one run on the whole batch).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

SMOOTHING = 0.1
CONFIDENCE_PENALTY = 0.05


def loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Label-smoothed cross-entropy minus a small entropy bonus (a confidence penalty)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])["logits"]
    log_probs = F.log_softmax(logits, dim=-1)
    smoothed = F.cross_entropy(logits, batch["labels"], label_smoothing=SMOOTHING, reduction="none")
    entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
    return (smoothed - CONFIDENCE_PENALTY * entropy).mean()


def metrics(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """Accuracy and plain cross-entropy of one held-out batch (means over its examples)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])["logits"]
    labels = batch["labels"]
    return {
        "accuracy": (logits.argmax(dim=-1) == labels).float().mean().item(),
        "cross_entropy": F.cross_entropy(logits, labels).item(),
    }
