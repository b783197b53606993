"""What each rank keeps of its own besides parameters: BatchNorm statistics (averaged over the
group before evaluation and checkpoints) and its random stream (reseeded per step and rank)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from benchmarks.harness import free_port
from tests.support import spawn_ranks
from trainer.backends.base import average_buffers
from trainer.seeding import seed_step


def _worker(rank: int, world: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        norm = nn.BatchNorm1d(3)
        norm(torch.randn(16, 3, generator=torch.Generator().manual_seed(rank)) + rank)  # own statistics
        before = {k: v.clone() for k, v in norm.state_dict().items()}
        average_buffers(norm)
        after = {k: v.clone() for k, v in norm.state_dict().items()}
        masks = []
        for step in (3, 3, 4):
            seed_step(7, step, rank)
            masks.append(F.dropout(torch.ones(256), 0.5))
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, {"before": before, "after": after, "masks": masks})
        if rank == 0:
            torch.save(gathered, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_batchnorm_statistics_are_averaged_and_each_rank_draws_its_own_masks(tmp_path: Path) -> None:
    out = str(tmp_path / "ranks.pt")
    spawn_ranks(_worker, (2, free_port(), out), 2)
    ranks = torch.load(out, weights_only=False)
    for key in ("running_mean", "running_var"):
        assert not torch.equal(ranks[0]["before"][key], ranks[1]["before"][key])
        mean = (ranks[0]["before"][key] + ranks[1]["before"][key]) / 2
        for r in ranks:
            torch.testing.assert_close(r["after"][key], mean)
    for r in ranks:  # integer buffers are left as they are (equal on every rank)
        assert torch.equal(r["after"]["num_batches_tracked"], r["before"]["num_batches_tracked"])
    (a3, a3_again, a4), (b3, _, _) = ranks[0]["masks"], ranks[1]["masks"]
    assert torch.equal(a3, a3_again)  # a pure function of (seed, step, rank): resumes draw alike
    assert not torch.equal(a3, b3) and not torch.equal(a3, a4)
