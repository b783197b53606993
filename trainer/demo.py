"""Single-process demo: a small CNN on the real digits data, trained with AdaHessian.

The same model, data order and learning-rate schedule (10 warm-up steps, cosine decay) as
``examples/digits-adahessian.yaml``, without Ray.

This is what ``hutch demo`` runs: no cluster, no service, one process. It shows progress,
prints the held-out accuracy and the Hessian trace, and writes the loss curve as JSON and PNG.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from torch.nn import functional as F

from trainer.data import build_dataset
from trainer.models.registry import build_model
from trainer.optim import AdaHessian
from trainer.spec import OptimizerSpec


@dataclass
class DemoResult:
    """What the demo reports and writes to ``result.json``."""

    steps: int
    final_loss: float
    test_accuracy: float
    hessian_trace: float | None
    seconds: float


def run_demo(
    steps: int = 300,
    batch_size: int = 64,
    lr: float = 0.15,
    hessian_update_freq: int = 2,
    seed: int = 0,
    out_dir: Path = Path("runs/demo"),
    console: Console | None = None,
) -> DemoResult:
    """Train, evaluate and write ``metrics.json``, ``result.json`` and ``loss.png``."""
    console = console or Console()
    schedule = OptimizerSpec(lr=lr, hessian_update_freq=hessian_update_freq, warmup_steps=10)
    torch.manual_seed(seed)
    dataset = build_dataset("digits")
    model = build_model("cnn", {}, dataset.model_args())
    opt = AdaHessian(model.parameters(), seed=seed, **schedule.adahessian_kwargs())
    losses: list[float] = []
    start = time.perf_counter()
    with Progress(
        TextColumn("[bold]training[/]"),
        BarColumn(),
        TextColumn("step {task.completed}/{task.total}  loss {task.fields[loss]:.4f}"),
        TimeRemainingColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("train", total=steps, loss=float("nan"))
        model.train()
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = schedule.lr_at(step, steps)
            inputs, targets = dataset.train_batch(step, seed, batch_size)
            opt.zero_grad()
            loss = F.cross_entropy(model(inputs), targets)
            opt.backward(loss)
            opt.step()
            losses.append(loss.item())
            progress.update(task, advance=1, loss=losses[-1])
    seconds = time.perf_counter() - start

    model.eval()
    correct = total = 0
    with torch.no_grad():
        for inputs, targets in dataset.eval_batches(512):
            correct += (model(inputs).argmax(dim=1) == targets).sum().item()
            total += len(targets)
    accuracy = correct / total
    result = DemoResult(steps, losses[-1], accuracy, opt.hessian_trace, seconds)

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps({"loss": losses}))
    (out_dir / "result.json").write_text(json.dumps(asdict(result), indent=2))
    _plot_losses(losses, out_dir / "loss.png")
    console.print(
        f"held-out accuracy [bold]{accuracy:.2%}[/] after {steps} steps in {seconds:.1f}s; "
        f"final loss {losses[-1]:.4f}; Hessian trace estimate {opt.hessian_trace:.3g}"
    )
    console.print(f"wrote {out_dir}/result.json and {out_dir}/loss.png")
    return result


def _plot_losses(losses: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(losses) + 1), losses, linewidth=1)
    ax.set(xlabel="step", ylabel="training loss", yscale="log", title="AdaHessian on digits")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
