"""The ``hutch`` command line."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(help="hutch: distributed training with a sharded, delayed-Hessian AdaHessian.", no_args_is_help=True)


def _positive(value: float) -> float:
    if value <= 0:
        raise typer.BadParameter(f"must be positive, got {value}")
    return value


@app.callback()
def main() -> None:
    """hutch: distributed training with a sharded, delayed-Hessian AdaHessian."""


@app.command()
def demo(
    steps: int = typer.Option(300, min=1, help="Optimizer steps."),
    batch_size: int = typer.Option(64, min=1, help="Examples per step."),
    lr: float = typer.Option(0.15, callback=_positive, help="Learning rate (positive)."),
    hessian_update_freq: int = typer.Option(2, min=1, help="Estimate the Hessian every this many steps."),
    seed: int = typer.Option(0, help="Seed for initialisation, data order and Hessian probes."),
    out_dir: Path = typer.Option(Path("runs/demo"), help="Where result.json and loss.png go."),
) -> None:
    """Train a small CNN on the digits data with AdaHessian in this process."""
    from trainer.demo import run_demo

    run_demo(steps, batch_size, lr, hessian_update_freq, seed, out_dir)


if __name__ == "__main__":
    app()
