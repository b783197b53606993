"""The flat element-level layout: balanced shares, cuts on averaging-unit boundaries, every
element owned once, and the GPT-2-small parameter set at 2, 4 and 8 ranks."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from benchmarks.shapes import gpt2_small_shapes
from trainer.optim.partition import FlatLayout, averaging_unit


def layout_of(shapes: list[tuple[int, ...]], units: list[int], world: int) -> FlatLayout:
    names = [f"p{i}" for i in range(len(shapes))]
    return FlatLayout.build(names, [torch.Size(s) for s in shapes], units, world)


def assert_sound(layout: FlatLayout) -> None:
    """Every element of every parameter is owned exactly once, pieces start on unit boundaries
    and end on one or at the tensor's end, and parameters never overlap in the flat buffer."""
    covered = [[] for _ in layout.names]
    for rank in range(layout.world_size):
        for piece in layout.fragments(rank):
            unit, numel = layout.units[piece.param_index], layout.numels[piece.param_index]
            assert piece.param_start % unit == 0
            end = piece.param_start + piece.numel
            assert end % unit == 0 or end == numel
            assert piece.flat_start >= 0 and piece.flat_start + piece.numel <= layout.chunk
            covered[piece.param_index].append((piece.param_start, end))
    for index, spans in enumerate(covered):
        spans.sort()
        assert spans[0][0] == 0 and spans[-1][1] == layout.numels[index]
        assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
    ends = [o + n for o, n in zip(layout.offsets, layout.numels)]
    assert all(end <= start for end, start in zip(ends, layout.offsets[1:]))
    assert ends[-1] <= layout.size


@pytest.mark.parametrize("world", [2, 4, 8])
def test_gpt2_small_is_balanced_within_a_few_units(world: int) -> None:
    names, shapes = zip(*gpt2_small_shapes())
    units = [1] * len(shapes)
    layout = FlatLayout.build(list(names), list(shapes), units, world)
    assert_sound(layout)
    total = sum(math.prod(s) for s in shapes)
    shares = [layout.owned_numel(r) for r in range(world)]
    assert sum(shares) == total
    assert max(shares) <= math.ceil(total / world) and min(shares) >= total / world - world
    assert layout.chunk * world <= 1.0001 * total  # collective buffers: the model, not 2.5x it


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("block", [None, 4])
def test_conv_kernels_and_blocks_are_never_cut(world: int, block: int | None) -> None:
    shapes = [(16, 3, 3, 3), (16,), (32, 16, 3, 3), (32,), (10, 7), (5, 5, 5), (1, 9, 8), (11,)]
    kernels = {0, 2, 5}
    units = [
        averaging_unit(torch.Size(s), conv_kernel=i in kernels, average_conv_kernel=True, block_size=block)
        for i, s in enumerate(shapes)
    ]
    layout = layout_of(shapes, units, world)
    assert_sound(layout)
    assert layout == layout_of(shapes, units, world)  # deterministic
    total = sum(math.prod(s) for s in shapes)
    shares = [layout.owned_numel(r) for r in range(world)]
    assert max(shares) - total / world <= max(units) * world
    assert "rank 0:" in layout.describe()


def test_a_parameter_spanning_several_chunks_keeps_its_units_whole() -> None:
    layout = layout_of([(3,), (1000,), (2,)], [1, 8, 1], 5)
    assert_sound(layout)
    assert layout.chunk % 8 == 0
