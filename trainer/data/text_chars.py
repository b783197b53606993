"""Character-level language modelling on Python source that ships with Python itself.

Why this corpus: it needs no download and is the same on every machine with the same Python
version. It is the concatenation, in a fixed order, of the ``.py`` files of a fixed list of
standard-library modules (about 0.58 MB with Python 3.11): code, comments and docstrings.

Vocabulary (97 tokens, fixed whatever the text): newline, the 95 printable ASCII characters
(space to ``~``), and one token for everything else (tabs, non-ASCII). The last 10% of the corpus
is the held-out split. Training batches are random windows of ``block_size + 1`` characters from
the first 90%, their starts drawn from a generator keyed by ``(seed, step)`` (``train_indices``);
each rank then cuts out only its own share of the windows (``train_examples``).
"""

from __future__ import annotations

import functools
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.data import generator

CORPUS_MODULES: tuple[str, ...] = (
    "argparse",
    "bisect",
    "calendar",
    "csv",
    "dataclasses",
    "difflib",
    "enum",
    "fnmatch",
    "fractions",
    "functools",
    "heapq",
    "pprint",
    "shlex",
    "statistics",
    "string",
    "textwrap",
)
"""Standard-library modules whose source forms the corpus (all present in Python 3.10-3.13)."""

VOCAB: str = "\n" + "".join(chr(c) for c in range(32, 127))
UNKNOWN: int = len(VOCAB)
VOCAB_SIZE: int = len(VOCAB) + 1
HELD_OUT_FRACTION = 0.1


@functools.lru_cache(maxsize=1)
def corpus_text() -> str:
    """The corpus as one string (read once per process)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts = []
    for module in CORPUS_MODULES:
        path = stdlib / f"{module}.py"
        try:
            parts.append(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise RuntimeError(f"text_chars needs the standard library's {path}: {exc}") from exc
    return "\n".join(parts)


def encode(text: str) -> torch.Tensor:
    """Characters to token ids (int64); anything outside :data:`VOCAB` becomes :data:`UNKNOWN`."""
    table = np.full(128, UNKNOWN, dtype=np.int64)
    for i, char in enumerate(VOCAB):
        table[ord(char)] = i
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    ids = np.where(codes < 128, table[np.minimum(codes, 127)], UNKNOWN)
    return torch.from_numpy(ids)


def decode(ids: torch.Tensor | list[int]) -> str:
    """Token ids back to text (the unknown token shows as U+FFFD)."""
    return "".join(VOCAB[i] if i < UNKNOWN else "\ufffd" for i in torch.as_tensor(ids).tolist())


@functools.lru_cache(maxsize=1)
def _corpus_tokens() -> torch.Tensor:
    return encode(corpus_text())


class TextChars:
    """``text_chars``: next-character prediction over windows of ``block_size`` characters."""

    task = "language_model"

    def __init__(self, block_size: int = 64) -> None:
        if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
            raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}")
        tokens = _corpus_tokens()
        split = int(len(tokens) * (1.0 - HELD_OUT_FRACTION))
        self.train_tokens, self.test_tokens = tokens[:split], tokens[split:]
        if len(self.test_tokens) < block_size + 1:
            raise ValueError(f"block_size {block_size} is longer than the held-out split")
        self.block_size = block_size

    @property
    def train_size(self) -> int:
        """Training examples: the windows' possible start positions."""
        return len(self.train_tokens) - self.block_size

    def train_indices(self, step: int, seed: int, batch_size: int) -> torch.Tensor:
        """Window starts of the global batch of ``step``: uniform, with replacement, keyed by (seed, step)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        return torch.randint(0, self.train_size, (batch_size,), generator=generator(seed, 1, step))

    def train_examples(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-character targets of the windows starting at ``indices``, both (B, block_size)."""
        windows = self.train_tokens[indices[:, None] + torch.arange(self.block_size + 1)]
        return windows[:, :-1], windows[:, 1:]

    def train_batch(self, step: int, seed: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The global batch of ``step`` (what every rank's shares of it concatenate to)."""
        return self.train_examples(self.train_indices(step, seed, batch_size))

    def eval_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Consecutive, non-overlapping windows covering the held-out split, in order."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        count = (len(self.test_tokens) - 1) // self.block_size
        offsets = torch.arange(self.block_size + 1)
        for first in range(0, count, batch_size):
            starts = torch.arange(first, min(first + batch_size, count)) * self.block_size
            windows = self.test_tokens[starts[:, None] + offsets]
            yield windows[:, :-1], windows[:, 1:]

    def model_args(self) -> dict[str, Any]:
        """What ``transformer_lm`` needs."""
        return {"vocab_size": VOCAB_SIZE, "block_size": self.block_size}
