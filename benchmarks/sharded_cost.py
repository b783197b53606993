"""Memory, traffic and time of the sharded AdaHessian (ZeRO-1) on gloo process groups of 1, 2 and 4.

Run from the repository root::

    .venv/bin/python benchmarks/sharded_cost.py            # full run, ~2-4 min on 2 shared cores
    .venv/bin/python benchmarks/sharded_cost.py --quick    # tiny smoke run, well under a minute

For every world size N it spawns N processes (gloo over loopback, ``torch.set_num_threads(1)``
each) that train the same model on the same fixed global batches, split into N equal
micro-batches, and measures:

1. **Optimizer state per rank** -- ``opt.state_bytes()`` after the first step, against the
   single-process state ``2 * P * 4`` bytes (m and v in fp32) divided by N. Target: every rank
   within 5 % of total/N. The layout's own imbalance (largest share over P/N) is printed too.
2. **Bytes sent per rank per step**, for an ordinary and a Hessian step (``hessian_update_freq``
   2), in ``hessian_scope`` "global" and "local", against the ZeRO-1 minimum. With P parameters
   of b bytes, an ordinary step must reduce-scatter the gradients ((N-1)/N * P * b sent per rank by
   a ring) and all-gather the updated parameters (another (N-1)/N * P * b): ``2(N-1)/N * P * b``.
   A global-scope Hessian step also reduce-scatters the signed Hutchinson products:
   ``3(N-1)/N * P * b``; a local-scope one sends no products: ``2(N-1)/N * P * b``. (The 3-float
   statistics all-reduce is left out of the minimum.) Three numbers are compared with it:
   the optimizer's own ``bytes_sent_last_step``; ring-algorithm bytes computed from the tensors
   actually passed to ``torch.distributed`` collectives (patched in the worker); and the bytes the
   process really wrote to its sockets (``wchar`` of ``/proc/self/io``, which counts gloo's
   ``writev`` calls: the wire payload of whatever algorithm gloo uses, plus its small headers).
   Plain DDP's gradient all-reduce (minimum ``2(N-1)/N * P * b``) is measured the same way.
3. **Time per step** of the sharded AdaHessian through :class:`trainer.backends.DDPBackend` at
   ``hessian_update_freq`` 1 and 4, against ``DistributedDataParallel`` + ``torch.optim.AdamW``
   (``loss.backward(); opt.step()``) on the same model and micro-batches.
4. **GPT-2 small** (124M, its tied embedding 31% of the model): state and bytes per rank per step
   at N = 2, 4, 8 from the layout the optimizer builds (no processes). Targets: state ≤ 1.05 ×
   total/N, bytes ≤ 1.10 × the ZeRO-1 minimum.
5. **Overhead at world 1**: the sharded step (a gloo group of one) against the single-process
   ``AdaHessian`` on a model of 300 small tensors, where per-parameter Python work shows.
   Target: ≤ 1.15×.

Method (timing). After a warm-up of whole Hessian periods, configurations are timed in
interleaved rounds (order rotated per round): all ranks ``barrier``, run one block of
consecutive steps (a whole number of Hessian periods, starting on a Hessian step) with the
garbage collector paused, and the block time is the maximum over ranks. ms/step is the median
over rounds of block time / block steps. On a 2-core CPU, N = 4 oversubscribes the cores: the
numbers show the overheads of the method (extra compute, communication, copies), not the
scaling a multi-GPU machine would see.

Results go to ``--out`` (default ``benchmarks/results/``): ``sharded_cost.json`` (machine,
settings, theory, per-rank raw data, summary) and ``sharded_cost.png``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import inspect
import math
import multiprocessing
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import (
    apply_mode,
    console,
    figure,
    finish,
    free_port,
    interleaved,
    log,
    machine_info,
    parser,
    spread,
    table,
    timed,
    whole_periods,
)
from benchmarks.harness import settings as settings_of
from benchmarks.shapes import gpt2_small_shapes
from benchmarks.workloads import Workload, image_batches, lm_factory, token_batches
from trainer.backends import DDPBackend
from trainer.double_backward import twice_differentiable
from trainer.models import resnet20
from trainer.optim import AdaHessian
from trainer.optim.partition import FlatLayout
from trainer.spec import OptimizerSpec

STATE_TOLERANCE = 0.05  # state bytes of a rank / (total / N) - 1
TRAFFIC_TOLERANCE = 0.10  # bytes per rank per step / ZeRO-1 minimum - 1
OVERHEAD_TARGET = 1.15  # sharded step at world 1 / single-process AdaHessian step
GPT2_WORLDS = (2, 4, 8)
BYTES_FREQ = 2  # hessian_update_freq of the traffic runs: steps 1, 3 are Hessian steps, 2, 4 are not
ACCOUNTING_STEPS = 4
OVERSUBSCRIPTION_NOTE = (
    "Timings: N gloo processes share this machine's {cpus} logical CPUs (1 thread each); at N > {cpus} "
    "the cores are oversubscribed, so the N = 4 numbers show the overheads of sharding (extra compute, "
    "communication, copies), not the scaling of a multi-GPU run."
)
THEORY = {
    "P": "number of trainable parameters (tied weights counted once)",
    "b": "bytes per parameter (4, fp32)",
    "ordinary_step_min": "2(N-1)/N * P * b: reduce-scatter of gradients + all-gather of updated parameters",
    "hessian_step_global_min": "3(N-1)/N * P * b: also reduce-scatter of the signed products z*Hz",
    "hessian_step_local_min": "2(N-1)/N * P * b: products stay on their owner, no extra traffic",
    "ddp_all_reduce_min": "2(N-1)/N * P * b: ring all-reduce of gradients",
    "ring_bytes_per_rank": (
        "reduce_scatter(out, in): (N-1) * out bytes; all_gather(out, in): (N-1) * in bytes; "
        "all_reduce(t): 2(N-1)/N * t bytes"
    ),
    "implementation": (
        "ShardedAdaHessian cuts one flat buffer into N chunks of S elements (S = P/N plus a few "
        "elements of alignment padding) and reports (N-1) * S * b per reduce-scatter and all-gather "
        "plus 2(N-1)/N * 4 * (3 + tensors) for the statistics all-reduce, so measured / minimum ~ N * S / P"
    ),
    "excluded": "the 3-float statistics all-reduce (12 bytes) is not part of the minimum",
}


# -- workload --------------------------------------------------------------------------------


def make_workload(settings: dict[str, Any]) -> Workload:
    """The same model and data on every rank: everything is drawn from seeded generators."""
    gen = torch.Generator().manual_seed(settings["seed"])
    batch = settings["global_batch"]
    if settings["model"] == "resnet20":
        batches = image_batches(gen, batch, settings["data_batches"])
        return Workload("resnet20", f"ResNet-20, random CIFAR-shaped global batch {batch}", resnet20, batches)
    seq = settings["lm_seq"]
    layers, heads, embd = settings["lm_layers"], settings["lm_heads"], settings["lm_embd"]
    make_lm = lm_factory(seq, layers, heads, embd)
    batches = token_batches(gen, batch, seq, settings["data_batches"])
    desc = f"GPT LM {layers}L/{heads}H/{embd}d, random tokens, global batch {batch}x{seq}"
    return Workload("transformer", desc, make_lm, batches)


def fresh_model(workload: Workload, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return workload.make_model()


# -- byte accounting -------------------------------------------------------------------------


def socket_bytes_written() -> int | None:
    """Bytes this process passed to write-type syscalls (``wchar``), or None where unavailable."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("wchar:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class CollectiveCounter:
    """Wraps ``torch.distributed`` collectives to record the tensors they move while active.

    Per rank, ring algorithms send ``(N-1)`` output chunks in a reduce-scatter, ``(N-1)`` input
    chunks in an all-gather and ``2(N-1)/N`` of the tensor in an all-reduce.
    """

    NAMES: ClassVar[dict[str, str]] = {
        "reduce_scatter_tensor": "reduce_scatter",
        "reduce_scatter_single": "reduce_scatter",
        "all_gather_into_tensor": "all_gather",
        "all_gather_single": "all_gather",
        "all_reduce": "all_reduce",
    }

    def __init__(self, world: int) -> None:
        self.world = world
        self.active = False
        self.calls: list[dict[str, Any]] = []
        self._originals: dict[str, Callable[..., Any]] = {}

    def _ring_bytes(self, kind: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        n = self.world
        tensors = [a for a in args if torch.is_tensor(a)] + [v for v in kwargs.values() if torch.is_tensor(v)]
        if kind == "all_reduce":
            t = tensors[0]
            size = t.numel() * t.element_size()
            return {"op": kind, "bytes": size, "ring_bytes_sent": 2 * (n - 1) / n * size}
        output, input_ = tensors[0], tensors[1]
        chunk = output if kind == "reduce_scatter" else input_
        size = chunk.numel() * chunk.element_size()
        return {
            "op": kind,
            "bytes": input_.numel() * input_.element_size(),
            "ring_bytes_sent": (n - 1) * size,
        }

    def install(self) -> None:
        for name, kind in self.NAMES.items():
            original = getattr(dist, name, None)
            if original is None:
                continue
            self._originals[name] = original

            def wrapped(*args: Any, _original: Any = original, _kind: str = kind, **kwargs: Any) -> Any:
                if self.active:
                    self.calls.append(self._ring_bytes(_kind, args, kwargs))
                return _original(*args, **kwargs)

            setattr(dist, name, wrapped)

    def uninstall(self) -> None:
        for name, original in self._originals.items():
            setattr(dist, name, original)
        self._originals.clear()

    @contextmanager
    def counting(self) -> Iterator[list[dict[str, Any]]]:
        self.calls = []
        self.active = True
        try:
            yield self.calls
        finally:
            self.active = False


# -- the per-rank runners --------------------------------------------------------------------


class Runner:
    """One configuration on one rank: the sharded AdaHessian backend or DDP + AdamW."""

    def __init__(
        self, kind: str, freq: int, workload: Workload, settings: dict[str, Any], rank: int, world: int
    ) -> None:
        self.kind, self.freq = kind, freq
        self.workload, self.rank, self.world = workload, rank, world
        self.micro = [workload.micro_batch(i, rank, world) for i in range(len(workload.batches))]
        self.cursor = 0
        model = fresh_model(workload, settings["seed"])
        self.losses: list[float] = []
        if kind == "sharded":
            optimizer = OptimizerSpec(
                hessian_scope=settings.get("scope", "global"),
                hessian_update_freq=freq,
                lr=settings["lr_adahessian"],
            )
            self.backend = DDPBackend(
                model, lambda m, b: workload.loss(m(b[0]), b[1]), optimizer, seed=settings["seed"]
            )
            self.model = model
        else:
            # DDPBackend does not synchronize buffers after its initial broadcast; nor does DDP here.
            ddp = nn.parallel.DistributedDataParallel
            no_sync = (
                {"forward_sync_buffers": False}  # torch >= 2.13 deprecates broadcast_buffers
                if "forward_sync_buffers" in inspect.signature(ddp).parameters
                else {"broadcast_buffers": False}
            )
            self.model = ddp(model, **no_sync)
            self.opt = torch.optim.AdamW(self.model.parameters(), lr=settings["lr_adam"])

    def step(self) -> None:
        x, y = self.micro[self.cursor % len(self.micro)]
        self.cursor += 1
        if self.kind == "sharded":  # Hessian steps switched, as the worker loop runs them
            with twice_differentiable() if self.backend.hessian_due else nullcontext():
                self.losses.append(self.backend.train_step([x, y]).loss)
            return
        self.opt.zero_grad(set_to_none=True)
        loss = self.workload.loss(self.model(x), y)
        loss.backward()
        self.opt.step()
        self.losses.append(loss.item())

    def timed_block(self, n: int) -> float:
        """``n`` steps started together on all ranks; the slowest rank's seconds."""
        t = torch.tensor([timed(self.step, n, before=dist.barrier)], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())


def accounting_run(
    scope: str,
    workload: Workload,
    settings: dict[str, Any],
    rank: int,
    world: int,
    counter: CollectiveCounter,
) -> dict[str, Any]:
    """A few steps at hessian_update_freq 2: state bytes and three byte counts per step."""
    runner = Runner("sharded", BYTES_FREQ, workload, {**settings, "scope": scope}, rank, world)
    opt = runner.backend.optimizer
    steps = []
    state_bytes = None
    captured: list[str] = []
    for i in range(ACCOUNTING_STEPS):
        hessian = opt.hessian_due
        with warnings.catch_warnings(record=True) as caught, counter.counting() as calls:
            warnings.simplefilter("always")
            before = socket_bytes_written()
            start = time.perf_counter()
            runner.step()
            seconds = time.perf_counter() - start
            after = socket_bytes_written()
        captured += [f"{w.category.__name__}: {w.message}" for w in caught]
        if i == 0:
            state_bytes = opt.state_bytes()
        steps.append(
            {
                "step": i + 1,
                "hessian_step": hessian,
                "bytes_sent_last_step": opt.bytes_sent_last_step,
                "ring_bytes_from_collectives": sum(c["ring_bytes_sent"] for c in calls),
                "collectives": list(calls),
                "socket_bytes_written": None if before is None else after - before,
                "loss": runner.losses[-1],
                "seconds": seconds,
            }
        )
    layout = opt.layout
    return {
        "scope": scope,
        "state_bytes_after_first_step": state_bytes,
        "owned_numel": layout.owned_numel(rank),
        "segment": layout.chunk,
        "plan_describe": layout.describe(),
        "shard_numels": [layout.owned_numel(r) for r in range(world)],
        "steps": steps,
        "warnings": sorted(set(captured)),
    }


def ddp_traffic(workload: Workload, settings: dict[str, Any], rank: int, world: int) -> list[int | None]:
    """Socket bytes of three DDP + AdamW steps (the first one builds DDP's buckets)."""
    runner = Runner("ddp", 1, workload, settings, rank, world)
    sent = []
    for _ in range(3):
        dist.barrier()
        before = socket_bytes_written()
        runner.step()
        after = socket_bytes_written()
        sent.append(None if before is None else after - before)
    return sent


def timing_run(workload: Workload, settings: dict[str, Any], rank: int, world: int) -> list[dict[str, Any]]:
    configs = [("DDP + AdamW", "ddp", 1)] + [
        (f"sharded AdaHessian k={k}", "sharded", k) for k in settings["timing_freqs"]
    ]
    runners = [Runner(kind, k, workload, settings, rank, world) for _, kind, k in configs]
    blocks = [whole_periods(settings["block_steps"], k) for _, _, k in configs]
    for runner in runners:
        for _ in range(whole_periods(settings["warmup_steps"], runner.freq)):
            runner.step()

    def block(runner: Runner, n: int) -> Callable[[], float]:
        return lambda: runner.timed_block(n) / n * 1e3

    def done(r: int) -> None:
        if rank == 0:
            log(f"  N={world}: timing round {r + 1}/{settings['rounds']} done")

    rounds = interleaved([block(runner, n) for runner, n in zip(runners, blocks)], settings["rounds"], done)
    return [
        {
            "name": name,
            "kind": kind,
            "hessian_update_freq": k,
            "block_steps": blocks[i],
            "round_ms": rounds[i],
            "last_loss": runners[i].losses[-1],
        }
        for i, (name, kind, k) in enumerate(configs)
    ]


def _worker(rank: int, world: int, port: int, settings: dict[str, Any], out: str) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=600),
    )
    counter = CollectiveCounter(world)
    try:
        torch.set_num_threads(1)
        torch.set_flush_denormal(True)
        workload = make_workload(settings)
        counter.install()
        result: dict[str, Any] = {"rank": rank}
        result["accounting"] = {
            scope: accounting_run(scope, workload, settings, rank, world, counter)
            for scope in ("global", "local")
        }
        counter.uninstall()
        # The deprecation warnings of the collectives were recorded above; keep the log clean.
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*is deprecated.*")
        result["ddp_socket_bytes"] = ddp_traffic(workload, settings, rank, world)
        result["timing"] = timing_run(workload, settings, rank, world) if settings["timing"] else []
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, result)
        if rank == 0:
            torch.save(gathered, out)
        # Free the DDP reducers (reference cycles) while the process group is alive, so that no
        # gloo work is torn down during interpreter shutdown (seen once as a SIGABRT at exit).
        gc.collect()
        dist.barrier()
    finally:
        counter.uninstall()
        dist.destroy_process_group()


def run_world(world: int, settings: dict[str, Any], tmp: Path) -> list[dict[str, Any]]:
    """Run the ``world`` ranks; their results, gathered by rank 0."""
    port = free_port()
    out = str(tmp / f"world{world}.pt")
    # Ranks forked from a forkserver that imported torch once start in milliseconds; spawned ones
    # import torch again each (seconds on a small machine). Nothing is timed before they start.
    multiprocessing.set_forkserver_preload(["torch", "torch.distributed", "trainer.backends"])
    mp.start_processes(
        _worker, args=(world, port, settings, out), nprocs=world, join=True, start_method="forkserver"
    )
    return torch.load(out, weights_only=False)


# -- summary ---------------------------------------------------------------------------------


def _ratio(value: float | None, minimum: float) -> float | None:
    return None if value is None or minimum <= 0 else value / minimum


def summarize_world(world: int, ranks: list[dict[str, Any]], n_params: int, element: int) -> dict[str, Any]:
    total_state = 2 * n_params * element
    per_rank_target = total_state / world
    glob = [r["accounting"]["global"] for r in ranks]
    state_rows = []
    for r, acc in zip(ranks, glob):
        sb = acc["state_bytes_after_first_step"]
        state_rows.append(
            {
                "rank": r["rank"],
                "owned_numel": acc["owned_numel"],
                "state_bytes": sb,
                "expected_from_plan": 2 * acc["owned_numel"] * element,
                "total_over_n": per_rank_target,
                "deviation": sb / per_rank_target - 1.0,
                "within_tolerance": abs(sb / per_rank_target - 1.0) <= STATE_TOLERANCE,
            }
        )
    shard_numels = glob[0]["shard_numels"]
    segment = glob[0]["segment"]

    fraction = (world - 1) / world
    model_bytes = n_params * element
    minimum = {
        "ordinary": 2 * fraction * model_bytes,
        "hessian_global": 3 * fraction * model_bytes,
        "hessian_local": 2 * fraction * model_bytes,
    }

    def pick(scope: str, hessian: bool, key: str) -> list[Any]:
        # The last step of the kind: the first step also carries one-off warnings and set-up.
        return [
            [s for s in r["accounting"][scope]["steps"] if s["hessian_step"] == hessian][-1][key]
            for r in ranks
        ]

    traffic_rows = []
    for label, scope, hessian, mkey in (
        ("ordinary (global scope)", "global", False, "ordinary"),
        ("Hessian, global scope", "global", True, "hessian_global"),
        ("ordinary (local scope)", "local", False, "ordinary"),
        ("Hessian, local scope", "local", True, "hessian_local"),
    ):
        reported = pick(scope, hessian, "bytes_sent_last_step")
        ring = pick(scope, hessian, "ring_bytes_from_collectives")
        wire = pick(scope, hessian, "socket_bytes_written")
        wire_max = None if any(w is None for w in wire) else max(wire)
        traffic_rows.append(
            {
                "step": label,
                "scope": scope,
                "hessian_step": hessian,
                "minimum_bytes": minimum[mkey],
                "reported_bytes_per_rank": reported,
                "ring_bytes_per_rank": ring,
                "socket_bytes_per_rank": wire,
                "reported_over_minimum": _ratio(max(reported), minimum[mkey]),
                "ring_over_minimum": _ratio(max(ring), minimum[mkey]),
                "socket_over_minimum": _ratio(wire_max, minimum[mkey]),
                "reported_equals_ring": all(abs(a - b) <= 12 * world for a, b in zip(reported, ring)),
            }
        )
    ddp_wire = [r["ddp_socket_bytes"][-1] for r in ranks]
    ddp_min = 2 * fraction * model_bytes
    traffic_rows.append(
        {
            "step": "DDP all-reduce (reference)",
            "scope": None,
            "hessian_step": False,
            "minimum_bytes": ddp_min,
            "reported_bytes_per_rank": None,
            "ring_bytes_per_rank": None,
            "socket_bytes_per_rank": ddp_wire,
            "reported_over_minimum": None,
            "ring_over_minimum": None,
            "socket_over_minimum": _ratio(None if None in ddp_wire else max(ddp_wire), ddp_min),
            "reported_equals_ring": None,
        }
    )

    timing = []
    if ranks[0]["timing"]:
        rows = ranks[0]["timing"]  # the block times are already the maximum over ranks
        base = spread(rows[0]["round_ms"])["median"]
        for row in rows:
            ms = spread(row["round_ms"])
            timing.append(
                {
                    **{
                        k: row[k] for k in ("name", "kind", "hessian_update_freq", "block_steps", "last_loss")
                    },
                    "ms_per_step": ms["median"],
                    "ms_per_step_iqr": [ms["q1"], ms["q3"]],
                    "ratio_to_ddp_adamw": ms["median"] / base,
                    "round_ms": row["round_ms"],
                }
            )
    losses = {
        scope: [s["loss"] for s in ranks[0]["accounting"][scope]["steps"]] for scope in ("global", "local")
    }
    return {
        "world_size": world,
        "state": {
            "total_single_process_bytes": total_state,
            "total_over_n": per_rank_target,
            "sum_over_ranks": sum(r["state_bytes"] for r in state_rows),
            "ranks": state_rows,
            "target_met": all(r["within_tolerance"] for r in state_rows),
            "max_deviation": max(r["deviation"] for r in state_rows),
            "min_deviation": min(r["deviation"] for r in state_rows),
            "plan_describe": glob[0]["plan_describe"],
            "shard_numels": shard_numels,
            "plan_imbalance": max(shard_numels) / (n_params / world) - 1.0,
            "padding_factor": world * segment / n_params,
            "segment": segment,
        },
        "traffic": traffic_rows,
        "timing": timing,
        "accounting_losses": losses,
        "warnings": sorted({w for r in ranks for acc in r["accounting"].values() for w in acc["warnings"]}),
        "raw_accounting": [r["accounting"] for r in ranks],
        "raw_ddp_socket_bytes": [r["ddp_socket_bytes"] for r in ranks],
    }


def gpt2_small_accounting() -> list[dict[str, Any]]:
    """State and bytes per rank per step of the GPT-2-small parameter set at N = 2, 4, 8, from the
    layout the optimizer would build (no processes needed): the chunk is what every rank holds and
    what each reduce-scatter/all-gather moves, plus the statistics all-reduce (3 + tensors floats)."""
    names, shapes = zip(*gpt2_small_shapes())
    total = sum(math.prod(s) for s in shapes)
    element = 4
    rows = []
    for world in GPT2_WORLDS:
        layout = FlatLayout.build(list(names), list(shapes), [1] * len(shapes), world)
        stats = 2 * (world - 1) * (3 + len(shapes)) * 4 / world
        fraction = (world - 1) / world
        row = {
            "world_size": world,
            "chunk": layout.chunk,
            "largest_share": max(layout.owned_numel(r) for r in range(world)),
            "state_bytes_per_rank": 2 * layout.chunk * element,
            "state_over_total_over_n": layout.chunk / (total / world),
        }
        for kind, collectives in (("ordinary", 2), ("hessian_global", 3)):
            sent = collectives * (world - 1) * layout.chunk * element + stats
            minimum = collectives * fraction * total * element
            row[f"{kind}_bytes"] = sent
            row[f"{kind}_zero1_minimum"] = minimum
            row[f"{kind}_over_minimum"] = sent / minimum
        row["targets_met"] = (
            row["state_over_total_over_n"] <= 1 + STATE_TOLERANCE
            and row["ordinary_over_minimum"] <= 1 + TRAFFIC_TOLERANCE
            and row["hessian_global_over_minimum"] <= 1 + TRAFFIC_TOLERANCE
        )
        rows.append(row)
    return rows


class ManySmallTensors(nn.Module):
    """150 Linear(8, 8) layers in a residual chain: 300 parameter tensors of 64 and 8 elements,
    where per-parameter Python work, not arithmetic, dominates a step."""

    def __init__(self, layers: int = 150) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + 0.1 * torch.tanh(layer(x))
        return x


def world_one_overhead(rounds: int, block: int) -> list[dict[str, Any]]:
    """ms/step of the sharded AdaHessian (DDPBackend, a gloo group of one) against the
    single-process AdaHessian on ManySmallTensors, interleaved rounds, at Hessian frequency 1 and
    at a frequency so large that every timed step is an ordinary one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(32, 8, generator=g), torch.randn(32, 8, generator=g)

        def loss_fn(model: nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
            return F.mse_loss(model(batch[0]), batch[1])

        def per_step_ms(step: Callable[[], None]) -> Callable[[], float]:
            return lambda: timed(step, block) * 1e3 / block

        rows = []
        for freq in (1, 10_000):
            torch.manual_seed(0)
            single_model, sharded_model = ManySmallTensors(), ManySmallTensors()
            sharded_model.load_state_dict(single_model.state_dict())
            single = AdaHessian(single_model.named_parameters(), lr=1e-3, hessian_update_freq=freq)
            backend = DDPBackend(sharded_model, loss_fn, OptimizerSpec(lr=1e-3, hessian_update_freq=freq))

            def single_step(opt: AdaHessian = single, model: nn.Module = single_model) -> None:
                opt.zero_grad()
                opt.backward(loss_fn(model, [x, y]))
                opt.step()

            def sharded_step(backend: DDPBackend = backend) -> None:
                backend.train_step([x, y])

            for _ in range(3):
                single_step()
                sharded_step()
            times = interleaved([per_step_ms(single_step), per_step_ms(sharded_step)], rounds)
            single_ms, sharded_ms = (spread(ms)["median"] for ms in times)
            rows.append(
                {
                    "hessian_update_freq": freq,
                    "steps": "every step a Hessian step" if freq == 1 else "ordinary steps",
                    "single_process_ms": single_ms,
                    "sharded_world1_ms": sharded_ms,
                    "ratio": sharded_ms / single_ms,
                    "target_met": sharded_ms / single_ms <= OVERHEAD_TARGET,
                }
            )
        return rows
    finally:
        dist.destroy_process_group()
        torch.set_num_threads(threads)


def loss_agreement(worlds: list[dict[str, Any]]) -> float:
    """Largest relative difference of the global-scope losses across world sizes (should be ~1e-6)."""
    ref = worlds[0]["accounting_losses"]["global"]
    worst = 0.0
    for w in worlds[1:]:
        for a, b in zip(w["accounting_losses"]["global"], ref):
            worst = max(worst, abs(a - b) / max(abs(b), 1e-12))
    return worst


# -- output ----------------------------------------------------------------------------------


def _fmt_bytes(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value / 1e6:.3f} MB" if value >= 1e5 else f"{value:,.0f} B"


def _fmt_ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def _ok(flag: bool) -> str:
    return "[green]met[/]" if flag else "[red]NOT met[/]"


def print_report(report: dict[str, Any]) -> None:
    out = console(130)
    m, s = report["machine"], report["summary"]
    out.print(
        f"[bold]Sharded AdaHessian cost[/] -- {report['workload']}, P = {report['n_params']:,} parameters, "
        f"torch {m['torch']}, {m['logical_cpus']} CPUs, {m['cpu']}"
    )

    columns = ["N", "rank", "shard elements", "state bytes", "total/N", "deviation"]
    title = "1. Optimizer state per rank (after the first step)"
    state = table(title, [*columns, f"≤{STATE_TOLERANCE:.0%}"], [], left=())
    for w in report["worlds"]:
        for row in w["state"]["ranks"]:
            state.add_row(
                str(w["world_size"]),
                str(row["rank"]),
                f"{row['owned_numel']:,}",
                f"{row['state_bytes']:,}",
                f"{row['total_over_n']:,.0f}",
                f"{row['deviation']:+.1%}",
                "yes" if row["within_tolerance"] else "[red]no[/]",
            )
        state.add_section()
    out.print(state)
    total = report["worlds"][0]["state"]["total_single_process_bytes"]
    out.print(f"  single-process state 2 × P × 4 = {total:,} bytes")
    for w in report["worlds"]:
        st = w["state"]
        out.print(
            f"  N={w['world_size']}: Σ ranks = {st['sum_over_ranks']:,} B; layout imbalance "
            f"(largest share / (P/N) - 1) = {st['plan_imbalance']:+.1%}; "
            f"padded buffers N·S/P = {st['padding_factor']:.3f}"
        )
        if w["world_size"] > 1:
            for line in st["plan_describe"].splitlines():
                out.print(f"    {line}", overflow="ellipsis", no_wrap=True, markup=False)
    out.print(f"  every rank within {STATE_TOLERANCE:.0%} of total/N: {_ok(s['state_target_met'])}")
    peak = max(w["state"]["max_deviation"] for w in report["worlds"])
    out.print(
        f"  largest rank (peak memory) within {STATE_TOLERANCE:.0%} above total/N: "
        f"{_ok(peak <= STATE_TOLERANCE)} ({peak:+.1%})"
    )

    def top(values: list[Any] | None) -> float | None:
        return None if values is None or None in values else max(values)

    columns = ["N", "step", "minimum"]
    columns += [c for name in ("opt.bytes_sent", "ring (patched)", "socket writes") for c in (name, "× min")]
    title = "2. Bytes sent per rank per step (max over ranks) and ratio to the ZeRO-1 minimum"
    traffic = table(title, columns, [], left=("step",))
    for w in report["worlds"]:
        for row in w["traffic"]:
            traffic.add_row(
                str(w["world_size"]),
                row["step"],
                _fmt_bytes(row["minimum_bytes"]),
                _fmt_bytes(top(row["reported_bytes_per_rank"])),
                _fmt_ratio(row["reported_over_minimum"]),
                _fmt_bytes(top(row["ring_bytes_per_rank"])),
                _fmt_ratio(row["ring_over_minimum"]),
                _fmt_bytes(top(row["socket_bytes_per_rank"])),
                _fmt_ratio(row["socket_over_minimum"]),
            )
        traffic.add_section()
    out.print(traffic)
    out.print(
        "  minimum: ordinary 2(N-1)/N·P·b; Hessian global 3(N-1)/N·P·b; Hessian local 2(N-1)/N·P·b "
        "(b = 4; 12-byte stats all-reduce excluded)"
    )
    out.print(
        "  opt.bytes_sent = ring bytes of the tensors passed to the collectives (± the stats all-reduce): "
        f"{_ok(s['reported_equals_ring'])}"
    )
    out.print(f"  global-scope losses agree across world sizes: max rel. diff {s['loss_agreement']:.1e}")
    for text in s["step_warnings"]:
        out.print(f"  warning raised inside a step: {text}", markup=False)

    if report["worlds"][0]["timing"]:
        names = [t["name"] for t in report["worlds"][0]["timing"]]
        columns = ["N", f"{names[0]} ms", *(c for name in names[1:] for c in (f"{name} ms", "× DDP"))]
        rows = []
        for w in report["worlds"]:
            cells = [str(w["world_size"])]
            for t in w["timing"]:
                cells.append(
                    f"{t['ms_per_step']:.1f} ({t['ms_per_step_iqr'][0]:.0f}–{t['ms_per_step_iqr'][1]:.0f})"
                )
                if t["kind"] != "ddp":
                    cells.append(f"{t['ratio_to_ddp_adamw']:.2f}")
            rows.append(cells)
        rounds = report["settings"]["rounds"]
        title = f"3. Time per step (median of {rounds} interleaved rounds, max over ranks)"
        out.print(table(title, columns, rows, left=()))
    rows = [
        [
            row["world_size"],
            f"{row['state_over_total_over_n']:.4f} (≤{1 + STATE_TOLERANCE:.2f})",
            f"{row['ordinary_over_minimum']:.4f} (≤{1 + TRAFFIC_TOLERANCE:.2f})",
            f"{row['hessian_global_over_minimum']:.4f} (≤{1 + TRAFFIC_TOLERANCE:.2f})",
            _ok(row["targets_met"]),
        ]
        for row in report["gpt2_small"]
    ]
    columns = ["N", "state / (total/N)", "ordinary step / ZeRO-1 min", "Hessian step / min", "targets"]
    title = "4. GPT-2 small (124M) parameter set: state and bytes per rank, from the layout"
    out.print(table(title, columns, rows, left=()))
    rows = [
        [
            row["steps"],
            f"{row['single_process_ms']:.2f}",
            f"{row['sharded_world1_ms']:.2f}",
            f"{row['ratio']:.2f}",
            _ok(row["target_met"]),
        ]
        for row in report["world_one_overhead"]
    ]
    columns = ["steps", "single-process ms", "sharded (world 1) ms", "ratio", f"≤{OVERHEAD_TARGET}"]
    title = "5. Sharded step at world 1 against the single-process AdaHessian (300 small tensors)"
    out.print(table(title, columns, rows, left=()))
    out.print(f"[yellow]Note:[/] {report['note']}")


def save_plot(report: dict[str, Any], path: Path) -> None:
    worlds = report["worlds"]
    sizes = [w["world_size"] for w in worlds]
    panels = 3 if worlds[0]["timing"] else 2
    with figure(path, 1, panels, (5.2, 4.2), report["workload"]) as grid:
        axes = grid[0]
        ax = axes[0]
        max_n = max(sizes)
        width = 0.8 / max_n
        for i, w in enumerate(worlds):
            ranks = w["state"]["ranks"]
            for r, row in enumerate(ranks):
                x = i + (r - (len(ranks) - 1) / 2) * width
                ax.bar(x, row["state_bytes"] / 1e6, width=width * 0.9, color="tab:blue")
            target = w["state"]["total_over_n"] / 1e6
            ax.plot([i - 0.45, i + 0.45], [target] * 2, "k--", linewidth=1)
        ax.set_xticks(range(len(sizes)), [f"N={n}" for n in sizes])
        ax.set_ylabel("optimizer state per rank (MB)")
        ax.set_title("state per rank (bars) vs total/N (dashed)", fontsize=9)

        ax = axes[1]
        labels = [row["step"] for row in worlds[0]["traffic"]]
        multi = [w for w in worlds if w["world_size"] > 1]
        bar = 0.8 / len(labels)
        colors = ["tab:blue", "tab:orange", "tab:cyan", "tab:green", "tab:gray"]
        for j, label in enumerate(labels):
            for i, w in enumerate(multi):
                row = w["traffic"][j]
                ring = row["ring_bytes_per_rank"]
                wire = row["socket_bytes_per_rank"]
                value = max(ring) if ring else (max(wire) if wire and None not in wire else 0.0)
                x = i + (j - (len(labels) - 1) / 2) * bar
                color = colors[j % len(colors)]
                ax.bar(x, value / 1e6, width=bar * 0.9, color=color, label=label if i == 0 else None)
                if wire and None not in wire:
                    ax.bar(x, max(wire) / 1e6, width=bar * 0.9, fill=False, edgecolor=color, linestyle="--")
                ax.plot([x - bar / 2, x + bar / 2], [row["minimum_bytes"] / 1e6] * 2, "k-", linewidth=1.5)
        ax.set_xticks(range(len(multi)), [f"N={w['world_size']}" for w in multi])
        ax.set_ylabel("bytes sent per rank per step (MB)")
        ax.set_title(
            "solid: ring bytes (DDP: socket); dashed: socket bytes (gloo); black: minimum", fontsize=8
        )
        ax.legend(fontsize=7)

        if panels == 3:
            ax = axes[2]
            names = [t["name"] for t in worlds[0]["timing"]]
            for j, name in enumerate(names):
                ratios = [w["timing"][j]["ratio_to_ddp_adamw"] for w in worlds]
                ax.plot(sizes, ratios, marker="o", label=name)
            ax.set_xticks(sizes)
            ax.set_xlabel("world size N")
            ax.set_ylabel("time per step / DDP + AdamW")
            ax.set_title("time ratio (2-core CPU: N=4 oversubscribed)", fontsize=9)
            ax.legend(fontsize=7)


# -- command line ----------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser(__doc__, "tiny model and few steps (smoke test, < 1 min)")
    p.add_argument("--model", choices=("transformer", "resnet20"), default="transformer")
    p.add_argument("--worlds", default="1,2,4", help="comma-separated world sizes")
    p.add_argument("--global-batch", type=int, default=None, help="split into N micro-batches [16; quick 4]")
    p.add_argument("--lm-seq", type=int, default=None, help="[64; quick 16]")
    p.add_argument("--lm-layers", type=int, default=None, help="[2; quick 1]")
    p.add_argument("--lm-heads", type=int, default=4)
    p.add_argument("--lm-embd", type=int, default=None, help="[128; quick 32]")
    p.add_argument("--data-batches", type=int, default=4, help="size of the fixed pool of global batches")
    p.add_argument("--timing-freqs", default="1,4", help="hessian_update_freq values timed")
    p.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds [9; quick 2]")
    p.add_argument(
        "--block-steps", type=int, default=None, help="steps per block, whole periods [8; quick 4]"
    )
    p.add_argument("--warmup-steps", type=int, default=None, help="untimed steps, whole periods [4; quick 1]")
    p.add_argument("--no-timing", dest="timing", action="store_false", help="only state and traffic")
    p.add_argument("--lr-adam", type=float, default=1e-3)
    p.add_argument("--lr-adahessian", type=float, default=0.01)
    args = apply_mode(
        p.parse_args(argv),
        full={"global_batch": 16, "lm_seq": 64, "lm_layers": 2, "lm_embd": 128, "rounds": 9, "block_steps": 8,
              "warmup_steps": 4},
        quick={"global_batch": 4, "lm_seq": 16, "lm_layers": 1, "lm_embd": 32, "rounds": 2, "block_steps": 4,
               "warmup_steps": 1},
    )  # fmt: skip
    args.worlds = sorted({int(w) for w in args.worlds.split(",") if w.strip()})
    args.timing_freqs = [int(k) for k in args.timing_freqs.split(",") if k.strip()]
    if not args.worlds or min(args.worlds) < 1:
        p.error("--worlds: positive integers")
    if any(args.global_batch % n for n in args.worlds):
        p.error(f"--global-batch {args.global_batch} must divide evenly by every world size {args.worlds}")
    if args.rounds < 1 or args.block_steps < 1 or any(k < 1 for k in args.timing_freqs):
        p.error("--rounds, --block-steps and --timing-freqs must be at least 1")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    settings = settings_of(args)
    started = time.perf_counter()
    workload = make_workload(settings)
    model = fresh_model(workload, args.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    element = params[0].element_size()
    worlds = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in args.worlds:
            log(f"{workload.description}: world size {world}")
            begun = time.perf_counter()
            ranks = run_world(world, settings, Path(tmp))
            log(f"  N={world}: done in {time.perf_counter() - begun:.0f} s")
            worlds.append(summarize_world(world, ranks, n_params, element))
    log("GPT-2 small layout at N = 2, 4, 8; the world-1 overhead on 300 small tensors")
    gpt2 = gpt2_small_accounting()
    overhead = world_one_overhead(rounds=args.rounds, block=args.block_steps)
    summary = {
        "gpt2_small_targets_met": all(row["targets_met"] for row in gpt2),
        "world_one_overhead_target_met": all(row["target_met"] for row in overhead),
        "state_target": f"every rank within {STATE_TOLERANCE:.0%} of total/N",
        "state_target_met": all(w["state"]["target_met"] for w in worlds),
        "state_peak_deviation": max(w["state"]["max_deviation"] for w in worlds),
        "state_peak_target_met": max(w["state"]["max_deviation"] for w in worlds) <= STATE_TOLERANCE,
        "reported_equals_ring": all(
            row["reported_equals_ring"]
            for w in worlds
            for row in w["traffic"]
            if row["reported_equals_ring"] is not None
        ),
        "max_reported_over_minimum": max(
            (
                row["reported_over_minimum"]
                for w in worlds
                for row in w["traffic"]
                if row["reported_over_minimum"]
            ),
            default=None,
        ),
        "loss_agreement": loss_agreement(worlds),
        "step_warnings": sorted({text for w in worlds for text in w["warnings"]}),
    }
    report: dict[str, Any] = {
        "benchmark": "sharded_cost",
        "machine": machine_info(
            torch_threads_per_process=1,
            backend="gloo (TCP loopback)",
            socket_bytes_available=socket_bytes_written() is not None,
        ),
        "settings": settings,
        "workload": workload.description,
        "n_params": n_params,
        "bytes_per_param": element,
        "theory": THEORY,
        "method": (
            "per world size N, N spawned gloo processes (1 thread each) on fixed global batches split into "
            f"N micro-batches. State: opt.state_bytes() after step 1. Traffic: {ACCOUNTING_STEPS} steps at "
            f"hessian_update_freq {BYTES_FREQ}, last ordinary and last Hessian step reported; ring bytes "
            "from patched torch.distributed collectives; socket bytes = /proc/self/io wchar delta. "
            "Timing: interleaved rounds of whole-period blocks after barrier, block time = max over ranks, "
            "ms/step = median over rounds; gc paused in blocks."
        ),
        "note": OVERSUBSCRIPTION_NOTE.format(cpus=os.cpu_count()),
        "summary": summary,
        "worlds": worlds,
        "gpt2_small": gpt2,
        "world_one_overhead": overhead,
    }
    return finish(args.out, "sharded_cost", report, started, save_plot, print_report)


if __name__ == "__main__":
    main()
