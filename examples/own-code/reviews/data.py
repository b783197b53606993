"""Synthetic "reviews": variable-length token sequences with a sentiment label.

Each review is 4 to 16 tokens from a 40-token vocabulary: ids 2-9 are positive words, 10-17
negative ones, 18-39 neutral; 0 is padding and 1 a start token. The label is 1 when a review
has more positive than negative words (reviews with a tie are redrawn). Review ``i`` of a split
is generated from its own seed, so any review can be loaded alone: the data set follows
hutch's indexed protocol (``train_size`` and ``train_examples(indices)``), and each worker
generates only its share of every batch.

Batches are dicts, as a Hugging Face tokenizer would give them:
``{"input_ids": (B, 16) int64, "attention_mask": (B, 16) bool, "labels": (B,) int64}``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

MAX_LEN = 16
VOCAB_SIZE = 40
PAD, START = 0, 1
POSITIVE = range(2, 10)
NEGATIVE = range(10, 18)


def review(seed: int, split: int, index: int) -> tuple[torch.Tensor, int]:
    """Tokens (without padding) and the label of one review, a pure function of its key."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + split * 7_919 + index)
    while True:
        length = int(torch.randint(3, MAX_LEN, (1,), generator=g))
        words = torch.randint(2, VOCAB_SIZE, (length,), generator=g)
        good = sum(int((words == w).sum()) for w in POSITIVE)
        bad = sum(int((words == w).sum()) for w in NEGATIVE)
        if good != bad:
            return torch.cat([torch.tensor([START]), words]), int(good > bad)


def collate(reviews: list[tuple[torch.Tensor, int]]) -> dict[str, torch.Tensor]:
    """Pad to ``MAX_LEN``: input ids, the mask of real tokens, labels."""
    ids = torch.full((len(reviews), MAX_LEN), PAD, dtype=torch.int64)
    for row, (tokens, _) in enumerate(reviews):
        ids[row, : len(tokens)] = tokens
    labels = torch.tensor([label for _, label in reviews], dtype=torch.int64)
    return {"input_ids": ids, "attention_mask": ids != PAD, "labels": labels}


class Reviews:
    """``num_train`` training and ``num_test`` held-out reviews (``data.args`` in the spec)."""

    task = "custom"  # the spec's training.loss computes the loss

    def __init__(self, num_train: int = 20_000, num_test: int = 1_000, seed: int = 0) -> None:
        self.train_size, self.num_test, self.seed = num_train, num_test, seed

    def train_examples(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """The training reviews at ``indices``: only these are generated."""
        return collate([review(self.seed, 0, i) for i in indices.tolist()])

    def eval_batches(self, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        """The held-out reviews in order."""
        for start in range(0, self.num_test, batch_size):
            stop = min(start + batch_size, self.num_test)
            yield collate([review(self.seed, 1, i) for i in range(start, stop)])

    def model_args(self) -> dict[str, int]:
        """What :func:`reviews.model.encoder` needs to fit the data."""
        return {"vocab_size": VOCAB_SIZE, "max_len": MAX_LEN}
