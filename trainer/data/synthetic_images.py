"""CIFAR-shaped synthetic images (3, 32, 32) labelled by a fixed random teacher network.

Why: ResNet-20 runs need CIFAR-sized inputs, and nothing may be downloaded. Pure noise with
random labels cannot be learned; here each image is smooth random structure (Gaussian noise at
8x8 and 16x16, upsampled bilinearly and mixed), and its label is the argmax of a fixed random
"teacher": 16 random 3x3 filters on the image at half resolution, ReLU, global average pooling,
standardised features, a random linear head, plus per-class offsets that make the classes about
equally frequent. The teacher is translation invariant, like a CNN with global pooling, so a CNN
can learn it.

Every image is generated on demand from its own seed ``(data_seed, split, index)``: nothing is
stored per example, so ``num_train`` can be CIFAR-sized (50,000) or larger at no memory cost,
and example ``i`` is the same whatever the split sizes. The teacher's standardisation and class
offsets come from a fixed calibration sample of 2,048 images (computed on first use, in about a
second). Labels are computed in float64 so that near-ties cannot flip between machines.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from trainer.data import epoch_indices, generator, mix_seed

IMAGE_SHAPE = (3, 32, 32)
_TRAIN, _TEST, _TEACHER, _CALIBRATION = 0, 1, 2, 3  # sub-streams of data_seed
_TEACHER_CHANNELS = 16
_CALIBRATION_SIZE = 2048
_CHUNK = 512


def _balancing_bias(logits: torch.Tensor, iterations: int = 200) -> torch.Tensor:
    """Per-class offsets that make ``argmax(logits + bias)`` close to uniform over the classes."""
    count, classes = logits.shape
    target = torch.tensor(count / classes + 1.0, dtype=logits.dtype).log()
    bias = torch.zeros(classes, dtype=logits.dtype)
    for _ in range(iterations):
        counts = torch.bincount((logits + bias).argmax(dim=1), minlength=classes).to(logits.dtype)
        bias -= 0.1 * (torch.log(counts + 1.0) - target)
    return bias


def _images(data_seed: int, split: int, indices: torch.Tensor) -> torch.Tensor:
    """Images (len(indices), 3, 32, 32) float64 with roughly unit variance per pixel."""
    g = torch.Generator()
    coarse = torch.empty(len(indices), 3, 8, 8, dtype=torch.float64)
    fine = torch.empty(len(indices), 3, 16, 16, dtype=torch.float64)
    for row, index in enumerate(indices.tolist()):
        g.manual_seed(mix_seed(data_seed, split, index))
        coarse[row] = torch.randn(3, 8, 8, generator=g, dtype=torch.float64)
        fine[row] = torch.randn(3, 16, 16, generator=g, dtype=torch.float64)
    size = IMAGE_SHAPE[1:]
    up = F.interpolate(coarse, size=size, mode="bilinear", align_corners=False)
    up_fine = F.interpolate(fine, size=size, mode="bilinear", align_corners=False)
    return up * 1.6 + up_fine * 0.8


def _features(images: torch.Tensor, conv_w: torch.Tensor, conv_b: torch.Tensor) -> torch.Tensor:
    """Teacher features: at half resolution (the images are smooth), 4x cheaper than at full."""
    return F.relu(F.conv2d(F.avg_pool2d(images, 2), conv_w, conv_b, padding=1)).mean(dim=(2, 3))


@functools.lru_cache(maxsize=8)
def _calibrated_teacher(data_seed: int, num_classes: int) -> dict[str, torch.Tensor]:
    """Filters, feature mean/std, head and class offsets, from a fixed calibration sample."""
    g = generator(data_seed, _TEACHER)
    f64 = torch.float64
    conv_w = torch.randn(_TEACHER_CHANNELS, 3, 3, 3, generator=g, dtype=f64) / 27**0.5
    conv_b = 0.5 * torch.randn(_TEACHER_CHANNELS, generator=g, dtype=f64)
    head = torch.randn(num_classes, _TEACHER_CHANNELS, generator=g, dtype=f64)
    features = _features(_images(data_seed, _CALIBRATION, torch.arange(_CALIBRATION_SIZE)), conv_w, conv_b)
    mean, std = features.mean(dim=0), features.std(dim=0).clamp_min(1e-6)
    bias = _balancing_bias(((features - mean) / std) @ head.T)
    return {"conv_w": conv_w, "conv_b": conv_b, "mean": mean, "std": std, "head": head, "bias": bias}


class SyntheticImages:
    """``synthetic_images``: ``num_train``/``num_test`` images in ``num_classes`` teacher-given classes."""

    task = "classification"

    def __init__(
        self, num_train: int = 5000, num_test: int = 1000, num_classes: int = 10, data_seed: int = 0
    ) -> None:
        checks = (("num_train", num_train, 1), ("num_test", num_test, 1), ("num_classes", num_classes, 2))
        for arg, value, low in checks:
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{arg} must be an integer >= {low}, got {value!r}")
        self.num_train = num_train
        self.num_test = num_test
        self.num_classes = num_classes
        self.data_seed = int(data_seed)
        self._teacher: dict[str, torch.Tensor] | None = None
        self._test: tuple[torch.Tensor, torch.Tensor] | None = None

    # -- generation -------------------------------------------------------------------------

    def _teacher_params(self) -> dict[str, torch.Tensor]:
        """The teacher, calibrated on first use (and shared by instances with the same seed and classes)."""
        if self._teacher is None:
            self._teacher = _calibrated_teacher(self.data_seed, self.num_classes)
        return self._teacher

    def _examples(self, split: int, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images as float32 and their teacher labels as int64."""
        t = self._teacher_params()
        images = _images(self.data_seed, split, indices)
        features = _features(images, t["conv_w"], t["conv_b"])
        logits = ((features - t["mean"]) / t["std"]) @ t["head"].T + t["bias"]
        return images.float(), logits.argmax(dim=1)

    # -- Dataset protocol -------------------------------------------------------------------

    @property
    def train_size(self) -> int:
        """``num_train``."""
        return self.num_train

    def train_examples(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (len(indices), 3, 32, 32) float32 and labels int64, generated for just these indices."""
        return self._examples(_TRAIN, indices)

    def train_batch(self, step: int, seed: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The global batch of ``step`` (what every rank's shares of it concatenate to)."""
        return self.train_examples(epoch_indices(self.num_train, step, seed, batch_size))

    def eval_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The held-out images in a fixed order (generated once, then kept: 12 MB per 1,000)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if self._test is None:
            chunks = [
                self._examples(_TEST, torch.arange(i, min(i + _CHUNK, self.num_test)))
                for i in range(0, self.num_test, _CHUNK)
            ]
            self._test = torch.cat([x for x, _ in chunks]), torch.cat([y for _, y in chunks])
        images, labels = self._test
        for start in range(0, self.num_test, batch_size):
            yield images[start : start + batch_size], labels[start : start + batch_size]

    def model_args(self) -> dict[str, Any]:
        """What ``resnet20`` (and ``cnn``) need."""
        return {"num_classes": self.num_classes, "in_channels": 3}

    def class_counts(self, split: str = "train") -> torch.Tensor:
        """How many examples of each class a split has (generates the whole split: for checks)."""
        stream, size = (_TRAIN, self.num_train) if split == "train" else (_TEST, self.num_test)
        counts = torch.zeros(self.num_classes, dtype=torch.int64)
        for i in range(0, size, _CHUNK):
            _, labels = self._examples(stream, torch.arange(i, min(i + _CHUNK, size)))
            counts += torch.bincount(labels, minlength=self.num_classes)
        return counts
