"""The ``hutch`` command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help="hutch: distributed training with a sharded, delayed-Hessian AdaHessian.", no_args_is_help=True
)


def _positive(value: float) -> float:
    if value <= 0:
        raise typer.BadParameter(f"must be positive, got {value}")
    return value


@app.callback()
def main() -> None:
    """hutch: distributed training with a sharded, delayed-Hessian AdaHessian."""


@app.command()
def demo(
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps.")] = 300,
    batch_size: Annotated[int, typer.Option(min=1, help="Examples per step.")] = 64,
    lr: Annotated[float, typer.Option(callback=_positive, help="Learning rate (positive).")] = 0.15,
    hessian_update_freq: Annotated[
        int, typer.Option(min=1, help="Estimate the Hessian every this many steps.")
    ] = 2,
    seed: Annotated[int, typer.Option(help="Seed for initialisation, data order and Hessian probes.")] = 0,
    out_dir: Annotated[Path, typer.Option(help="Where result.json and loss.png go.")] = Path("runs/demo"),
) -> None:
    """Train a small CNN on the digits data with AdaHessian in this process."""
    from trainer.demo import run_demo

    run_demo(steps, batch_size, lr, hessian_update_freq, seed, out_dir)


@app.command()
def train(
    spec: Annotated[Path, typer.Argument(help="Job spec, YAML or JSON (see examples/).")],
    run_dir: Annotated[Path | None, typer.Option(help="Where metrics.jsonl and result.json go.")] = None,
    job_id: Annotated[str | None, typer.Option(help="The job's id [NAME-random].")] = None,
) -> None:
    """Run a job spec on Ray Train: the cluster in RAY_ADDRESS, or a local one started for it."""
    from trainer.__main__ import main as run_entrypoint

    argv = [str(spec)]
    if run_dir is not None:
        argv += ["--run-dir", str(run_dir)]
    if job_id is not None:
        argv += ["--job-id", job_id]
    raise typer.Exit(run_entrypoint(argv))


if __name__ == "__main__":
    app()
