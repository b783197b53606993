"""Data sets that need no download: real data that packages ship, or generated data.

Every data set follows :class:`Dataset`. The contract that matters for distributed training:
``train_batch(step, seed, batch_size)`` returns the *global* batch of a step and is a pure
function of ``(seed, step)``. Every worker computes the same global batch and takes its own
slice, so a run on 1, 2 or 4 workers sees exactly the same examples at every step, and a run
resumed from a checkpoint at step s continues with the batch of step s, with no loader state to
save.

Built-ins (``build_dataset`` names): ``digits`` (:mod:`trainer.data.digits`),
``synthetic_images`` (:mod:`trainer.data.synthetic_images`) and ``text_chars``
(:mod:`trainer.data.text_chars`). Any other name is an import path ``"package.module:factory"``
whose factory takes the spec's ``data.args`` as keyword arguments and returns a :class:`Dataset`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Literal, Protocol

import torch

from trainer import seeding
from trainer.spec import BUILTIN_DATASETS, SpecError, call_factory, check_component_name, import_factory

Task = Literal["classification", "language_model"]
TASKS: tuple[str, ...] = ("classification", "language_model")

_FACTORIES: dict[str, str] = {
    "digits": "trainer.data.digits:DigitsDataset",
    "synthetic_images": "trainer.data.synthetic_images:SyntheticImages",
    "text_chars": "trainer.data.text_chars:TextChars",
}


class Dataset(Protocol):
    """A training split sampled by step and a fixed held-out split.

    ``task`` tells the worker loop which loss and metrics apply: ``classification`` (inputs,
    integer labels ``(B,)``; cross-entropy and accuracy) or ``language_model`` (tokens ``(B, T)``,
    next tokens ``(B, T)``; cross-entropy per token).
    """

    task: Task

    def train_batch(self, step: int, seed: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The global batch of ``step``: a pure function of ``(seed, step)``, identical on every worker."""
        ...

    def eval_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The whole held-out split, in a fixed order, in batches of at most ``batch_size``."""
        ...

    def model_args(self) -> dict[str, Any]:
        """Arguments the matching built-in model needs (e.g. ``num_classes``, ``vocab_size``)."""
        ...


# -- deterministic sampling ------------------------------------------------------------------

_DATA_DOMAIN = 0x6461746100000000  # "data": keeps these streams apart from the optimizer's probes


def mix_seed(*parts: int) -> int:
    """The seed of a data stream keyed by ``parts`` (see :mod:`trainer.seeding`)."""
    return seeding.mix_seed(*parts, domain=_DATA_DOMAIN)


def generator(*parts: int) -> torch.Generator:
    """A CPU generator seeded by :func:`mix_seed` of ``parts``."""
    return torch.Generator().manual_seed(mix_seed(*parts))


def epoch_indices(num_examples: int, step: int, seed: int, batch_size: int) -> torch.Tensor:
    """Example indices of the global batch of ``step``: epochs of shuffled, non-repeating examples.

    The stream of indices is the concatenation of one permutation per epoch (seeded by
    ``(seed, epoch)``); step ``s`` takes positions ``s*B .. s*B+B-1`` of it. So every example is
    seen once per epoch, and the batch is still a pure function of ``(seed, step)``.
    """
    _check_batch_size(batch_size)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    first = step * batch_size
    positions = torch.arange(first, first + batch_size, dtype=torch.int64)
    epochs = positions // num_examples
    out = torch.empty(batch_size, dtype=torch.int64)
    for epoch in range(int(epochs[0]), int(epochs[-1]) + 1):
        order = torch.randperm(num_examples, generator=generator(seed, 0, epoch))
        mask = epochs == epoch
        out[mask] = order[positions[mask] % num_examples]
    return out


def ordered_batches(
    inputs: torch.Tensor, targets: torch.Tensor, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(inputs, targets)`` in their stored order, ``batch_size`` at a time (the last may be short)."""
    _check_batch_size(batch_size)
    for start in range(0, len(targets), batch_size):
        yield inputs[start : start + batch_size], targets[start : start + batch_size]


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


# -- building from a spec ----------------------------------------------------------------------


def build_dataset(name: str, args: Mapping[str, Any] | None = None) -> Dataset:
    """The data set a spec's ``data`` section names; raises :class:`~trainer.spec.SpecError`.

    ``name`` is a built-in or ``"package.module:factory"``; ``args`` are the factory's keyword
    arguments. Errors say what failed: a malformed path, a failed import, a missing or
    non-callable attribute, arguments the factory rejects, or a result that is not a data set.
    """
    what = f"data set {name!r}"
    try:
        check_component_name(name, "data set", BUILTIN_DATASETS)
    except ValueError as exc:
        raise SpecError(f"{what}: {exc}") from None
    factory = import_factory(_FACTORIES.get(name, name), what)
    dataset = call_factory(factory, args or {}, {}, what)
    methods = ("train_batch", "eval_batches", "model_args")
    missing = [m for m in methods if not callable(getattr(dataset, m, None))]
    if missing:
        kind = type(dataset).__name__
        raise SpecError(f"{what}: the factory returned a {kind} without {', '.join(missing)}")
    task = getattr(dataset, "task", None)
    if task not in TASKS:
        raise SpecError(f"{what}: its task must be one of {', '.join(TASKS)}, got {task!r}")
    return dataset
