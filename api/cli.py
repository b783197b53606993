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


if __name__ == "__main__":
    app()
