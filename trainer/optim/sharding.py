"""Who owns what: the assignment of whole parameter tensors to data-parallel ranks.

A :class:`ShardPlan` is pure bookkeeping, with no communication and no optimizer math, so the
same plan serves the DDP path and tests, and can be printed to see where state lives. It also
fixes the layout of the flat buffers that collectives move: rank r's parameters, in model
order, fill segment r, and every segment is padded to the largest one so that
``reduce_scatter``/``all_gather`` move equal chunks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ShardPlan:
    """Owner rank of every parameter (by its index in model order) and the flat layout."""

    names: tuple[str, ...]
    numels: tuple[int, ...]
    owners: tuple[int, ...]
    world_size: int

    @classmethod
    def balanced(cls, named_shapes: Sequence[tuple[str, torch.Size]], world_size: int) -> ShardPlan:
        """Largest tensor first onto the least-loaded rank (ties: lower index, lower rank)."""
        numels = [int(torch.Size(shape).numel()) for _, shape in named_shapes]
        loads = [0] * world_size
        owners = [0] * len(numels)
        for index in sorted(range(len(numels)), key=lambda i: (-numels[i], i)):
            rank = min(range(world_size), key=lambda r: (loads[r], r))
            owners[index] = rank
            loads[rank] += numels[index]
        return cls(tuple(n for n, _ in named_shapes), tuple(numels), tuple(owners), world_size)

    @classmethod
    def explicit(
        cls, named_shapes: Sequence[tuple[str, torch.Size]], owners: Sequence[int], world_size: int
    ) -> ShardPlan:
        """A given assignment (for tests and experiments); checked for range and length."""
        if len(owners) != len(named_shapes):
            raise ValueError(f"owners has {len(owners)} entries for {len(named_shapes)} parameters")
        if any(not 0 <= r < world_size for r in owners):
            raise ValueError(f"owners must be ranks in [0, {world_size})")
        numels = tuple(int(torch.Size(shape).numel()) for _, shape in named_shapes)
        return cls(tuple(n for n, _ in named_shapes), numels, tuple(owners), world_size)

    def owned(self, rank: int) -> list[int]:
        """Indices of the parameters ``rank`` owns, in model order."""
        return [i for i, r in enumerate(self.owners) if r == rank]

    def shard_numel(self, rank: int) -> int:
        return sum(self.numels[i] for i in self.owned(rank))

    @property
    def segment(self) -> int:
        """Length of one rank's (padded) segment in a flat buffer."""
        return max(self.shard_numel(r) for r in range(self.world_size))

    @property
    def flat_order(self) -> list[int]:
        """Parameter indices in flat-buffer order: rank 0's shard, then rank 1's, …"""
        return [i for r in range(self.world_size) for i in self.owned(r)]

    def describe(self) -> str:
        """A readable table: one line per rank with its element count and parameters."""
        total = sum(self.numels) or 1
        lines = []
        for rank in range(self.world_size):
            numel = self.shard_numel(rank)
            names = ", ".join(self.names[i] for i in self.owned(rank))
            lines.append(f"rank {rank}: {numel} elements ({numel / total:.1%}): {names}")
        return "\n".join(lines)
