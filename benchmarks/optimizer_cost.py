"""Per-step cost of AdaHessian against first-order optimizers (cf. the AdaHessian paper's speed table).

Run from the repository root::

    .venv/bin/python benchmarks/optimizer_cost.py            # full run, ~4-8 min on 2 shared cores
    .venv/bin/python benchmarks/optimizer_cost.py --quick    # tiny smoke run, well under a minute

For each model (ResNet-20 on random CIFAR-shaped images, a small GPT-style LM on random tokens)
it times one training step -- ``zero_grad`` + forward + backward + optimizer step -- for SGD
(momentum 0.9), AdamW, torch-optimizer's ``Adahessian`` (drop-in usage,
``loss.backward(create_graph=True)``, ``hessian_power=1.0``) and our
:class:`trainer.optim.AdaHessian` (efficient usage, ``opt.backward(loss)``) with
``hessian_update_freq`` k = 1..5.

Method. Every configuration gets its own copy of the same initial model and sees the same fixed
pool of random batches. After a warm-up, the configurations are timed *interleaved*: each round
times one block of consecutive steps of every configuration (in an order rotated from round to
round), and a configuration's per-step time is the median over rounds of (block time / block
steps). A block is always a whole number of Hessian periods: for update frequency k (k = 1 for
the other optimizers) it has ``k * ceil(block_steps / k)`` steps and starts on a Hessian step
(warm-up is also a whole number of periods), so the Hessian steps are amortized exactly. The
garbage collector is run before and paused during each block.

Targets: our k = 1 step costs at most 0.9x torch-optimizer's, and for every k the measured ratio
to SGD is within 5 % of the amortized prediction ``1 + (r1 - 1) / k``, where r1 is our k = 1
ratio to SGD.
The JSON also gives the prediction ``(r1 + (k - 1) * r_adamw) / k``, which prices the non-Hessian
steps as what they are (an Adam-type step, not an SGD step).

Results go to ``--out`` (default ``benchmarks/results/``): ``optimizer_cost.json`` (machine,
settings, per-round raw times, summary) and ``optimizer_cost.png`` (bar plot of ratios to SGD).
With ``--phases`` (on by default in a full run) the Hessian step of both AdaHessians is also split
into phases (forward, gradient with graph, Hessian-vector product, update).
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch_optimizer

import trainer.optim.adahessian as ours_module
from benchmarks.common import DEFAULT_OUT, machine_info, write_results
from trainer.models import resnet20, transformer_lm
from trainer.optim import AdaHessian

OURS_FREQS = (1, 2, 3, 4, 5)
SPEED_TARGET = 0.9  # our k=1 time / torch-optimizer's time
AMORTIZED_TOLERANCE = 0.05  # |measured / predicted - 1|


# -- workloads -------------------------------------------------------------------------------


@dataclass
class Workload:
    """A model factory, a pool of fixed batches and the loss to train on them."""

    name: str
    description: str
    make_model: Callable[[], nn.Module]
    batches: list[tuple[torch.Tensor, torch.Tensor]]

    @staticmethod
    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def make_workloads(args: argparse.Namespace) -> list[Workload]:
    """The selected workloads, with data drawn from a generator seeded by ``--seed``."""
    gen = torch.Generator().manual_seed(args.seed)
    workloads = []
    if "resnet20" in args.models:
        batches = [
            (
                torch.randn(args.resnet_batch, 3, 32, 32, generator=gen),
                torch.randint(0, 10, (args.resnet_batch,), generator=gen),
            )
            for _ in range(args.data_batches)
        ]
        workloads.append(
            Workload(
                "resnet20", f"ResNet-20, random CIFAR-shaped batch {args.resnet_batch}", resnet20, batches
            )
        )
    if "transformer" in args.models:
        vocab, seq = 96, args.lm_seq

        def make_lm() -> nn.Module:
            return transformer_lm(
                vocab_size=vocab,
                block_size=seq,
                n_layer=args.lm_layers,
                n_head=args.lm_heads,
                n_embd=args.lm_embd,
            )

        batches = []
        for _ in range(args.data_batches):
            tokens = torch.randint(0, vocab, (args.lm_batch, seq + 1), generator=gen)
            batches.append((tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()))
        desc = (
            f"GPT LM {args.lm_layers}L/{args.lm_heads}H/{args.lm_embd}d, random tokens {args.lm_batch}x{seq}"
        )
        workloads.append(Workload("transformer", desc, make_lm, batches))
    return workloads


# -- optimizer configurations ----------------------------------------------------------------


@dataclass
class Config:
    """One optimizer setting: how to build it, how to run its backward, its Hessian period."""

    name: str
    kind: str  # "sgd" | "adamw" | "torch_optimizer" | "ours"
    freq: int = 1

    def build(self, params: list[nn.Parameter], args: argparse.Namespace) -> torch.optim.Optimizer:
        if self.kind == "sgd":
            return torch.optim.SGD(params, lr=args.lr_sgd, momentum=0.9)
        if self.kind == "adamw":
            return torch.optim.AdamW(params, lr=args.lr_adam)
        if self.kind == "torch_optimizer":
            return torch_optimizer.Adahessian(params, lr=args.lr_adahessian, hessian_power=1.0)
        return AdaHessian(
            params, lr=args.lr_adahessian, hessian_power=1.0, hessian_update_freq=self.freq, seed=args.seed
        )


def make_configs() -> list[Config]:
    configs = [
        Config("SGD (momentum 0.9)", "sgd"),
        Config("AdamW", "adamw"),
        Config("torch-optimizer Adahessian", "torch_optimizer"),
    ]
    configs += [Config(f"AdaHessian k={k}", "ours", k) for k in OURS_FREQS]
    return configs


class Runner:
    """A model replica with its optimizer; :meth:`steps` runs whole training steps."""

    def __init__(
        self, config: Config, model: nn.Module, workload: Workload, args: argparse.Namespace
    ) -> None:
        self.config = config
        self.model = model
        self.workload = workload
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = config.build(self.params, args)
        self.cursor = 0

    def _batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.workload.batches[self.cursor % len(self.workload.batches)]
        self.cursor += 1
        return batch

    def step(self) -> None:
        """One full training step, exactly as a user would write it for this optimizer."""
        x, y = self._batch()
        self.opt.zero_grad(set_to_none=True)
        loss = self.workload.loss(self.model(x), y)
        if self.config.kind == "ours":
            self.opt.backward(loss)  # type: ignore[attr-defined]
        elif self.config.kind == "torch_optimizer":
            loss.backward(create_graph=True)
        else:
            loss.backward()
        self.opt.step()

    def steps(self, n: int) -> float:
        """Run ``n`` steps with the garbage collector paused; return the elapsed seconds."""
        gc.collect()
        gc.disable()
        try:
            start = time.perf_counter()
            for _ in range(n):
                self.step()
            return time.perf_counter() - start
        finally:
            gc.enable()


def whole_periods(steps: int, freq: int) -> int:
    """The smallest multiple of ``freq`` that is at least ``steps``."""
    return freq * math.ceil(max(steps, 1) / freq)


# -- the interleaved measurement -------------------------------------------------------------


@dataclass
class Measurement:
    name: str
    kind: str
    freq: int
    block_steps: int
    round_ms: list[float] = field(default_factory=list)  # per-step ms, one entry per round

    @property
    def median_ms(self) -> float:
        return statistics.median(self.round_ms)


def measure(
    workload: Workload, configs: list[Config], args: argparse.Namespace, log: Callable[[str], None]
) -> list[Measurement]:
    """Warm up every configuration, then time them in ``args.rounds`` interleaved rounds."""
    torch.manual_seed(args.seed)
    base = workload.make_model()
    runners = [Runner(c, copy.deepcopy(base), workload, args) for c in configs]
    results = [Measurement(c.name, c.kind, c.freq, whole_periods(args.block_steps, c.freq)) for c in configs]
    for runner in runners:
        runner.steps(whole_periods(args.warmup_steps, runner.config.freq))
    for r in range(args.rounds):
        order = [(i + r) % len(runners) for i in range(len(runners))]
        for i in order:
            n = results[i].block_steps
            results[i].round_ms.append(runners[i].steps(n) / n * 1e3)
        log(f"  {workload.name}: round {r + 1}/{args.rounds} done")
    return results


def summarize(results: list[Measurement]) -> dict[str, Any]:
    """Ratios to SGD and AdamW, amortization check and the speed target, from median times."""
    sgd = next(m.median_ms for m in results if m.kind == "sgd")
    adamw = next(m.median_ms for m in results if m.kind == "adamw")
    rows = []
    for m in results:
        q = statistics.quantiles(m.round_ms, n=4) if len(m.round_ms) > 1 else [m.median_ms] * 3
        rows.append(
            {
                "name": m.name,
                "kind": m.kind,
                "hessian_update_freq": m.freq,
                "block_steps": m.block_steps,
                "ms_per_step": m.median_ms,
                "ms_per_step_min": min(m.round_ms),
                "ms_per_step_iqr": [q[0], q[2]],
                "ratio_to_sgd": m.median_ms / sgd,
                "ratio_to_adamw": m.median_ms / adamw,
                "round_ms": m.round_ms,
            }
        )
    ours = {m.freq: m for m in results if m.kind == "ours"}
    r1 = ours[1].median_ms / sgd
    amortized = []
    for k, m in sorted(ours.items()):
        predicted = 1.0 + (r1 - 1.0) / k
        deviation = (m.median_ms / sgd) / predicted - 1.0
        # Same amortization, but pricing the k-1 non-Hessian steps as AdamW steps (what they are).
        predicted_adamw = (r1 + (k - 1) * adamw / sgd) / k
        amortized.append(
            {
                "hessian_update_freq": k,
                "measured_ratio_to_sgd": m.median_ms / sgd,
                "predicted_ratio_to_sgd": predicted,
                "relative_deviation": deviation,
                "target_met": abs(deviation) <= AMORTIZED_TOLERANCE,
                "predicted_ratio_adamw_baseline": predicted_adamw,
                "relative_deviation_adamw_baseline": (m.median_ms / sgd) / predicted_adamw - 1.0,
            }
        )
    reference = next(m for m in results if m.kind == "torch_optimizer")
    speed = ours[1].median_ms / reference.median_ms
    return {
        "rows": rows,
        "amortized": amortized,
        "ours_k1_over_torch_optimizer": speed,
        "speed_target": SPEED_TARGET,
        "speed_target_met": speed <= SPEED_TARGET,
        "amortized_tolerance": AMORTIZED_TOLERANCE,
        "amortized_target_met": all(a["target_met"] for a in amortized),
    }


# -- phase breakdown of a Hessian step -------------------------------------------------------


@contextmanager
def _timed(store: dict[str, float], key: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        store[key] = store.get(key, 0.0) + time.perf_counter() - start


def _phase_step(
    runner: Runner, wrap_hvp: Callable[[dict[str, float]], Callable[[], None]]
) -> dict[str, float]:
    """One Hessian step of an AdaHessian, timed by phase (seconds)."""
    t: dict[str, float] = {}
    restore = wrap_hvp(t)
    try:
        x, y = runner._batch()
        with _timed(t, "zero_grad"):
            runner.opt.zero_grad(set_to_none=True)
        with _timed(t, "forward"):
            loss = runner.workload.loss(runner.model(x), y)
        with _timed(t, "backward"):
            if runner.config.kind == "ours":
                runner.opt.backward(loss)  # type: ignore[attr-defined]
            else:
                loss.backward(create_graph=True)
        with _timed(t, "step"):
            runner.opt.step()
    finally:
        restore()
    hvp = t.get("hvp", 0.0)
    # The HVP runs inside `backward` for ours and inside `step` for torch-optimizer.
    inside = "backward" if runner.config.kind == "ours" else "step"
    t[inside] -= hvp
    return {
        "zero_grad": t["zero_grad"],
        "forward": t["forward"],
        "gradient_with_graph": t["backward"],
        "hvp": hvp,
        "update": t["step"],
    }


def measure_phases(workload: Workload, args: argparse.Namespace, steps: int) -> dict[str, dict[str, float]]:
    """Median phase times (ms) of a Hessian step: ours (k=1) vs torch-optimizer, plus SGD's step."""
    torch.manual_seed(args.seed)
    base = workload.make_model()
    ours = Runner(Config("ours", "ours", 1), copy.deepcopy(base), workload, args)
    ref = Runner(Config("torch-optimizer", "torch_optimizer"), copy.deepcopy(base), workload, args)
    sgd = Runner(Config("sgd", "sgd"), copy.deepcopy(base), workload, args)

    def wrap_ours(t: dict[str, float]) -> Callable[[], None]:
        original = ours_module.hutchinson_products

        def timed(*a: Any, **kw: Any) -> Any:
            with _timed(t, "hvp"):
                return original(*a, **kw)

        ours_module.hutchinson_products = timed  # type: ignore[assignment]

        def restore() -> None:
            ours_module.hutchinson_products = original

        return restore

    def wrap_ref(t: dict[str, float]) -> Callable[[], None]:
        opt: Any = ref.opt
        original = opt.get_trace

        def timed(*a: Any, **kw: Any) -> Any:
            with _timed(t, "hvp"):
                return original(*a, **kw)

        opt.get_trace = timed

        def restore() -> None:
            del opt.get_trace

        return restore

    samples: dict[str, list[dict[str, float]]] = {"ours_k1": [], "torch_optimizer": [], "sgd": []}
    for runner in (ours, ref, sgd):
        runner.steps(2)
    for _ in range(steps):
        gc.collect()
        samples["ours_k1"].append(_phase_step(ours, wrap_ours))
        samples["torch_optimizer"].append(_phase_step(ref, wrap_ref))
        t: dict[str, float] = {}
        x, y = sgd._batch()
        with _timed(t, "zero_grad"):
            sgd.opt.zero_grad(set_to_none=True)
        with _timed(t, "forward"):
            loss = workload.loss(sgd.model(x), y)
        with _timed(t, "gradient"):
            loss.backward()
        with _timed(t, "update"):
            sgd.opt.step()
        samples["sgd"].append(t)
    return {
        name: {key: statistics.median(s[key] for s in rows) * 1e3 for key in rows[0]}
        for name, rows in samples.items()
    }


# -- output ----------------------------------------------------------------------------------


def print_report(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 120)
    m = report["machine"]
    console.print(
        f"[bold]Optimizer step cost[/] -- torch {m['torch']}, {m['torch_threads']} threads, {m['cpu']}"
    )
    for wl in report["workloads"]:
        s = wl["summary"]
        table = Table(title=f"{wl['description']} ({report['settings']['rounds']} rounds, median)")
        for col in (
            "optimizer",
            "block",
            "ms/step",
            "IQR (ms)",
            "× SGD",
            "× AdamW",
            "predicted × SGD",
            "dev.",
        ):
            table.add_column(col, justify="left" if col == "optimizer" else "right")
        predicted = {a["hessian_update_freq"]: a for a in s["amortized"]}
        for row in s["rows"]:
            pred = predicted.get(row["hessian_update_freq"]) if row["kind"] == "ours" else None
            dev = ""
            if pred is not None:
                style = "green" if pred["target_met"] else "red"
                dev = f"[{style}]{pred['relative_deviation']:+.1%}[/]"
            table.add_row(
                row["name"],
                str(row["block_steps"]),
                f"{row['ms_per_step']:.1f}",
                f"{row['ms_per_step_iqr'][0]:.1f}–{row['ms_per_step_iqr'][1]:.1f}",
                f"{row['ratio_to_sgd']:.2f}",
                f"{row['ratio_to_adamw']:.2f}",
                f"{pred['predicted_ratio_to_sgd']:.2f}" if pred else "",
                dev,
            )
        console.print(table)
        ok = "[green]met[/]" if s["speed_target_met"] else "[red]NOT met[/]"
        speed = s["ours_k1_over_torch_optimizer"]
        console.print(f"  ours k=1 / torch-optimizer = {speed:.3f} (target ≤ {SPEED_TARGET}): {ok}")
        ok = "[green]met[/]" if s["amortized_target_met"] else "[red]NOT met[/]"
        console.print(f"  every k within {AMORTIZED_TOLERANCE:.0%} of 1 + (r1 - 1)/k: {ok}")
        if "phases_ms" in wl:
            phases = Table(title=f"{wl['name']}: phases of a Hessian step (median ms)")
            names = list(wl["phases_ms"])
            phases.add_column("phase")
            for name in names:
                phases.add_column(name, justify="right")
            keys = list(dict.fromkeys(k for name in names for k in wl["phases_ms"][name]))
            for key in [*keys, "total"]:
                vals = [
                    sum(wl["phases_ms"][n].values()) if key == "total" else wl["phases_ms"][n].get(key)
                    for n in names
                ]
                phases.add_row(key, *("" if v is None else f"{v:.1f}" for v in vals))
            console.print(phases)


def save_plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = report["workloads"]
    fig, axes = plt.subplots(1, len(workloads), figsize=(6 * len(workloads), 4.5), squeeze=False)
    for ax, wl in zip(axes[0], workloads):
        rows = wl["summary"]["rows"]
        names = [
            r["name"].replace("torch-optimizer ", "torch-opt.\n").replace(" (momentum 0.9)", "") for r in rows
        ]
        ratios = [r["ratio_to_sgd"] for r in rows]
        colors = [
            "tab:gray"
            if r["kind"] in ("sgd", "adamw")
            else "tab:orange"
            if r["kind"] == "torch_optimizer"
            else "tab:blue"
            for r in rows
        ]
        ax.bar(range(len(rows)), ratios, color=colors)
        pred = {a["hessian_update_freq"]: a["predicted_ratio_to_sgd"] for a in wl["summary"]["amortized"]}
        for i, r in enumerate(rows):
            if r["kind"] == "ours":
                ax.plot(
                    [i - 0.4, i + 0.4],
                    [pred[r["hessian_update_freq"]]] * 2,
                    color="k",
                    linestyle="--",
                    linewidth=1,
                )
            ax.text(i, ratios[i], f"{ratios[i]:.2f}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(rows)), names, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("time per step / SGD")
        ax.set_title(wl["description"], fontsize=9)
    fig.suptitle("Per-step cost (dashed: amortized prediction 1 + (r1 - 1)/k)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- command line ----------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes and few steps (smoke test, < 1 min)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory for the JSON and PNG results")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--models", default="resnet20,transformer", help="comma-separated: resnet20, transformer")
    p.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds [7; quick 2]")
    p.add_argument(
        "--block-steps",
        type=int,
        default=None,
        help="steps per timed block, rounded up to whole Hessian periods [12; quick 5]",
    )
    p.add_argument(
        "--warmup-steps",
        type=int,
        default=None,
        help="untimed steps per config, rounded up to whole periods [5; quick 2]",
    )
    p.add_argument("--data-batches", type=int, default=4, help="size of the fixed pool of random batches")
    p.add_argument("--resnet-batch", type=int, default=None, help="[32; quick 4]")
    p.add_argument("--lm-batch", type=int, default=None, help="[16; quick 2]")
    p.add_argument("--lm-seq", type=int, default=None, help="[64; quick 16]")
    p.add_argument("--lm-layers", type=int, default=2)
    p.add_argument("--lm-heads", type=int, default=4)
    p.add_argument("--lm-embd", type=int, default=None, help="[128; quick 32]")
    p.add_argument("--lr-sgd", type=float, default=0.01)
    p.add_argument("--lr-adam", type=float, default=1e-3)
    p.add_argument("--lr-adahessian", type=float, default=0.01, help="both AdaHessian implementations")
    p.add_argument(
        "--phases",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="phase breakdown [on; quick off]",
    )
    p.add_argument("--phase-steps", type=int, default=7, help="Hessian steps sampled for the phase breakdown")
    args = p.parse_args(argv)
    full = {
        "rounds": 7,
        "block_steps": 12,
        "warmup_steps": 5,
        "resnet_batch": 32,
        "lm_batch": 16,
        "lm_seq": 64,
        "lm_embd": 128,
        "phases": True,
    }
    quick = {
        "rounds": 2,
        "block_steps": 5,
        "warmup_steps": 2,
        "resnet_batch": 4,
        "lm_batch": 2,
        "lm_seq": 16,
        "lm_embd": 32,
        "phases": False,
    }
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = set(args.models) - {"resnet20", "transformer"}
    if unknown or not args.models:
        p.error(f"--models: unknown {sorted(unknown)}; choose from resnet20, transformer")
    if args.rounds < 1 or args.block_steps < 1:
        p.error("--rounds and --block-steps must be at least 1")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    # torch-optimizer's documented usage, backward(create_graph=True), warns about a param<->grad
    # reference cycle; its step() detaches the gradients, which breaks the cycle.
    warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    started = time.perf_counter()
    report: dict[str, Any] = {
        "benchmark": "optimizer_cost",
        "machine": machine_info(
            torch_optimizer=getattr(torch_optimizer, "__version__", "unknown"),
            torch_threads=torch.get_num_threads(),
            flush_denormal=True,
        ),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "method": (
            "interleaved rounds; per round each config runs one block of k*ceil(block_steps/k) steps "
            "(whole Hessian periods, starting on a Hessian step) after a warm-up of whole periods; "
            "ms/step = median over rounds of block time / block steps; gc paused in blocks"
        ),
        "configs": [asdict(c) for c in make_configs()],
        "workloads": [],
    }
    for workload in make_workloads(args):
        log(f"{workload.description}: timing {len(make_configs())} configs")
        results = measure(workload, make_configs(), args, log)
        entry: dict[str, Any] = {
            "name": workload.name,
            "description": workload.description,
            "summary": summarize(results),
        }
        if args.phases:
            log(f"  {workload.name}: phase breakdown")
            entry["phases_ms"] = measure_phases(workload, args, args.phase_steps)
        report["workloads"].append(entry)
    report["wall_seconds"] = time.perf_counter() - started

    files = write_results(args.out, "optimizer_cost", report, save_plot)
    print_report(report)
    print(f"results: {files} ({report['wall_seconds']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
