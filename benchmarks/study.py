"""Does AdaHessian pay? Held-out quality, time to a target and learning-rate robustness against
tuned AdamW, Adam and SGD.

Run from the repository root::

    .venv/bin/python benchmarks/study.py --out docs/study    # the full run: hours on 2 cores; resumes
    .venv/bin/python benchmarks/study.py --quick             # smoke test (CI), about a minute

Four tasks, none needing a download. Two have the power to show an effect: a 4-layer, 128-wide
character LM (context 64, 2,000 steps of 16 windows) on ``text_chars`` and ResNet-20 on the
synthetic CIFAR-like images at 16×16 (the teacher labels them at that resolution; 4× cheaper
than 32×32), 5,000 training images for 10 epochs, scored on 5,000 held-out ones. Two are smoke
tasks, too small to tell optimizers apart (one held-out example is 0.3 and 0.9 points of
accuracy): the digits CNN and an MLP on scikit-learn's breast-cancer table. Every run trains in
one process on one thread (the distributed paths are tested equal to it) with the same
schedule: a linear warm-up over the first 5 % of the steps, then cosine decay to 0.

Selection is the same for every optimizer, and survives seeds: each optimizer's base setting
runs its learning-rate grid (half-decades) on seed 0, growing past an edge that holds the best
lr up to twice; the best ``SHORTLIST`` lrs of seed 0 run on every seed, and the lr with the best
mean over seeds is chosen (ties to the larger). At that lr the optimizer's other settings run
on every seed and the best mean wins: AdaHessian's Hessian frequency k and weight decay; AdamW's
weight decay; on the LM task AdamW's and Adam's β2 ∈ {0.95, 0.98, 0.999} with and without
clipping at 1.0. Then, at each optimizer's chosen setting:

* *time to target*: the target is tuned AdamW's median final held-out loss; for each optimizer
  the steps and the seconds (steps × its per-step time, all timed interleaved on one thread
  before the runs) until its held-out loss first reaches the target, median over seeds;
* *robustness*: the chosen lr × 0.3, 3, 10 and 30 (seed 0);
* *ablations* of AdaHessian's curvature options: β2 0.98, ``update_clip`` 1 and, on the LM,
  averaging over blocks of 32, of every tensor or (``spatial_average_1d`` off, as the authors'
  code) of 2-D ones only, on every seed;
* the spec's AdaHessian defaults, as a user gets them, on every seed.

Results go to ``--out``: ``study.json`` (every run with its curves; a rerun resumes from it and
skips runs already done with the same task settings), ``study.md`` (the tables), ``study.png``
(final held-out metric), ``study-time.png`` (held-out loss against seconds),
``study-robustness.png`` and ``study-trace.png`` (the Hutchinson trace estimate).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import math
import os
import signal
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
from trainer.batches import step_chunks
from trainer.data import build_dataset, ordered_batches, step_indices
from trainer.double_backward import twice_differentiable
from trainer.models.registry import build_model
from trainer.optim import AdaHessian
from trainer.spec import OptimizerSpec, adahessian_warmup

WARMUP_FRACTION = 0.05
SHORTLIST = 2
"""Learning rates of the seed-0 grid that run on every seed."""
SCALES = (0.3, 3.0, 10.0, 30.0)
FREQS = (1, 2, 4)
"""AdaHessian's Hessian frequencies tried; the grid runs k = 2 (the spec's recommendation)."""
BASE_FREQ = 2
BETA2_CLIP = ((0.95, None), (0.98, None), (0.95, 1.0), (0.98, 1.0), (0.999, 1.0))
"""AdamW's and Adam's (β2, clip) settings tried on the LM beside the base (0.999, none)."""
DIVERGED_LOSS_FACTOR = 20.0  # a training loss this many times the first one ends the run as diverged
LR_GRIDS: dict[str, tuple[float, ...]] = {
    "adahessian": (0.005, 0.015, 0.05, 0.15, 0.5),
    "adamw": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2),
    "adam": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2),
    "sgd": (0.003, 0.01, 0.03, 0.1, 0.3),
}
EDGE_EXTENSIONS = 2
"""Half-decades a grid may grow past an edge that holds its best lr."""
LINES = ("adahessian", "adamw", "adam", "sgd")
"""The optimizers compared, each at its chosen setting."""
LINE_TITLES = {"adahessian": "AdaHessian", "adamw": "AdamW", "adam": "Adam", "sgd": "SGD momentum 0.9"}
BASE_WEIGHT_DECAY = {"adamw": 0.01}
"""Decoupled weight decay of each optimizer's base setting (others: 0); AdaHessian and AdamW
also try the other of {0, 0.01}."""


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


class Pooled:
    """A data set of images, each average-pooled by ``factor`` (the synthetic teacher labels at
    half resolution, so 16×16 keeps what decides the label)."""

    def __init__(self, data: Any, factor: int) -> None:
        self.data, self.factor = data, factor
        self.train_size = data.train_size

    def train_examples(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = self.data.train_examples(indices)
        return F.avg_pool2d(images, self.factor), labels

    def eval_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels in self.data.eval_batches(batch_size):
            yield F.avg_pool2d(images, self.factor), labels

    def model_args(self) -> dict[str, Any]:
        return self.data.model_args()


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
    held_out: int | None = None  # held-out examples of an accuracy task (for its standard error)
    powered: bool = True  # False: a smoke task, too small to tell optimizers apart
    block: int = 1  # AdaHessian's spatial_average_block_size on this task

    @property
    def higher_is_better(self) -> bool:
        return self.metric == "accuracy"

    def fingerprint(self) -> list[Any]:
        """What must match for a kept run of this task to be reused."""
        return [self.title, self.steps, self.batch_size, self.evals, self.held_out, self.block]


def _tasks(quick: bool) -> dict[str, Task]:
    q = quick
    images_args = {"num_train": 5000, "num_test": 32 if q else 5000}
    tasks = [
        Task(
            "char_lm",
            "char LM (4 layers, 128 wide, context 64)",
            "loss",
            8 if q else 2000,
            16,
            lambda: build_dataset("text_chars", {"block_size": 16 if q else 64}),
            lambda d: build_model(
                "transformer_lm",
                {"n_layer": 2 if q else 4, "n_head": 4, "n_embd": 16 if q else 128},
                d.model_args(),
            ),
            evals=2 if q else 20,
        ),
        Task(
            "images",
            "ResNet-20, synthetic images 16×16",
            "accuracy",
            3 if q else 400,
            4 if q else 128,
            lambda: Pooled(build_dataset("synthetic_images", images_args), 2),
            lambda d: build_model("resnet20", {}, d.model_args()),
            evals=2 if q else 10,
            held_out=images_args["num_test"],
        ),
        Task(
            "digits",
            "digits CNN (smoke)",
            "accuracy",
            30 if q else 240,
            64,
            lambda: build_dataset("digits"),
            lambda d: build_model("cnn", {}, d.model_args()),
            held_out=359,
            powered=False,
        ),
        Task(
            "tabular",
            "breast-cancer MLP (smoke)",
            "accuracy",
            30 if q else 200,
            32,
            BreastCancer,
            lambda d: build_model("mlp", {"hidden": 64}, d.model_args()),
            held_out=114,
            powered=False,
        ),
    ]
    return {t.name: t for t in tasks}


@cache
def _dataset(task_name: str, quick: bool) -> Any:
    return _tasks(quick)[task_name].data()


# -- one training run ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSpec:
    """One training run; its :attr:`key` names it in the results file (a setting at its default
    is left out of the key, so keys of earlier studies stay valid)."""

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
    beta2: float = 0.999
    clip: float | None = None  # gradient clipping to this global norm
    wd: float | None = None  # decoupled weight decay; None: BASE_WEIGHT_DECAY
    update_clip: float | None = None
    avg1d: bool = True
    hfrac: float = 1.0  # hessian_batch_fraction

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
            ("beta2", self.beta2, 0.999),
            ("clip", self.clip, None),
            ("wd", self.wd, None),
            ("uclip", self.update_clip, None),
            ("avg1d", self.avg1d, True),
            ("hfrac", self.hfrac, 1.0),
        ):
            if value != default:
                parts.append(f"{name}{value:g}" if isinstance(value, float) else f"{name}{value}")
        return "/".join(parts)

    @property
    def weight_decay(self) -> float:
        return BASE_WEIGHT_DECAY.get(self.optimizer, 0.0) if self.wd is None else self.wd

    def setting(self) -> str:
        """The settings beside lr, as the tables show them."""
        parts = [f"k={self.freq}"] if self.optimizer == "adahessian" else []
        if self.optimizer in ("adamw", "adam"):
            parts.append(f"β2={self.beta2:g}")
        if self.clip is not None:
            parts.append(f"clip {self.clip:g}")
        if self.optimizer in ("adahessian", "adamw"):
            parts.append(f"wd {self.weight_decay:g}")
        return ", ".join(parts)


def _optimizer(spec: RunSpec, model: nn.Module) -> torch.optim.Optimizer:
    eps, betas = spec.eps, (0.9, spec.beta2)
    if spec.optimizer == "adahessian":
        return AdaHessian(
            model.named_parameters(),
            lr=spec.lr,
            betas=betas,
            eps=1e-4 if eps is None else eps,
            weight_decay=spec.weight_decay,
            hessian_power=spec.hessian_power,
            hessian_update_freq=spec.freq,
            spatial_average_block_size=spec.block if spec.block > 1 else None,
            spatial_average_1d=spec.avg1d,
            update_clip=spec.update_clip,
            seed=spec.seed,
        )
    if spec.optimizer == "adamw":
        return torch.optim.AdamW(
            model.parameters(), lr=spec.lr, betas=betas, eps=eps or 1e-8, weight_decay=spec.weight_decay
        )
    if spec.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=spec.lr, betas=betas, eps=eps or 1e-8)
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


def _step(
    spec: RunSpec, model: nn.Module, opt: torch.optim.Optimizer, batch: tuple[torch.Tensor, ...]
) -> float:
    """One training step (the Hessian switch as hutch's workers use it; on Hessian steps the
    products of the examples ``hfrac`` chooses, by the workers' rule); the loss before it."""
    inputs, targets = batch
    opt.zero_grad(set_to_none=True)
    hessian_step = isinstance(opt, AdaHessian) and opt.hessian_due
    with twice_differentiable() if hessian_step else nullcontext():
        loss = _loss(model(inputs), targets)
        value = loss.item()
        if not math.isfinite(value):
            return value
        if not isinstance(opt, AdaHessian):
            loss.backward()
        elif hessian_step and spec.hfrac < 1.0:
            chunk = step_chunks(batch, None, hessian_fraction=spec.hfrac)[0]
            assert chunk.curvature is not None  # a study's batch holds at least one chosen example
            opt.backward(loss, _loss(model(chunk.curvature[0]), chunk.curvature[1]))
        else:
            opt.backward(loss)
    if spec.clip is not None:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], spec.clip)
    opt.step()
    return value


def train(spec: RunSpec, quick: bool) -> dict[str, Any]:
    """Train once and report the final metric and held-out loss, the curves and the traces."""
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
    losses: list[list[float | None]] = []
    traces: list[list[float]] = []
    first_loss: float | None = None
    diverged = False
    began = time.perf_counter()
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = schedule.lr_at(step, steps)
        hessian_step = isinstance(opt, AdaHessian) and opt.hessian_due
        value = _step(
            spec, model, opt, data.train_examples(step_indices(data, step, spec.seed, task.batch_size))
        )
        first_loss = value if first_loss is None else first_loss
        if not math.isfinite(value) or value > DIVERGED_LOSS_FACTOR * first_loss:
            diverged = True
            losses.append([step, value if math.isfinite(value) else None])
            break
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


def _end_with_the_study(study_pid: int) -> None:
    """A run process gets SIGTERM when the study that started it dies (Linux), so killing the
    study does not leave its runs training on; one whose study died while it started ends."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the runs end when their current run does
    if os.getppid() != study_pid:
        os._exit(1)
    _init_worker()


# -- per-step cost ------------------------------------------------------------------------------


FRACTION = 0.25
"""The ``hessian_batch_fraction`` the ablation tries (and the costs are timed at)."""


def cost_name(spec: RunSpec) -> str:
    """Which timed configuration a run's steps cost what: AdaHessian by k and fraction, the
    others by name."""
    if spec.optimizer != "adahessian":
        return spec.optimizer
    return f"adahessian_k{spec.freq}" + ("" if spec.hfrac == 1.0 else f"_f{spec.hfrac:g}")


def cost_configs(task: Task) -> list[RunSpec]:
    """One run of each timed configuration (its lr does not change the cost)."""
    configs = [RunSpec(task.name, name, lr) for name, lr in (("sgd", 0.01), ("adam", 1e-4), ("adamw", 1e-4))]
    return configs + [
        RunSpec(task.name, "adahessian", 0.005, freq=k, block=task.block, hfrac=f)
        for f in (1.0, FRACTION)
        for k in FREQS
    ]


def step_costs(task: Task, quick: bool, rounds: int, block_steps: int) -> dict[str, float]:
    """Median milliseconds per training step of each optimizer (and AdaHessian at every k) on
    ``task``, timed in interleaved rounds of whole Hessian periods."""
    data = _dataset(task.name, quick)
    configs = cost_configs(task)
    blocks = []
    for spec in configs:
        torch.manual_seed(0)
        model = task.model(data)
        opt = _optimizer(spec, model)
        cursor = [0]

        def step(
            spec: RunSpec = spec, model: nn.Module = model, opt: Any = opt, cursor: list[int] = cursor
        ) -> None:
            _step(spec, model, opt, data.train_examples(step_indices(data, cursor[0], 0, task.batch_size)))
            cursor[0] += 1

        n = harness.whole_periods(block_steps, spec.freq)
        harness.timed(step, n)  # warm-up, a whole number of periods
        blocks.append(lambda step=step, n=n: harness.timed(step, n) / n * 1e3)
    times = harness.interleaved(blocks, rounds)
    return {cost_name(spec): statistics.median(t) for spec, t in zip(configs, times)}


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
        """What must match for kept runs to be reused: the mode, the schedule and, per task, its
        settings (runs of a task whose settings changed are dropped, the others kept)."""
        return {
            "quick": self.quick,
            "warmup_fraction": WARMUP_FRACTION,
            "tasks": {n: t.fingerprint() for n, t in self.tasks.items()},
        }

    def load(self) -> None:
        if not self.path.exists():
            return
        kept = json.loads(self.path.read_text())
        mine, theirs = self.fingerprint(), kept.get("fingerprint", {})
        if {k: theirs.get(k) for k in ("quick", "warmup_fraction")} != {
            k: mine[k] for k in ("quick", "warmup_fraction")
        }:
            harness.log(f"{self.path} holds another mode or schedule: starting over")
            return
        same = {n for n, t in mine["tasks"].items() if theirs.get("tasks", {}).get(n) == t}
        self.runs = {k: r for k, r in kept.get("runs", {}).items() if r["spec"]["task"] in same}
        self.costs = {n: c for n, c in kept.get("costs", {}).items() if n in same}
        dropped = sorted(set(mine["tasks"]) - same)
        harness.log(
            f"resuming: {len(self.runs)} runs kept in {self.path}"
            + (f"; tasks changed since, started over: {', '.join(dropped)}" if dropped else "")
        )

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
        return (spec.steps or self.tasks[spec.task].steps) * self.costs[spec.task][cost_name(spec)]

    # -- reading results

    def result(self, spec: RunSpec) -> dict[str, Any]:
        return self.runs[spec.key]

    def score(self, spec: RunSpec) -> float:
        """Higher is better; a diverged run scores lowest."""
        r = self.result(spec)
        if r["diverged"]:
            return -math.inf
        return r["metric"] if self.tasks[spec.task].higher_is_better else -r["metric"]

    def mean_score(self, spec: RunSpec) -> float:
        """The mean score over the study's seeds (a diverged seed makes it the lowest)."""
        return statistics.mean(self.score(s) for s in on_seeds(spec, self.seeds))

    def best(self, specs: list[RunSpec], over_seeds: bool) -> RunSpec:
        """The best spec by seed 0's score or by the mean over seeds; ties go to the later one
        (a larger lr: cheaper or faster)."""
        key = self.mean_score if over_seeds else self.score
        return max(reversed(specs), key=key)


def on_seeds(spec: RunSpec, seeds: int) -> list[RunSpec]:
    return [replace(spec, seed=s) for s in range(seeds)]


def base_setting(task: Task, line: str, lr: float) -> RunSpec:
    """A line's setting before anything but lr is tuned."""
    if line == "adahessian":
        return RunSpec(task.name, "adahessian", lr, freq=BASE_FREQ, block=task.block)
    return RunSpec(task.name, line, lr)


def grid(task: Task, line: str, quick: bool) -> list[RunSpec]:
    lrs = LR_GRIDS[line]
    lrs = lrs[1:4:2] if quick else lrs
    return [base_setting(task, line, lr) for lr in lrs]


def past_edge(study: Study, specs: list[RunSpec]) -> RunSpec | None:
    """The next half-decade past the grid's edge if seed 0's best lr sits on that edge, else None."""
    best = study.best(specs, over_seeds=False)
    # Rounded as run keys write it (3e-05, not 2.9999999999999997e-05).
    if best.lr == specs[-1].lr:
        return replace(best, lr=float(f"{specs[-2].lr * 10:.4g}"))
    if best.lr == specs[0].lr:
        return replace(best, lr=float(f"{specs[1].lr / 10:.4g}"))
    return None


def shortlist(study: Study, specs: list[RunSpec]) -> list[RunSpec]:
    """The ``SHORTLIST`` best lrs of seed 0 (ties to the larger lr), lowest lr first."""
    ranked = sorted(reversed(specs), key=study.score, reverse=True)
    return sorted(ranked[:SHORTLIST], key=lambda s: s.lr)


def variants(task: Task, chosen: RunSpec) -> list[RunSpec]:
    """The settings beside lr tried at the chosen lr (``chosen`` first)."""
    out = [chosen]
    if chosen.optimizer == "adahessian":
        out += [replace(chosen, freq=k) for k in FREQS if k != chosen.freq]
        out.append(replace(chosen, wd=0.01))
    if chosen.optimizer == "adamw":
        out.append(replace(chosen, wd=0.0))
    if chosen.optimizer in ("adamw", "adam") and task.metric == "loss":
        out += [replace(chosen, beta2=b2, clip=clip) for b2, clip in BETA2_CLIP]
    return out


LM_BLOCK = 32
"""The block the AdaHessian paper averages a transformer's estimate over (quick: 4)."""


def ablations(task: Task, chosen: RunSpec, quick: bool) -> dict[str, RunSpec]:
    """AdaHessian's curvature options, each changed alone from its chosen setting; on the LM also
    block averaging, over every tensor and (as the authors' code) over 2-D ones only."""
    out = {
        "as chosen": chosen,
        "β2 0.98": replace(chosen, beta2=0.98),
        "update_clip 1": replace(chosen, update_clip=1.0),
        f"products of {FRACTION:g} of each batch": replace(chosen, hfrac=FRACTION),
    }
    if task.metric == "loss":
        block = 4 if quick else LM_BLOCK
        out[f"blocks of {block}"] = replace(chosen, block=block)
        out[f"blocks of {block}, 1-D tensors unaveraged"] = replace(chosen, block=block, avg1d=False)
    return out


def tune(study: Study, tasks: list[Task]) -> dict[tuple[str, str], dict[str, Any]]:
    """Every line's lr, then its other settings, chosen by the mean over seeds (module doc).
    Returns per (task, line): the grid as run, the shortlist, the chosen lr's setting, the
    variants tried and the chosen setting."""
    grids = {(t.name, line): grid(t, line, study.quick) for t in tasks for line in LINES}
    study.run_all("grid (seed 0)", [s for specs in grids.values() for s in specs])
    for _ in range(0 if study.quick else EDGE_EXTENSIONS):
        beyond = {key: past_edge(study, specs) for key, specs in grids.items()}
        beyond = {key: spec for key, spec in beyond.items() if spec is not None}
        if not beyond:
            break
        study.run_all("grid past an edge (seed 0)", list(beyond.values()))
        for key, spec in beyond.items():
            grids[key] = sorted([*grids[key], spec], key=lambda s: s.lr)
    short = {key: shortlist(study, specs) for key, specs in grids.items()}
    study.run_all(
        "shortlist (every seed)",
        [x for specs in short.values() for s in specs for x in on_seeds(s, study.seeds)],
    )
    chosen_lr = {key: study.best(specs, over_seeds=True) for key, specs in short.items()}
    tried = {key: variants(study.tasks[key[0]], spec) for key, spec in chosen_lr.items()}
    study.run_all(
        "settings (every seed)",
        [x for specs in tried.values() for s in specs for x in on_seeds(s, study.seeds)],
    )
    return {
        key: {
            "grid": grids[key],
            "shortlist": short[key],
            "lr": chosen_lr[key],
            "tried": tried[key],
            "chosen": study.best(tried[key], over_seeds=True),
        }
        for key in grids
    }


def defaults_variants(task: Task) -> dict[str, RunSpec]:
    """AdaHessian as a job spec's defaults give it (lr, eps, betas, k and warm-up as
    ``JobSpec`` fills them for the task's steps; the task's block size), beside the defaults
    before this study (k = 2 given, 10 warm-up steps, β2 0.999) and those without warm-up."""
    spec = OptimizerSpec(name="adahessian")
    steps = task.steps
    now = RunSpec(
        task.name,
        "adahessian",
        spec.lr,
        freq=spec.hessian_update_freq,
        block=task.block,
        warmup=adahessian_warmup(steps),
        eps=spec.eps,
        hessian_power=spec.hessian_power,
        beta2=spec.betas[1],
    )
    before = replace(now, freq=2, warmup=10, beta2=0.999)
    return {
        "spec defaults": now,
        "before the study (10 warm-up steps, β2 0.999)": before,
        "before the study, no warm-up": replace(before, warmup=0),
    }


def plan(study: Study) -> dict[str, dict[str, Any]]:
    """Run the stages; return, per task, what each table is made of."""
    tasks = list(study.tasks.values())
    tuned = tune(study, tasks)
    scales = SCALES[:1] if study.quick else SCALES
    plans: dict[str, dict[str, Any]] = {}
    later: list[RunSpec] = []
    for t in tasks:
        chosen = {line: tuned[t.name, line]["chosen"] for line in LINES}
        p = {
            "tuned": {line: tuned[t.name, line] for line in LINES},
            "chosen": chosen,
            "scales": {
                line: [replace(spec, lr=spec.lr * x) for x in scales] for line, spec in chosen.items()
            },
            "ablations": ablations(t, chosen["adahessian"], study.quick),
            "defaults": defaults_variants(t),
        }
        later += [s for specs in p["scales"].values() for s in specs]
        later += [
            x for s in [*p["ablations"].values(), *p["defaults"].values()] for x in on_seeds(s, study.seeds)
        ]
        plans[t.name] = p
    study.run_all("robustness, ablations and defaults", later)
    return plans


# -- summary ------------------------------------------------------------------------------------


def _stats(study: Study, specs: list[RunSpec], key: str = "metric") -> dict[str, Any]:
    """Mean ± std over the runs that did not diverge, of ``metric`` or ``eval_loss``."""
    results = [study.result(s) for s in specs]
    values = [r[key] for r in results if not r["diverged"]]
    diverged = sum(r["diverged"] for r in results)
    return {
        "values": values,
        "diverged": diverged,
        "mean": statistics.mean(values) if values else None,
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "text": _mean_std(values, diverged, 3),
    }


def _mean_std(values: list[float], diverged: int, digits: int) -> str:
    if not values:
        return "diverged"
    text = f"{statistics.mean(values):.{digits}f}"
    if len(values) > 1:
        text += f" ± {statistics.stdev(values):.{digits}f}"
    return text + (f" ({diverged} diverged)" if diverged else "")


def reach(result: dict[str, Any], target: float) -> int | None:
    """The first evaluated step whose held-out loss is at or below ``target`` (None: never)."""
    if result["diverged"]:
        return None
    return next((int(step) for step, _, loss in result["curve"] if loss <= target), None)


def _median(values: list[float | None]) -> float | None:
    """The (lower) median, a value that is None counting as never (infinite); None if that is the
    median. The lower one, so that of two seeds the better counts, as the target's median allows."""
    m = statistics.median_low([math.inf if v is None else v for v in values])
    return None if math.isinf(m) else m


def summarize(study: Study, plans: dict[str, dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for name, p in plans.items():
        task, costs = study.tasks[name], study.costs[name]
        adamw_losses = _stats(study, on_seeds(p["chosen"]["adamw"], study.seeds), "eval_loss")["values"]
        target = statistics.median(adamw_losses) if adamw_losses else None
        lines = []
        for line in LINES:
            spec, tuned = p["chosen"][line], p["tuned"][line]
            runs = on_seeds(spec, study.seeds)
            ms = costs[cost_name(spec)]
            steps = [None if target is None else reach(study.result(s), target) for s in runs]
            grid_lrs = [s.lr for s in tuned["grid"]]
            lines.append(
                {
                    "line": line,
                    "title": LINE_TITLES[line],
                    "spec": asdict(spec),
                    "lr": spec.lr,
                    "setting": spec.setting(),
                    "lr_at_grid_edge": spec.lr in (grid_lrs[0], grid_lrs[-1]),
                    "metric": _stats(study, runs),
                    "eval_loss": _stats(study, runs, "eval_loss"),
                    "ms_per_step": ms,
                    "ratio_to_adamw": ms / costs["adamw"],
                    "steps_to_target": steps,
                    "median_steps_to_target": _median(steps),
                    "median_seconds_to_target": _median([None if s is None else s * ms / 1e3 for s in steps]),
                    "grid_seed0": [[s.lr, study.result(s)["metric"]] for s in tuned["grid"]],
                    "shortlist_means": [[s.lr, study.mean_score(s)] for s in tuned["shortlist"]],
                    "settings_tried": [
                        {"setting": s.setting(), "lr": s.lr, **_stats(study, on_seeds(s, study.seeds))}
                        for s in tuned["tried"]
                    ],
                    "scales": [
                        {
                            "scale": s.lr / spec.lr,
                            "metric": study.result(s)["metric"],
                            "diverged": study.result(s)["diverged"],
                        }
                        for s in p["scales"][line]
                    ],
                }
            )
        adamw_seconds = next(x["median_seconds_to_target"] for x in lines if x["line"] == "adamw")
        for x in lines:
            seconds = x["median_seconds_to_target"]
            x["time_to_target_vs_adamw"] = (
                None if seconds is None or not adamw_seconds else seconds / adamw_seconds
            )
        summary[name] = {
            "title": task.title,
            "metric": task.metric,
            "powered": task.powered,
            "held_out": task.held_out,
            "steps": task.steps,
            "batch_size": task.batch_size,
            "target_eval_loss": target,
            "lines": lines,
            "ablations": {
                k: {
                    "setting": s.key,
                    **_stats(study, on_seeds(s, study.seeds)),
                    "eval_loss": _stats(study, on_seeds(s, study.seeds), "eval_loss")["text"],
                    "ms_per_step": costs[cost_name(s)],
                    "ratio_to_adamw": costs[cost_name(s)] / costs["adamw"],
                }
                for k, s in p["ablations"].items()
            },
            "defaults": {k: _stats(study, on_seeds(s, study.seeds)) for k, s in p["defaults"].items()},
            "costs_ms": costs,
        }
    return summary


def _fmt(value: float | None, pattern: str, missing: str = "not reached") -> str:
    return missing if value is None else format(value, pattern)


def markdown(study: Study, summary: dict[str, Any]) -> str:
    """The study's tables, as the README links them."""
    out = [
        f"# AdaHessian study{' (quick)' if study.quick else ''}",
        "",
        f"Every number is the mean ± std over {study.seeds} seeds at the setting chosen by the mean "
        f"over {study.seeds} seeds (seed-0 grid of half-decades, its best {SHORTLIST} lrs on every "
        "seed, then the other settings at the chosen lr; `benchmarks/study.py` says how). Warm-up "
        f"{WARMUP_FRACTION:.0%} of the steps, then cosine decay to 0; one thread per run. "
        + study.meta.get("how", ""),
        "",
    ]
    for s in summary.values():
        arrow = "higher is better" if s["metric"] == "accuracy" else "lower is better"
        out += [
            f"## {s['title']}: held-out {s['metric']} ({arrow}), {s['steps']} steps of {s['batch_size']}",
            "",
        ]
        if s["held_out"]:
            se = math.sqrt(0.25 / s["held_out"])
            out += [
                f"{s['held_out']} held-out examples: one is {100 / s['held_out']:.2f} points; the standard "
                f"error of an accuracy near 50 % is {100 * se:.1f} points"
                + ("" if s["powered"] else " — too small to tell these optimizers apart")
                + ".",
                "",
            ]
        target = s["target_eval_loss"]
        rows = [
            [
                x["title"],
                f"{x['lr']:.3g}" + (" (grid edge)" if x["lr_at_grid_edge"] else ""),
                x["setting"],
                x["metric"]["text"],
                x["eval_loss"]["text"] if s["metric"] == "accuracy" else "",
                f"{x['ms_per_step']:.1f}",
                f"{x['ratio_to_adamw']:.2f}",
                _fmt(x["median_steps_to_target"], ".0f"),
                _fmt(x["median_seconds_to_target"], ".1f"),
                _fmt(x["time_to_target_vs_adamw"], ".2f", "—"),
            ]
            for x in s["lines"]
        ]
        columns = [
            "optimizer",
            "lr",
            "setting",
            s["metric"],
            "held-out loss",
            "ms/step",
            "× AdamW",
            "steps to target",
            "seconds to target",
            "× AdamW's time",
        ]
        out += [
            f"Target: tuned AdamW's median held-out loss, {_fmt(target, '.4f', '—')}; steps and seconds "
            "are medians over seeds (seconds = steps × ms/step, one thread).",
            "",
            harness.markdown_table(columns, rows),
            "",
        ]
        rows = [
            [x["title"], t["setting"], f"{t['lr']:.3g}", t["text"]]
            for x in s["lines"]
            for t in x["settings_tried"]
        ]
        out += [
            "Settings tried at the chosen lr (every seed):",
            "",
            harness.markdown_table(["optimizer", "setting", "lr", s["metric"]], rows),
            "",
        ]
        scales = [x["scale"] for x in s["lines"][0]["scales"]]
        rows = [
            [x["title"], *("diverged" if y["diverged"] else f"{y['metric']:.3f}" for y in x["scales"])]
            for x in s["lines"]
        ]
        out += [
            "Learning-rate robustness (chosen lr × scale, seed 0):",
            "",
            harness.markdown_table(["optimizer", *(f"× {x:g}" for x in scales)], rows),
            "",
        ]
        rows = [
            [k, a["text"], a["eval_loss"] if s["metric"] == "accuracy" else "", f"{a['ratio_to_adamw']:.2f}"]
            for k, a in s["ablations"].items()
        ]
        out += [
            "AdaHessian's curvature options, each changed alone from its chosen setting:",
            "",
            harness.markdown_table(["variant", s["metric"], "held-out loss", "step × AdamW"], rows),
            "",
        ]
        rows = [[k, d["text"]] for k, d in s["defaults"].items()]
        out += [
            "AdaHessian as a job spec's defaults give it (`optimizer: {name: adahessian}`), and as "
            "they were before this study (with `hessian_update_freq: 2` given):",
            "",
            harness.markdown_table(["variant", s["metric"]], rows),
            "",
        ]
    return "\n".join(out)


# -- plots --------------------------------------------------------------------------------------

_COLORS = {"adahessian": "tab:blue", "adamw": "tab:orange", "adam": "tab:red", "sgd": "tab:gray"}


def save_plot(report: dict[str, Any], path: Path) -> None:
    """Final held-out metric per optimizer and task (mean ± std over seeds)."""
    summary = report["summary"]
    with harness.figure(
        path, 1, len(summary), size=(4.2, 3.8), title="Held-out metric at the chosen setting"
    ) as axes:
        for ax, s in zip(axes[0], summary.values()):
            for i, line in enumerate(s["lines"]):
                m = line["metric"]
                if m["mean"] is not None:
                    ax.bar(i, m["mean"], 0.6, yerr=m["std"] or 0, color=_COLORS[line["line"]])
            values = [v for line in s["lines"] for v in line["metric"]["values"]]
            if values:
                lo, hi = min(values), max(values)
                pad = (hi - lo) * 0.5 + 1e-3
                ax.set_ylim(lo - pad, hi + pad)
            ax.set_xticks(
                range(len(s["lines"])),
                [line["title"] for line in s["lines"]],
                rotation=30,
                ha="right",
                fontsize=7,
            )
            ax.set_title(s["title"] + ("" if s["powered"] else " (underpowered)"), fontsize=9)
            ax.set_ylabel(s["metric"])


def save_extra_plots(
    study: Study, summary: dict[str, Any], plans: dict[str, dict[str, Any]], out: Path
) -> list[Path]:
    """Held-out loss against seconds, robustness and the Hessian trace."""
    names = list(summary)
    paths = [out / f"study-{n}.png" for n in ("time", "robustness", "trace")]
    with harness.figure(
        paths[0],
        1,
        len(names),
        size=(4.2, 3.5),
        title="Held-out loss against seconds of one thread (every seed; dashed: the target)",
    ) as axes:
        for ax, name in zip(axes[0], names):
            s = summary[name]
            for line in s["lines"]:
                spec = plans[name]["chosen"][line["line"]]
                for seed, run in enumerate(on_seeds(spec, study.seeds)):
                    r = study.result(run)
                    ax.plot(
                        [c[0] * line["ms_per_step"] / 1e3 for c in r["curve"]],
                        [c[2] for c in r["curve"]],
                        "-",
                        color=_COLORS[line["line"]],
                        linewidth=1,
                        label=line["title"] if seed == 0 else None,
                    )
            if s["target_eval_loss"] is not None:
                ax.axhline(s["target_eval_loss"], color="black", linestyle="--", linewidth=0.8)
            ax.set(xlabel="seconds (steps × ms/step)", ylabel="held-out loss", title=s["title"])
        axes[0][0].legend(fontsize=7)
    with harness.figure(
        paths[1], 1, len(names), size=(4.2, 3.5), title="Chosen lr × scale (seed 0; x: diverged)"
    ) as axes:
        for ax, name in zip(axes[0], names):
            s = summary[name]
            for line in s["lines"]:
                points = [
                    (1.0, study.result(plans[name]["chosen"][line["line"]])),
                    *((x["scale"], x) for x in line["scales"]),
                ]
                ok = sorted((x, r["metric"]) for x, r in points if not r["diverged"])
                ax.plot(
                    [x for x, _ in ok],
                    [m for _, m in ok],
                    "o-",
                    color=_COLORS[line["line"]],
                    label=line["title"],
                    markersize=3,
                )
                bad = [x for x, r in points if r["diverged"]]
                if bad and ok:
                    worst = (min if s["metric"] == "accuracy" else max)(m for _, m in ok)
                    ax.plot(bad, [worst] * len(bad), "x", color=_COLORS[line["line"]], markersize=8)
            ax.set(xscale="log", xlabel="lr / chosen lr", ylabel=s["metric"], title=s["title"])
        axes[0][0].legend(fontsize=7)
    with harness.figure(
        paths[2], 1, len(names), size=(4.2, 3.5), title="Hutchinson estimate of tr(H) (seed 0)"
    ) as axes:
        for ax, name in zip(axes[0], names):
            spec = plans[name]["chosen"]["adahessian"]
            trace = study.result(spec)["trace"]
            ax.plot(
                [t[0] for t in trace],
                [t[1] for t in trace],
                color=_COLORS["adahessian"],
                linewidth=1,
                label=f"AdaHessian k={spec.freq}",
            )
            ax.set(xlabel="step", ylabel="tr(H) estimate", yscale="symlog", title=summary[name]["title"])
            ax.legend(fontsize=7)
    return paths


# -- command line ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = harness.parser(__doc__, "tiny tasks, two lrs, two seeds (CI smoke test, about a minute)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (processes of one thread each)")
    p.add_argument("--seeds", type=int, default=None, help="seeds of every selection and line [3; quick 2]")
    p.add_argument("--tasks", default="char_lm,images,digits,tabular", help="comma-separated tasks")
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
    if args.jobs < 1 or args.seeds < 2 or args.cost_rounds < 1:
        p.error("--jobs and --cost-rounds must be at least 1, --seeds at least 2")
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
        wanted = {cost_name(s) for s in cost_configs(task)}
        if not wanted <= set(study.costs.get(name, {})):
            harness.log(f"timing one step of every optimizer on {task.title}")
            study.costs[name] = step_costs(task, args.quick, args.cost_rounds, 1 if args.quick else 8)
            study.save()
    with ProcessPoolExecutor(
        args.jobs, mp_context=get_context("spawn"), initializer=_end_with_the_study, initargs=(os.getpid(),)
    ) as pool:
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
        rows = [
            [
                x["title"],
                f"{x['lr']:.3g}",
                x["setting"],
                x["metric"]["text"],
                f"{x['ratio_to_adamw']:.2f}",
                _fmt(x["median_seconds_to_target"], ".1f"),
                _fmt(x["time_to_target_vs_adamw"], ".2f", "—"),
            ]
            for x in s["lines"]
        ]
        columns = ["optimizer", "lr", "setting", "mean ± std", "step × AdamW", "s to target", "× AdamW"]
        con.print(harness.table(f"{s['title']}: held-out {s['metric']}", columns, rows))
    print(
        f"results: {study.path}, {args.out / 'study.md'}, {args.out / 'study.png'}, "
        f"{', '.join(str(x) for x in extra)} ({wall:.0f} s)"
    )
    return report


if __name__ == "__main__":
    main()
