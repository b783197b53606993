"""Batches of any structure: a tensor, or tuples, lists and dicts of them (nested).

A batch is whatever a data set returns and a loss function takes: ``(images, labels)``, a
Hugging Face-style ``{"input_ids": …, "attention_mask": …, "labels": …}``, or nestings of
those. The training loop needs four things from it, and does them the same way whatever the
structure, so no code downstream has to know it:

* its number of examples: the length along dim 0, which every tensor of the batch must share;
* a slice of examples (a rank's share of the global batch, a chunk of a rank's share): the
  same rows of every tensor;
* the concatenation of batches of the same structure (to build a global batch from pieces);
* a move to the model's device, floating tensors also to the model's dtype (bf16 under
  DeepSpeed), integer and boolean tensors (token ids, masks) keeping theirs.

Leaves that are not tensors (a string, a number, ``None``) and 0-dim tensors are constants of
the batch: they are passed unchanged to every slice and not counted as examples. Containers
keep their type: a tuple stays a tuple (a named tuple stays that named tuple), a list a list,
and any mapping becomes a ``dict``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

Batch = Any
"""A tensor, or a tuple, list or mapping of batches (see the module docstring)."""


class BatchError(ValueError):
    """A batch whose structure the loop cannot split (the message names the offending part)."""


def map_tensors(fn: Callable[[torch.Tensor], Any], batch: Batch) -> Batch:
    """``batch`` with every tensor ``t`` replaced by ``fn(t)``, same structure, constants as they are."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return {key: map_tensors(fn, value) for key, value in batch.items()}
    if isinstance(batch, tuple):
        items = [map_tensors(fn, value) for value in batch]
        return type(batch)(*items) if hasattr(batch, "_fields") else tuple(items)
    if isinstance(batch, list):
        return [map_tensors(fn, value) for value in batch]
    return batch


def _tensors(batch: Batch, path: str = "batch") -> list[tuple[str, torch.Tensor]]:
    """``(path, tensor)`` for every tensor with at least one dimension, in a fixed order."""
    if isinstance(batch, torch.Tensor):
        return [(path, batch)] if batch.dim() > 0 else []
    if isinstance(batch, Mapping):
        return [pair for key, value in batch.items() for pair in _tensors(value, f"{path}[{key!r}]")]
    if isinstance(batch, (tuple, list)):
        return [pair for i, value in enumerate(batch) for pair in _tensors(value, f"{path}[{i}]")]
    return []


def batch_size(batch: Batch) -> int:
    """The number of examples: the common length along dim 0; raises :class:`BatchError`."""
    tensors = _tensors(batch)
    if not tensors:
        raise BatchError(f"a batch must hold at least one tensor with a batch dimension, got {_kind(batch)}")
    first_path, first = tensors[0]
    for path, tensor in tensors[1:]:
        if len(tensor) != len(first):
            raise BatchError(
                f"the tensors of a batch must share dim 0 (the examples): {first_path} has "
                f"{len(first)}, {path} has {len(tensor)}"
            )
    return len(first)


def slice_batch(batch: Batch, start: int, stop: int) -> Batch:
    """Examples ``start:stop`` of the batch (rows of every tensor; views, no copy)."""
    return map_tensors(lambda t: t[start:stop] if t.dim() > 0 else t, batch)


def split_batch(batch: Batch, chunk_size: int | None) -> list[Batch]:
    """Consecutive chunks of at most ``chunk_size`` examples (the whole batch if ``None``)."""
    size = batch_size(batch)
    if chunk_size is None or chunk_size >= size:
        return [batch]
    return [slice_batch(batch, start, start + chunk_size) for start in range(0, size, chunk_size)]


def rank_slice(batch: Batch, rank: int, world: int) -> Batch:
    """Rank ``rank``'s equal share of a global batch (``world`` must divide its size)."""
    size = batch_size(batch)
    if size % world:
        raise BatchError(f"a batch of {size} examples does not split evenly over {world} ranks")
    share = size // world
    return slice_batch(batch, rank * share, (rank + 1) * share)


def concat_batches(batches: Sequence[Batch]) -> Batch:
    """Batches of the same structure joined along dim 0 (constants taken from the first)."""
    first = batches[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(list(batches)) if first.dim() > 0 else first
    if isinstance(first, Mapping):
        return {key: concat_batches([b[key] for b in batches]) for key in first}
    if isinstance(first, tuple):
        items = [concat_batches([b[i] for b in batches]) for i in range(len(first))]
        return type(first)(*items) if hasattr(first, "_fields") else tuple(items)
    if isinstance(first, list):
        return [concat_batches([b[i] for b in batches]) for i in range(len(first))]
    return first


def to_device(batch: Batch, device: torch.device | str, dtype: torch.dtype | None = None) -> Batch:
    """Every tensor onto ``device``; floating ones also to ``dtype`` (the model's) if given."""

    def move(tensor: torch.Tensor) -> torch.Tensor:
        if dtype is not None and tensor.is_floating_point():
            return tensor.to(device, dtype)
        return tensor.to(device)

    return map_tensors(move, batch)


def _kind(batch: Batch) -> str:
    if isinstance(batch, torch.Tensor):
        return "a 0-dim tensor"
    if isinstance(batch, Mapping):
        return f"a mapping with keys {sorted(map(str, batch))}" if batch else "an empty mapping"
    return f"a {type(batch).__name__}"


def take_rows(batch: Batch, rows: torch.Tensor) -> Batch:
    """The examples at ``rows`` (an index tensor) of every tensor of the batch, in that order."""
    return map_tensors(lambda t: t[rows.to(t.device)] if t.dim() > 0 else t, batch)


def curvature_rows(start: int, stop: int, global_size: int, fraction: float) -> torch.Tensor:
    """Which examples of positions ``start:stop`` of a global batch of ``global_size`` the
    Hutchinson products use, as offsets from ``start``: position j is chosen when
    ``⌊(j+1)·f⌋ > ⌊j·f⌋``, which spreads ``⌊global_size·f⌋`` examples evenly over the batch and
    depends only on the position, so every world size and chunking chooses the same ones."""
    positions = torch.arange(start, min(stop, global_size), dtype=torch.float64)
    chosen = torch.floor((positions + 1) * fraction) > torch.floor(positions * fraction)
    return torch.nonzero(chosen).flatten()


def curvature_count(global_size: int, fraction: float) -> int:
    """How many examples of a global batch the Hutchinson products use (see :func:`curvature_rows`)."""
    return len(curvature_rows(0, global_size, global_size, fraction))


@dataclass(frozen=True)
class StepChunk:
    """One chunk of a rank's micro-batch: its examples and loss weight (its share of the
    micro-batch), and the examples of it the Hutchinson products use with the weight of their
    mean loss (the chunk itself and the same weight when every example is used; None and 0 when
    none of its examples is)."""

    batch: Batch
    weight: float
    curvature: Batch | None
    curvature_weight: float


def step_chunks(
    batch: Batch, chunk_size: int | None, rank: int = 0, world: int = 1, hessian_fraction: float = 1.0
) -> list[StepChunk]:
    """The chunks of rank ``rank``'s equal, contiguous share of a global batch, with the examples
    the Hutchinson products use (:func:`curvature_rows` of the whole global batch). The
    curvature weights make the group average of the products that of the chosen examples' mean
    loss, at any world size and chunking."""
    size = batch_size(batch)
    global_size, offset = size * world, rank * size
    chosen = curvature_count(global_size, hessian_fraction)
    out, start = [], 0
    for chunk in split_batch(batch, chunk_size):
        count = batch_size(chunk)
        weight = count / size
        if hessian_fraction >= 1.0:
            out.append(StepChunk(chunk, weight, chunk, weight))
        else:
            rows = curvature_rows(offset + start, offset + start + count, global_size, hessian_fraction)
            subset = take_rows(chunk, rows) if len(rows) else None
            out.append(StepChunk(chunk, weight, subset, len(rows) * world / chosen))
        start += count
    return out
