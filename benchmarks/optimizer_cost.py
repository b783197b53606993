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
into phases (forward, gradient with graph, Hessian-vector product, update). With ``--variants`` (on
by default) the LM's ordinary and Hessian steps of our AdaHessian are timed with its attention
written out (as it was before it used ``F.scaled_dot_product_attention``) and through SDPA with
the math-kernel switch on Hessian steps, in fp32 and under bf16 autocast (CPU autocast: on a
GPU, bf16 and the fused kernels gain far more).
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch_optimizer

import trainer.optim.adahessian as ours_module
from benchmarks.harness import (
    apply_mode,
    console,
    figure,
    finish,
    interleaved,
    log,
    machine_info,
    parser,
    settings,
    spread,
    table,
    timed,
    whole_periods,
)
from benchmarks.workloads import Workload, image_batches, lm_factory, token_batches, write_attention_out
from trainer.backends.base import autocast
from trainer.double_backward import twice_differentiable
from trainer.models import resnet20
from trainer.optim import AdaHessian

OURS_FREQS = (1, 2, 3, 4, 5)
SPEED_TARGET = 0.9  # our k=1 time / torch-optimizer's time
AMORTIZED_TOLERANCE = 0.05  # |measured / predicted - 1|


# -- workloads -------------------------------------------------------------------------------


def make_workloads(args: argparse.Namespace) -> list[Workload]:
    """The selected workloads, with data drawn from a generator seeded by ``--seed``."""
    gen = torch.Generator().manual_seed(args.seed)
    workloads = []
    if "resnet20" in args.models:
        batches = image_batches(gen, args.resnet_batch, args.data_batches)
        workloads.append(
            Workload(
                "resnet20", f"ResNet-20, random CIFAR-shaped batch {args.resnet_batch}", resnet20, batches
            )
        )
    if "transformer" in args.models:
        seq = args.lm_seq
        make_lm = lm_factory(seq, args.lm_layers, args.lm_heads, args.lm_embd)
        batches = token_batches(gen, args.lm_batch, seq, args.data_batches)
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

    def backward(self, loss: torch.Tensor) -> None:
        """The backward pass this optimizer's documented usage asks for."""
        if self.config.kind == "ours":
            self.opt.backward(loss)  # type: ignore[attr-defined]
        elif self.config.kind == "torch_optimizer":
            loss.backward(create_graph=True)
        else:
            loss.backward()

    @property
    def hessian_due(self) -> bool:
        """Whether this step differentiates the loss twice (torch-optimizer's: every step)."""
        if self.config.kind == "ours":
            return self.opt.hessian_due  # type: ignore[attr-defined]
        return self.config.kind == "torch_optimizer"

    def step(self) -> None:
        """One full training step, exactly as a user would write it for this optimizer (Hessian
        steps with attention on its twice-differentiable kernel, as hutch's workers run them)."""
        x, y = self._batch()
        with twice_differentiable() if self.hessian_due else nullcontext():
            self.opt.zero_grad(set_to_none=True)
            self.backward(self.workload.loss(self.model(x), y))
            self.opt.step()


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


def measure(workload: Workload, configs: list[Config], args: argparse.Namespace) -> list[Measurement]:
    """Warm up every configuration, then time them in ``args.rounds`` interleaved rounds."""
    torch.manual_seed(args.seed)
    base = workload.make_model()
    runners = [Runner(c, copy.deepcopy(base), workload, args) for c in configs]
    results = [Measurement(c.name, c.kind, c.freq, whole_periods(args.block_steps, c.freq)) for c in configs]
    for runner in runners:
        timed(runner.step, whole_periods(args.warmup_steps, runner.config.freq))

    def block(runner: Runner, n: int) -> Callable[[], float]:
        return lambda: timed(runner.step, n) / n * 1e3

    rounds = interleaved(
        [block(runner, m.block_steps) for runner, m in zip(runners, results)],
        args.rounds,
        lambda r: log(f"  {workload.name}: round {r + 1}/{args.rounds} done"),
    )
    for m, round_ms in zip(results, rounds):
        m.round_ms = round_ms
    return results


def summarize(results: list[Measurement]) -> dict[str, Any]:
    """Ratios to SGD and AdamW, amortization check and the speed target, from median times."""
    sgd = next(m.median_ms for m in results if m.kind == "sgd")
    adamw = next(m.median_ms for m in results if m.kind == "adamw")
    rows = []
    for m in results:
        s = spread(m.round_ms)
        rows.append(
            {
                "name": m.name,
                "kind": m.kind,
                "hessian_update_freq": m.freq,
                "block_steps": m.block_steps,
                "ms_per_step": s["median"],
                "ms_per_step_min": s["min"],
                "ms_per_step_iqr": [s["q1"], s["q3"]],
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
def _clock(store: dict[str, float], key: str) -> Iterator[None]:
    """Add the seconds the block takes to ``store[key]``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        store[key] = store.get(key, 0.0) + time.perf_counter() - start


@contextmanager
def _clocking(owner: Any, name: str, store: dict[str, float]) -> Iterator[None]:
    """While active, every call of ``owner.name`` adds its seconds to ``store["hvp"]``."""
    original = getattr(owner, name)
    own = name in vars(owner)  # a module's function is put back, an instance's override dropped

    def clocked(*a: Any, **kw: Any) -> Any:
        with _clock(store, "hvp"):
            return original(*a, **kw)

    setattr(owner, name, clocked)
    try:
        yield
    finally:
        if own:
            setattr(owner, name, original)
        else:
            delattr(owner, name)


def _phase_step(runner: Runner, hvp: tuple[Any, str] | None) -> dict[str, float]:
    """One step timed by phase (seconds); ``hvp`` names the (owner, function) that computes an
    AdaHessian's Hessian-vector products, timed apart from the phase that calls it."""
    t: dict[str, float] = {}
    x, y = runner._batch()
    switch = twice_differentiable() if runner.hessian_due else nullcontext()
    with switch, _clocking(*hvp, t) if hvp else nullcontext():
        with _clock(t, "zero_grad"):
            runner.opt.zero_grad(set_to_none=True)
        with _clock(t, "forward"):
            loss = runner.workload.loss(runner.model(x), y)
        with _clock(t, "backward"):
            runner.backward(loss)
        with _clock(t, "step"):
            runner.opt.step()
    if hvp is None:
        return {
            "zero_grad": t["zero_grad"],
            "forward": t["forward"],
            "gradient": t["backward"],
            "update": t["step"],
        }
    hvp_s = t.get("hvp", 0.0)
    # The HVP runs inside `backward` for ours and inside `step` for torch-optimizer.
    t["backward" if runner.config.kind == "ours" else "step"] -= hvp_s
    return {
        "zero_grad": t["zero_grad"],
        "forward": t["forward"],
        "gradient_with_graph": t["backward"],
        "hvp": hvp_s,
        "update": t["step"],
    }


def measure_phases(workload: Workload, args: argparse.Namespace, steps: int) -> dict[str, dict[str, float]]:
    """Median phase times (ms) of a Hessian step: ours (k=1) vs torch-optimizer, plus SGD's step."""
    torch.manual_seed(args.seed)
    base = workload.make_model()
    ours = Runner(Config("ours", "ours", 1), copy.deepcopy(base), workload, args)
    ref = Runner(Config("torch-optimizer", "torch_optimizer"), copy.deepcopy(base), workload, args)
    sgd = Runner(Config("sgd", "sgd"), copy.deepcopy(base), workload, args)
    timers: dict[str, tuple[Runner, tuple[Any, str] | None]] = {
        "ours_k1": (ours, (ours_module, "hutchinson_products")),
        "torch_optimizer": (ref, (ref.opt, "get_trace")),
        "sgd": (sgd, None),
    }
    for runner, _ in timers.values():
        timed(runner.step, 2)
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in timers}
    for _ in range(steps):
        gc.collect()
        for name, (runner, hvp) in timers.items():
            samples[name].append(_phase_step(runner, hvp))
    return {
        name: {key: statistics.median(s[key] for s in rows) * 1e3 for key in rows[0]}
        for name, rows in samples.items()
    }


# -- the LM's attention and precision --------------------------------------------------------


@dataclass(frozen=True)
class LMVariant:
    """One way to run the LM's AdaHessian steps: attention written out or through SDPA (with the
    math-kernel switch on Hessian steps), fp32 or bf16 autocast, ordinary or Hessian steps."""

    attention: str  # "written" | "sdpa"
    precision: str  # "fp32" | "bf16"
    hessian: bool

    @property
    def name(self) -> str:
        step = "Hessian" if self.hessian else "ordinary"
        return f"{self.attention}, {self.precision}, {step} step"


LM_VARIANTS = [
    LMVariant(attention, precision, hessian)
    for attention, precision in (("written", "fp32"), ("sdpa", "fp32"), ("sdpa", "bf16"))
    for hessian in (False, True)
]


class VariantRunner:
    """The LM with :class:`AdaHessian` run as ``variant`` says; ordinary steps come from a Hessian
    period longer than the run (its first step, a Hessian step, falls in the warm-up)."""

    def __init__(self, variant: LMVariant, base: nn.Module, workload: Workload, args: argparse.Namespace):
        self.variant, self.workload = variant, workload
        self.model = copy.deepcopy(base)
        if variant.attention == "written":
            write_attention_out(self.model)
        freq = 1 if variant.hessian else 10**9
        self.opt = AdaHessian(self.model.parameters(), lr=args.lr_adahessian, hessian_update_freq=freq)
        self.cursor = 0

    def step(self) -> None:
        x, y = self.workload.batches[self.cursor % len(self.workload.batches)]
        self.cursor += 1
        switch = self.opt.hessian_due and self.variant.attention == "sdpa"
        with twice_differentiable() if switch else nullcontext():
            with autocast(torch.device("cpu"), self.variant.precision):  # type: ignore[arg-type]
                loss = self.workload.loss(self.model(x), y)
            self.opt.zero_grad(set_to_none=True)
            self.opt.backward(loss)
            self.opt.step()


def measure_lm_variants(workload: Workload, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Median ms per step of each :data:`LM_VARIANTS`, interleaved, and the ratio to written-out
    fp32 attention on the same kind of step."""
    torch.manual_seed(args.seed)
    base = workload.make_model()
    runners = [VariantRunner(v, base, workload, args) for v in LM_VARIANTS]
    for runner in runners:
        timed(runner.step, args.warmup_steps)

    def block(runner: VariantRunner) -> Callable[[], float]:
        return lambda: timed(runner.step, args.block_steps) / args.block_steps * 1e3

    rounds = interleaved(
        [block(r) for r in runners],
        args.rounds,
        lambda r: log(f"  LM attention and precision: round {r + 1}/{args.rounds} done"),
    )
    medians = {v: statistics.median(ms) for v, ms in zip(LM_VARIANTS, rounds)}
    return [
        {**asdict(v), "name": v.name, "ms_per_step": medians[v],
         "ratio_to_written_fp32": medians[v] / medians[LMVariant("written", "fp32", v.hessian)],
         "round_ms": ms}
        for v, ms in zip(LM_VARIANTS, rounds)
    ]  # fmt: skip


# -- output ----------------------------------------------------------------------------------


def _ok(flag: bool) -> str:
    return "[green]met[/]" if flag else "[red]NOT met[/]"


def print_report(report: dict[str, Any]) -> None:
    out = console(120)
    m = report["machine"]
    out.print(f"[bold]Optimizer step cost[/] -- torch {m['torch']}, {m['torch_threads']} threads, {m['cpu']}")
    columns = ("optimizer", "block", "ms/step", "IQR (ms)", "× SGD", "× AdamW", "predicted × SGD", "dev.")
    for wl in report["workloads"]:
        s = wl["summary"]
        predicted = {a["hessian_update_freq"]: a for a in s["amortized"]}
        rows = []
        for row in s["rows"]:
            pred = predicted.get(row["hessian_update_freq"]) if row["kind"] == "ours" else None
            dev = ""
            if pred is not None:
                style = "green" if pred["target_met"] else "red"
                dev = f"[{style}]{pred['relative_deviation']:+.1%}[/]"
            rows.append(
                [
                    row["name"],
                    row["block_steps"],
                    f"{row['ms_per_step']:.1f}",
                    f"{row['ms_per_step_iqr'][0]:.1f}–{row['ms_per_step_iqr'][1]:.1f}",
                    f"{row['ratio_to_sgd']:.2f}",
                    f"{row['ratio_to_adamw']:.2f}",
                    f"{pred['predicted_ratio_to_sgd']:.2f}" if pred else "",
                    dev,
                ]
            )
        out.print(
            table(f"{wl['description']} ({report['settings']['rounds']} rounds, median)", columns, rows)
        )
        speed, ok = s["ours_k1_over_torch_optimizer"], _ok(s["speed_target_met"])
        out.print(f"  ours k=1 / torch-optimizer = {speed:.3f} (target ≤ {SPEED_TARGET}): {ok}")
        out.print(
            f"  every k within {AMORTIZED_TOLERANCE:.0%} of 1 + (r1 - 1)/k: {_ok(s['amortized_target_met'])}"
        )
        if "lm_variants" in wl:
            rows = [[v["name"], f"{v['ms_per_step']:.1f}", f"{v['ratio_to_written_fp32']:.2f}"]
                    for v in wl["lm_variants"]]  # fmt: skip
            columns = ("attention, precision, step", "ms/step", "× written-out fp32")
            out.print(table(f"{wl['name']}: attention and precision (CPU autocast)", columns, rows))
        if "phases_ms" in wl:
            phases = wl["phases_ms"]
            keys = dict.fromkeys(k for p in phases.values() for k in p)
            rows = [[k, *(f"{p[k]:.1f}" if k in p else None for p in phases.values())] for k in keys]
            rows.append(["total", *(f"{sum(p.values()):.1f}" for p in phases.values())])
            out.print(table(f"{wl['name']}: phases of a Hessian step (median ms)", ["phase", *phases], rows))


def save_plot(report: dict[str, Any], path: Path) -> None:
    workloads = report["workloads"]
    title = "Per-step cost (dashed: amortized prediction 1 + (r1 - 1)/k)"
    with figure(path, 1, len(workloads), (6, 4.5), title) as axes:
        for ax, wl in zip(axes[0], workloads):
            rows = wl["summary"]["rows"]
            names = [
                r["name"].replace("torch-optimizer ", "torch-opt.\n").replace(" (momentum 0.9)", "")
                for r in rows
            ]
            ratios = [r["ratio_to_sgd"] for r in rows]
            colors = {"sgd": "tab:gray", "adamw": "tab:gray", "torch_optimizer": "tab:orange"}
            ax.bar(range(len(rows)), ratios, color=[colors.get(r["kind"], "tab:blue") for r in rows])
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


# -- command line ----------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser(__doc__, "tiny sizes and few steps (smoke test, < 1 min)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
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
    p.add_argument(
        "--variants",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the LM's steps with written-out vs SDPA attention, fp32 vs bf16 autocast",
    )
    p.add_argument("--phase-steps", type=int, default=7, help="Hessian steps sampled for the phase breakdown")
    args = apply_mode(
        p.parse_args(argv),
        full={"rounds": 7, "block_steps": 12, "warmup_steps": 5, "resnet_batch": 32, "lm_batch": 16,
              "lm_seq": 64, "lm_embd": 128, "phases": True},
        quick={"rounds": 2, "block_steps": 5, "warmup_steps": 2, "resnet_batch": 4, "lm_batch": 2,
               "lm_seq": 16, "lm_embd": 32, "phases": False},
    )  # fmt: skip
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
    started = time.perf_counter()
    report: dict[str, Any] = {
        "benchmark": "optimizer_cost",
        "machine": machine_info(
            torch_optimizer=getattr(torch_optimizer, "__version__", "unknown"),
            torch_threads=torch.get_num_threads(),
            flush_denormal=True,
        ),
        "settings": settings(args),
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
        entry: dict[str, Any] = {
            "name": workload.name,
            "description": workload.description,
            "summary": summarize(measure(workload, make_configs(), args)),
        }
        if args.variants and workload.name == "transformer":
            log(f"  {workload.name}: attention and precision")
            entry["lm_variants"] = measure_lm_variants(workload, args)
        if args.phases:
            log(f"  {workload.name}: phase breakdown")
            entry["phases_ms"] = measure_phases(workload, args, args.phase_steps)
        report["workloads"].append(entry)
    return finish(args.out, "optimizer_cost", report, started, save_plot, print_report)


if __name__ == "__main__":
    main()
