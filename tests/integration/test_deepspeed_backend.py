"""The DeepSpeed backend (ZeRO stage 1 and 2) on 2 gloo processes with ``DS_ACCELERATOR=cpu``.

Same model, data, seed and optimizer settings as ``test_sharded_adahessian.py``: the references
are the single-process :class:`AdaHessian` on the global batch and the DDP path. All runs share
one pair of processes (DeepSpeed's start-up is the slow part), spawned once for the module.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_sharded_adahessian import (
    OPTIM,
    assert_close_to_scale,
    backend_options,
    global_batch,
    make_model,
    micro_batch,
    reference_run,
)
from test_sharded_parameters import FRACTION as ODD_FRACTION
from test_sharded_parameters import FREEZE_AT, before_step
from test_sharded_parameters import OPTIM as ODD_OPTIM
from test_sharded_parameters import OPTIONS as ODD_OPTIONS
from test_sharded_parameters import STEPS as ODD_STEPS
from test_sharded_parameters import global_batch as odd_batch
from test_sharded_parameters import loss_fn as odd_loss
from test_sharded_parameters import make_model as make_odd_model
from test_sharded_parameters import reference as odd_reference
from torch.nn import functional as F

from trainer.backends import DDPBackend

pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed (pip install -e .[deepspeed])")
pytestmark = pytest.mark.slow

WORLD = 2
STEPS = 10


def loss_fn(model: torch.nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch[0], batch[1]), batch[2])


def _train(
    backend: Any, start: int, stop: int, rank: int, chunk_size: int | None = None, freq: int | None = 3
) -> dict[str, Any]:
    """Steps ``start``…``stop - 1``; ``freq`` is the Hessian frequency (None: a first-order run)."""
    losses, traces = [], []
    for step in range(start, stop):
        stats = backend.train_step(micro_batch(step, rank, WORLD), chunk_size)
        assert stats.step == step + 1 and stats.hessian_step == (freq is not None and step % freq == 0)
        losses.append(stats.loss)
        traces.append(stats.hessian_trace)
    params = {n: p.detach().float().clone() for n, p in backend.model.named_parameters()}
    return {"losses": losses, "traces": traces, "params": params}


def _partition(backend: Any) -> dict[str, Any]:
    """What this rank's inner optimizer holds, and which pieces of which parameters it owns."""
    inner = backend.optimizer
    slices = [flat for group in inner.param_groups for flat in group["params"]]
    tensors = [t for state in inner.state.values() for t in state.values() if torch.is_tensor(t)]
    return {
        "slice_numels": [flat.numel() for flat in slices],
        "state_is_slices_only": set(inner.state) == set(slices),
        "state_numels": sorted(t.numel() for t in tensors),
        "pieces": [(f.param_index, f.param_start, f.numel) for fs in inner._fragments.values() for f in fs],
    }


def _worker(rank: int, port: int, directory: str) -> None:
    os.environ.update(DS_ACCELERATOR="cpu", LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        from trainer.backends.deepspeed import DeepSpeedBackend

        torch.set_num_threads(1)

        def deepspeed(stage: int, precision: str = "fp32") -> DeepSpeedBackend:
            options = backend_options(OPTIM)
            return DeepSpeedBackend(make_model(), loss_fn, **options, zero_stage=stage, precision=precision)

        ddp = DDPBackend(make_model(), loss_fn, **backend_options(OPTIM))
        results: dict[str, Any] = {"ddp": _train(ddp, 0, STEPS, rank)}
        for stage in (1, 2):
            backend = deepspeed(stage)
            results[f"zero{stage}"] = _train(backend, 0, STEPS, rank)
            results[f"zero{stage}"]["partition"] = _partition(backend)
            # Save at step 5, load into a fresh engine, continue to step 10.
            first = deepspeed(stage)
            _train(first, 0, 5, rank)
            first.save_checkpoint(Path(directory) / f"zero{stage}", 5)
            resumed = deepspeed(stage)
            resumed.load_checkpoint(Path(directory) / f"zero{stage}")
            schedule = (resumed.optimizer.steps_done, resumed.optimizer.hessian_steps_done)
            results[f"resumed{stage}"] = {**_train(resumed, 5, STEPS, rank), "schedule": schedule}
        results["zero2_chunks"] = _train(deepspeed(2), 0, STEPS, rank, chunk_size=2)
        adamw = backend_options(dict(name="adamw", lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01))
        results["ddp_adamw"] = _train(DDPBackend(make_model(), loss_fn, **adamw), 0, 5, rank, freq=None)
        backend = DeepSpeedBackend(make_model(), loss_fn, **adamw, zero_stage=1)
        results["zero1_adamw"] = _train(backend, 0, 5, rank, freq=None)
        results["bf16"] = _train(deepspeed(2, "bf16"), 0, STEPS, rank)
        # Frozen, never-used, sometimes-used, tied and frozen-mid-run parameters (fp32, ZeRO-2),
        # without and with clipping.
        for key, optim, clip in (
            ("odd", ODD_OPTIM, None),
            ("odd_clipped", ODD_OPTIM, 0.05),
            ("odd_options", ODD_OPTIONS, None),
            ("odd_fraction", ODD_FRACTION, None),
        ):
            options = backend_options(dict(optim, max_grad_norm=clip))
            odd = DeepSpeedBackend(make_odd_model(torch.float32), odd_loss, **options, zero_stage=2)
            history = []
            for step in range(ODD_STEPS):
                before_step(odd.model, step)
                tokens, labels = odd_batch(step)
                half = len(tokens) // WORLD
                odd.train_step(
                    [tokens[rank * half : (rank + 1) * half], labels[rank * half : (rank + 1) * half]]
                )
                history.append({n: p.detach().clone() for n, p in odd.model.named_parameters()})
            results[key] = history
        # bf16 with chunks: the chunks' gradients add up in fp32 (one rounding to bf16).
        results["bf16_chunks"] = _train(deepspeed(2, "bf16"), 0, STEPS, rank, chunk_size=1)
        # bf16 trains: ZeRO-1 fitting one fixed batch.
        backend = deepspeed(1, "bf16")
        fixed = [t[rank * 4 : (rank + 1) * 4] for t in global_batch(0)]
        results["bf16_fixed_batch"] = [backend.train_step(fixed).loss for _ in range(20)]

        gathered: list[Any] = [None] * WORLD
        dist.all_gather_object(gathered, results)
        if rank == 0:
            torch.save(gathered, Path(directory) / "results.pt")
        dist.barrier()  # no rank tears gloo down while a peer still talks to it
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Every run's results, one dict per rank."""
    directory = tmp_path_factory.mktemp("deepspeed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, str(directory)), nprocs=WORLD, join=True)
    return torch.load(directory / "results.pt", weights_only=False)


@pytest.fixture(scope="module")
def reference() -> tuple[dict[str, torch.Tensor], list[float]]:
    params, _, losses = reference_run(STEPS)
    return params, losses


def assert_same_run(actual: dict[str, Any], params: dict[str, torch.Tensor], losses: list[float]) -> None:
    """Parameters within 1e-5 of each tensor's scale; losses within 1e-5 relative."""
    assert actual["losses"] == pytest.approx(losses[-len(actual["losses"]) :], rel=1e-5)
    for name, value in params.items():
        assert_close_to_scale(actual["params"][name], value, name, rel=1e-5)


@pytest.mark.parametrize("run", ["zero1", "zero2", "zero2_chunks"])
def test_zero_fp32_equals_ddp_and_single_process(runs, reference, run: str) -> None:
    ref_params, ref_losses = reference
    for per_rank in runs:  # both ranks hold the whole, identical model
        assert_same_run(per_rank[run], ref_params, ref_losses)
        assert_same_run(per_rank[run], per_rank["ddp"]["params"], per_rank["ddp"]["losses"])
        assert per_rank[run]["traces"] == pytest.approx(per_rank["ddp"]["traces"], rel=1e-5)


def test_first_order_baseline_under_zero_equals_the_ddp_path(runs) -> None:
    for per_rank in runs:
        zero, ddp = per_rank["zero1_adamw"], per_rank["ddp_adamw"]
        assert_same_run(zero, ddp["params"], ddp["losses"])
        assert zero["traces"] == [None] * 5


@pytest.mark.parametrize("stage", [1, 2])
def test_inner_optimizer_holds_state_for_its_slice_only(runs, stage: int) -> None:
    model = make_model()
    total = sum(p.numel() for p in model.parameters())
    covered = [torch.zeros(p.numel(), dtype=torch.int64) for p in model.parameters()]
    for per_rank in runs:
        partition = per_rank[f"zero{stage}"]["partition"]
        assert partition["state_is_slices_only"]
        (slice_numel,) = partition["slice_numels"]
        assert slice_numel < total  # a real partition, not the model
        assert partition["state_numels"] == [slice_numel, slice_numel]  # m and v, slice-sized
        for index, start, numel in partition["pieces"]:
            covered[index][start : start + numel] += 1
    assert all(bool((c == 1).all()) for c in covered)  # the slices partition every parameter
    pieces = [{index for index, _, _ in r[f"zero{stage}"]["partition"]["pieces"]} for r in runs]
    assert pieces[0] & pieces[1], "one tensor is cut between the two slices"


@pytest.mark.parametrize("stage", [1, 2])
def test_checkpoint_at_step_5_resumes_to_the_uninterrupted_run(runs, stage: int) -> None:
    for per_rank in runs:
        resumed, uninterrupted = per_rank[f"resumed{stage}"], per_rank[f"zero{stage}"]
        assert resumed["schedule"] == (5, 2)  # Hessian steps 1 and 4 done, the next one is 7
        assert resumed["losses"] == uninterrupted["losses"][5:]
        for name, value in uninterrupted["params"].items():
            assert torch.equal(resumed["params"][name], value), name


def test_bf16_trains_and_stays_close_to_fp32(runs) -> None:
    for per_rank in runs:
        bf16, fp32 = per_rank["bf16"], per_rank["zero2"]
        # bf16 has 8 bits of mantissa: a few 1e-3 relative per operation.
        assert bf16["losses"][:3] == pytest.approx(fp32["losses"][:3], rel=1e-2)
        for name, value in fp32["params"].items():
            assert_close_to_scale(bf16["params"][name], value, name, rel=5e-2)
        fixed = per_rank["bf16_fixed_batch"]
        assert fixed[-1] < 0.5 * fixed[0], fixed


@pytest.mark.parametrize(
    ("run", "clip", "optim"),
    [
        ("odd", None, ODD_OPTIM),
        ("odd_clipped", 0.05, ODD_OPTIM),
        ("odd_options", None, ODD_OPTIONS),
        ("odd_fraction", None, ODD_FRACTION),
    ],
)
def test_odd_parameters_follow_the_single_process_optimizer(
    runs, run: str, clip: float | None, optim: dict[str, Any]
) -> None:
    """The DeepSpeed path leaves parameters without a gradient alone, survives freezing mid-run,
    keys probes by name, clips by the global norm and applies the curvature options (block
    averaging of 2-D tensors only, the step bound, the products of a quarter of the examples),
    so it follows the single-process optimizer
    (with clip_grad_norm_; fp32: within 1e-4 of each tensor's scale)."""
    expected = odd_reference(clip, torch.float32, optim)["history"]
    initial = {n: p.detach() for n, p in make_odd_model(torch.float32).named_parameters()}
    for per_rank in runs:
        history = per_rank[run]
        for step, (want, have) in enumerate(zip(expected, history), start=1):
            for name, value in want.items():
                assert_close_to_scale(have[name], value, f"step {step}, {name}", rel=1e-4)
        final = history[-1]
        for name in ("unused.weight", "unused.bias", "frozen.weight", "frozen.bias"):
            assert torch.equal(final[name], initial[name]), name
        assert torch.equal(final["later.weight"], history[FREEZE_AT - 1]["later.weight"])


def test_bf16_chunks_accumulate_in_fp32(runs) -> None:
    """Eight chunks of one example each in bf16 stay as close to fp32 as one chunk does."""
    for per_rank in runs:
        fp32, whole, chunked = per_rank["zero2"], per_rank["bf16"], per_rank["bf16_chunks"]
        assert chunked["losses"][:3] == pytest.approx(fp32["losses"][:3], rel=1e-2)
        for name, value in fp32["params"].items():
            assert_close_to_scale(chunked["params"][name], value, name, rel=5e-2)
        assert chunked["losses"] == pytest.approx(whole["losses"], rel=2e-2)
