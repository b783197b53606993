"""Sharded AdaHessian on real gloo process groups (1, 2 and 4 processes) against one process.

The reference is the single-process :class:`AdaHessian` on the whole global batch; every
distributed run splits the same global batch into equal micro-batches, one per rank.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from tests.support import spawn_ranks
from trainer.backends import DDPBackend
from trainer.optim import AdaHessian
from trainer.optim.partition import conv_kernel_names
from trainer.spec import OptimizerSpec

GLOBAL_BATCH = 8
OPTIM = dict(lr=0.05, hessian_update_freq=3, weight_decay=0.01, spatial_average_block_size=4, seed=3)


def backend_options(options: dict[str, Any]) -> dict[str, Any]:
    """A backend's optimizer arguments for ``options`` as :class:`AdaHessian` takes them (or a
    baseline's, with its ``name``): the spec's optimizer section and the training seed. What
    ``options`` leaves out is the constructor's default, not the job spec's (β2 0.98 and k = 2
    there), so the backend and the single-process reference built from ``options`` agree."""
    options = dict(options)
    seed = options.pop("seed", 0)
    constructor = {"betas": (0.9, 0.999), "hessian_update_freq": 1}
    return {"optimizer": OptimizerSpec(**{**constructor, **options}), "seed": seed}


class MixedNet(nn.Module):
    """Conv, GroupNorm, embedding, linear and 1-D parameters; per-sample ops only, so a
    micro-batch split changes nothing but the order of sums."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.norm = nn.GroupNorm(2, 4)
        self.embed = nn.Embedding(10, 6)
        self.scale = nn.Parameter(torch.ones(6))
        self.head = nn.Linear(4 * 4 * 4 + 6, 5)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        pictures = torch.tanh(self.norm(self.conv(images))).flatten(1)
        words = torch.tanh(self.embed(tokens).mean(dim=1) * self.scale)
        return self.head(torch.cat([pictures, words], dim=1))


def make_model() -> MixedNet:
    torch.manual_seed(0)
    return MixedNet()


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(500 + step)
    images = torch.randn(GLOBAL_BATCH, 1, 6, 6, generator=g)
    tokens = torch.randint(0, 10, (GLOBAL_BATCH, 3), generator=g)
    labels = torch.randint(0, 5, (GLOBAL_BATCH,), generator=g)
    return images, tokens, labels


def micro_batch(step: int, rank: int, world: int) -> list[torch.Tensor]:
    """Rank ``rank``'s equal slice of the global batch of ``step``."""
    size = GLOBAL_BATCH // world
    return [t[rank * size : (rank + 1) * size] for t in global_batch(step)]


def reference_run(steps: int) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]], list[float]]:
    """Single process, global batch: parameters, optimizer state by name, losses."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers, so only the split changes the sums
    try:
        model = make_model()
        opt = AdaHessian(model.named_parameters(), conv_kernels=conv_kernel_names(model), **OPTIM)
        losses = []
        for step in range(steps):
            images, tokens, labels = global_batch(step)
            opt.zero_grad()
            loss = F.cross_entropy(model(images, tokens), labels)
            opt.backward(loss)
            opt.step()
            losses.append(loss.item())
    finally:
        torch.set_num_threads(threads)
    names = {p: n for n, p in model.named_parameters()}
    state = {names[p]: s for p, s in opt.state.items()}
    return {n: p.detach().clone() for n, p in model.named_parameters()}, state, losses


def _worker(rank: int, world: int, port: int, job: dict[str, Any], out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = make_model()
        backend = DDPBackend(
            model,
            lambda m, batch: F.cross_entropy(m(batch[0], batch[1]), batch[2]),
            **backend_options(dict(hessian_scope=job.get("scope", "global"), **OPTIM)),
        )
        opt = backend.optimizer
        if job.get("resume"):
            saved = torch.load(job["resume"], weights_only=False)
            model.load_state_dict(saved["model"])
            backend.load_optimizer_state(saved["shards"])
        losses, traces = [], []
        for step in range(job["start"], job["stop"]):
            stats = backend.train_step(micro_batch(step, rank, world))
            assert stats.step == step + 1 and stats.hessian_step == (step % 3 == 0)
            losses.append(stats.loss)
            traces.append(stats.hessian_trace)
        shards: list[Any] = [None] * world
        dist.all_gather_object(shards, opt.state_dict())
        if rank == 0:
            torch.save(
                {
                    "model": {n: p.detach().clone() for n, p in model.named_parameters()},
                    "shards": shards,
                    "losses": losses,
                    "traces": traces,
                    "owned": [
                        sorted({opt.names[f.param_index] for f in opt.layout.fragments(r)})
                        for r in range(world)
                    ],
                    "state_bytes": opt.state_bytes(),
                },
                out,
            )
        dist.barrier()  # no rank tears gloo down while a peer still talks to it
    finally:
        dist.destroy_process_group()


def run_distributed(world: int, tmp_path: Path, name: str, **job: Any) -> dict[str, Any]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / f"{name}.pt")
    job.setdefault("start", 0)
    spawn_ranks(_worker, (world, port, job, out), world)
    return torch.load(out, weights_only=False)


def merged_state(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Whole tensors of m and v per parameter name, joined from every rank's pieces."""
    shapes = {n: p.shape for n, p in make_model().named_parameters()}
    pieces: dict[str, list[dict[str, Any]]] = {}
    for shard in result["shards"]:
        for name, saved in shard["params"].items():
            pieces.setdefault(name, []).append(saved)
    merged = {}
    for name, parts in pieces.items():
        parts.sort(key=lambda saved: saved["start"])
        assert parts[0]["start"] == 0
        joined = {
            key: torch.cat([p[key].reshape(-1) for p in parts]).view(shapes[name])
            for key in ("exp_avg", "exp_hessian_diag_sq")
        }
        joined.update(step=parts[0]["step"], hessian_step=parts[0]["hessian_step"])
        merged[name] = joined
    return merged


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, what: str, rel: float = 1e-6) -> None:
    """Every element within ``rel`` of the tensor's scale (max |expected|): fp32 sums taken in
    another order differ by a few ulps of the large entries, which elementwise relative checks
    would blow up on near-zero entries."""
    error = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert error <= rel * scale, f"{what}: max error {error:.3g} vs scale {scale:.3g}"


def assert_matches_reference(result: dict[str, Any], steps: int) -> None:
    params, state, losses = reference_run(steps)
    assert result["losses"] == pytest.approx(losses[-len(result["losses"]) :], rel=1e-6)
    for name, value in params.items():
        assert_close_to_scale(result["model"][name], value, name)
    gathered = merged_state(result)
    assert set(gathered) == set(state)
    for name, expected in state.items():
        for key in ("exp_avg", "exp_hessian_diag_sq"):
            assert_close_to_scale(gathered[name][key], expected[key], f"{name}.{key}")
        assert (gathered[name]["step"], gathered[name]["hessian_step"]) == (expected["step"], 4)


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2, 4])
def test_sharded_equals_single_process_on_global_batch(world: int, tmp_path: Path) -> None:
    result = run_distributed(world, tmp_path, f"w{world}", stop=10)
    assert_matches_reference(result, 10)
    # Each rank's state holds pieces of exactly the parameters its chunk touches.
    for shard, owned in zip(result["shards"], result["owned"]):
        assert sorted(shard["params"]) == owned


@pytest.mark.slow
@pytest.mark.parametrize(("before", "after"), [(2, 4), (4, 1), (1, 2)])
def test_checkpoint_resumes_across_world_sizes(before: int, after: int, tmp_path: Path) -> None:
    first = run_distributed(before, tmp_path, "first", stop=5)
    checkpoint = tmp_path / "checkpoint.pt"
    torch.save({"model": first["model"], "shards": first["shards"]}, checkpoint)
    resumed = run_distributed(after, tmp_path, "resumed", start=5, stop=10, resume=str(checkpoint))
    assert len(resumed["losses"]) == 5
    assert_matches_reference(resumed, 10)


@pytest.mark.slow
def test_checkpoint_of_the_whole_tensor_format_still_loads(tmp_path: Path) -> None:
    """Shards written before the flat layout (``hutch.sharded_adahessian.v1``: whole tensors, each
    on its owner) load into today's optimizer at another world size and continue like an
    uninterrupted run; a format this version does not know is refused by name."""
    params, state, _ = reference_run(5)
    names = sorted(state)
    group = {k: v for k, v in OPTIM.items() if k not in ("hessian_update_freq", "seed")}
    v1 = [
        {
            "format": "hutch.sharded_adahessian.v1",
            "world_size": 2,
            "rank": rank,
            "schedule": {"steps_done": 5, "hessian_steps_done": 2, "hessian_trace": 1.0},
            "param_groups": [{**group, "betas": (0.9, 0.999), "eps": 1e-4, "hessian_power": 1.0}],
            "params": {name: state[name] for name in names[rank::2]},
        }
        for rank in range(2)
    ]
    checkpoint = tmp_path / "v1.pt"
    torch.save({"model": params, "shards": v1}, checkpoint)
    resumed = run_distributed(4, tmp_path, "from-v1", start=5, stop=10, resume=str(checkpoint))
    assert_matches_reference(resumed, 10)

    torch.save({"model": params, "shards": [{**v1[0], "format": "hutch.sharded_adahessian.v9"}]}, checkpoint)
    with pytest.raises(Exception, match=r"optimizer state format 'hutch\.sharded_adahessian\.v9'"):
        run_distributed(1, tmp_path, "from-v9", start=5, stop=10, resume=str(checkpoint))


def _local_scope_worker(rank: int, world: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        results = {}
        for scope in ("global", "local"):
            model = make_model()
            backend = DDPBackend(
                model,
                lambda m, batch: F.cross_entropy(m(batch[0], batch[1]), batch[2]),
                **backend_options(dict(hessian_scope=scope, **OPTIM)),
            )
            losses, sent = [], []
            for step in range(6):
                stats = backend.train_step(micro_batch(step % 2, rank, world))
                losses.append(stats.loss)
                sent.append(backend.optimizer.bytes_sent_last_step)
            results[scope] = {"losses": losses, "sent": sent, "trace": backend.optimizer.hessian_trace}
        # A non-finite loss on one rank only: every rank raises, none hangs in a collective.
        images, tokens, labels = global_batch(0)
        poison = float("nan") if rank == 1 else 1.0
        try:
            backend.train_step([images[:2] * poison, tokens[:2], labels[:2]])
            results["nan"] = "no error"
        except FloatingPointError as error:
            results["nan"] = str(error)
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, results)
        if rank == 0:
            torch.save(gathered, out)
        dist.barrier()  # no rank tears gloo down while a peer still talks to it
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_local_scope_trains_without_hessian_traffic_and_errors_are_collective(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "local.pt")
    spawn_ranks(_local_scope_worker, (2, port, out), 2)
    per_rank = torch.load(out, weights_only=False)
    for results in per_rank:
        glob, local = results["global"], results["local"]
        # Hessian steps (1 and 4) send the products in global scope only.
        assert glob["sent"][0] > glob["sent"][1] and local["sent"][0] == local["sent"][1]
        assert local["losses"][-1] < local["losses"][0] and glob["losses"][-1] < glob["losses"][0]
        assert local["trace"] != pytest.approx(glob["trace"], rel=1e-3)
        assert "loss is nan at step 7" in results["nan"]
    assert per_rank[0]["local"] == per_rank[1]["local"]  # statistics are group-wide
