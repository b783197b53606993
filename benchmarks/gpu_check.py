"""Every path hutch can run on one GPU, checked, and the AdaHessian paper's cost table, measured:
one command for a short GPU loan (``scripts/gpu-check``; scripts/README.md says how to run it).

    scripts/gpu-check            # a GPU: NCCL, CUDA, bf16, flash attention
    scripts/gpu-check --cpu      # the same checks at tiny sizes on the CPU with gloo (CI runs it)

Every check but ``collectives`` trains ResNet-20 (CIFAR shapes) and the GPT-style LM for eight
steps on one fixed batch (so the loss falls and loss curves have something to agree on), the
Hessian every second step (so delayed steps are covered), and compares with a reference run
(``sdpa-switch`` and the bf16 DeepSpeed checks: the LM only):

* ``updates``: the distance of the parameters' updates (final minus initial, all parameters
  together) from the reference's, relative to the reference's (L2);
* ``losses``: the largest difference of a step's loss from the reference's, relative to the
  reference's fall in loss over the run.

The reference is the single-process :class:`~trainer.optim.AdaHessian` in float64 *on the checked
device*: a probe is drawn by the device's generator, and from one seed CUDA's Philox and the
CPU's Mersenne twister give different ±1 probes, so a CPU run cannot be a CUDA run's reference.

* ``collectives``: the collectives the sharded optimizer and the FSDP2 backend call between ranks
  (``reduce_scatter_single``, ``all_gather_single``, ``all_reduce``), at world size 1 on NCCL
  (gloo with ``--cpu``), where each is a copy: they exist in the image's torch and run on CUDA
  buffers. (At world size 1 the backends themselves skip them: one rank owns everything.)
* ``adahessian``: the single-process AdaHessian in fp32.
* ``sharded``: the DDP backend (:class:`~trainer.optim.sharded.ShardedAdaHessian`: flat buffers,
  ``p.data`` views, the statistics) at world size 1 on NCCL (gloo with ``--cpu``), in float64, so
  it must equal the reference to rounding; the LM's steps in two chunks. NCCL runs the backend's
  broadcast.
* ``fsdp2``: the FSDP2 backend at world size 1 (FSDP2's all-gathers and reduce-scatters run on
  NCCL), in float64, equal to the reference to rounding.
* ``deepspeed-zero1``, ``deepspeed-zero2``: the DeepSpeed backend at world size 1 in fp32
  (DeepSpeed's CUDA accelerator; its CPU accelerator with ``--cpu``).
* ``deepspeed-zero1-bf16``, ``deepspeed-zero2-bf16``: the same in bf16 (DeepSpeed's CPU accelerator
  runs bf16 too), on the LM only: DeepSpeed 0.19 keeps buffers in fp32 under bf16, and BatchNorm
  then refuses ResNet-20's bf16 activations ("expected scalar type BFloat16 but found Float").
* ``bf16-ddp``: the DDP backend with ``precision: bf16`` (autocast, fp32 Hessian steps) against its
  own fp32 run; the LM's ordinary steps are held to the flash attention kernel, its Hessian steps
  to the math kernel by the switch, as the worker runs them.
* ``sdpa-switch``: the Hutchinson products through ``F.scaled_dot_product_attention`` with the
  switch (:func:`~trainer.double_backward.twice_differentiable`) in fp32, with and without
  activation checkpointing (whose backward recomputes each block), against those of attention
  written out in float64; and the flash kernel, held to in bf16, runs a gradient but refuses the
  double backward with an error :func:`~trainer.double_backward.explain_double_backward` explains.

Cost table: ms per training step of SGD, AdamW, torch-optimizer's Adahessian and hutch's AdaHessian
at Hessian frequency k = 1…5, timed in one process as ``benchmarks/optimizer_cost.py`` does
(warm-up, interleaved rounds of whole Hessian periods, medians), with CUDA events on a GPU, on
ResNet-20 (batch 128) and the LM, in fp32 and bf16 autocast, beside the paper's ratios to SGD.
TF32 is off, so fp32 is fp32. Blocks that would start after ``--budget-s`` are skipped (listed).

Prints the checks and the table, writes ``gpu_check.json`` into ``--out`` (``$OUT`` by default,
rewritten after every part, so a run cut short still leaves what it did), and exits 0 only if
every check that ran held. Imports nothing that imports Ray (Ray is not on the GPU machine).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.nn.attention import SDPBackend, sdpa_kernel

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import console, free_port, interleaved, log, machine_info, table, timed, whole_periods
from benchmarks.workloads import LM_VOCAB, Workload, lm_factory, token_batches, write_attention_out
from trainer.backends.base import autocast
from trainer.double_backward import explain_double_backward, twice_differentiable
from trainer.models import resnet20

TOLERANCES: dict[str, dict[str, float]] = {
    "float64": {"updates": 1e-9, "losses": 1e-5},
    "fp32": {"updates": 0.3, "losses": 1e-2},
    "bf16": {"losses": 0.25},
    "products": {"products": 1e-4, "checkpointed": 1e-4},
    "exact": {"collectives": 0.0},
}
"""What each kind of check must stay within. ``float64``: the same arithmetic in another order
(measured: 0 to 5e-14; the losses are reported in fp32). ``fp32``: AdaHessian divides each step by
|z⊙Hz| + eps, and BatchNorm's Hessian amplifies fp32 rounding where a channel's variance is tiny,
so ResNet-20's updates drift (measured at the GPU's shapes on a CPU: 0.065, the LM 9e-5); losses
agree far better (measured: 9e-4). ``bf16``: rounding flips the sign-like first steps of
coordinates with tiny gradients and, with the Hessian in bf16 (DeepSpeed), the step sizes too, so
only the losses are held (measured: 0.053, 0.07 at ``--cpu``'s shapes, DeepSpeed's bf16 losses
being rounded to 8 bits); a run whose updates do nothing or go astray misses the reference's fall
by 1 or more. ``products``: one double backward in fp32 against float64, with and without
activation checkpointing (measured: 1e-6). ``exact``: copies."""

CHECK_STEPS = 8
HESSIAN_FREQ = 2
SEED = 3
PAPER_RATIO_TO_SGD = {1: 2.42, 2: 1.71, 3: 1.47, 4: 1.36, 5: 1.28}
"""AdaHessian's time per step over SGD's at Hessian frequency k, measured on a GPU by the paper."""


# -- sizes -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """A ResNet-20 and an LM workload's sizes."""

    image_batch: int
    image_size: int
    lm_batch: int
    lm_seq: int
    lm_layers: int
    lm_heads: int
    lm_embd: int


@dataclass(frozen=True)
class Sizes:
    """What a mode runs: the checks' shapes and the cost table's shapes and timing."""

    checks: Shape
    costs: Shape
    rounds: int
    block_steps: int
    warmup_steps: int


GPU_SIZES = Sizes(
    checks=Shape(32, 32, 8, 128, 2, 4, 128),
    costs=Shape(128, 32, 32, 256, 4, 4, 256),
    rounds=9,
    block_steps=10,
    warmup_steps=10,
)
CPU_SIZES = Sizes(
    checks=Shape(4, 8, 4, 16, 1, 2, 32),
    costs=Shape(4, 8, 4, 16, 1, 2, 32),
    rounds=2,
    block_steps=2,
    warmup_steps=1,
)


def workloads(shape: Shape, steps: int, seed: int) -> list[Workload]:
    """ResNet-20 on random CIFAR-shaped images and the LM on random tokens, ``steps`` batches each."""
    gen = torch.Generator().manual_seed(seed)
    images = [
        (
            torch.randn(shape.image_batch, 3, shape.image_size, shape.image_size, generator=gen),
            torch.randint(0, 10, (shape.image_batch,), generator=gen),
        )
        for _ in range(steps)
    ]
    size = f"{shape.image_size}x{shape.image_size}"
    lm = lm_factory(shape.lm_seq, shape.lm_layers, shape.lm_heads, shape.lm_embd)
    tokens = token_batches(gen, shape.lm_batch, shape.lm_seq, steps)
    described = f"{shape.lm_layers}L/{shape.lm_heads}H/{shape.lm_embd}d, {shape.lm_batch}x{shape.lm_seq}"
    return [
        Workload("resnet20", f"ResNet-20, batch {shape.image_batch} of {size}", resnet20, images),
        Workload("lm", f"GPT LM {described} tokens of {LM_VOCAB}", lm, tokens),
    ]


# -- running the paths -----------------------------------------------------------------------


@dataclass
class Run:
    """One training run's losses and final parameters (float64, on the CPU)."""

    losses: list[float]
    params: dict[str, torch.Tensor]


def _whole(p: torch.Tensor) -> torch.Tensor:
    return p.full_tensor() if isinstance(p, DTensor) else p


def build_model(workload: Workload, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The workload's model from the one seed, on ``device`` in ``dtype``."""
    torch.manual_seed(SEED)
    return workload.make_model().to(device, dtype)


def loss_fn(model: nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
    return Workload.loss(model(batch[0]), batch[1])


def optimizer_spec() -> Any:
    """AdaHessian as every check runs it. The step bound (``update_clip``) keeps coordinates whose
    curvature estimate is near zero from steps of lr·g/eps, which fp32 rounding would decide."""
    from trainer.spec import OptimizerSpec

    return OptimizerSpec(
        name="adahessian", lr=0.02, hessian_update_freq=HESSIAN_FREQ, weight_decay=0.01, update_clip=1.0
    )


class SingleProcess:
    """The single-process :class:`AdaHessian` behind the backends' ``train_step``/``hessian_due``."""

    def __init__(self, model: nn.Module) -> None:
        from trainer.optim import AdaHessian
        from trainer.optim.partition import conv_kernel_names

        self.model = model
        kwargs = optimizer_spec().adahessian_kwargs()
        self.optimizer = AdaHessian(
            model.named_parameters(), conv_kernels=conv_kernel_names(model), seed=SEED, **kwargs
        )

    @property
    def hessian_due(self) -> bool:
        return self.optimizer.hessian_due

    def train_step(self, batch: list[torch.Tensor], chunk_size: int | None = None) -> float:
        self.optimizer.zero_grad()
        loss = loss_fn(self.model, batch)
        self.optimizer.backward(loss)
        self.optimizer.step()
        return float(loss.detach())


def train(path: str, workload: Workload, device: torch.device, dtype: torch.dtype, **options: Any) -> Run:
    """:data:`CHECK_STEPS` steps of ``path`` (``single``, ``ddp``, ``fsdp``, ``deepspeed``) on the
    workload's first batch, as the worker runs them: Hessian steps inside the attention switch;
    with ``flash``, ordinary steps held to the flash kernel (it raises where flash cannot run);
    the LM in two chunks with ``chunks``. Other ``options`` go to the backend."""
    model = build_model(workload, device, dtype)
    flash, chunks = options.pop("flash", False), options.pop("chunks", False)
    if path == "single":
        backend: Any = SingleProcess(model)
    elif path == "ddp":
        from trainer.backends import DDPBackend

        backend = DDPBackend(model, loss_fn, optimizer_spec(), seed=SEED, **options)
    elif path == "fsdp":
        from trainer.backends import FSDPBackend

        backend = FSDPBackend(model, loss_fn, optimizer_spec(), seed=SEED, **options)
    else:
        from trainer.backends import DeepSpeedBackend

        backend = DeepSpeedBackend(model, loss_fn, optimizer_spec(), seed=SEED, **options)
    batch = [t.to(device, dtype) if t.is_floating_point() else t.to(device) for t in workload.batches[0]]
    # BatchNorm normalizes over a chunk: chunks would change ResNet-20's function, not the LM's.
    chunk_size = len(batch[0]) // 2 if chunks and workload.name == "lm" else None
    losses = []
    for _ in range(CHECK_STEPS):
        if backend.hessian_due:
            switch: contextlib.AbstractContextManager[Any] = twice_differentiable()
        else:
            switch = sdpa_kernel([SDPBackend.FLASH_ATTENTION]) if flash else contextlib.nullcontext()
        with switch:
            result = backend.train_step(batch, chunk_size)
        losses.append(float(getattr(result, "loss", result)))
    params = {n: _whole(p).detach().double().cpu() for n, p in backend.model.named_parameters()}
    return Run(losses, params)


def difference(run: Run, reference: Run, initial: dict[str, torch.Tensor]) -> dict[str, float]:
    """``updates`` and ``losses`` of ``run`` against ``reference`` (see the module docstring)."""
    squared = sum(float((run.params[n] - want).square().sum()) for n, want in reference.params.items())
    moved = sum(float((want - initial[n]).square().sum()) for n, want in reference.params.items())
    fall = reference.losses[0] - reference.losses[-1]
    losses = max(abs(a - b) for a, b in zip(run.losses, reference.losses)) / fall
    return {"updates": (squared / moved) ** 0.5, "losses": losses}


# -- the checks ------------------------------------------------------------------------------


@dataclass
class Check:
    """One check's outcome: what it compared, against what, how far apart, whether that held."""

    name: str
    compares: str
    reference: str
    tolerances: dict[str, float]
    errors: dict[str, float] = field(default_factory=dict)
    held: bool = False
    skipped: str | None = None
    failure: str | None = None
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Plan:
    """A check to run on each of ``workloads`` (none: once, on no model): ``run(workload)``
    returns its errors and details."""

    name: str
    compares: str
    reference: str
    tolerance: str
    run: Callable[[Workload | None], dict[str, Any]]
    workloads: tuple[str, ...] = ("resnet20", "lm")

    def targets(self) -> list[tuple[str, str | None]]:
        """Each check's name (``plan/workload``, or ``plan``) and workload."""
        return [(f"{self.name}/{w}", w) for w in self.workloads] or [(self.name, None)]


class Checks:
    """Runs the checks on ``device``, keeping the runs that several checks compare against."""

    def __init__(self, device: torch.device, sizes: Sizes, tolerance_scale: float) -> None:
        self.device, self.scale = device, tolerance_scale
        self.workloads = {w.name: w for w in workloads(sizes.checks, 1, SEED)}
        self._runs: dict[tuple[Any, ...], Run] = {}
        group = f"world size 1 on {'NCCL' if device.type == 'cuda' else 'gloo'}"
        f64, f32 = torch.float64, torch.float32
        self.plans = [
            Plan("collectives", f"reduce_scatter_single, all_gather_single, all_reduce, {group}",
                 "their definition", "exact", self._collectives, ()),
            Plan("adahessian", "single-process AdaHessian, fp32", "float64", "fp32",
                 lambda w: self._against_reference(w, "single", f32)),
            Plan("sharded", f"DDP backend, {group}, float64", "float64", "float64",
                 lambda w: self._against_reference(w, "ddp", f64, chunks=True)),
            Plan("fsdp2", f"FSDP2 backend, {group}, float64", "float64", "float64",
                 lambda w: self._against_reference(w, "fsdp", f64)),
            *(Plan(f"deepspeed-zero{stage}", f"DeepSpeed ZeRO-{stage}, world size 1, fp32", "float64", "fp32",
                   lambda w, stage=stage: self._against_reference(w, "deepspeed", f32, zero_stage=stage))
              for stage in (1, 2)),
            *(Plan(f"deepspeed-zero{stage}-bf16", f"DeepSpeed ZeRO-{stage}, world size 1, bf16", "float64",
                   "bf16", lambda w, stage=stage: self._against_reference(
                       w, "deepspeed", f32, zero_stage=stage, precision="bf16"), ("lm",))
              for stage in (1, 2)),
            Plan("bf16-ddp", "DDP backend, bf16 (LM: flash on ordinary steps)", "its fp32 run", "bf16",
                 self._bf16_ddp),
            Plan("sdpa-switch", "Hutchinson products, SDPA switched, checkpointed or not, fp32; "
                 "flash refuses", "written-out float64", "products", self._sdpa, ("lm",)),
        ]  # fmt: skip

    def names(self) -> list[str]:
        """Every check's name."""
        return [name for plan in self.plans for name, _ in plan.targets()]

    def run(self, only: set[str] | None, skip: set[str], on_done: Callable[[Check], None]) -> list[Check]:
        """Every check (``only`` those named, ``plan`` or ``plan/workload``; none of ``skip``),
        each reported to ``on_done`` as it ends; an exception fails its check only."""
        done = []
        for plan in self.plans:
            for full, name in plan.targets():
                if only is not None and not ({plan.name, full} & only):
                    continue
                tolerances = {k: v * self.scale for k, v in TOLERANCES[plan.tolerance].items()}
                check = Check(full, plan.compares, plan.reference, tolerances)
                if {plan.name, full} & skip:
                    check.skipped = "--skip"
                else:
                    self._run_check(check, plan, None if name is None else self.workloads[name])
                done.append(check)
                on_done(check)
        return done

    def _run_check(self, check: Check, plan: Plan, workload: Workload | None) -> None:
        log(f"check {check.name}")
        began = time.perf_counter()
        try:
            check.details = plan.run(workload)
            check.errors = check.details.pop("errors")
            within = all(check.errors[k] <= limit for k, limit in check.tolerances.items())
            check.held = within and check.details.get("refused", True)
        except Exception as error:  # one broken path must not hide the others' results
            check.failure = "".join(traceback.format_exception_only(error)).strip()[-2000:]
            log(f"check {check.name} raised:\n{traceback.format_exc()}")
        check.seconds = time.perf_counter() - began

    def _train(self, w: Workload, path: str, dtype: torch.dtype, **options: Any) -> Run:
        """The run of ``path`` on ``w`` (one run for every check that needs it)."""
        key = (w.name, path, dtype, *sorted(options.items()))
        if key not in self._runs:
            self._runs[key] = train(path, w, self.device, dtype, **options)
        return self._runs[key]

    def _collectives(self, _: Workload | None) -> dict[str, Any]:
        """The collectives the sharded optimizer and the FSDP2 backend call between ranks (skipped
        at world size 1, where one rank owns everything), called here at world size 1 on the
        checked device's backend, where each is a copy: they exist in this torch and run there."""
        sent = torch.arange(1.0, 9.0, device=self.device)
        scattered, gathered, reduced = torch.empty_like(sent), torch.empty_like(sent), sent.clone()
        dist.reduce_scatter_single(scattered, sent)
        dist.all_gather_single(gathered, sent)
        dist.all_reduce(reduced)
        error = max(float((t - sent).abs().max()) for t in (scattered, gathered, reduced))
        return {"errors": {"collectives": error}}

    def _initial(self, w: Workload) -> dict[str, torch.Tensor]:
        return {
            n: p.detach().double()
            for n, p in build_model(w, torch.device("cpu"), torch.float32).named_parameters()
        }

    def _against_reference(
        self, w: Workload, path: str, dtype: torch.dtype, **options: Any
    ) -> dict[str, Any]:
        """``path`` against the single-process AdaHessian in float64 on the checked device."""
        run, reference = self._train(w, path, dtype, **options), self._train(w, "single", torch.float64)
        return {"errors": difference(run, reference, self._initial(w)), "losses": run.losses,
                "reference_losses": reference.losses}  # fmt: skip

    def _bf16_ddp(self, w: Workload) -> dict[str, Any]:
        reference = self._train(w, "ddp", torch.float32, chunks=True)
        run = self._train(w, "ddp", torch.float32, chunks=True, precision="bf16", flash=w.name == "lm")
        return {"errors": difference(run, reference, self._initial(w)), "losses": run.losses,
                "reference_losses": reference.losses}  # fmt: skip

    def _sdpa(self, w: Workload) -> dict[str, Any]:
        from trainer.optim.hutchinson import ProbeSource, hutchinson_products, param_key

        batch = [t.to(self.device) for t in w.batches[0]]

        def products(model: nn.Module, precision: str = "fp32") -> list[torch.Tensor]:
            names, params = zip(*model.named_parameters())
            with autocast(self.device, precision):  # type: ignore[arg-type]
                loss = loss_fn(model, batch)
            grads = torch.autograd.grad(loss, params, create_graph=True)
            keys = [param_key(n) for n in names]
            return hutchinson_products(grads, params, keys, ProbeSource(SEED), 0)

        def error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
            return max(
                float((g.double() - w).abs().max() / w.abs().max().clamp_min(1e-30))
                for g, w in zip(got, want)
            )

        reference = products(write_attention_out(build_model(w, self.device, torch.float64)))
        model = build_model(w, self.device, torch.float32)
        with twice_differentiable():
            switched = products(model)
            model.checkpoint_activations = True  # the backward recomputes each block, math kernel too
            checkpointed = products(model)
            model.checkpoint_activations = False
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]), autocast(self.device, "bf16"):
            loss_fn(model, batch).backward()  # flash runs a gradient (it raises where it cannot run)
        raised, refusal = "nothing", None
        try:
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                products(model, "bf16")
        except RuntimeError as caught:
            raised = str(caught).strip().splitlines()[0]
            refusal = explain_double_backward(caught, "model")
        errors = {"products": error(switched, reference), "checkpointed": error(checkpointed, reference)}
        return {"errors": errors, "refused": refusal is not None, "refusal": refusal, "raised": raised}


# -- the cost table --------------------------------------------------------------------------


def device_timed(step: Callable[[], Any], n: int, device: torch.device) -> float:
    """Seconds ``n`` calls of ``step`` take: between CUDA events on a GPU (the queue drained
    before and after), :func:`benchmarks.harness.timed` on the CPU."""
    if device.type != "cuda":
        return timed(step, n)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    gc.collect()
    gc.disable()
    try:
        start.record()
        for _ in range(n):
            step()
        end.record()
        end.synchronize()
    finally:
        gc.enable()
    return start.elapsed_time(end) / 1e3


def cost_block(workload: Workload, precision: str, device: torch.device, sizes: Sizes) -> dict[str, Any]:
    """The optimizers of ``benchmarks/optimizer_cost.py`` timed on ``workload`` in ``precision``
    (interleaved rounds, medians); its summary with the paper's ratios beside."""
    from benchmarks.optimizer_cost import Measurement, Runner, make_configs, summarize

    class DeviceRunner(Runner):
        """optimizer_cost's step with the forward pass under autocast in ``precision``."""

        def step(self) -> None:
            x, y = self._batch()
            with twice_differentiable() if self.hessian_due else contextlib.nullcontext():
                self.opt.zero_grad(set_to_none=True)
                with autocast(device, precision):  # type: ignore[arg-type]
                    loss = self.workload.loss(self.model(x), y)
                self.backward(loss)
                self.opt.step()

    options = argparse.Namespace(lr_sgd=0.01, lr_adam=1e-3, lr_adahessian=0.01, seed=SEED)
    configs = make_configs()
    torch.manual_seed(SEED)
    base = workload.make_model().to(device)
    runners = [DeviceRunner(c, copy.deepcopy(base), workload, options) for c in configs]
    results = [Measurement(c.name, c.kind, c.freq, whole_periods(sizes.block_steps, c.freq)) for c in configs]
    for runner in runners:
        device_timed(runner.step, whole_periods(sizes.warmup_steps, runner.config.freq), device)

    def block(runner: Runner, n: int) -> Callable[[], float]:
        return lambda: device_timed(runner.step, n, device) / n * 1e3

    rounds = interleaved([block(r, m.block_steps) for r, m in zip(runners, results)], sizes.rounds)
    for m, round_ms in zip(results, rounds):
        m.round_ms = round_ms
    summary = summarize(results)
    for row in summary["rows"]:
        k = row["hessian_update_freq"] if row["kind"] == "ours" else None
        row["paper_ratio_to_sgd"] = PAPER_RATIO_TO_SGD.get(k) if k else None
        row["theory_ratio_to_sgd"] = 1 + 1 / k if k else None
    del runners, base
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"workload": workload.name, "description": workload.description, "precision": precision,
            "rounds": sizes.rounds, "summary": summary}  # fmt: skip


# -- output ----------------------------------------------------------------------------------


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.2g}"


def _pairs(values: dict[str, float]) -> str:
    return ", ".join(f"{name} {_number(value)}" for name, value in values.items())


def print_report(report: dict[str, Any]) -> None:
    """The checks, then the cost table (ms per step and × SGD for each block), then the verdict."""
    out = console(170)
    m, seconds = report["machine"], report["setup"]["wheel_install_s"]
    wheels = "no wheels installed" if seconds is None else f"wheels installed in {seconds} s"
    out.print(
        f"[bold]hutch GPU check[/] ({report['mode']}) on {m.get('gpu') or m['cpu']}: torch {m['torch']}, "
        f"process group {report['process_group']}, {wheels}"
    )
    rows = []
    for c in report["checks"]:
        result = "skipped" if c["skipped"] else "[green]held[/]" if c["held"] else "[red]FAILED[/]"
        note = c["failure"] or c["skipped"] or ""
        if c["details"].get("refused") is False:
            note = f"flash did not refuse the double backward: {c['details']['raised']}"
        rows.append([c["name"], c["compares"], c["reference"], _pairs(c["errors"]), _pairs(c["tolerances"]),
                     result, f"{c['seconds']:.1f}", note[:90]])  # fmt: skip
    columns = ("check", "compares", "against", "error", "tolerance", "result", "s", "note")
    left = ("check", "compares", "against", "error", "tolerance", "note")
    out.print(
        table("Checks (module docstring of benchmarks/gpu_check.py: what each error is)", columns, rows, left)
    )
    blocks = report["costs"]
    if blocks:
        columns = ["optimizer"]
        for b in blocks:
            columns += [f"{b['workload']} {b['precision']} ms", "× SGD"]
        columns += ["paper × SGD", "theory × SGD"]
        rows = []
        for i, first in enumerate(blocks[0]["summary"]["rows"]):
            row = [first["name"]]
            for b in blocks:
                r = b["summary"]["rows"][i]
                row += [f"{r['ms_per_step']:.2f}", f"{r['ratio_to_sgd']:.2f}"]
            row += [
                f"{first[key]:.2f}" if first[key] else ""
                for key in ("paper_ratio_to_sgd", "theory_ratio_to_sgd")
            ]
            rows.append(row)
        rounds = blocks[0]["rounds"]
        title = f"Cost per training step ({rounds} interleaved rounds, median; {report['timer']})"
        out.print(table(title, columns, rows))
    for skipped in report["costs_skipped"]:
        out.print(f"  cost block skipped: {skipped}")
    held = "[green]every check held[/]" if report["all_held"] else "[red]a check FAILED[/]"
    out.print(f"{held}; {report['wall_seconds']:.0f} s in all; {report['out']}")


# -- the command -----------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="tiny shapes on the CPU with gloo (about 10 s)")
    default_out = os.environ.get("OUT") or str(Path(__file__).resolve().parent / "results")
    p.add_argument("--out", type=Path, default=Path(default_out), help="folder for gpu_check.json [$OUT]")
    p.add_argument("--only", default="", help="comma-separated checks to run (path or path/workload)")
    p.add_argument("--skip", default="", help="comma-separated checks to skip (e.g. deepspeed-zero1-bf16)")
    p.add_argument("--no-costs", action="store_true", help="no cost table")
    p.add_argument("--tolerance-scale", type=float, default=1.0, help="multiplies every tolerance (0: break)")
    p.add_argument("--budget-s", type=float, default=360.0, help="no cost block starts after this")
    p.add_argument("--wheel-install-s", type=float, default=None, help="set by scripts/gpu-check")
    return p.parse_args(argv)


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[str]:
    """A one-process group as Ray Train makes on the device (NCCL on a GPU, gloo on the CPU);
    ``LOCAL_RANK`` for DeepSpeed, its CPU accelerator with ``--cpu``."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    port = free_port()
    os.environ.update(LOCAL_RANK="0", RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    if device.type == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"
    extra = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1, **extra)
    try:
        yield backend
    finally:
        dist.destroy_process_group()


def versions() -> dict[str, str | None]:
    """The versions of what the wheels bring (None: not importable)."""
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {}
    for name in ("deepspeed", "torch-optimizer", "pydantic", "transformers"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    device = torch.device("cpu") if args.cpu else torch.device("cuda", 0)
    if args.cpu:
        # Tiny shapes gain nothing from a second thread, and on a loaded machine (CI) idle torch
        # threads spin: measured here under load 9, 17 s with one thread, 164 s with two.
        torch.set_num_threads(1)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("no CUDA device: run with --cpu, or on a GPU", file=sys.stderr)
            return 2
        torch.cuda.set_device(0)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    missing = [name for name in ("pydantic", "torch_optimizer") if find_spec(name) is None]
    if missing:
        print(f"not importable: {', '.join(missing)}: run `make gpu-wheels` and carry .gpu-wheels "
              "(scripts/README.md)", file=sys.stderr)  # fmt: skip
        return 2
    sizes = CPU_SIZES if args.cpu else GPU_SIZES
    gpu = torch.cuda.get_device_name(0) if device.type == "cuda" else None
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "gpu_check.json"
    report: dict[str, Any] = {
        "check": "gpu_check",
        "mode": "cpu" if args.cpu else "gpu",
        "machine": machine_info(gpu=gpu, cuda=torch.version.cuda, torch_threads=torch.get_num_threads(),
                                **versions()),
        "setup": {"wheel_install_s": args.wheel_install_s},
        "tolerances": TOLERANCES, "tolerance_scale": args.tolerance_scale,
        "timer": "CUDA events" if device.type == "cuda" else "perf_counter",
        "checks": [], "costs": [], "costs_skipped": [], "all_held": False, "out": str(path),
    }  # fmt: skip

    def write() -> None:
        report["wall_seconds"] = time.perf_counter() - started
        checks = report["checks"]
        report["all_held"] = bool(checks) and all(c["held"] or c["skipped"] for c in checks)
        path.write_text(json.dumps(report, indent=2))

    only = {n for n in args.only.split(",") if n} or None
    skip = {n for n in args.skip.split(",") if n}
    with process_group(device) as backend:
        report["process_group"] = backend
        checks = Checks(device, sizes, args.tolerance_scale)
        unknown = (only or set()) | skip
        unknown -= {n for name in checks.names() for n in (name, name.split("/")[0])}
        if unknown:
            known = ", ".join(checks.names())
            print(f"unknown checks {sorted(unknown)}; the checks: {known}", file=sys.stderr)
            return 2

        def done(check: Check) -> None:
            report["checks"].append(asdict(check))
            write()

        checks.run(only, skip, done)
        if not args.no_costs:
            # What exists now is never garbage: the collection before each timed block (the
            # harness's method) then takes microseconds instead of 0.2 s.
            gc.freeze()
            for workload in workloads(sizes.costs, 4, SEED):
                workload.batches = [tuple(t.to(device) for t in b) for b in workload.batches]
                for precision in ("fp32", "bf16"):
                    if time.perf_counter() - started > args.budget_s:
                        report["costs_skipped"].append(f"{workload.name} {precision}: past --budget-s")
                        continue
                    log(f"cost {workload.name} {precision}")
                    report["costs"].append(cost_block(workload, precision, device, sizes))
                    write()
    write()
    print_report(report)
    return 0 if report["all_held"] else 1


if __name__ == "__main__":
    sys.exit(main())
