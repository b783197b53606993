"""Hutchinson's Hessian diagonal and trace under bf16 autocast against fp32: error and cost.

Run from the repository root::

    .venv/bin/python benchmarks/hessian_precision.py           # full run, ~3 min on 2 cores
    .venv/bin/python benchmarks/hessian_precision.py --quick   # smoke run, seconds

The measurement behind ``backend.hessian_precision`` of the ``ddp`` backend with ``precision:
bf16``: whether a Hessian step's forward and Hessian-vector product run under bf16 autocast like
the other steps, or in fp32 (the default; the README's "bf16" section says why).

For each model (the GPT-style LM on random tokens, ResNet-20 on CIFAR-shaped images),
at initialization and after ``--train-steps`` AdamW steps, and for ``--probes`` probe seeds, it
computes the signed products ``z⊙Hz`` (the same probes) in fp32 and under bf16 autocast, then

* the bf16 error: ‖D_bf16 - D_fp32‖ / ‖D_fp32‖ of the estimate ``D = |z⊙Hz|`` over the whole
  model, the same of ``1/(D + eps)`` (how far each element may move: small estimates dominate
  it), and |tr_bf16 - tr_fp32| / |tr_fp32| of the trace estimate ``Σ z⊙Hz``;
* the probe noise the estimator has anyway: the same two quantities between fp32 estimates of
  two different probes (what AdaHessian's averaging over Hessian steps smooths out);
* the cost: a Hessian step (forward, gradient with graph, one product) in fp32 and in bf16,
  medians of interleaved rounds. CPU autocast only: on a GPU's tensor cores bf16 is several times
  cheaper, here it may be dearer.

Results go to ``--out`` (default ``benchmarks/results/``): ``hessian_precision.json`` and a plot.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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
    table,
    timed,
)
from benchmarks.workloads import Workload, image_batches, lm_factory, token_batches
from trainer.backends.base import autocast
from trainer.double_backward import twice_differentiable
from trainer.models import resnet20
from trainer.optim.hutchinson import ProbeSource, hutchinson_products, param_key

CPU = torch.device("cpu")


def make_workloads(args: argparse.Namespace) -> list[Workload]:
    gen = torch.Generator().manual_seed(args.seed)
    lm = lm_factory(args.lm_seq, 2, 4, args.lm_embd)
    return [
        Workload(
            "transformer",
            f"GPT LM 2L/4H/{args.lm_embd}d, random tokens {args.lm_batch}x{args.lm_seq}",
            lm,
            token_batches(gen, args.lm_batch, args.lm_seq, 4),
        ),
        Workload(
            "resnet20",
            f"ResNet-20, random CIFAR-shaped batch {args.resnet_batch}",
            resnet20,
            image_batches(gen, args.resnet_batch, 4),
        ),
    ]


def signed_products(
    model: nn.Module, workload: Workload, probe_seed: int, precision: str
) -> tuple[torch.Tensor, float]:
    """``z⊙Hz`` of the whole model, flat, in fp32, and the trace estimate, on batch 0."""
    names, params = zip(*model.named_parameters())
    x, y = workload.batches[0]
    with twice_differentiable():
        with autocast(CPU, precision):  # type: ignore[arg-type]
            loss = workload.loss(model(x), y)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        products = hutchinson_products(
            grads, params, [param_key(n) for n in names], ProbeSource(probe_seed), 0
        )
    flat = torch.cat([p.detach().reshape(-1).float() for p in products])
    return flat, float(flat.sum())


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def step_scale(products: torch.Tensor, eps: float) -> torch.Tensor:
    """``1 / (|z⊙Hz| + eps)``: how far one Hessian estimate lets each element move (AdaHessian's
    denominator from one estimate). Small estimates dominate it, where the diagonal's L2 error
    does not see them."""
    return 1.0 / (products.abs() + eps)


def errors(model: nn.Module, workload: Workload, probes: int, eps: float) -> dict[str, float]:
    """Median over probe seeds of the bf16 error and of the fp32 probe-to-probe difference."""
    fp32 = [signed_products(model, workload, s, "fp32") for s in range(probes + 1)]
    bf16 = [signed_products(model, workload, s, "bf16") for s in range(probes)]
    return {
        "step_scale_bf16_error": statistics.median(
            relative(step_scale(b[0], eps), step_scale(f[0], eps)) for b, f in zip(bf16, fp32)
        ),
        "step_scale_probe_noise": statistics.median(
            relative(step_scale(fp32[s + 1][0], eps), step_scale(fp32[s][0], eps)) for s in range(probes)
        ),
        "diag_bf16_error": statistics.median(relative(b[0].abs(), f[0].abs()) for b, f in zip(bf16, fp32)),
        "diag_probe_noise": statistics.median(
            relative(fp32[s + 1][0].abs(), fp32[s][0].abs()) for s in range(probes)
        ),
        "trace_bf16_error": statistics.median(abs(b[1] - f[1]) / abs(f[1]) for b, f in zip(bf16, fp32)),
        "trace_probe_noise": statistics.median(
            abs(fp32[s + 1][1] - fp32[s][1]) / abs(fp32[s][1]) for s in range(probes)
        ),
        "trace_fp32": fp32[0][1],
    }


def trained(model: nn.Module, workload: Workload, steps: int) -> nn.Module:
    """``model`` after ``steps`` fp32 AdamW steps over the batch pool (a point past initialization)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(steps):
        x, y = workload.batches[step % len(workload.batches)]
        opt.zero_grad()
        workload.loss(model(x), y).backward()
        opt.step()
    return model


def step_cost(model: nn.Module, workload: Workload, args: argparse.Namespace) -> dict[str, float]:
    """Median ms of one Hessian step in fp32 and in bf16, interleaved."""

    def block(precision: str) -> Any:
        return lambda: (
            timed(lambda: signed_products(model, workload, 0, precision), args.block) / args.block * 1e3
        )

    for precision in ("fp32", "bf16"):
        timed(lambda p=precision: signed_products(model, workload, 0, p), 1)  # warm-up
    fp32, bf16 = interleaved([block("fp32"), block("bf16")], args.rounds)
    return {"fp32_ms": statistics.median(fp32), "bf16_ms": statistics.median(bf16)}


def measure(workload: Workload, args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    model = workload.make_model()
    log(f"{workload.description}: at initialization")
    points = {"initialization": errors(model, workload, args.probes, args.eps)}
    log(f"  after {args.train_steps} AdamW steps")
    points[f"after {args.train_steps} steps"] = errors(
        trained(model, workload, args.train_steps), workload, args.probes, args.eps
    )
    log("  cost")
    return {"name": workload.name, "description": workload.description, "points": points,
            "cost": step_cost(model, workload, args)}  # fmt: skip


def print_report(report: dict[str, Any]) -> None:
    out = console(120)
    columns = ("model", "point", "diag: bf16 err", "diag: probe noise", "1/(D+eps): bf16 err",
               "1/(D+eps): probe noise", "trace: bf16 err", "trace: probe noise", "step fp32 ms",
               "step bf16 ms")  # fmt: skip
    rows = []
    for wl in report["workloads"]:
        cost = wl["cost"]
        for i, (point, e) in enumerate(wl["points"].items()):
            rows.append([
                wl["name"] if i == 0 else "", point,
                f"{e['diag_bf16_error']:.2%}", f"{e['diag_probe_noise']:.0%}",
                f"{e['step_scale_bf16_error']:.2%}", f"{e['step_scale_probe_noise']:.0%}",
                f"{e['trace_bf16_error']:.2%}", f"{e['trace_probe_noise']:.0%}",
                f"{cost['fp32_ms']:.1f}" if i == 0 else "", f"{cost['bf16_ms']:.1f}" if i == 0 else "",
            ])  # fmt: skip
    out.print(table("Hutchinson estimate under bf16 autocast vs fp32 (medians over probes)", columns, rows))
    out.print(
        f"  worst bf16 error / probe noise: diagonal {report['worst_diag_error_to_noise']:.3f}, "
        f"1/(D+eps) {report['worst_step_scale_error_to_noise']:.3f}"
    )


def save_plot(report: dict[str, Any], path: Path) -> None:
    with figure(path, 1, 1, (7, 4.5), "bf16 error of the Hessian estimate against its probe noise") as axes:
        ax = axes[0][0]
        labels, errs, noise = [], [], []
        for wl in report["workloads"]:
            for point, e in wl["points"].items():
                labels.append(f"{wl['name']}\n{point}")
                errs.append(e["diag_bf16_error"])
                noise.append(e["diag_probe_noise"])
        xs = range(len(labels))
        ax.bar([x - 0.2 for x in xs], errs, width=0.4, label="bf16 vs fp32 (same probe)")
        ax.bar([x + 0.2 for x in xs], noise, width=0.4, label="probe vs probe (fp32)")
        ax.set_yscale("log")
        ax.set_xticks(list(xs), labels, fontsize=8)
        ax.set_ylabel("relative L2 difference of |z⊙Hz|")
        ax.legend(fontsize=8)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser(__doc__, "tiny sizes (smoke test, seconds)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--eps", type=float, default=1e-4, help="AdaHessian's eps, for 1/(D+eps)")
    p.add_argument("--probes", type=int, default=None, help="probe seeds per point [4; quick 2]")
    p.add_argument(
        "--train-steps", type=int, default=None, help="AdamW steps before the second point [30; quick 2]"
    )
    p.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds [5; quick 1]")
    p.add_argument("--block", type=int, default=None, help="Hessian steps per timed block [3; quick 1]")
    p.add_argument("--lm-batch", type=int, default=None, help="[16; quick 2]")
    p.add_argument("--lm-seq", type=int, default=None, help="[64; quick 16]")
    p.add_argument("--lm-embd", type=int, default=None, help="[128; quick 32]")
    p.add_argument("--resnet-batch", type=int, default=None, help="[32; quick 2]")
    args = apply_mode(
        p.parse_args(argv),
        full={"probes": 4, "train_steps": 30, "rounds": 5, "block": 3, "lm_batch": 16, "lm_seq": 64,
              "lm_embd": 128, "resnet_batch": 32},
        quick={"probes": 2, "train_steps": 2, "rounds": 1, "block": 1, "lm_batch": 2, "lm_seq": 16,
               "lm_embd": 32, "resnet_batch": 2},
    )  # fmt: skip
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    workloads = [measure(w, args) for w in make_workloads(args)]
    points = [e for w in workloads for e in w["points"].values()]
    report = {
        "benchmark": "hessian_precision",
        "machine": machine_info(torch_threads=torch.get_num_threads()),
        "settings": settings(args),
        "workloads": workloads,
        "worst_diag_error_to_noise": max(e["diag_bf16_error"] / e["diag_probe_noise"] for e in points),
        "worst_step_scale_error_to_noise": max(
            e["step_scale_bf16_error"] / e["step_scale_probe_noise"] for e in points
        ),
    }
    return finish(args.out, "hessian_precision", report, started, save_plot, print_report)


if __name__ == "__main__":
    main()
