"""scikit-learn's bundled 8×8 handwritten digits (1,797 real images), with a fixed split."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.data import epoch_indices, ordered_batches


@dataclass(frozen=True)
class DigitsSplit:
    """Images as (N, 1, 8, 8) float32 in [0, 1] and integer labels, for train and test."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as (N, 8, 8) pixel counts 0-16 and labels.

    The bundled CSV is read straight from scikit-learn's installed files when it is where it has
    always been: importing ``sklearn.datasets`` costs ~1.7 s of CPU, paid by every worker of
    every digits job at start-up. Elsewhere, ``load_digits`` itself (the test suite checks that
    both give the same arrays)."""
    found = importlib.util.find_spec("sklearn")  # locates the package without importing it
    bundled = (
        Path(found.origin).parent / "datasets" / "data" / "digits.csv.gz" if found and found.origin else None
    )
    if bundled is not None and bundled.is_file():
        table = np.loadtxt(bundled, delimiter=",")
        return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images, bunch.target


def load_digits_split(test_fraction: float = 0.2, split_seed: int = 0) -> DigitsSplit:
    """The same split on every machine: a permutation from ``split_seed``, not the run's seed."""
    pixels, target = _digits_arrays()
    images = torch.from_numpy((pixels / 16.0).astype(np.float32)).unsqueeze(1)
    labels = torch.from_numpy(target.astype(np.int64))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(split_seed))
    n_test = round(len(labels) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return DigitsSplit(images[train], labels[train], images[test], labels[test])


class DigitsDataset:
    """The digits split as a :class:`trainer.data.Dataset`: 10-way classification of (1, 8, 8) images.

    1,438 training and 359 held-out images with the defaults; training batches walk through
    shuffled epochs (:func:`trainer.data.epoch_indices`).
    """

    task = "classification"

    def __init__(self, test_fraction: float = 0.2, split_seed: int = 0) -> None:
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
        self.split = load_digits_split(test_fraction, split_seed)

    @property
    def train_size(self) -> int:
        """Training images (1,438 with the defaults)."""
        return len(self.split.train_y)

    def train_examples(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (len(indices), 1, 8, 8) float32 and their labels int64."""
        return self.split.train_x[indices], self.split.train_y[indices]

    def train_batch(self, step: int, seed: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The global batch of ``step`` (what every rank's shares of it concatenate to)."""
        return self.train_examples(epoch_indices(self.train_size, step, seed, batch_size))

    def eval_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The held-out images in a fixed order."""
        return ordered_batches(self.split.test_x, self.split.test_y, batch_size)

    def model_args(self) -> dict[str, Any]:
        """What ``mlp`` (flattened 64 inputs) and ``cnn`` (one channel) need."""
        return {"in_features": 64, "in_channels": 1, "num_classes": 10}
