"""scikit-learn's bundled 8×8 handwritten digits (1,797 real images), with a fixed split."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class DigitsSplit:
    """Images as (N, 1, 8, 8) float32 in [0, 1] and integer labels, for train and test."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def load_digits_split(test_fraction: float = 0.2, split_seed: int = 0) -> DigitsSplit:
    """The same split on every machine: a permutation from ``split_seed``, not the run's seed."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy((bunch.images / 16.0).astype(np.float32)).unsqueeze(1)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(split_seed))
    n_test = round(len(labels) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return DigitsSplit(images[train], labels[train], images[test], labels[test])
