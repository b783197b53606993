"""Memory and time of the FSDP2 backend against the DDP path, on gloo process groups of 2 and 4.

Run from the repository root::

    .venv/bin/python benchmarks/fsdp_cost.py            # full run, a few minutes on 2 shared cores
    .venv/bin/python benchmarks/fsdp_cost.py --quick    # tiny smoke run, well under a minute

For every world size N it spawns N processes (gloo over loopback, one thread each) that train
the GPT-style LM of :mod:`benchmarks.workloads` with AdaHessian (Hessian every 2nd step) on the
same global batches, once through :class:`trainer.backends.DDPBackend` (whole parameters and
gradients on every rank, AdaHessian state sharded) and once through
:class:`trainer.backends.FSDPBackend` (parameters, gradients, products and state sharded), and
measures per rank:

1. **Resident bytes**: parameters + gradients + optimizer state between steps (gradients are kept
   until the next step on both paths), against the single-process total (4 tensors of P fp32
   values) over N. Target: ≤ 1.05 × total/N; during an ordinary step FSDP2 adds one gathered
   unit (its parameters and their unreduced gradients), so the in-step figure is resident +
   the largest unit, target ≤ 1.05 × total/N + that unit.
2. **Peak bytes within a step** (ordinary and Hessian), everything included: parameters, gathered
   copies, gradients, state, activations, the double-backward graph, communication buffers.
3. **Time per ordinary and per Hessian step**, FSDP against DDP, in interleaved rounds.
4. **GPT-2 small** (124M) at N = 2, 4, 8 from its layout (no processes): resident bytes per rank
   on both paths and the largest gathered unit (the tied embedding, with the root).

How bytes are counted (CPU has no allocator statistics): a ``TorchDispatchMode`` sees every
tensor an operator returns, collectives included, and keeps a weak reference to its storage;
storages that existed before the step (parameters, gradients, state, batches) are added from the
garbage collector's list of tensors. After every operator the live storages' ``nbytes()`` are
summed (``nbytes`` follows ``resize_``, which is how FSDP2 frees and refills gathered
parameters); the peak is the largest such sum. Resident bytes are the storages reachable from
the parameters, their gradients and the optimizer's tensors, each storage counted once.

Timing: after a warm-up of two whole Hessian periods, each round runs one Hessian and one
ordinary step per backend (the order rotated per round), each started on a barrier, with the
garbage collector paused; a step's time is the slowest rank's. ms/step is the median over rounds.
On 2 cores, N = 4 oversubscribes the machine: ratios show the method's overheads, not a GPU
cluster's scaling.

Results go to ``--out`` (default ``benchmarks/results/``): ``fsdp_cost.json`` and ``fsdp_cost.png``.
"""

from __future__ import annotations

import datetime
import gc
import math
import multiprocessing
import statistics
import sys
import tempfile
import time
import warnings
import weakref
from collections.abc import Iterable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import (
    apply_mode,
    console,
    figure,
    finish,
    free_port,
    log,
    machine_info,
    parser,
    table,
    timed,
)
from benchmarks.harness import settings as settings_of
from benchmarks.shapes import gpt2_small_shapes
from benchmarks.workloads import Workload, lm_factory, token_batches
from trainer.backends import DDPBackend, FSDPBackend
from trainer.double_backward import twice_differentiable
from trainer.optim.dtensor import rows_per_rank
from trainer.spec import OptimizerSpec

RESIDENT_TOLERANCE = 0.05  # resident bytes / (total / N) - 1
FREQ = 2  # Hessian every 2nd step: steps 1, 3, … are Hessian steps
GPT2_WORLDS = (2, 4, 8)
FP32 = 4
BACKENDS = ("ddp", "fsdp")


# -- counting bytes ----------------------------------------------------------------------------


def _storage(tensor: torch.Tensor) -> torch.UntypedStorage | None:
    if isinstance(tensor, DTensor):
        tensor = tensor.to_local()
    try:
        return tensor.untyped_storage()
    except (RuntimeError, NotImplementedError):  # a wrapper subclass without storage of its own
        return None


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (each storage once)."""
    seen: dict[int, int] = {}
    for tensor in tensors:
        storage = _storage(tensor)
        if storage is not None:
            seen[storage.data_ptr() or id(storage)] = storage.nbytes()
    return sum(seen.values())


def tensors_in(obj: Any, depth: int = 4) -> list[torch.Tensor]:
    """Every tensor reachable from ``obj`` through containers and attributes, ``depth`` levels."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if depth == 0 or isinstance(obj, (str, bytes, int, float, bool, type(None), nn.Module)):
        return []
    if isinstance(obj, dict):
        children: Iterable[Any] = obj.values()
    elif isinstance(obj, (list, tuple, set)):
        children = obj
    elif hasattr(obj, "__dict__"):
        children = vars(obj).values()
    else:
        return []
    return [t for child in children for t in tensors_in(child, depth - 1)]


def resident_bytes(backend: Any) -> int:
    """Parameters (this rank's part), their gradients and the optimizer's tensors."""
    params = list(backend.model.parameters())
    grads = [p.grad for p in params if p.grad is not None]
    return storage_bytes([*params, *grads, *tensors_in(backend.optimizer)])


class LiveBytes(TorchDispatchMode):
    """The peak of the bytes held by live tensor storages while the mode is active (see the
    module doc for how)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, weakref.ref[torch.UntypedStorage]] = {}
        self.peak = 0
        with warnings.catch_warnings():  # isinstance on torch's deprecated module attributes warns
            warnings.simplefilter("ignore", FutureWarning)
            for obj in gc.get_objects():
                if isinstance(obj, torch.Tensor):
                    self.track(obj)
        self.start = self.peak = self.current()

    def track(self, tensor: torch.Tensor) -> None:
        storage = _storage(tensor)
        if storage is None or id(storage) in self.live:
            return
        key = id(storage)
        self.live[key] = weakref.ref(storage, lambda _, key=key: self.live.pop(key, None))

    def current(self) -> int:
        return sum(s.nbytes() for ref in list(self.live.values()) if (s := ref()) is not None)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self.track(value)
        self.peak = max(self.peak, self.current())
        return out


# -- one rank -----------------------------------------------------------------------------------


def make_workload(settings: dict[str, Any]) -> Workload:
    gen = torch.Generator().manual_seed(settings["seed"])
    seq, layers, heads, embd = (settings[k] for k in ("lm_seq", "lm_layers", "lm_heads", "lm_embd"))
    batch = settings["global_batch"]
    desc = f"GPT LM {layers}L/{heads}H/{embd}d, random tokens, global batch {batch}x{seq}"
    return Workload(
        "transformer", desc, lm_factory(seq, layers, heads, embd), token_batches(gen, batch, seq, 4)
    )


class Runner:
    """One backend on one rank, stepping through the workload's batches."""

    def __init__(
        self, kind: str, workload: Workload, settings: dict[str, Any], rank: int, world: int
    ) -> None:
        torch.manual_seed(settings["seed"])
        model = workload.make_model()
        optimizer = OptimizerSpec(hessian_update_freq=FREQ, lr=settings["lr"])
        make = DDPBackend if kind == "ddp" else FSDPBackend
        self.backend = make(
            model, lambda m, b: workload.loss(m(b[0]), b[1]), optimizer, seed=settings["seed"]
        )
        self.micro = [workload.micro_batch(i, rank, world) for i in range(len(workload.batches))]
        self.cursor = 0
        self.losses: list[float] = []

    def step(self) -> None:
        batch = self.micro[self.cursor % len(self.micro)]
        self.cursor += 1
        with twice_differentiable() if self.backend.hessian_due else nullcontext():
            self.losses.append(self.backend.train_step(batch).loss)

    def timed_step(self) -> float:
        """One step started on a barrier: the slowest rank's milliseconds."""
        t = torch.tensor([timed(self.step, 1, before=dist.barrier) * 1e3], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())


def largest_unit_bytes(backend: Any) -> int:
    """Bytes of the largest FSDP unit's parameters gathered, plus their unreduced gradients (0 on
    the DDP path, which gathers nothing)."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(backend, FSDPBackend):
        return 0
    sizes = []
    for module in backend.model.modules():
        if isinstance(module, FSDPModule):
            own = [p for p in module.parameters() if not _inside_other_unit(backend.model, module, p)]
            sizes.append(2 * sum(p.numel() * p.element_size() for p in own))
    return max(sizes)


def _inside_other_unit(root: nn.Module, unit: nn.Module, param: torch.Tensor) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(
        param is p
        for m in unit.modules()
        if m is not unit and isinstance(m, FSDPModule)
        for p in m.parameters()
    )


def memory_run(
    kind: str, workload: Workload, settings: dict[str, Any], rank: int, world: int
) -> dict[str, Any]:
    runner = Runner(kind, workload, settings, rank, world)
    for _ in range(2 * FREQ):  # warm: every buffer that persists exists
        runner.step()
    peaks = {}
    for label in ("hessian", "ordinary"):
        assert runner.backend.hessian_due == (label == "hessian")
        gc.collect()
        with LiveBytes() as mode:
            runner.step()
        peaks[label] = {"start": mode.start, "peak": mode.peak}
    result = {
        "resident_bytes": resident_bytes(runner.backend),
        "largest_unit_bytes": largest_unit_bytes(runner.backend),
        "peaks": peaks,
    }
    del runner
    gc.collect()
    return result


def timing_run(workload: Workload, settings: dict[str, Any], rank: int, world: int) -> dict[str, Any]:
    runners = {kind: Runner(kind, workload, settings, rank, world) for kind in BACKENDS}
    for runner in runners.values():
        for _ in range(2 * FREQ):
            runner.step()
    times: dict[str, dict[str, list[float]]] = {k: {"hessian": [], "ordinary": []} for k in BACKENDS}
    for r in range(settings["rounds"]):
        order = BACKENDS if r % 2 == 0 else BACKENDS[::-1]
        for kind in order:
            times[kind]["hessian"].append(runners[kind].timed_step())
            times[kind]["ordinary"].append(runners[kind].timed_step())
        if rank == 0:
            log(f"  N={world}: timing round {r + 1}/{settings['rounds']} done")
    return {"ms": times, "last_loss": {k: runners[k].losses[-1] for k in BACKENDS}}


def _worker(rank: int, world: int, port: int, settings: dict[str, Any], out: str) -> None:
    timeout = datetime.timedelta(seconds=600)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timeout)  # fmt: skip
    try:
        torch.set_num_threads(1)
        workload = make_workload(settings)
        result: dict[str, Any] = {"rank": rank}
        result["memory"] = {kind: memory_run(kind, workload, settings, rank, world) for kind in BACKENDS}
        if rank == 0:
            log(f"  N={world}: memory measured")
        result["timing"] = timing_run(workload, settings, rank, world)
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, result)
        if rank == 0:
            torch.save(gathered, out)
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_world(world: int, settings: dict[str, Any], tmp: Path) -> list[dict[str, Any]]:
    port, out = free_port(), str(tmp / f"world{world}.pt")
    multiprocessing.set_forkserver_preload(["torch", "torch.distributed", "trainer.backends"])
    mp.start_processes(
        _worker, args=(world, port, settings, out), nprocs=world, join=True, start_method="forkserver"
    )
    return torch.load(out, weights_only=False)


# -- summary --------------------------------------------------------------------------------------


def summarize_world(world: int, ranks: list[dict[str, Any]], n_params: int) -> dict[str, Any]:
    total = 4 * n_params * FP32  # parameters, gradients, m and v of the whole model
    per_rank = total / world
    rows = {}
    for kind in BACKENDS:
        memory = [r["memory"][kind] for r in ranks]
        resident = max(m["resident_bytes"] for m in memory)
        unit = max(m["largest_unit_bytes"] for m in memory)
        rows[kind] = {
            "resident_bytes": resident,
            "resident_over_total_per_rank": resident / per_rank,
            "largest_unit_bytes": unit,
            "in_step_bound_bytes": resident + unit,
            "in_step_target_bytes": (1 + RESIDENT_TOLERANCE) * per_rank + unit,
            "peak_ordinary_bytes": max(m["peaks"]["ordinary"]["peak"] for m in memory),
            "peak_hessian_bytes": max(m["peaks"]["hessian"]["peak"] for m in memory),
            "ms_ordinary": statistics.median(ranks[0]["timing"]["ms"][kind]["ordinary"]),
            "ms_hessian": statistics.median(ranks[0]["timing"]["ms"][kind]["hessian"]),
            "last_loss": ranks[0]["timing"]["last_loss"][kind],
        }
    fsdp, ddp = rows["fsdp"], rows["ddp"]
    return {
        "world": world,
        "total_bytes": total,
        "total_over_n": per_rank,
        "backends": rows,
        "targets": {
            "resident_within_tolerance": fsdp["resident_over_total_per_rank"] <= 1 + RESIDENT_TOLERANCE,
            "in_step_within_target": fsdp["in_step_bound_bytes"] <= fsdp["in_step_target_bytes"],
        },
        "fsdp_over_ddp": {
            key: fsdp[key] / ddp[key]
            for key in (
                "resident_bytes",
                "peak_ordinary_bytes",
                "peak_hessian_bytes",
                "ms_ordinary",
                "ms_hessian",
            )
        },
    }


def gpt2_layout() -> list[dict[str, Any]]:
    """Resident bytes per rank for GPT-2 small from its shapes: FSDP cuts every parameter's rows
    over N (the last rank's rows padded); the DDP path holds whole flat parameters, gradients and
    Hutchinson products, and 1/N of m, v and the reduce-scatter's output (3P + 3P/N, as the LM
    runs measure)."""
    shapes = gpt2_small_shapes()
    n_params = sum(s.numel() for _, s in shapes)
    units: dict[str, int] = {}
    for name, shape in shapes:
        unit = ".".join(name.split(".")[:2]) if name.startswith("h.") else "root"
        units[unit] = units.get(unit, 0) + shape.numel()
    rows = []
    for world in GPT2_WORLDS:
        sharded = sum(rows_per_rank(s[0], world) * (s.numel() // s[0]) for _, s in shapes)
        total = 4 * n_params * FP32
        fsdp = 4 * sharded * FP32
        unit = 2 * max(units.values()) * FP32
        rows.append(
            {
                "world": world,
                "params": n_params,
                "total_over_n": total / world,
                "fsdp_resident_bytes": fsdp,
                "fsdp_over_total_per_rank": fsdp / (total / world),
                "largest_unit": max(units, key=units.__getitem__),
                "largest_unit_bytes": unit,
                "ddp_resident_bytes": (3 + 3 / world) * n_params * FP32,
                "within_tolerance": fsdp / (total / world) <= 1 + RESIDENT_TOLERANCE,
            }
        )
    return rows


# -- report ---------------------------------------------------------------------------------------


def _mb(value: float) -> str:
    return f"{value / 2**20:.2f}"


def print_report(report: dict[str, Any]) -> None:
    out = console()
    out.print(report["workload"])
    rows = []
    for w in report["worlds"]:
        for kind in BACKENDS:
            b = w["backends"][kind]
            rows.append([f"N={w['world']} {kind}", _mb(w["total_over_n"]), _mb(b["resident_bytes"]),
                         f"{b['resident_over_total_per_rank']:.3f}", _mb(b["in_step_bound_bytes"]),
                         _mb(b["in_step_target_bytes"]) if kind == "fsdp" else "",
                         _mb(b["peak_ordinary_bytes"]), _mb(b["peak_hessian_bytes"]),
                         f"{b['ms_ordinary']:.1f}", f"{b['ms_hessian']:.1f}"])  # fmt: skip
    columns = ["run", "total/N MiB", "resident MiB", "/ (total/N)", "in-step MiB", "target MiB",
               "peak ordinary MiB", "peak Hessian MiB", "ms ordinary", "ms Hessian"]  # fmt: skip
    out.print(table("Per rank: parameters + gradients + AdaHessian state, peaks, step times", columns, rows))
    ratios = [[f"N={w['world']}", *(f"{w['fsdp_over_ddp'][k]:.2f}" for k in w["fsdp_over_ddp"]),
               "yes" if all(w["targets"].values()) else "NO"] for w in report["worlds"]]  # fmt: skip
    out.print(table("FSDP / DDP", ["N", "resident", "peak ordinary", "peak Hessian", "ms ordinary",
                                   "ms Hessian", "targets hold"], ratios))  # fmt: skip
    gpt2 = [[f"N={r['world']}", _mb(r["total_over_n"]), _mb(r["fsdp_resident_bytes"]),
             f"{r['fsdp_over_total_per_rank']:.4f}", f"{r['largest_unit']} {_mb(r['largest_unit_bytes'])}",
             _mb(r["ddp_resident_bytes"])] for r in report["gpt2_small"]]  # fmt: skip
    out.print(table("GPT-2 small (124M) from its layout, fp32, per rank",
                    ["N", "total/N MiB", "FSDP resident MiB", "/ (total/N)", "largest gathered unit MiB",
                     "DDP resident MiB"], gpt2))  # fmt: skip


def save_plot(report: dict[str, Any], path: Path) -> None:
    with figure(path, 1, 2, title=report["workload"]) as axes:
        worlds = [w["world"] for w in report["worlds"]]
        for ax, keys, label in (
            (axes[0][0], ("resident_bytes", "peak_ordinary_bytes", "peak_hessian_bytes"), "MiB per rank"),
            (axes[0][1], ("ms_ordinary", "ms_hessian"), "ms per step"),
        ):
            width = 0.8 / (len(keys) * 2)
            for i, key in enumerate(keys):
                for j, kind in enumerate(BACKENDS):
                    values = [w["backends"][kind][key] for w in report["worlds"]]
                    if key.endswith("bytes"):
                        values = [v / 2**20 for v in values]
                    x = [k + (2 * i + j) * width for k in range(len(worlds))]
                    ax.bar(x, values, width, label=f"{kind} {key.replace('_bytes', '')}")
            ax.set_xticks([k + 0.4 - width / 2 for k in range(len(worlds))], [f"N={w}" for w in worlds])
            ax.set_ylabel(label)
            ax.legend(fontsize=7)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--worlds", type=int, nargs="+", default=None)
    p.add_argument("--rounds", type=int, default=None)
    args = apply_mode(
        p.parse_args(),
        full={"worlds": [2, 4], "rounds": 7},
        quick={"worlds": [2], "rounds": 2},
    )
    started = time.perf_counter()
    lm = {"lm_seq": 32, "lm_layers": 4, "lm_heads": 4, "lm_embd": 256, "global_batch": 8}
    if args.quick:
        lm = {"lm_seq": 16, "lm_layers": 2, "lm_heads": 2, "lm_embd": 64, "global_batch": 4}
    settings = {**settings_of(args), **lm, "lr": 0.05}
    workload = make_workload(settings)
    n_params = sum(p.numel() for p in workload.make_model().parameters())
    worlds = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in args.worlds:
            log(f"N={world}: {world} processes")
            worlds.append(summarize_world(world, run_world(world, settings, Path(tmp)), n_params))
    report = {
        "machine": machine_info(),
        "settings": settings,
        "workload": f"{workload.description}, {n_params / 1e6:.2f} M parameters, AdaHessian k={FREQ}",
        "worlds": worlds,
        "gpt2_small": gpt2_layout(),
        "method": __doc__.split("How bytes are counted")[1].split("\n\n")[0].strip(),
    }
    finish(args.out, "fsdp_cost", report, started, save_plot, print_report)
    held = all(all(w["targets"].values()) for w in worlds) and all(
        r["within_tolerance"] for r in report["gpt2_small"]
    )
    if not math.isfinite(sum(w["backends"]["fsdp"]["last_loss"] for w in worlds)):
        held = False
    sys.exit(0 if held else 1)


if __name__ == "__main__":
    main()
