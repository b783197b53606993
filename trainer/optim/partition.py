"""Who owns which elements: flat, element-level partitions of the parameters, and the averaging
units that a partition must not cut.

Pure bookkeeping (no communication, no optimizer math), shared by every data-parallel path:

* the DDP path lays all trainable parameters out in one flat buffer (:class:`FlatLayout`) cut
  into ``N`` equal chunks, one per rank, as ZeRO does, but with the cuts on averaging-unit
  boundaries, so a rank computes ``D`` for its elements without a neighbour's data;
* the DeepSpeed path describes DeepSpeed's own flat slices with the same :class:`Fragment`s.

Both compute ``D`` with :func:`unit_mean_abs`, as the single-process optimizer does on whole
tensors (:func:`trainer.optim.hutchinson.hessian_diagonal`): one rule for the spatial averaging,
written once.

The averaging unit of a parameter (:func:`averaging_unit`) is the number of consecutive elements
of its flattened form whose ``|z⊙Hz|`` are averaged together: a convolution kernel
``(out, in, *spatial)`` averages over its spatial block (``prod(spatial)`` elements); any other
tensor averages over blocks of ``spatial_average_block_size`` elements (the last block of a
tensor may be shorter), or not at all (unit 1).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

_CONV_MODULES = (nn.modules.conv._ConvNd,)


def conv_kernel_names(model: nn.Module) -> set[str]:
    """Names (as in ``model.named_parameters()``) of the weights of torch's convolution modules
    (``Conv1d/2d/3d`` and their transposes): the tensors whose estimate is spatially averaged."""
    names = set()
    for module_name, module in model.named_modules():
        if isinstance(module, _CONV_MODULES):
            names.add(f"{module_name}.weight" if module_name else "weight")
    return names


def is_conv_kernel(name: str, shape: torch.Size, conv_kernels: Collection[str] | None) -> bool:
    """The rule: a parameter named in ``conv_kernels``; without that list (bare tensors handed to
    an optimizer), a 4-D tensor, which in torch.nn only ``Conv2d`` has. A 3-D tensor such as a
    ``(1, T, D)`` position embedding is a kernel only when named."""
    if conv_kernels is not None:
        return name in conv_kernels and len(shape) >= 3
    return len(shape) == 4


def averaging_unit(
    shape: torch.Size,
    *,
    conv_kernel: bool,
    average_conv_kernel: bool,
    block_size: int | None,
    average_1d: bool = True,
) -> int:
    """Consecutive elements whose ``|z⊙Hz|`` are averaged together (see the module doc); with
    ``average_1d`` false, 1-D tensors (biases, norm gains) are not block-averaged."""
    if conv_kernel:
        return max(1, math.prod(shape[2:])) if average_conv_kernel else 1
    if block_size is None or block_size <= 1 or (len(shape) <= 1 and not average_1d):
        return 1
    return block_size


def averaging_units(
    named_shapes: Iterable[tuple[str, torch.Size]],
    *,
    conv_kernels: Collection[str] | None,
    average_conv_kernel: bool,
    block_size: int | None,
    average_1d: bool = True,
) -> list[int]:
    """:func:`averaging_unit` of every ``(name, shape)``, with :func:`is_conv_kernel`'s rule."""
    return [
        averaging_unit(
            shape,
            conv_kernel=is_conv_kernel(name, shape, conv_kernels),
            average_conv_kernel=average_conv_kernel,
            block_size=block_size,
            average_1d=average_1d,
        )
        for name, shape in named_shapes
    ]


def unit_mean_abs(signed: torch.Tensor, unit: int) -> torch.Tensor:
    """``|signed|`` (1-D) averaged over consecutive blocks of ``unit`` elements (a new tensor)."""
    return average_blocks_(signed.abs(), unit)


def average_blocks_(values: torch.Tensor, unit: int) -> torch.Tensor:
    """Replace each block of ``unit`` consecutive elements of the contiguous 1-D ``values`` by its
    mean, in place; a last, shorter block is averaged over its own length. ``values`` must start
    on a block boundary."""
    if unit <= 1 or values.numel() <= 1:
        return values
    full = (values.numel() // unit) * unit
    if full:
        blocks = values[:full].view(-1, unit)
        blocks.copy_(blocks.mean(dim=1, keepdim=True).expand_as(blocks))
    if full < values.numel():
        values[full:] = values[full:].mean()
    return values


@dataclass(frozen=True)
class Fragment:
    """``numel`` elements of parameter ``param_index`` (its flattened form, from ``param_start``)
    stored at ``flat_start`` of a rank's flat slice."""

    param_index: int
    param_start: int
    flat_start: int
    numel: int


@dataclass(frozen=True)
class FlatLayout:
    """Every trainable parameter's place in one flat buffer of ``world_size`` chunks of ``chunk``
    elements; rank r owns chunk r.

    Parameters lie in model order. Where a chunk boundary would fall inside a parameter off an
    averaging-unit boundary, the parameter is moved forward by fewer than ``unit`` elements of
    padding, so every cut lies between two units. Padding and the tail of the last chunk are never
    a parameter's: they stay zero in the parameter, gradient and state buffers. Every rank's
    share of real elements is within ``chunk - total/N`` of the ideal, a few units at most.
    """

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    units: tuple[int, ...]
    offsets: tuple[int, ...]
    chunk: int
    world_size: int

    @classmethod
    def build(
        cls, names: Sequence[str], shapes: Sequence[torch.Size], units: Sequence[int], world_size: int
    ) -> FlatLayout:
        """The smallest aligned layout (see the class doc); deterministic in its arguments."""
        if world_size < 1:
            raise ValueError(f"world_size={world_size}: must be at least 1")
        numels = [math.prod(shape) for shape in shapes]
        total = sum(numels)
        chunk = max(1, math.ceil(total / world_size))
        # A parameter crossing two or more cuts can move only once: the chunk must be a multiple
        # of its unit. Parameters shorter than a chunk cross at most one cut.
        while True:
            spanning = [u for u, n in zip(units, numels) if n > chunk and u > 1]
            modulus = math.lcm(*spanning) if spanning else 1
            chunk = math.ceil(chunk / modulus) * modulus
            offsets = _aligned_offsets(numels, units, chunk)
            end = offsets[-1] + numels[-1] if offsets else 0
            if end <= chunk * world_size:
                return cls(
                    tuple(names),
                    tuple(torch.Size(s) for s in shapes),
                    tuple(units),
                    tuple(offsets),
                    chunk,
                    world_size,
                )
            chunk += max(1, math.ceil((end - chunk * world_size) / world_size))

    @property
    def numels(self) -> list[int]:
        return [math.prod(shape) for shape in self.shapes]

    @property
    def size(self) -> int:
        """Elements of the whole flat buffer: ``world_size * chunk``."""
        return self.world_size * self.chunk

    def fragments(self, rank: int) -> list[Fragment]:
        """The pieces of parameters in rank ``rank``'s chunk, in order (``flat_start`` relative to
        the chunk)."""
        lo, hi = rank * self.chunk, (rank + 1) * self.chunk
        pieces = []
        for index, (offset, numel) in enumerate(zip(self.offsets, self.numels)):
            start, end = max(offset, lo), min(offset + numel, hi)
            if start < end:
                pieces.append(Fragment(index, start - offset, start - lo, end - start))
        return pieces

    def owned_numel(self, rank: int) -> int:
        return sum(f.numel for f in self.fragments(rank))

    def describe(self) -> str:
        """One line per rank: its real elements, their share, and the parameters it touches."""
        total = sum(self.numels) or 1
        lines = []
        for rank in range(self.world_size):
            pieces = self.fragments(rank)
            numel = sum(f.numel for f in pieces)
            names = ", ".join(self.names[f.param_index] for f in pieces)
            lines.append(f"rank {rank}: {numel} elements ({numel / total:.2%}): {names}")
        return "\n".join(lines)


def _aligned_offsets(numels: Iterable[int], units: Iterable[int], chunk: int) -> list[int]:
    offsets, position = [], 0
    for numel, unit in zip(numels, units):
        cut = (position // chunk + 1) * chunk  # the first cut after the parameter's start
        if unit > 1 and cut < position + numel:
            position += (cut - position) % unit
        offsets.append(position)
        position += numel
    return offsets
