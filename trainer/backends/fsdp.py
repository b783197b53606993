"""Fully sharded data parallelism (FSDP2, ``torch.distributed.fsdp.fully_shard``) with AdaHessian
on every rank's own rows: parameters, gradients, Hessian products and optimizer state sharded.

* **Sharding.** ``fully_shard`` on every block (:func:`shard_units`) and on the root: each
  parameter becomes a DTensor cut on dim 0 over the ranks.
* **Ordinary steps** are FSDP2's own: each block's parameters are all-gathered for its forward,
  freed after it (the root's stay), gathered again for its backward, and the gradients
  reduce-scattered (averaged) onto the dim-0 shards. Parameters unused on a rank are
  reduce-scattered as zeros, so ranks that use different parameters still agree on every
  collective; which parameters had a gradient anywhere is counted from hooks on the gathered
  parameters and settled by the optimizer's one all-reduce.
* **Hessian steps** keep every parameter gathered from the forward through the gradient with
  its graph and the Hessian-vector products (resharding after forward and backward off, FSDP2's
  gradient reduction off): ``torch.autograd.grad`` runs on the gathered parameters, the signed
  Hutchinson products are taken with the probes every other path uses (keyed by seed,
  Hessian-step index and parameter name), and gradient and products are reduce-scattered onto
  the same dim-0 shards in one collective each; then everything is resharded. The estimate so
  equals the single-process one on the global batch. With ``hessian_batch_fraction`` below 1
  the gradient is taken without a graph and the products from the chosen examples' loss.
  Peak memory is the whole model gathered plus the double-backward graph
  (``benchmarks/fsdp_cost.py`` measures it).
* **The optimizer** (:mod:`trainer.optim.dtensor`) keeps m and v for its rows only and updates
  them with the one AdaHessian core; baselines are torch's optimizers on the DTensors.
* **bf16**: with ``hessian_precision: bf16``, FSDP2's ``MixedPrecisionPolicy`` (bf16 gathered
  parameters and compute, fp32 gradient reduction, fp32 sharded parameters and state); with
  the default ``fp32`` Hessian steps, ordinary steps autocast to bf16 over fp32 gathers instead,
  so Hessian steps can run in fp32 (FSDP2 fixes a module's gathered dtype once).
* **Checkpoints** are ``torch.distributed.checkpoint``'s: every rank writes its own rows
  (``fsdp/__<rank>_0.distcp``, rank 0 the ``.metadata``), and a checkpoint loads into any world
  size; ``progress.json`` holds the step and the optimizer's counts.
* **Evaluation** gathers the whole model once, collectively, so each rank can then evaluate a
  different number of batches without collectives.

Untested here (no GPU): NCCL collectives and CUDA streams; the code passes the model's device
type to the device mesh as torch documents, and nothing in it is CPU-specific.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from trainer.backends.base import (
    LossFn,
    Precision,
    StepStats,
    autocast,
    average_buffers,
    evaluation_mode,
    hessian_precision_of,
    weighted,
)
from trainer.batches import Batch, step_chunks
from trainer.checkpoint import read_engine_progress, write_engine_progress
from trainer.optim.core import AdaHessianHyperparameters
from trainer.optim.dtensor import DTensorAdaHessian, DTensorFirstOrder, local, rows_per_rank
from trainer.optim.hutchinson import ProbeSource, hutchinson_products
from trainer.optim.partition import conv_kernel_names
from trainer.spec import JobSpec, OptimizerSpec, SpecError

CHECKPOINT_DIR = "fsdp"
"""Sub-directory of a checkpoint with ``torch.distributed.checkpoint``'s files."""


def shard_units(model: nn.Module, class_names: Sequence[str] | None = None) -> list[tuple[str, nn.Module]]:
    """The blocks ``fully_shard`` wraps before the root, outermost first, with their names.

    The rule: every child with parameters of an ``nn.ModuleList`` or ``nn.Sequential`` (the
    root included) that is not inside another block: transformer layers, residual stages, the
    layers of a sequential MLP. ``class_names`` replaces the rule: the outermost modules of
    those classes. A block whose parameters are also used outside it (a tied embedding) is left
    to the root, since FSDP2 needs a shared parameter in one unit.
    """
    owners: dict[int, set[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), set()).add(name)
    units: list[tuple[str, nn.Module]] = []

    def shared_outside(prefix: str, module: nn.Module) -> bool:
        return any(not all(n.startswith(prefix + ".") for n in owners[id(p)]) for p in module.parameters())

    def visit(prefix: str, module: nn.Module) -> None:
        container = isinstance(module, (nn.ModuleList, nn.Sequential)) and class_names is None
        for child_name, child in module.named_children():
            name = f"{prefix}.{child_name}" if prefix else child_name
            chosen = type(child).__name__ in class_names if class_names is not None else container
            if chosen and any(True for _ in child.parameters()) and not shared_outside(name, child):
                units.append((name, child))
            else:
                visit(name, child)

    visit("", model)
    if class_names is not None:
        present = {type(m).__name__ for _, m in units}
        missing = [c for c in class_names if c not in present]
        if missing:
            classes = sorted({type(m).__name__ for m in model.modules()})
            raise SpecError(
                f"backend.shard_modules: no shardable module of class {', '.join(map(repr, missing))} "
                f"in the model (its classes: {', '.join(classes)})"
            )
    return units


class FSDPBackend:
    """One rank of a fully sharded job: see the module docstring."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        optimizer: OptimizerSpec,
        seed: int = 0,
        precision: Precision = "fp32",
        hessian_precision: Precision = "fp32",
        shard_modules: Sequence[str] | None = None,
    ) -> None:
        hessian: Precision = hessian_precision_of(precision, hessian_precision)
        self.loss_fn = loss_fn
        self.precision: Precision = precision
        self.hessian_precision = hessian
        self.hessian_batch_fraction = optimizer.hessian_batch_fraction
        self._device = next(model.parameters()).device
        self.world_size, self.rank = dist.get_world_size(), dist.get_rank()
        with torch.no_grad():  # every rank starts from rank 0's values, as on the DDP path
            for tensor in [*model.parameters(), *model.buffers()]:
                dist.broadcast(tensor, src=0)
        conv_kernels = conv_kernel_names(model)
        mesh = init_device_mesh(self._device.type, (self.world_size,))
        mixed = self.hessian_precision == "bf16"  # every step in bf16: FSDP2's own mixed precision
        options: dict[str, Any] = {"mesh": mesh}
        if mixed:
            options["mp_policy"] = MixedPrecisionPolicy(
                param_dtype=torch.bfloat16, reduce_dtype=torch.float32
            )
        self._autocast: Precision = "fp32" if mixed else precision
        self._blocks = [module for _, module in shard_units(model, shard_modules)]
        for block in self._blocks:
            fully_shard(block, **options)
        self.model: nn.Module = fully_shard(model, **options)
        self._fsdp_modules: list[FSDPModule] = [m for m in model.modules() if isinstance(m, FSDPModule)]
        self.model.set_reduce_scatter_unused_params(True)
        self._set_resharding(hessian=False)

        named = [(n, p) for n, p in model.named_parameters()]
        self._index = {name: i for i, (name, _) in enumerate(named)}
        self._used: set[str] = set()
        self._hooked: set[int] = set()
        for module_name, module in model.named_modules():
            if isinstance(module, FSDPModule):
                module.register_forward_pre_hook(self._hook_gathered(module_name))
        if optimizer.name == "adahessian":
            self.optimizer: DTensorAdaHessian | DTensorFirstOrder = DTensorAdaHessian(
                named,
                AdaHessianHyperparameters.from_spec(optimizer, seed),
                conv_kernels=conv_kernels,
                max_grad_norm=optimizer.max_grad_norm,
            )
            self._probes = ProbeSource(seed)
            self._local_products = optimizer.hessian_scope == "local"
        else:
            self.optimizer = DTensorFirstOrder(named, optimizer)

    @classmethod
    def from_spec(cls, spec: JobSpec, model: nn.Module, loss_fn: LossFn) -> FSDPBackend:
        try:
            return cls(
                model,
                loss_fn,
                spec.optimizer,
                seed=spec.training.seed,
                precision=spec.backend.precision,
                hessian_precision=spec.backend.hessian_precision,
                shard_modules=spec.backend.shard_modules,
            )
        except SpecError:
            raise
        except ValueError as error:  # a block size that would cross a shard boundary
            raise SpecError(f"optimizer: {error}") from error

    @property
    def hessian_due(self) -> bool:
        return self.optimizer.hessian_due

    # -- FSDP2's switches ------------------------------------------------------------------

    def _set_resharding(self, hessian: bool) -> None:
        """Hessian steps keep everything gathered and reduce nothing themselves; ordinary steps
        reshard blocks after forward and everything after backward, and reduce-scatter."""
        root = self.model
        assert isinstance(root, FSDPModule)
        root.set_reshard_after_forward(not hessian)
        root.set_reshard_after_forward(False, recurse=False)  # the root is needed again at once
        root.set_reshard_after_backward(not hessian)
        root.set_requires_gradient_sync(not hessian)

    def _reshard(self) -> None:
        for module in self._fsdp_modules:
            module.reshard()

    def _hook_gathered(self, prefix: str) -> Any:
        """A forward pre-hook (it runs after FSDP2's, which gathers the module's parameters):
        mark each gathered parameter used when autograd accumulates a gradient into it. FSDP2
        keeps one gathered tensor per parameter for the whole run, so each is hooked once."""

        def hook(module: nn.Module, args: Any) -> None:
            for name, p in module.named_parameters(prefix=prefix):
                if isinstance(p, DTensor) or not p.requires_grad or id(p) in self._hooked:
                    continue
                self._hooked.add(id(p))
                p.register_post_accumulate_grad_hook(lambda _, name=name: self._used.add(name))

        return hook

    # -- one step ----------------------------------------------------------------------------

    def train_step(self, batch: Batch, chunk_size: int | None = None) -> StepStats:
        """One step on this rank's micro-batch (in chunks of ``chunk_size`` examples if given);
        each chunk's mean loss is weighted by its share of the micro-batch."""
        hessian_step = self.hessian_due
        self.model.train()
        for p in self.optimizer.params:
            p.grad = None
        if hessian_step:
            loss, grads, products, used = self._hessian_pass(batch, chunk_size)
        else:
            loss, grads, used = self._ordinary_pass(batch, chunk_size)
            products = None
        self.optimizer.step(grads, products, used, loss)
        return StepStats(
            step=self.optimizer.steps_done,
            loss=float(self.optimizer.loss),
            grad_norm=float(self.optimizer.grad_norm),
            hessian_step=hessian_step,
            hessian_trace=self.optimizer.hessian_trace,
        )

    def _ordinary_pass(
        self, batch: Batch, chunk_size: int | None
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[bool]]:
        """FSDP2's forward and backward per chunk; its reduce-scatters add the chunks' averaged
        gradients onto the sharded ``.grad``."""
        self._used.clear()
        total = torch.zeros((), dtype=torch.float64)
        for chunk in step_chunks(batch, chunk_size):
            with autocast(self._device, self._autocast):
                loss = weighted(self.loss_fn(self.model, chunk.batch), chunk.weight)
            total += loss.detach().double().cpu()
            loss.backward()
        grads = [
            torch.zeros_like(local(p)) if p.grad is None else local(p.grad) for p in self.optimizer.params
        ]
        return total, grads, [name in self._used for name in self.optimizer.names]

    def _hessian_pass(
        self, batch: Batch, chunk_size: int | None
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor], list[bool]]:
        """Gradients with their graph and Hutchinson products on the gathered parameters, summed
        over chunks, then reduce-scattered onto this rank's rows."""
        opt = self.optimizer
        assert isinstance(opt, DTensorAdaHessian)
        names, count = opt.names, len(opt.names)
        full_grads: list[torch.Tensor | None] = [None] * count
        full_products: list[torch.Tensor | None] = [None] * count
        total = torch.zeros((), dtype=torch.float64)
        precision = self.hessian_precision if self._autocast == "bf16" else "fp32"
        self._set_resharding(hessian=True)
        fraction = self.hessian_batch_fraction
        try:
            for chunk in step_chunks(batch, chunk_size, self.rank, self.world_size, fraction):
                with autocast(self._device, precision):
                    loss = weighted(self.loss_fn(self.model, chunk.batch), chunk.weight)
                total += loss.detach().double().cpu()
                gathered = dict(self.model.named_parameters())
                # Parameters of a module that did not run stay sharded: no gradient.
                live = [i for i, n in enumerate(names) if _gathered_trainable(gathered[n])]
                params = [gathered[names[i]] for i in live]
                separate = fraction < 1.0
                grads = torch.autograd.grad(loss, params, create_graph=not separate, allow_unused=True)
                for i, g in zip(live, grads):
                    if g is not None:
                        g = g.detach().to(opt.params[i].dtype)  # sums in the sharded (master) dtype
                        full_grads[i] = g if full_grads[i] is None else full_grads[i].add_(g)
                if separate:
                    if chunk.curvature is None:
                        continue
                    with autocast(self._device, precision):
                        curvature = weighted(
                            self.loss_fn(self.model, chunk.curvature), chunk.curvature_weight
                        )
                    grads = torch.autograd.grad(curvature, params, create_graph=True, allow_unused=True)
                got = [(i, p, g) for i, p, g in zip(live, params, grads) if g is not None]
                products = hutchinson_products(
                    [g for _, _, g in got],
                    [p for _, p, _ in got],
                    [opt.keys[i] for i, _, _ in got],
                    self._probes,
                    opt.hessian_steps_done,
                    opt.hyperparameters.n_samples,
                )
                for (i, _, _), product in zip(got, products):
                    product = product.to(opt.params[i].dtype)
                    full_products[i] = product if full_products[i] is None else full_products[i].add_(product)
                del grads, got, products, loss
        finally:
            self._set_resharding(hessian=False)
            self._reshard()
        used = [g is not None for g in full_grads]
        grads_rows = self._scatter_rows(full_grads, average=True)
        if self._local_products:
            rows = self._own_rows(full_products)
        else:
            rows = self._scatter_rows(full_products, average=True)
        return total, grads_rows, rows, used

    def _own_rows(self, full: Sequence[torch.Tensor | None]) -> list[torch.Tensor]:
        """This rank's rows of each whole tensor (zeros where None), no communication."""
        out = []
        for tensor, p in zip(full, self.optimizer.params):
            mine = local(p)
            if tensor is None:
                out.append(torch.zeros_like(mine))
                continue
            start = self.rank * rows_per_rank(p.shape[0], self.world_size)
            out.append(tensor[start : start + mine.shape[0]].clone())
        return out

    def _scatter_rows(self, full: Sequence[torch.Tensor | None], average: bool) -> list[torch.Tensor]:
        """Reduce-scatter whole tensors (each rank's sums) onto the ranks' rows, as FSDP2 cuts
        them: one collective over a buffer holding rank r's padded rows of every tensor in
        segment r. ``average`` divides by the world size (the group mean)."""
        params = self.optimizer.params
        if self.world_size == 1:
            return [torch.zeros_like(local(p)) if t is None else t for t, p in zip(full, params)]
        world = self.world_size
        pieces = []
        for tensor, p in zip(full, params):
            rows = p.shape[0]
            per = rows_per_rank(rows, world)
            padded = torch.zeros((world * per, *p.shape[1:]), dtype=p.dtype, device=local(p).device)
            if tensor is not None:
                padded[:rows] = tensor
            pieces.append(padded.reshape(world, -1))
        send = torch.cat(pieces, dim=1).reshape(-1)
        received = torch.empty(send.numel() // world, dtype=send.dtype, device=send.device)
        dist.reduce_scatter_single(received, send)
        if average:
            received.div_(world)
        out, at = [], 0
        for p, piece in zip(params, pieces):
            numel = piece.shape[1]
            mine = local(p)
            rows = received[at : at + numel].view(-1, *p.shape[1:])[: mine.shape[0]]
            out.append(rows)
            at += numel
        return out

    # -- what the worker asks besides steps ------------------------------------------------------

    def average_buffers(self) -> None:
        average_buffers(self.model)

    @contextmanager
    def evaluation(self) -> Iterator[nn.Module]:
        """The whole model gathered (collectively, once), in eval mode, so ranks may evaluate
        different numbers of batches; resharded afterwards."""
        for module in self._fsdp_modules:
            module.unshard()
        self._set_resharding(hessian=True)
        try:
            with evaluation_mode(self.model) as model, autocast(self._device, self._autocast):
                yield model
        finally:
            self._set_resharding(hessian=False)
            self._reshard()

    # -- checkpoints ---------------------------------------------------------------------------

    def _checkpoint_state(self) -> dict[str, Any]:
        if isinstance(self.optimizer, DTensorAdaHessian):
            optimizer_state: dict[str, Any] = self.optimizer.sharded_state()
        else:
            optimizer_state = get_optimizer_state_dict(self.model, self.optimizer.optimizer)
        return {"model": self.model.state_dict(), "optimizer": optimizer_state}

    def save_checkpoint(self, directory: Path, step: int) -> bool:
        """Collective: every rank writes its rows with ``torch.distributed.checkpoint``; rank 0
        also the progress and the optimizer's counts."""
        dcp.save(self._checkpoint_state(), checkpoint_id=directory / CHECKPOINT_DIR)
        if self.rank == 0:
            plain = self.optimizer.plain_state() if isinstance(self.optimizer, DTensorAdaHessian) else {}
            extra = {"optimizer": plain, "steps_done": self.optimizer.steps_done}
            write_engine_progress(directory, step, self.world_size, "fsdp", extra)
        return any(path.is_file() for path in directory.rglob("*"))

    def load_checkpoint(self, directory: Path) -> int:
        """Collective: load a checkpoint :meth:`save_checkpoint` wrote, at any world size."""
        progress = read_engine_progress(directory, "fsdp")
        state = self._checkpoint_state()
        dcp.load(state, checkpoint_id=directory / CHECKPOINT_DIR)
        self.model.load_state_dict(state["model"])
        if isinstance(self.optimizer, DTensorAdaHessian):
            self.optimizer.load_plain_state(progress["optimizer"])
        else:
            optimizer = self.optimizer.optimizer
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=state["optimizer"])
            self.optimizer.steps_done = int(progress["steps_done"])
        return int(progress["step"])


def _gathered_trainable(p: torch.Tensor) -> bool:
    """A gathered parameter that needs a gradient (one still a DTensor belongs to a module that
    did not run: it has none)."""
    return p.requires_grad and not isinstance(p, DTensor)
