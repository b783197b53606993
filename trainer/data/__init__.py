"""Data sets that need no download, and the protocol a user's own data set follows.

The contract that matters for distributed training: the examples of a step are a pure function
of ``(seed, step)``, whatever the number of workers. So a run on 1, 2 or 4 workers sees exactly
the same examples at every step, and a run resumed from a checkpoint at step s continues with
the batch of step s, with no loader state to save.

A data set follows one of two protocols (:func:`rank_batch` tells them apart):

* :class:`Dataset` (*indexed*, what the built-ins follow): the loop computes the example
  indices of the step's global batch from ``(seed, step)`` (:func:`epoch_indices` over
  ``train_size`` examples, or the data set's own ``train_indices``), takes this rank's equal,
  contiguous share of them, and asks the data set for just those: ``train_examples(indices)``.
  Every rank reads only its share of every global batch.
* :class:`GlobalBatchDataset` (the original protocol, still accepted): ``train_batch(step,
  seed, batch_size)`` returns the whole global batch and every rank keeps its own slice; each
  rank then reads (or generates) N times what it uses.

A batch is a tensor, or a tuple, list or dict of tensors (nested; :mod:`trainer.batches`), with
the examples along dim 0. ``task`` says which built-in loss and metrics apply
(``classification``, ``language_model``); ``custom`` (or no ``task``) means the job's spec names
its own loss (``training.loss``).

Built-ins (``build_dataset`` names): ``digits`` (:mod:`trainer.data.digits`),
``synthetic_images`` (:mod:`trainer.data.synthetic_images`) and ``text_chars``
(:mod:`trainer.data.text_chars`). Any other name is an import path ``"package.module:factory"``
whose factory takes the spec's ``data.args`` as keyword arguments and returns a data set.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Literal, Protocol

import torch

from trainer import seeding
from trainer.batches import Batch, BatchError, batch_size, rank_slice
from trainer.spec import BUILTIN_DATASETS, SpecError, check_component_name
from trainer.user_code import call_factory, import_factory

Task = Literal["classification", "language_model", "custom"]
TASKS: tuple[str, ...] = ("classification", "language_model", "custom")
BUILTIN_TASKS: tuple[str, ...] = ("classification", "language_model")
"""Tasks with a built-in loss and metrics; ``custom`` needs ``training.loss``."""

_FACTORIES: dict[str, str] = {
    "digits": "trainer.data.digits:DigitsDataset",
    "synthetic_images": "trainer.data.synthetic_images:SyntheticImages",
    "text_chars": "trainer.data.text_chars:TextChars",
}


class Dataset(Protocol):
    """An indexed training split, loaded a rank's share at a time, and a fixed held-out split.

    ``task`` tells the worker loop which built-in loss and metrics apply: ``classification``
    (batches ``(inputs, labels (B,))``; cross-entropy and accuracy), ``language_model``
    (``(tokens (B, T), next tokens (B, T))``; cross-entropy per token, perplexity) or
    ``custom`` (any batch structure; the spec's ``training.loss`` computes the loss).

    Optional members: ``train_indices(step, seed, batch_size)`` replaces the default sampling
    (shuffled epochs over ``train_size`` examples) and must itself be a pure function of
    ``(seed, step)``; ``model_args()`` defaults to no arguments.
    """

    task: Task
    train_size: int
    """How many training examples there are: ``train_examples`` takes indices below it."""

    def train_examples(self, indices: torch.Tensor) -> Batch:
        """The training examples at ``indices`` (1-D int64), in that order, along dim 0."""
        ...

    def eval_batches(self, batch_size: int) -> Iterator[Batch]:
        """The whole held-out split, in a fixed order, in batches of at most ``batch_size``."""
        ...

    def model_args(self) -> dict[str, Any]:
        """Arguments the matching built-in model needs (e.g. ``num_classes``, ``vocab_size``)."""
        ...


class GlobalBatchDataset(Protocol):
    """The original protocol: every rank builds the whole global batch and keeps its slice."""

    task: Task

    def train_batch(self, step: int, seed: int, batch_size: int) -> Batch:
        """The global batch of ``step``: a pure function of ``(seed, step)``, identical on every worker."""
        ...

    def eval_batches(self, batch_size: int) -> Iterator[Batch]:
        """The whole held-out split, in a fixed order, in batches of at most ``batch_size``."""
        ...


AnyDataset = Dataset | GlobalBatchDataset


def is_indexed(dataset: AnyDataset) -> bool:
    """Whether ``dataset`` loads examples by index (:class:`Dataset`) rather than whole global batches."""
    return callable(getattr(dataset, "train_examples", None))


def dataset_task(dataset: AnyDataset) -> str:
    """The data set's ``task``; ``custom`` when it has none."""
    return getattr(dataset, "task", "custom")


def dataset_model_args(dataset: AnyDataset) -> dict[str, Any]:
    """``dataset.model_args()``, or no arguments when the data set does not define it."""
    model_args = getattr(dataset, "model_args", None)
    return dict(model_args()) if callable(model_args) else {}


def step_indices(dataset: Dataset, step: int, seed: int, batch_size: int) -> torch.Tensor:
    """Example indices of the global batch of ``step`` (the same on every rank and world size)."""
    custom = getattr(dataset, "train_indices", None)
    if callable(custom):
        indices = torch.as_tensor(custom(step, seed, batch_size))
    else:
        indices = epoch_indices(int(dataset.train_size), step, seed, batch_size)
    if indices.shape != (batch_size,) or indices.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"{type(dataset).__name__}.train_indices must return {batch_size} integer indices, "
            f"got a {indices.dtype} tensor of shape {tuple(indices.shape)}"
        )
    return indices.long()


def rank_batch(
    dataset: AnyDataset, step: int, seed: int, global_batch_size: int, rank: int, world: int
) -> Batch:
    """Rank ``rank``'s share of the global batch of ``step``: its contiguous ``1/world`` of the
    examples, in order, so the shares of ranks 0..world-1 concatenate to the global batch.

    An indexed data set loads only these examples; a global-batch one builds the whole batch,
    which is sliced here. Raises ``ValueError`` for a batch of the wrong size or structure.
    """
    share = global_batch_size // world
    name = type(dataset).__name__
    try:
        if is_indexed(dataset):
            indices = step_indices(dataset, step, seed, global_batch_size)[rank * share : (rank + 1) * share]
            batch = dataset.train_examples(indices)
            got, want = batch_size(batch), share
        else:
            whole = dataset.train_batch(step, seed, global_batch_size)
            got, want = batch_size(whole), global_batch_size
            batch = rank_slice(whole, rank, world) if got == want else None
    except BatchError as exc:
        raise ValueError(f"{name}: training batch of step {step}: {exc}") from None
    if got != want:
        method = "train_examples" if is_indexed(dataset) else "train_batch"
        raise ValueError(f"{name}.{method} returned {got} examples for step {step}, expected {want}")
    return batch


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


def build_dataset(name: str, args: Mapping[str, Any] | None = None) -> AnyDataset:
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
    kind = type(dataset).__name__
    has = {m: callable(getattr(dataset, m, None)) for m in ("train_examples", "train_batch", "eval_batches")}
    if not (has["train_examples"] or has["train_batch"]) or not has["eval_batches"]:
        raise SpecError(
            f"{what}: the factory returned a {kind}, which is not a data set: it needs "
            "train_examples(indices) with train_size (or train_batch(step, seed, batch_size)), "
            "and eval_batches(batch_size)"
        )
    if has["train_examples"] and not callable(getattr(dataset, "train_indices", None)):
        size = getattr(dataset, "train_size", None)
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise SpecError(
                f"{what}: a {kind} with train_examples needs train_size, the number of training "
                f"examples (an integer >= 1), or its own train_indices; got {size!r}"
            )
    task = dataset_task(dataset)
    if task not in TASKS:
        raise SpecError(f"{what}: its task must be one of {', '.join(TASKS)}, got {task!r}")
    return dataset
