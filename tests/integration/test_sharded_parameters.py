"""Frozen, unused, conditionally used and tied parameters, freezing mid-run and gradient clipping:
the sharded AdaHessian at 1, 2 and 4 gloo ranks against the single-process :class:`AdaHessian`
on the global batch (with ``torch.nn.utils.clip_grad_norm_`` as the clipping reference), in
float64.
"""

from __future__ import annotations

import socket
from typing import Any

import pytest
import torch
import torch.distributed as dist
from test_sharded_adahessian import backend_options
from torch import nn
from torch.nn import functional as F

from tests.support import spawn_ranks
from trainer.backends import DDPBackend
from trainer.optim import AdaHessian
from trainer.optim.partition import conv_kernel_names

GLOBAL_BATCH = 8
STEPS = 8
FREEZE_AT = 4  # `later` stops training after this many steps
OPTIM = dict(lr=0.05, hessian_update_freq=2, weight_decay=0.01, seed=5)
ADAMW = dict(name="adamw", lr=0.01, weight_decay=0.01)
OPTIONS = dict(OPTIM, spatial_average_block_size=2, spatial_average_1d=False, update_clip=0.5)
"""The curvature options: block averaging of tensors with 2 or more dimensions only, and a bound
on each coordinate of the preconditioned step."""
FRACTION = dict(OPTIM, hessian_batch_fraction=0.25)
"""The Hutchinson products of 2 of the 8 examples, positions 3 and 7: at 4 ranks two hold one
each and two hold none."""
CHOSEN = [3, 7]


class OddNet(nn.Module):
    """A tied embedding/output, a layer frozen from the start, one never used, one used only on
    some steps (``branch_on``), one frozen mid-run, a conv kernel and a 3-D position embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.position = nn.Parameter(torch.randn(1, 3, 6) * 0.1)
        self.frozen = nn.Linear(6, 6).requires_grad_(False)
        self.unused = nn.Linear(6, 6)
        self.branch = nn.Linear(6, 6)
        self.later = nn.Linear(6, 6)
        self.conv = nn.Conv1d(6, 6, 2)
        self.branch_on = True

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.frozen(self.embed(tokens) + self.position))
        if self.branch_on:
            h = h + torch.tanh(self.branch(h))
        h = torch.tanh(self.later(h))
        h = torch.tanh(self.conv(h.transpose(1, 2))).mean(dim=2)
        return h @ self.embed.weight.T  # tied output layer


def make_model(dtype: torch.dtype = torch.float64) -> OddNet:
    """In float64 by default, so that only the algorithm, not fp32 summation order, could tell
    paths apart (DeepSpeed's test runs it in fp32)."""
    torch.manual_seed(0)
    return OddNet().to(dtype)


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(900 + step)
    return torch.randint(0, 10, (GLOBAL_BATCH, 3), generator=g), torch.randint(
        0, 10, (GLOBAL_BATCH,), generator=g
    )


def before_step(model: OddNet, step: int) -> None:
    """The same schedule on every path: the branch runs on steps 1 and 4 only (0-based 0 and 3,
    one Hessian step and one not); ``later`` is frozen after FREEZE_AT steps."""
    model.branch_on = step in (0, 3)
    if step == FREEZE_AT:
        model.later.requires_grad_(False)


def loss_fn(model: nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def reference(
    max_grad_norm: float | None, dtype: torch.dtype = torch.float64, optim: dict[str, Any] = OPTIM
) -> dict[str, Any]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = make_model(dtype)
        optim = dict(optim)
        fraction = optim.pop("hessian_batch_fraction", 1.0)
        opt = AdaHessian(model.named_parameters(), conv_kernels=conv_kernel_names(model), **optim)
        history = []
        for step in range(STEPS):
            before_step(model, step)
            opt.zero_grad()
            batch = list(global_batch(step))
            if fraction == 1.0:
                opt.backward(loss_fn(model, batch))
            else:  # the gradient of every example, the products of the chosen ones
                curvature = loss_fn(model, [t[CHOSEN] for t in batch]) if opt.hessian_due else "loss"
                opt.backward(loss_fn(model, batch), curvature)
            if max_grad_norm is not None:
                trainable = [p for p in model.parameters() if p.grad is not None]
                torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
            opt.step()
            history.append({n: p.detach().clone() for n, p in model.named_parameters()})
    finally:
        torch.set_num_threads(threads)
    return {"history": history}


def _worker(rank: int, world: int, port: int, jobs: list[dict[str, Any]], out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        results = []
        for job in jobs:
            model = make_model()
            options = dict(max_grad_norm=job["max_grad_norm"], **job["optimizer"])
            backend = DDPBackend(model, loss_fn, **backend_options(options))
            history, norms = [], []
            size = GLOBAL_BATCH // world
            for step in range(STEPS):
                before_step(model, step)
                tokens, labels = global_batch(step)
                stats = backend.train_step(
                    [tokens[rank * size : (rank + 1) * size], labels[rank * size : (rank + 1) * size]]
                )
                norms.append(stats.grad_norm)
                history.append({n: p.detach().clone() for n, p in model.named_parameters()})
            results.append({"history": history, "norms": norms})
        if rank == 0:
            torch.save(results, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, list[dict[str, Any]]]:
    """Both jobs (no clipping, clipping at 0.05) at 1, 2 and 4 ranks."""
    jobs = [
        {"max_grad_norm": None, "optimizer": OPTIM},
        {"max_grad_norm": 0.05, "optimizer": OPTIM},
        {"max_grad_norm": 0.05, "optimizer": ADAMW},
        {"max_grad_norm": None, "optimizer": OPTIONS},
        {"max_grad_norm": None, "optimizer": FRACTION},
    ]
    results = {}
    for world in (1, 2, 4):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        out = str(tmp_path_factory.mktemp(f"w{world}") / "out.pt")
        spawn_ranks(_worker, (world, port, jobs, out), world)
        results[world] = torch.load(out, weights_only=False)
    return results


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    error = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert error <= 1e-10 * scale, f"{what}: max error {error:.3g} vs scale {scale:.3g}"


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("clip", [None, 0.05])
def test_odd_parameters_follow_the_single_process_optimizer(runs, world: int, clip: float | None) -> None:
    expected = reference(clip)["history"]
    got = runs[world][0 if clip is None else 1]
    for step, (want, have) in enumerate(zip(expected, got["history"]), start=1):
        for name, value in want.items():
            assert_close(have[name], value, f"world {world}, step {step}, {name}")
    initial = {n: p.detach() for n, p in make_model().named_parameters()}
    final = got["history"][-1]
    # Never-used and frozen parameters are not touched (no weight decay, no momentum step).
    for name in ("unused.weight", "unused.bias", "frozen.weight", "frozen.bias"):
        assert torch.equal(final[name], initial[name]), name
    # Frozen mid-run: it stops where step FREEZE_AT left it.
    assert torch.equal(final["later.weight"], got["history"][FREEZE_AT - 1]["later.weight"])
    assert not torch.equal(final["later.weight"], initial["later.weight"])
    # The conditional branch moves on the steps after it had a gradient, as single-process does.
    assert not torch.equal(final["branch.weight"], initial["branch.weight"])
    if clip is not None:
        assert max(got["norms"]) > clip  # clipping was active


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2, 4])
def test_replicated_baseline_clips_like_clip_grad_norm(runs, world: int) -> None:
    """AdamW through the DDP backend, clipped at 0.05: torch's AdamW with clip_grad_norm_ on the
    global batch, at every world size (parameters without a gradient are skipped by AdamW too)."""
    torch.set_num_threads(1)
    model = make_model()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01, weight_decay=0.01)
    for step, have in enumerate(runs[world][2]["history"]):
        before_step(model, step)
        opt.zero_grad()
        loss_fn(model, list(global_batch(step))).backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], 0.05)
        opt.step()
        for name, value in model.named_parameters():
            assert_close(have[name], value.detach(), f"world {world}, step {step + 1}, {name}")


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2, 4])
def test_curvature_options_follow_the_single_process_optimizer(runs, world: int) -> None:
    expected = reference(None, optim=OPTIONS)["history"]
    unclipped = reference(None, optim=dict(OPTIONS, update_clip=None))["history"]
    assert not torch.equal(expected[-1]["later.weight"], unclipped[-1]["later.weight"])  # the bound acts
    for step, (want, have) in enumerate(zip(expected, runs[world][3]["history"]), start=1):
        for name, value in want.items():
            assert_close(have[name], value, f"world {world}, step {step}, {name}")


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2, 4])
def test_hessian_batch_fraction_follows_the_single_process_optimizer(runs, world: int) -> None:
    """The products of the chosen examples only, wherever they sit (ranks with none of them
    still take part): the single-process optimizer given their loss as its curvature."""
    expected = reference(None, optim=FRACTION)["history"]
    every = reference(None)["history"]
    assert not torch.equal(expected[-1]["later.weight"], every[-1]["later.weight"])  # it matters
    for step, (want, have) in enumerate(zip(expected, runs[world][4]["history"]), start=1):
        for name, value in want.items():
            assert_close(have[name], value, f"world {world}, step {step}, {name}")


@pytest.mark.filterwarnings("ignore:optimizer contains a parameter group with duplicate parameters")
def test_duplicate_parameters_are_refused() -> None:
    weight = nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="given twice"):
        AdaHessian([weight, weight])
    with pytest.raises(ValueError, match="given twice"):
        AdaHessian([{"params": [weight, weight]}])
