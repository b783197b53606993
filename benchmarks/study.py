"""Does AdaHessian pay? Held-out quality, learning-rate robustness and cost against AdamW, Adam and SGD.

Run from the repository root::

    .venv/bin/python benchmarks/study.py --out docs/study    # the full run: about an hour on 2 cores
    .venv/bin/python benchmarks/study.py --quick             # smoke test (CI), about a minute

Four tasks, none needing a download: the digits CNN (scikit-learn's 8x8 digits), ResNet-20 on the
CIFAR-shaped synthetic images, the character LM on ``text_chars`` and an MLP on scikit-learn's
breast-cancer table. Five optimizers: AdaHessian with a Hessian every step (k = 1) and at the best
delayed frequency k in 2..5, AdamW, Adam and SGD with momentum 0.9. Every run trains in one
process on one thread (the distributed paths are tested equal to it) with the same schedule: a
linear warm-up over the first 5 % of the steps, then cosine decay to 0.

The stages, each a set of independent runs spread over ``--jobs`` processes:

1. *grid*: every optimizer (AdaHessian at k = 1) at the same number of learning rates, a log grid
   of half-decades around its usual value, seed 0; where the best lr is on the grid's edge, the
   grid grows by a half-decade past it, up to twice (the same rule for every optimizer);
2. *frequency*: AdaHessian at k = 2..5 at the k = 1 run's best learning rate (so the delayed
   AdaHessian gets these extra tuning runs);
3. *confirm*: each optimizer's best learning rate with more seeds (mean ± std), that rate scaled
   by 0.5..10 (robustness, the AdaHessian paper's axis), the LM's spatial-averaging block size,
   runs of equal compute (each optimizer gets the steps that cost what SGD's run costs, by the
   per-step times measured first), and the spec's AdaHessian defaults against variants of them.

Before the runs, each task's per-step cost is timed for every optimizer (interleaved rounds, one
thread, nothing else running in the study). Every AdaHessian run records its Hutchinson estimate
of the Hessian trace.

Results go to ``--out``: ``study.json`` (every run, with its curves; a rerun resumes from it and
skips runs already done with the same settings), ``study.md`` (the tables), ``study.png``
(final metric per optimizer), ``study-robustness.png``, ``study-time.png`` (metric against
compute time), ``study-trace.png`` (Hessian trace) and ``study-block.png``.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from functools import cache
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import harness
from trainer.data import build_dataset, ordered_batches, step_indices
from trainer.double_backward import twice_differentiable
from trainer.models.registry import build_model
from trainer.optim import AdaHessian
from trainer.spec import OptimizerSpec

WARMUP_FRACTION = 0.05
SCALES = (0.5, 1.0, 2.0, 3.0, 5.0, 10.0)
DELAYED_FREQS = (2, 3, 4, 5)
LM_BLOCKS = (1, 4, 16, 64)
DIVERGED_LOSS_FACTOR = 20.0  # a training loss this many times the first one ends the run as diverged
LR_GRIDS: dict[str, tuple[float, ...]] = {
    "adahessian": (0.005, 0.015, 0.05, 0.15, 0.5),
    "adamw": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2),
    "adam": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2),
    "sgd": (0.003, 0.01, 0.03, 0.1, 0.3),
}
EDGE_EXTENSIONS = 2
"""Half-decades a grid may grow past an edge that holds its best lr."""
TUNED = ("adahessian", "adamw", "adam", "sgd")
"""The optimizers whose lr is tuned on a grid (AdaHessian at k = 1)."""
LINES = ("adahessian", "adahessian_delayed", "adamw", "adam", "sgd")
"""The optimizers compared: AdaHessian at k = 1, AdaHessian at its best k in 2..5, and the others."""
LINE_TITLES = {
    "adahessian": "AdaHessian k=1",
    "adahessian_delayed": "AdaHessian best k",
    "adamw": "AdamW (wd 0.01)",
    "adam": "Adam",
    "sgd": "SGD momentum 0.9",
}


# -- tasks ---------------------------------------------------------------------------------------


class BreastCancer:
    """scikit-learn's breast-cancer table (569 x 30), standardized by the training split's
    statistics; 20 % held out (stratified, fixed split)."""

    task = "classification"

    def __init__(self, test_fraction: float = 0.2, split_seed: int = 0) -> None:
        from sklearn.datasets import load_breast_cancer
        from sklearn.model_selection import train_test_split

        x, y = load_breast_cancer(return_X_y=True)
        x_train, x_test, y_train, y_test = train_test_split(
            x, y, test_size=test_fraction, random_state=split_seed, stratify=y
        )
        mean, std = x_train.mean(axis=0), x_train.std(axis=0) + 1e-8
        self.train_x = torch.tensor((x_train - mean) / std, dtype=torch.float32)
        self.test_x = torch.tensor((x_test - mean) / std, dtype=torch.float32)
        self.train_y, self.test_y = torch.tensor(y_train), torch.tensor(y_test)
        self.train_size = len(self.train_y)

    def train_examples(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.train_x[indices], self.train_y[indices]

    def eval_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return ordered_batches(self.test_x, self.test_y, batch_size)

    def model_args(self) -> dict[str, Any]:
        return {"in_features": 30, "num_classes": 2}


@dataclass(frozen=True)
class Task:
    """A model on a data set, trained for ``steps`` steps of ``batch_size`` examples."""

    name: str
    title: str
    metric: str  # "accuracy" (higher is better) or "loss" (held-out cross-entropy, lower is better)
    steps: int
    batch_size: int
    data: Callable[[], Any]
    model: Callable[[Any], nn.Module]
    evals: int = 6  # evaluations over a run, evenly spaced, the last one after the last step

    @property
    def higher_is_better(self) -> bool:
        return self.metric == "accuracy"


def _tasks(quick: bool) -> dict[str, Task]:
    q = quick
    lm_block = 16 if q else 64
    tasks = [
        Task(
            "digits",
            "digits CNN",
            "accuracy",
            30 if q else 240,
            64,
            lambda: build_dataset("digits"),
            lambda d: build_model("cnn", {}, d.model_args()),
        ),
        Task(
            "tabular",
            "breast-cancer MLP",
            "accuracy",
            30 if q else 200,
            32,
            BreastCancer,
            lambda d: build_model("mlp", {"hidden": 64}, d.model_args()),
        ),
        Task(
            "resnet20",
            "ResNet-20, synthetic CIFAR-shaped",
            "accuracy",
            3 if q else 200,
            4 if q else 32,
            lambda: build_dataset("synthetic_images", {"num_train": 5000, "num_test": 32 if q else 500}),
            lambda d: build_model("resnet20", {}, d.model_args()),
            evals=2 if q else 5,
        ),
        Task(
            "char_lm",
            "char LM (2 layers, 64 wide)",
            "loss",
            8 if q else 400,
            16,
            lambda: build_dataset("text_chars", {"block_size": lm_block}),
            lambda d: build_model("transformer_lm", {"n_embd": 16 if q else 64}, d.model_args()),
            evals=2 if q else 6,
        ),
    ]
    return {t.name: t for t in tasks}


@cache
def _dataset(task_name: str, quick: bool) -> Any:
    return _tasks(quick)[task_name].data()


# -- one training run ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSpec:
    """One training run; its :attr:`key` names it in the results file."""

    task: str
    optimizer: str  # adahessian, adamw, adam, sgd
    lr: float
    seed: int = 0
    steps: int | None = None  # None: the task's
    freq: int = 1
    block: int = 1
    warmup: int | None = None  # None: WARMUP_FRACTION of the steps
    hessian_power: float = 1.0
    eps: float | None = None  # None: the optimizer's usual value (the spec's default)

    @property
    def key(self) -> str:
        parts = [self.task, self.optimizer, f"lr{self.lr:.4g}", f"seed{self.seed}"]
        for name, value, default in (
            ("steps", self.steps, None),
            ("k", self.freq, 1),
            ("block", self.block, 1),
            ("warmup", self.warmup, None),
            ("power", self.hessian_power, 1.0),
            ("eps", self.eps, None),
        ):
            if value != default:
                parts.append(f"{name}{value:g}" if isinstance(value, float) else f"{name}{value}")
        return "/".join(parts)


def _optimizer(spec: RunSpec, model: nn.Module) -> torch.optim.Optimizer:
    eps = spec.eps
    if spec.optimizer == "adahessian":
        return AdaHessian(
            model.named_parameters(),
            lr=spec.lr,
            eps=1e-4 if eps is None else eps,
            hessian_power=spec.hessian_power,
            hessian_update_freq=spec.freq,
            spatial_average_block_size=spec.block if spec.block > 1 else None,
            seed=spec.seed,
        )
    if spec.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=spec.lr, eps=eps or 1e-8, weight_decay=0.01)
    if spec.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=spec.lr, eps=eps or 1e-8)
    return torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=0.9)


def _loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1))


def _evaluate(task: Task, model: nn.Module, data: Any) -> tuple[float, float]:
    """(metric, held-out loss): accuracy or, for the LM, the loss itself."""
    model.eval()
    loss_sum = correct = count = 0.0
    with torch.no_grad():
        for inputs, targets in data.eval_batches(512):
            outputs = model(inputs)
            n = targets.numel()
            loss_sum += _loss(outputs, targets).item() * n
            correct += (outputs.argmax(dim=-1) == targets).sum().item()
            count += n
    model.train()
    loss = loss_sum / count
    return (correct / count if task.higher_is_better else loss), loss


def train(spec: RunSpec, quick: bool) -> dict[str, Any]:
    """Train once and report the final metric, the curves and the Hessian traces."""
    task = _tasks(quick)[spec.task]
    data = _dataset(spec.task, quick)
    steps = spec.steps or task.steps
    warmup = spec.warmup if spec.warmup is not None else round(WARMUP_FRACTION * steps)
    schedule = OptimizerSpec(name=spec.optimizer, lr=spec.lr, warmup_steps=warmup, schedule="cosine")
    torch.manual_seed(spec.seed)
    model = task.model(data)
    opt = _optimizer(spec, model)
    eval_at = {math.ceil(steps * (i + 1) / task.evals) for i in range(task.evals)}
    curve: list[list[float]] = []
    losses: list[list[float]] = []
    traces: list[list[float]] = []
    first_loss: float | None = None
    diverged = False
    began = time.perf_counter()
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = schedule.lr_at(step, steps)
        inputs, targets = data.train_examples(step_indices(data, step, spec.seed, task.batch_size))
        opt.zero_grad(set_to_none=True)
        hessian_step = isinstance(opt, AdaHessian) and opt.hessian_due
        with twice_differentiable() if hessian_step else nullcontext():  # as hutch's workers do
            loss = _loss(model(inputs), targets)
            value = loss.item()
            first_loss = value if first_loss is None else first_loss
            if not math.isfinite(value) or value > DIVERGED_LOSS_FACTOR * first_loss:
                diverged = True
                losses.append([step, value if math.isfinite(value) else None])
                break
            opt.backward(loss) if isinstance(opt, AdaHessian) else loss.backward()
        opt.step()
        if hessian_step:
            traces.append([step + 1, opt.hessian_trace])
        if step % max(1, steps // 100) == 0:
            losses.append([step + 1, value])
        if step + 1 in eval_at:
            metric, eval_loss = _evaluate(task, model, data)
            if not math.isfinite(eval_loss):
                diverged = True
                break
            curve.append([step + 1, metric, eval_loss])
    return {
        "key": spec.key,
        "spec": asdict(spec),
        "steps": steps,
        "warmup": warmup,
        "diverged": diverged,
        "metric": None if diverged else curve[-1][1],
        "eval_loss": None if diverged else curve[-1][2],
        "curve": curve,
        "loss": losses,
        "trace": traces,
        "seconds": time.perf_counter() - began,
    }


def _init_worker() -> None:
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)


# -- per-step cost ------------------------------------------------------------------------------


def step_costs(task: Task, quick: bool, rounds: int, block_steps: int) -> dict[str, float]:
    """Median milliseconds per training step of each optimizer (and AdaHessian at every k) on
    ``task``, timed in interleaved rounds of whole Hessian periods."""
    data = _dataset(task.name, quick)
    configs = {
        "sgd": RunSpec(task.name, "sgd", 0.01),
        "adam": RunSpec(task.name, "adam", 1e-4),
        "adamw": RunSpec(task.name, "adamw", 1e-4),
    }
    for k in (1, *DELAYED_FREQS):
        configs[f"adahessian_k{k}"] = RunSpec(task.name, "adahessian", 0.005, freq=k)
    blocks = []
    for spec in configs.values():
        torch.manual_seed(0)
        model = task.model(data)
        opt = _optimizer(spec, model)
        cursor = [0]

        def step(
            model: nn.Module = model, opt: torch.optim.Optimizer = opt, cursor: list[int] = cursor
        ) -> None:
            inputs, targets = data.train_examples(step_indices(data, cursor[0], 0, task.batch_size))
            cursor[0] += 1
            opt.zero_grad(set_to_none=True)
            hessian_step = isinstance(opt, AdaHessian) and opt.hessian_due
            with twice_differentiable() if hessian_step else nullcontext():
                loss = _loss(model(inputs), targets)
                opt.backward(loss) if isinstance(opt, AdaHessian) else loss.backward()
            opt.step()

        n = harness.whole_periods(block_steps, spec.freq)
        harness.timed(step, n)  # warm-up, a whole number of periods
        blocks.append(lambda step=step, n=n: harness.timed(step, n) / n * 1e3)
    times = harness.interleaved(blocks, rounds)
    return {name: statistics.median(t) for name, t in zip(configs, times)}


def line_cost(costs: dict[str, float], line: str, freq: int) -> float:
    """Milliseconds per step of an optimizer line at Hessian frequency ``freq``."""
    return costs[f"adahessian_k{freq}"] if line.startswith("adahessian") else costs[line]


# -- the study ------------------------------------------------------------------------------------


@dataclass
class Study:
    """The runs done so far, kept in ``study.json`` after every run so that a rerun resumes."""

    path: Path
    quick: bool
    jobs: int
    seeds: int
    tasks: dict[str, Task]
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    costs: dict[str, dict[str, float]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    pool: ProcessPoolExecutor | None = None  # the processes that run the training runs

    def fingerprint(self) -> dict[str, Any]:
        """What must match for kept runs to be reused."""
        return {
            "quick": self.quick,
            "warmup_fraction": WARMUP_FRACTION,
            "tasks": {n: [t.steps, t.batch_size, t.evals] for n, t in self.tasks.items()},
        }

    def load(self) -> None:
        if not self.path.exists():
            return
        kept = json.loads(self.path.read_text())
        if kept.get("fingerprint") == self.fingerprint():
            self.runs, self.costs = kept.get("runs", {}), kept.get("costs", {})
            harness.log(f"resuming: {len(self.runs)} runs kept in {self.path}")
        else:
            harness.log(f"{self.path} holds other settings: starting over")

    def save(self) -> None:
        report = {
            "benchmark": "study",
            "fingerprint": self.fingerprint(),
            **self.meta,
            "costs": self.costs,
            "runs": self.runs,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(report))
        tmp.replace(self.path)

    def run_all(self, stage: str, specs: list[RunSpec]) -> None:
        """Run every spec not done yet over ``jobs`` processes, saving after each."""
        todo = list({s.key: s for s in specs if s.key not in self.runs}.values())
        harness.log(f"stage {stage}: {len(todo)} runs to do, {len(specs) - len(todo)} kept")
        todo.sort(key=self.estimated_ms, reverse=True)  # longest first: the processes end together
        assert self.pool is not None, "run_all needs the study's process pool"
        pending: dict[Future[dict[str, Any]], RunSpec] = {
            self.pool.submit(train, s, self.quick): s for s in todo
        }
        done_count = 0
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                spec = pending.pop(future)
                result = future.result()
                result["stage"] = stage
                self.runs[spec.key] = result
                done_count += 1
                self.save()
                task = self.tasks[spec.task]
                shown = "diverged" if result["diverged"] else f"{task.metric} {result['metric']:.4f}"
                harness.log(f"  [{done_count}/{len(todo)}] {spec.key}: {shown} ({result['seconds']:.1f} s)")

    def estimated_ms(self, spec: RunSpec) -> float:
        """What a run should cost, from the measured per-step times."""
        task = self.tasks[spec.task]
        return (spec.steps or task.steps) * line_cost(self.costs[spec.task], spec.optimizer, spec.freq)

    # -- reading results

    def result(self, spec: RunSpec) -> dict[str, Any]:
        return self.runs[spec.key]

    def score(self, task: Task, spec: RunSpec) -> float:
        """Higher is better; a diverged run scores lowest."""
        r = self.result(spec)
        if r["diverged"]:
            return -math.inf
        return r["metric"] if task.higher_is_better else -r["metric"]

    def best(self, task: Task, specs: list[RunSpec]) -> RunSpec:
        """The best-scoring spec; ties go to the later one (larger lr or k: cheaper or faster)."""
        return max(reversed(specs), key=lambda s: self.score(task, s))


def tuned_as(line: str) -> str:
    """The optimizer whose lr grid serves ``line`` (both AdaHessian lines share k = 1's)."""
    return "adahessian" if line.startswith("adahessian") else line


def grid(task: Task, line: str, quick: bool) -> list[RunSpec]:
    optimizer = tuned_as(line)
    lrs = LR_GRIDS[optimizer]
    lrs = lrs[1:4:2] if quick else lrs
    return [RunSpec(task.name, optimizer, lr) for lr in lrs]


def past_edge(study: Study, task: Task, specs: list[RunSpec]) -> RunSpec | None:
    """The next half-decade past the grid's edge if its best lr sits on that edge, else None."""
    best = study.best(task, specs)
    # Rounded as run keys write it (3e-05, not 2.9999999999999997e-05).
    if best.lr == specs[-1].lr:
        return replace(best, lr=float(f"{specs[-2].lr * 10:.4g}"))
    if best.lr == specs[0].lr:
        return replace(best, lr=float(f"{specs[1].lr / 10:.4g}"))
    return None


def tune(study: Study, tasks: list[Task]) -> dict[tuple[str, str], list[RunSpec]]:
    """Run every optimizer's lr grid; where the best lr sits on an edge, extend the grid past it
    by a half-decade, up to ``EDGE_EXTENSIONS`` times (the same rule for every optimizer).
    Returns each (task, optimizer)'s grid as run, lowest lr first."""
    grids = {(t.name, line): grid(t, line, study.quick) for t in tasks for line in TUNED}
    study.run_all("grid", [s for specs in grids.values() for s in specs])
    for _ in range(0 if study.quick else EDGE_EXTENSIONS):
        beyond = {key: past_edge(study, study.tasks[key[0]], specs) for key, specs in grids.items()}
        beyond = {key: spec for key, spec in beyond.items() if spec is not None}
        if not beyond:
            break
        study.run_all("grid past an edge", list(beyond.values()))
        for key, spec in beyond.items():
            grids[key] = sorted([*grids[key], spec], key=lambda s: s.lr)
    return grids


def plan(study: Study) -> dict[str, dict[str, Any]]:
    """Run the stages; return, per task, each line's best spec and the runs that confirm it."""
    quick, seeds = study.quick, range(study.seeds)
    freqs = DELAYED_FREQS[:1] if quick else DELAYED_FREQS
    scales = SCALES[:2] if quick else SCALES
    blocks = LM_BLOCKS[:2] if quick else LM_BLOCKS
    tasks = list(study.tasks.values())

    grids = tune(study, tasks)
    best: dict[str, dict[str, RunSpec]] = {t.name: {} for t in tasks}
    for t in tasks:
        for line in TUNED:
            best[t.name][line] = study.best(t, grids[t.name, line])
    delayed = {t.name: [replace(best[t.name]["adahessian"], freq=k) for k in freqs] for t in tasks}
    study.run_all("frequency", [s for t in tasks for s in delayed[t.name]])
    for t in tasks:
        best[t.name]["adahessian_delayed"] = study.best(t, delayed[t.name])

    confirm: list[RunSpec] = []
    plans: dict[str, dict[str, Any]] = {}
    for t in tasks:
        costs = study.costs[t.name]
        p: dict[str, Any] = {
            "best": best[t.name],
            "grid_lrs": {line: [s.lr for s in grids[t.name, tuned_as(line)]] for line in LINES},
            "seeds": {},
            "scales": {},
            "equal_time": {},
            "blocks": [],
            "defaults": {},
        }
        for line, spec in best[t.name].items():
            p["seeds"][line] = [replace(spec, seed=s) for s in seeds]
            p["scales"][line] = [replace(spec, lr=spec.lr * x) for x in scales]
            ratio = costs["sgd"] / line_cost(costs, line, spec.freq)
            if abs(ratio - 1.0) > 0.05:
                steps = max(1, round(t.steps * ratio))
                p["equal_time"][line] = [replace(spec, seed=s, steps=steps) for s in seeds]
            else:
                p["equal_time"][line] = p["seeds"][line]
            confirm += p["seeds"][line] + p["scales"][line] + p["equal_time"][line]
        if t.name == "char_lm":
            p["blocks"] = [replace(best[t.name]["adahessian_delayed"], block=b) for b in blocks]
            confirm += p["blocks"]
        p["defaults"] = defaults_variants(t, seeds, quick)
        confirm += [s for specs in p["defaults"].values() for s in specs]
        plans[t.name] = p
    study.run_all("confirm", confirm)
    return plans


def defaults_variants(task: Task, seeds: range, quick: bool) -> dict[str, list[RunSpec]]:
    """The spec's AdaHessian defaults as a user gets them with ``hessian_update_freq: 2`` (lr,
    eps and warm-up as ``OptimizerSpec`` fills them), and that with one setting changed."""
    spec = OptimizerSpec(name="adahessian", hessian_update_freq=2)
    base = RunSpec(
        task.name,
        "adahessian",
        spec.lr,
        freq=2,
        warmup=spec.warmup_steps,
        eps=spec.eps,
        hessian_power=spec.hessian_power,
    )
    variants = {
        "spec defaults": base,
        "no warm-up": replace(base, warmup=0),
        "warm-up 5 %": replace(base, warmup=None),
    }
    if task.name in ("digits", "tabular") and not quick:
        variants |= {
            "hessian_power 0.5": replace(base, hessian_power=0.5),
            "eps 1e-8": replace(base, eps=1e-8),
            "k = 1": replace(base, freq=1),
            "k = 4": replace(base, freq=4),
        }
    if spec.warmup_steps == round(WARMUP_FRACTION * task.steps):
        variants.pop("warm-up 5 %")
    return {name: [replace(v, seed=s) for s in seeds] for name, v in variants.items()}


# -- summary ------------------------------------------------------------------------------------


def _values(study: Study, specs: list[RunSpec]) -> tuple[list[float], int]:
    """The metrics of the runs that did not diverge, and how many diverged."""
    results = [study.result(s) for s in specs]
    return [r["metric"] for r in results if not r["diverged"]], sum(r["diverged"] for r in results)


def _mean_std(values: list[float], diverged: int, digits: int) -> str:
    if not values:
        return "diverged"
    text = f"{statistics.mean(values):.{digits}f}"
    if len(values) > 1:
        text += f" ± {statistics.stdev(values):.{digits}f}"
    return text + (f" ({diverged} diverged)" if diverged else "")


def summarize(study: Study, plans: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per task: each line's best lr, mean ± std over seeds, robustness, equal-time and defaults."""
    summary: dict[str, Any] = {}
    for name, p in plans.items():
        task, costs = study.tasks[name], study.costs[name]
        digits = 3
        lines = []
        for line in LINES:
            spec = p["best"][line]
            grid_lrs = p["grid_lrs"][line]
            values, diverged = _values(study, p["seeds"][line])
            equal_values, equal_div = _values(study, p["equal_time"][line])
            scales = []
            for s in p["scales"][line]:
                r = study.result(s)
                scales.append({"scale": s.lr / spec.lr, "metric": r["metric"], "diverged": r["diverged"]})
            lines.append(
                {
                    "line": line,
                    "title": LINE_TITLES[line],
                    "lr": spec.lr,
                    "freq": spec.freq,
                    "lr_at_grid_edge": spec.lr in (grid_lrs[0], grid_lrs[-1]),
                    "mean": statistics.mean(values) if values else None,
                    "std": statistics.stdev(values) if len(values) > 1 else None,
                    "values": values,
                    "diverged": diverged,
                    "text": _mean_std(values, diverged, digits),
                    "ms_per_step": line_cost(costs, line, spec.freq),
                    "ratio_to_sgd": line_cost(costs, line, spec.freq) / costs["sgd"],
                    "equal_time_steps": p["equal_time"][line][0].steps or task.steps,
                    "equal_time_text": _mean_std(equal_values, equal_div, digits),
                    "equal_time_mean": statistics.mean(equal_values) if equal_values else None,
                    "scales": scales,
                }
            )
        defaults = {}
        for variant, specs in p["defaults"].items():
            values, diverged = _values(study, specs)
            defaults[variant] = {
                "values": values,
                "diverged": diverged,
                "text": _mean_std(values, diverged, digits),
                "worst": (min(values) if task.higher_is_better else max(values)) if values else None,
            }
        blocks = []
        for s in p["blocks"]:
            r = study.result(s)
            blocks.append({"block": s.block, "metric": r["metric"], "diverged": r["diverged"]})
        summary[name] = {
            "title": task.title,
            "metric": task.metric,
            "steps": task.steps,
            "batch_size": task.batch_size,
            "lines": lines,
            "defaults": defaults,
            "blocks": blocks,
            "costs_ms": costs,
        }
    return summary


def markdown(study: Study, summary: dict[str, Any]) -> str:
    """The study's tables, as the README links them."""
    lrs = len(grid(next(iter(study.tasks.values())), "sgd", study.quick))
    more = 0 if study.quick else EDGE_EXTENSIONS
    out = [
        f"# AdaHessian study{' (quick)' if study.quick else ''}",
        "",
        f"{study.seeds} seeds per best learning rate; {lrs} learning rates per optimizer, and up to "
        f"{more} more past an edge that held the best one; warm-up {WARMUP_FRACTION:.0%} "
        "of the steps then cosine decay to 0; one thread per run. " + study.meta.get("how", ""),
        "",
    ]
    for s in summary.values():
        arrow = "higher is better" if s["metric"] == "accuracy" else "lower is better"
        out += [
            f"## {s['title']}: held-out {s['metric']} ({arrow}), {s['steps']} steps of {s['batch_size']}",
            "",
        ]
        rows = []
        for line in s["lines"]:
            lr = f"{line['lr']:.3g}" + (" (grid edge)" if line["lr_at_grid_edge"] else "")
            k = str(line["freq"]) if line["line"].startswith("adahessian") else ""
            rows.append(
                [
                    line["title"],
                    lr,
                    k,
                    line["text"],
                    f"{line['ms_per_step']:.1f}",
                    f"{line['ratio_to_sgd']:.2f}",
                    f"{line['equal_time_text']} ({line['equal_time_steps']} steps)",
                ]
            )
        out += [
            harness.markdown_table(
                [
                    "optimizer",
                    "best lr",
                    "k",
                    f"{s['metric']} (mean ± std)",
                    "ms/step",
                    "× SGD",
                    "at SGD's compute",
                ],
                rows,
            ),
            "",
        ]
        scales = [x["scale"] for x in s["lines"][0]["scales"]]
        rows = [
            [line["title"], *("diverged" if x["diverged"] else f"{x['metric']:.3f}" for x in line["scales"])]
            for line in s["lines"]
        ]
        out += [
            "Learning-rate robustness (best lr × scale, seed 0):",
            "",
            harness.markdown_table(["optimizer", *(f"× {x:g}" for x in scales)], rows),
            "",
        ]
        if s["blocks"]:
            rows = [
                [str(b["block"]), "diverged" if b["diverged"] else f"{b['metric']:.3f}"] for b in s["blocks"]
            ]
            out += [
                "Spatial-averaging block size (AdaHessian best k, seed 0):",
                "",
                harness.markdown_table(["block", s["metric"]], rows),
                "",
            ]
        rows = [
            [variant, d["text"], "" if d["worst"] is None else f"{d['worst']:.3f}"]
            for variant, d in s["defaults"].items()
        ]
        out += [
            "AdaHessian as the spec's defaults give it (`{name: adahessian, hessian_update_freq: 2}`) "
            "and with one setting changed:",
            "",
            harness.markdown_table(["variant", s["metric"], "worst seed"], rows),
            "",
        ]
    return "\n".join(out)


# -- plots --------------------------------------------------------------------------------------

_COLORS = {
    "adahessian": "tab:blue",
    "adahessian_delayed": "tab:cyan",
    "adamw": "tab:orange",
    "adam": "tab:red",
    "sgd": "tab:gray",
}


def save_plot(report: dict[str, Any], path: Path) -> None:
    """Final metric per optimizer and task (mean ± std over seeds; hatched: at SGD's compute)."""
    summary = report["summary"]
    with harness.figure(
        path, 1, len(summary), size=(4.2, 3.8), title="Held-out metric at the best lr"
    ) as axes:
        for ax, s in zip(axes[0], summary.values()):
            for i, line in enumerate(s["lines"]):
                if line["mean"] is not None:
                    ax.bar(i - 0.2, line["mean"], 0.4, yerr=line["std"] or 0, color=_COLORS[line["line"]])
                if line["equal_time_mean"] is not None:
                    ax.bar(
                        i + 0.2,
                        line["equal_time_mean"],
                        0.4,
                        color=_COLORS[line["line"]],
                        alpha=0.5,
                        hatch="//",
                    )
            values = [v for line in s["lines"] for v in line["values"]]
            if values:
                lo, hi = min(values), max(values)
                pad = (hi - lo) * 0.5 + 1e-3
                ax.set_ylim(lo - pad, hi + pad)
            ax.set_xticks(
                range(len(s["lines"])),
                [line["title"] for line in s["lines"]],
                rotation=40,
                ha="right",
                fontsize=7,
            )
            ax.set_title(s["title"], fontsize=9)
            ax.set_ylabel(s["metric"])


def save_extra_plots(
    study: Study, summary: dict[str, Any], plans: dict[str, dict[str, Any]], out: Path
) -> list[Path]:
    """Robustness, metric against compute time, Hessian trace and block size."""
    names = list(summary)
    paths = [out / f"study-{n}.png" for n in ("robustness", "time", "trace", "block")]
    with harness.figure(
        paths[0], 1, len(names), size=(4.2, 3.5), title="Best lr × scale (seed 0; x: diverged)"
    ) as axes:
        for ax, name in zip(axes[0], names):
            s = summary[name]
            for line in s["lines"]:
                xs = [x["scale"] for x in line["scales"] if not x["diverged"]]
                ax.plot(
                    xs,
                    [x["metric"] for x in line["scales"] if not x["diverged"]],
                    "o-",
                    color=_COLORS[line["line"]],
                    label=line["title"],
                    markersize=3,
                )
                bad = [x["scale"] for x in line["scales"] if x["diverged"]]
                if bad and xs:
                    ax.plot(
                        bad,
                        # drawn at the line's worst finished value (max for a loss)
                        [
                            (min if s["metric"] == "accuracy" else max)(
                                x["metric"] for x in line["scales"] if not x["diverged"]
                            )
                        ]
                        * len(bad),
                        "x",
                        color=_COLORS[line["line"]],
                        markersize=8,
                    )
            ax.set(xscale="log", xlabel="lr / best lr", ylabel=s["metric"], title=s["title"])
        axes[0][0].legend(fontsize=7)
    with harness.figure(
        paths[1], 1, len(names), size=(4.2, 3.5), title="Held-out metric against compute (seed 0)"
    ) as axes:
        for ax, name in zip(axes[0], names):
            s = summary[name]
            for line in s["lines"]:
                r = study.result(plans[name]["best"][line["line"]])
                if r["curve"]:
                    ms = line["ms_per_step"]
                    ax.plot(
                        [c[0] * ms / 1e3 for c in r["curve"]],
                        [c[1] for c in r["curve"]],
                        "o-",
                        color=_COLORS[line["line"]],
                        label=line["title"],
                        markersize=3,
                    )
            ax.set(xlabel="seconds of one thread (steps × ms/step)", ylabel=s["metric"], title=s["title"])
        axes[0][0].legend(fontsize=7)
    with harness.figure(
        paths[2], 1, len(names), size=(4.2, 3.5), title="Hutchinson estimate of tr(H) (best lr, seed 0)"
    ) as axes:
        for ax, name in zip(axes[0], names):
            for line in ("adahessian", "adahessian_delayed"):
                spec = plans[name]["best"][line]
                trace = study.result(spec)["trace"]
                ax.plot(
                    [t[0] for t in trace],
                    [t[1] for t in trace],
                    color=_COLORS[line],
                    label=f"AdaHessian k={spec.freq}",
                    linewidth=1,
                )
            ax.set(xlabel="step", ylabel="tr(H) estimate", yscale="symlog", title=summary[name]["title"])
            ax.legend(fontsize=7)
    blocks = [(name, summary[name]["blocks"]) for name in names if summary[name]["blocks"]]
    with harness.figure(
        paths[3], 1, max(1, len(blocks)), size=(4.2, 3.5), title="Spatial-averaging block size"
    ) as axes:
        for ax, (name, rows) in zip(axes[0], blocks):
            ok = [b for b in rows if not b["diverged"]]
            ax.plot(
                [b["block"] for b in ok], [b["metric"] for b in ok], "o-", color=_COLORS["adahessian_delayed"]
            )
            ax.set(
                xscale="log",
                xlabel="block size",
                ylabel=summary[name]["metric"],
                title=summary[name]["title"],
            )
    return paths


# -- command line ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = harness.parser(__doc__, "tiny tasks, two lrs, two seeds (CI smoke test, about a minute)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (processes of one thread each)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per best lr [3; quick 2]")
    p.add_argument("--tasks", default="digits,tabular,resnet20,char_lm", help="comma-separated tasks")
    p.add_argument(
        "--cost-rounds", type=int, default=None, help="interleaved rounds timing each step [5; quick 1]"
    )
    args = harness.apply_mode(
        p.parse_args(argv), {"seeds": 3, "cost_rounds": 5}, {"seeds": 2, "cost_rounds": 1}
    )
    all_tasks = _tasks(args.quick)
    chosen = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = sorted(set(chosen) - set(all_tasks))
    if unknown or not chosen:
        p.error(f"--tasks: unknown {unknown}; choose from {', '.join(all_tasks)}")
    if args.jobs < 1 or args.seeds < 1 or args.cost_rounds < 1:
        p.error("--jobs, --seeds and --cost-rounds must be at least 1")
    _init_worker()
    began = time.perf_counter()
    study = Study(
        args.out / "study.json", args.quick, args.jobs, args.seeds, {n: all_tasks[n] for n in chosen}
    )
    study.load()
    study.meta = {
        "machine": harness.machine_info(torch_threads_per_run=1),
        "settings": harness.settings(args),
    }
    for name, task in study.tasks.items():
        if name not in study.costs:
            harness.log(f"timing one step of every optimizer on {task.title}")
            study.costs[name] = step_costs(task, args.quick, args.cost_rounds, 1 if args.quick else 8)
            study.save()
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn"), initializer=_init_worker) as pool:
        study.pool = pool
        plans = plan(study)
    summary = summarize(study, plans)
    wall = time.perf_counter() - began
    study.meta |= {
        "summary": summary,
        "wall_seconds_this_run": wall,
        "how": f"`benchmarks/study.py{' --quick' if args.quick else ''}`: {len(study.runs)} runs.",
    }
    study.save()
    report = json.loads(study.path.read_text())
    save_plot(report, args.out / "study.png")
    extra = save_extra_plots(study, summary, plans, args.out)
    (args.out / "study.md").write_text(markdown(study, summary))
    con = harness.console()
    for s in summary.values():
        con.print(
            harness.table(
                f"{s['title']}: held-out {s['metric']}",
                ["optimizer", "best lr", "k", "mean ± std", "ms/step", "× SGD", "at SGD's compute"],
                [
                    [
                        x["title"],
                        f"{x['lr']:.3g}",
                        x["freq"],
                        x["text"],
                        f"{x['ms_per_step']:.1f}",
                        f"{x['ratio_to_sgd']:.2f}",
                        x["equal_time_text"],
                    ]
                    for x in s["lines"]
                ],
            )
        )
    print(
        f"results: {study.path}, {args.out / 'study.md'}, {args.out / 'study.png'}, "
        f"{', '.join(str(x) for x in extra)} ({wall:.0f} s)"
    )
    return report


if __name__ == "__main__":
    main()
