"""The FSDP2 backend on real gloo groups of 1, 2 and 4 processes.

References: the DDP path on the same ranks (fp32, in chunks), the single-process
:class:`AdaHessian` and torch's AdamW with ``clip_grad_norm_`` on the global batch (float64, the
frozen/unused/tied/sometimes-used model, with and without clipping), and an uninterrupted run
for checkpoints written at one world size and loaded at another (2 → 4, 4 → 1); each backend
refuses the other's checkpoints. The groups run in the order 2, 4, 1, so each finds the
checkpoint the one before wrote.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from test_sharded_adahessian import assert_close_to_scale, backend_options, micro_batch
from test_sharded_adahessian import make_model as make_mixed_model
from test_sharded_parameters import ADAMW, FREEZE_AT, STEPS, before_step, global_batch, reference
from test_sharded_parameters import FRACTION as ODD_FRACTION
from test_sharded_parameters import OPTIM as ODD_OPTIM
from test_sharded_parameters import OPTIONS as ODD_OPTIONS
from test_sharded_parameters import assert_close as assert_close_float64
from test_sharded_parameters import loss_fn as odd_loss
from test_sharded_parameters import make_model as make_odd_model
from torch.distributed.tensor import DTensor
from torch.nn import functional as F

from tests.support import spawn_ranks
from trainer.backends import DDPBackend, FSDPBackend
from trainer.checkpoint import CheckpointMismatch

pytestmark = pytest.mark.slow

OPTIM = dict(lr=0.05, hessian_update_freq=3, weight_decay=0.01, seed=3)
MIXED_STEPS = 8
RESUME_AT = 4
CHUNK = 2
MIXED_UNITS = ["Conv2d", "GroupNorm", "Linear"]
ODD_UNITS = ["Linear", "Conv1d"]
"""Every layer its own unit: the frozen one, the never-run one, the sometimes-run one and the
one frozen mid-run each gather, reshard and reduce on their own; the tied embedding stays with
the root."""


def mixed_loss(model: torch.nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch[0], batch[1]), batch[2])


def whole(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter whole (collective for DTensors)."""
    return {
        n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
        for n, p in model.named_parameters()
    }


def mixed_batch(step: int, rank: int, world: int, dtype: torch.dtype) -> list[torch.Tensor]:
    return [t.to(dtype) if t.is_floating_point() else t for t in micro_batch(step, rank, world)]


def _odd_run(backend: Any, rank: int, world: int) -> dict[str, Any]:
    history, norms = [], []
    size = len(global_batch(0)[0]) // world
    for step in range(STEPS):
        before_step(backend.model, step)
        tokens, labels = global_batch(step)
        share = slice(rank * size, (rank + 1) * size)
        stats = backend.train_step([tokens[share], labels[share]])
        norms.append(stats.grad_norm)
        history.append(whole(backend.model))
    return {"history": history, "norms": norms}


def _mixed_run(
    backend: Any, rank: int, world: int, start: int, stop: int, dtype: torch.dtype, chunk: int | None
) -> list[dict[str, torch.Tensor]]:
    history = []
    for step in range(start, stop):
        stats = backend.train_step(mixed_batch(step, rank, world, dtype), chunk)
        assert stats.step == step + 1
        history.append(whole(backend.model))
    return history


def _worker(rank: int, world: int, port: int, directory: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        root = Path(directory)
        results: dict[str, Any] = {}

        def fsdp(model: torch.nn.Module, loss: Any, options: dict[str, Any], **kwargs: Any) -> FSDPBackend:
            return FSDPBackend(model, loss, **backend_options(options), **kwargs)

        # fp32 in chunks: the DDP path's parameters, step by step.
        ddp = DDPBackend(make_mixed_model(), mixed_loss, **backend_options(OPTIM))
        results["ddp"] = _mixed_run(ddp, rank, world, 0, MIXED_STEPS, torch.float32, CHUNK)
        sharded = fsdp(make_mixed_model(), mixed_loss, OPTIM, shard_modules=MIXED_UNITS)
        results["fsdp"] = _mixed_run(sharded, rank, world, 0, MIXED_STEPS, torch.float32, CHUNK)
        results["state_numels"] = [
            t.to_local().numel() for t in sharded.optimizer.exp_avg + sharded.optimizer.exp_hessian_diag_sq
        ]

        # float64, frozen/unused/tied/sometimes-used/frozen-mid-run parameters, clipping.
        for units in (None, ODD_UNITS):
            for key, clip in (("odd", None), ("odd_clipped", 0.05)):
                options = dict(ODD_OPTIM, max_grad_norm=clip)
                backend = fsdp(make_odd_model(), odd_loss, options, shard_modules=units)
                results[key, units is None] = _odd_run(backend, rank, world)
                results["units", units is None] = len(backend._fsdp_modules)
            backend = fsdp(make_odd_model(), odd_loss, dict(ADAMW, max_grad_norm=0.05), shard_modules=units)
            results["adamw", units is None] = _odd_run(backend, rank, world)
        results["odd_options"] = _odd_run(fsdp(make_odd_model(), odd_loss, ODD_OPTIONS), rank, world)
        results["odd_fraction"] = _odd_run(
            fsdp(make_odd_model(), odd_loss, ODD_FRACTION, shard_modules=ODD_UNITS), rank, world
        )

        # Checkpoints: uninterrupted in float64, then one saved at RESUME_AT here and one loaded
        # from the group before (2 → 4, 4 → 1).
        double = make_mixed_model().double()
        results["uninterrupted"] = _mixed_run(
            fsdp(double, mixed_loss, OPTIM), rank, world, 0, MIXED_STEPS, torch.float64, None
        )
        first = fsdp(make_mixed_model().double(), mixed_loss, OPTIM)
        _mixed_run(first, rank, world, 0, RESUME_AT, torch.float64, None)
        mine = root / f"checkpoint-{world}" / f"rank-{rank}"
        first.save_checkpoint(mine, RESUME_AT)
        dist.barrier()
        merged = root / f"checkpoint-{world}" / "merged"
        if rank == 0:  # what Ray Train does with the ranks' directories
            for r in range(world):
                for path in (root / f"checkpoint-{world}" / f"rank-{r}").rglob("*"):
                    if path.is_file():
                        target = merged / path.relative_to(root / f"checkpoint-{world}" / f"rank-{r}")
                        target.parent.mkdir(parents=True, exist_ok=True)
                        target.write_bytes(path.read_bytes())
        dist.barrier()
        source = {2: None, 4: 2, 1: 4}[world]
        if source is not None:
            resumed = fsdp(make_mixed_model().double(), mixed_loss, OPTIM)
            step = resumed.load_checkpoint(root / f"checkpoint-{source}" / "merged")
            schedule = (resumed.optimizer.steps_done, resumed.optimizer.hessian_steps_done)
            results["resumed"] = {
                "step": step,
                "schedule": schedule,
                "history": _mixed_run(resumed, rank, world, step, MIXED_STEPS, torch.float64, None),
            }

        # Each backend refuses the other's checkpoint (before any collective), naming its writer.
        ddp_dir = root / f"ddp-checkpoint-{world}"
        ddp.save_checkpoint(ddp_dir, MIXED_STEPS)  # rank 0 writes
        dist.barrier()
        results["cross_backend"] = []
        for load, directory in ((first.load_checkpoint, ddp_dir), (ddp.load_checkpoint, merged)):
            try:
                load(directory)
                results["cross_backend"].append(None)
            except CheckpointMismatch as error:
                results["cross_backend"].append(str(error))

        # A block size that would cut a parameter between two ranks' rows is refused.
        try:
            fsdp(make_mixed_model(), mixed_loss, dict(OPTIM, spatial_average_block_size=4))
            results["refusal"] = None
        except ValueError as error:
            results["refusal"] = str(error)

        if rank == 0:
            torch.save(results, root / f"results-{world}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[str, Any]]:
    directory = tmp_path_factory.mktemp("fsdp")
    for world in (2, 4, 1):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        spawn_ranks(_worker, (world, port, str(directory)), world)
    return {world: torch.load(directory / f"results-{world}.pt", weights_only=False) for world in (1, 2, 4)}


@pytest.mark.parametrize("world", [1, 2, 4])
def test_fp32_in_chunks_follows_the_ddp_path(runs, world: int) -> None:
    got = runs[world]
    for step, (want, have) in enumerate(zip(got["ddp"], got["fsdp"]), start=1):
        for name, value in want.items():
            assert_close_to_scale(have[name], value, f"world {world}, step {step}, {name}", rel=1e-5)
    # Each rank holds m and v for its rows only: 1/world of the elements, up to rounding rows.
    total = sum(p.numel() for p in make_mixed_model().parameters())
    assert sum(got["state_numels"]) <= 2 * (total / world + 5 * 70)


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("clip", [None, 0.05])
@pytest.mark.parametrize("root_only", [True, False], ids=["root-unit", "layer-units"])
def test_odd_parameters_follow_the_single_process_optimizer(
    runs, world: int, clip: float | None, root_only: bool
) -> None:
    got = runs[world]["odd" if clip is None else "odd_clipped", root_only]
    expected = reference(clip)["history"]
    for step, (want, have) in enumerate(zip(expected, got["history"]), start=1):
        for name, value in want.items():
            assert_close_float64(have[name], value, f"world {world}, step {step}, {name}")
    initial = {n: p.detach() for n, p in make_odd_model().named_parameters()}
    final = got["history"][-1]
    for name in ("unused.weight", "unused.bias", "frozen.weight", "frozen.bias"):
        assert torch.equal(final[name], initial[name]), name
    assert torch.equal(final["later.weight"], got["history"][FREEZE_AT - 1]["later.weight"])
    if clip is not None:
        assert max(got["norms"]) > clip
    assert runs[world]["units", root_only] == (1 if root_only else 6)  # 5 layers and the root


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("root_only", [True, False], ids=["root-unit", "layer-units"])
def test_adamw_on_shards_clips_like_clip_grad_norm(runs, world: int, root_only: bool) -> None:
    torch.set_num_threads(1)
    model = make_odd_model()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01, weight_decay=0.01)
    for step, have in enumerate(runs[world]["adamw", root_only]["history"]):
        before_step(model, step)
        opt.zero_grad()
        odd_loss(model, list(global_batch(step))).backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], 0.05)
        opt.step()
        for name, value in model.named_parameters():
            assert_close_float64(have[name], value.detach(), f"world {world}, step {step + 1}, {name}")


@pytest.mark.parametrize(("saved", "loaded"), [(2, 4), (4, 1)])
def test_checkpoints_load_at_another_world_size(runs, saved: int, loaded: int) -> None:
    resumed = runs[loaded]["resumed"]
    assert resumed["step"] == RESUME_AT
    assert resumed["schedule"] == (RESUME_AT, 2)  # Hessian steps 1 and 4 (every 3)
    expected = runs[saved]["uninterrupted"][RESUME_AT:]
    for step, (want, have) in enumerate(zip(expected, resumed["history"]), start=RESUME_AT + 1):
        for name, value in want.items():
            assert_close_float64(have[name], value, f"{saved} → {loaded}, step {step}, {name}")


def test_a_block_size_that_cuts_a_shard_is_refused(runs) -> None:
    assert runs[1]["refusal"] is None  # one rank holds every row
    message = runs[2]["refusal"]
    assert message is not None and "spatial_average_block_size=4" in message
    assert "choose a block size that divides" in message


@pytest.mark.parametrize("world", [1, 2, 4])
def test_each_backend_refuses_the_others_checkpoints(runs, world: int) -> None:
    fsdp_reads_ddp, ddp_reads_fsdp = runs[world]["cross_backend"]
    assert fsdp_reads_ddp is not None and "written by the 'ddp' backend" in fsdp_reads_ddp
    assert "the 'fsdp' backend cannot read" in fsdp_reads_ddp
    assert ddp_reads_fsdp is not None and "written by the 'fsdp' backend" in ddp_reads_fsdp


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("run", ["odd_options", "odd_fraction"])
def test_curvature_options_follow_the_single_process_optimizer(runs, world: int, run: str) -> None:
    """Block averaging of 2-D and larger tensors only (blocks of 2 fit every rank's rows), the
    bound on the preconditioned step, and the products of a quarter of the examples (at 4 ranks
    two ranks hold none; every layer its own unit), as the single-process optimizer does them."""
    expected = reference(None, optim=ODD_OPTIONS if run == "odd_options" else ODD_FRACTION)["history"]
    for step, (want, have) in enumerate(zip(expected, runs[world][run]["history"]), start=1):
        for name, value in want.items():
            assert_close_float64(have[name], value, f"world {world}, step {step}, {name}")
