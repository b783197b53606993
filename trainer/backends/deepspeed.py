"""Data parallelism under DeepSpeed ZeRO stage 1 or 2, with AdaHessian as the client optimizer.

DeepSpeed owns who holds what: it flattens the parameters, gives each rank one slice of the
flat fp32 master weights, and its inner (client) optimizer sees only that slice
(:class:`~trainer.optim.partitioned.PartitionedAdaHessian`). This backend adds what DeepSpeed
cannot do, the Hutchinson products, and leaves the rest to the engine. One step:

* ordinary steps (no Hessian due): forward through the engine and ``engine.backward`` per chunk;
  DeepSpeed reduces and partitions the gradients as usual; ``engine.step()`` runs the inner
  optimizer on the slice and all-gathers the parameters.
* Hessian steps: DeepSpeed's gradient hooks do not support double backward, and every backward
  through the engine's outputs runs them, so the loss is computed on the unwrapped module and
  differentiated with ``torch.autograd.grad(create_graph=True)`` (no hook runs), and the
  products ``z⊙Hz`` are taken for every parameter with the shared probe (keyed by seed,
  Hessian-step index and parameter name, as on the DDP path). The gradient is then handed to
  DeepSpeed's own reduction through ``engine.backward`` of the linear surrogate ``Σ⟨p, g⟩``,
  whose gradient is exactly ``g`` (a first-order backward of one multiply per element); the
  signed products of whole tensors are averaged with one all-reduce, so every rank can apply
  ``|·|`` and spatial averaging to whole tensors and cut out its own pieces. Then
  ``engine.step()`` as above.

Loss and trace are group-wide (one small all-reduce, folded into the products' on Hessian
steps); a non-finite loss or Hessian estimate raises :class:`NonFiniteError` on every rank
before the engine steps, and a non-finite gradient makes DeepSpeed skip the update (its
overflow check), after which every rank raises too. ``deepspeed`` is imported only when a
backend is built: it is an optional extra (``pip install hutch[deepspeed]``).
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from trainer.backends.base import LossFn, StepStats, average_buffers, evaluation_mode, weighted
from trainer.batches import Batch, StepChunk, map_tensors, step_chunks
from trainer.checkpoint import DEEPSPEED_DIR, read_engine_progress, write_engine_progress
from trainer.optim.core import AdaHessianHyperparameters, check_finite
from trainer.optim.hutchinson import ProbeSource, hutchinson_products
from trainer.optim.partition import Fragment, conv_kernel_names
from trainer.optim.partitioned import PartitionedAdaHessian
from trainer.optim.replicated import first_order_optimizer
from trainer.spec import JobSpec, OptimizerSpec

CHECKPOINT_TAG = "hutch"
"""The tag (sub-directory) under which the engine's checkpoint files are written."""


def deepspeed_config(zero_stage: int, precision: str, max_grad_norm: float | None = None) -> dict[str, Any]:
    """The engine's configuration: ZeRO ``zero_stage`` (1 or 2), ``fp32`` or ``bf16``, and
    gradient clipping by the global norm (DeepSpeed's ``gradient_clipping``; 0 is off).

    Gradient accumulation over chunks is driven by the backend (one optimizer step per
    ``train_step``), so DeepSpeed's own count stays 1; its batch-size fields only feed its
    sample counter. Overlapped communication is off: on gloo/CPU it buys nothing.
    """
    if zero_stage not in (1, 2):
        raise ValueError(f"zero_stage={zero_stage!r}: must be 1 or 2")
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision={precision!r}: must be 'fp32' or 'bf16'")
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": float(max_grad_norm or 0.0),
        "zero_optimization": {"stage": zero_stage, "overlap_comm": False},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": precision == "bf16", "check_grad_overflow": True},
    }


def build_client_optimizer(
    model: nn.Module, spec: OptimizerSpec, seed: int
) -> PartitionedAdaHessian | torch.optim.Optimizer:
    """The optimizer ``spec`` names, for DeepSpeed to drive: AdaHessian over the engine's slices
    (probes drawn from ``seed``), or a plain torch optimizer, which ZeRO partitions itself.

    ``hessian_scope`` must be ``global``: the DeepSpeed path always averages products over the
    group.
    """
    if spec.name == "adahessian":
        if spec.hessian_scope != "global":
            raise ValueError(
                f"hessian_scope={spec.hessian_scope!r}: the deepspeed backend supports 'global' only"
            )
        return PartitionedAdaHessian(
            model.named_parameters(),
            AdaHessianHyperparameters.from_spec(spec, seed),
            conv_kernels=conv_kernel_names(model),
        )
    return first_order_optimizer([p for p in model.parameters() if p.requires_grad], spec)


class DeepSpeedBackend:
    """One data-parallel rank training ``model`` under a DeepSpeed engine (ZeRO stage 1 or 2).

    ``torch.distributed`` must be initialized (all ranks form the data-parallel group) and
    ``LOCAL_RANK`` set, as Ray Train and torchrun do. ``model`` is trained in place: after
    construction it is ``self.engine.module`` (in bf16 with ``precision="bf16"``).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        optimizer: OptimizerSpec,
        seed: int = 0,
        zero_stage: int = 1,
        precision: str = "fp32",
    ) -> None:
        import deepspeed  # the optional extra; see the module docstring
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # its INFO lines drown the progress
        self.loss_fn = loss_fn
        self.optimizer = build_client_optimizer(model, optimizer, seed)
        self.engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=self.optimizer,
            config=deepspeed_config(zero_stage, precision, optimizer.max_grad_norm),
            dist_init_required=False,
        )
        if not isinstance(self.engine.optimizer, DeepSpeedZeroOptimizer):
            raise RuntimeError(
                f"DeepSpeed {deepspeed.__version__} wrapped the optimizer in "
                f"{type(self.engine.optimizer).__name__}, not its ZeRO stage 1/2 optimizer; "
                "this backend needs the flat partitions of the latter"
            )
        self.model: nn.Module = self.engine.module
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.dtype = self.params[0].dtype
        self.world_size = dist.get_world_size()
        self.hessian_batch_fraction = optimizer.hessian_batch_fraction
        self._probes: ProbeSource | None = None
        self._used = [False] * len(self.params)
        if isinstance(self.optimizer, PartitionedAdaHessian):
            self._probes = ProbeSource(self.optimizer.hyperparameters.seed)
            self.optimizer.bind_partition(self._fragments())
            for i, p in enumerate(self.params):  # which parameters got a gradient this step
                p.register_post_accumulate_grad_hook(lambda _, i=i: self._used.__setitem__(i, True))

    @classmethod
    def from_spec(cls, spec: JobSpec, model: nn.Module, loss_fn: LossFn) -> DeepSpeedBackend:
        b = spec.backend
        return cls(
            model,
            loss_fn,
            spec.optimizer,
            seed=spec.training.seed,
            zero_stage=b.zero_stage,
            precision=b.precision,
        )

    def _fragments(self) -> dict[torch.Tensor, list[Fragment]]:
        """Where each parameter's piece lies in this rank's flat slices, from DeepSpeed's
        ``_hp_mapping`` (the map behind its ``safe_get_full_*`` utilities)."""
        zero = self.engine.optimizer
        index = {id(p): i for i, p in enumerate(self.optimizer.trainable.tensors)}
        assert list(index) == [id(p) for p in self.params], (
            "the optimizer and the engine disagree on the parameters"
        )
        fragments: dict[torch.Tensor, list[Fragment]] = {}
        for group, flat in zip(zero.bit16_groups, zero.single_partition_of_fp32_groups):
            pieces = fragments.setdefault(flat, [])
            for p in group:
                mapping = getattr(p, "_hp_mapping", None)
                if mapping is None:
                    continue  # wholly in another rank's slice
                pieces.append(
                    Fragment(
                        param_index=index[id(p)],
                        param_start=mapping.lp_fragment_address.start,
                        flat_start=mapping.hp_fragment_address.start,
                        numel=mapping.lp_fragment_address.numel,
                    )
                )
        return fragments

    @property
    def hessian_due(self) -> bool:
        """Whether the next :meth:`train_step` takes Hessian products (never for first-order runs)."""
        return isinstance(self.optimizer, PartitionedAdaHessian) and self.optimizer.hessian_due

    def train_step(self, batch: Batch, chunk_size: int | None = None) -> StepStats:
        """One step on this rank's micro-batch, in chunks of ``chunk_size`` examples if given.

        Each chunk's mean loss is weighted by its share of the micro-batch, so gradients and
        Hessian products accumulate to those of the whole micro-batch (as on the DDP path).
        """
        hessian_step = self.hessian_due
        self.model.train()
        self._used = [False] * len(self.params)
        batch = map_tensors(lambda t: t.to(self.dtype) if t.is_floating_point() else t, batch)
        fraction = self.hessian_batch_fraction if hessian_step else 1.0
        chunks = step_chunks(batch, chunk_size, dist.get_rank(), self.world_size, fraction)
        if hessian_step or (self.dtype != torch.float32 and len(chunks) > 1):
            # Hessian steps, and bf16 gradients of several chunks, which must add up in fp32
            loss_sum, products = self._own_backward(chunks, hessian=hessian_step, separate=fraction < 1.0)
        else:
            loss_sum, products = self._plain_backward(chunks), None

        # One all-reduce: the products (Hessian steps), the loss and which parameters had a
        # gradient on any rank, so every rank decides alike.
        used = torch.tensor(self._used, dtype=torch.float32, device=loss_sum.device)
        flat = torch.cat([*(t.reshape(-1).float() for t in products or ()), loss_sum.reshape(1), used])
        dist.all_reduce(flat)
        flat.div_(self.world_size)
        tail = flat[-1 - len(self.params) :].tolist()
        loss, used_anywhere = tail[0], [flag > 0 for flag in tail[1:]]
        step = self.engine.global_steps + 1  # the step being made
        check_finite(step, loss=loss)
        if isinstance(self.optimizer, PartitionedAdaHessian):
            averaged, offset = None, 0
            if products is not None:
                averaged = []
                for p in self.params:
                    averaged.append(flat[offset : offset + p.numel()].view(p.shape))
                    offset += p.numel()
            self.optimizer.prepare_step(used_anywhere, averaged)

        self.engine.step()
        grad_norm = float(self.engine.get_global_grad_norm())
        # A non-finite norm: DeepSpeed saw the overflow and skipped the update.
        check_finite(step, gradient=grad_norm)
        if isinstance(self.optimizer, PartitionedAdaHessian):
            self.optimizer.finish_step()
        return StepStats(
            step=self.engine.global_steps,
            loss=loss,
            grad_norm=grad_norm,
            hessian_step=hessian_step,
            hessian_trace=getattr(self.optimizer, "hessian_trace", None),
        )

    def _plain_backward(self, chunks: list[StepChunk]) -> torch.Tensor:
        """DeepSpeed's own forward and backward per chunk; its reduction runs at the last one."""
        loss_sum = torch.zeros((), device=self.params[0].device)
        for k, chunk in enumerate(chunks):
            self.engine.set_gradient_accumulation_boundary(k == len(chunks) - 1)
            loss = weighted(self.loss_fn(self.engine, chunk.batch), chunk.weight)
            loss_sum += loss.detach().float()
            self.engine.backward(loss)
        return loss_sum

    def _own_backward(
        self, chunks: list[StepChunk], hessian: bool, separate: bool
    ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """Gradients (and on Hessian steps the local Hutchinson products, of the chunks'
        curvature examples if ``separate``) on the unwrapped module, summed over the chunks in
        fp32 whatever the model's dtype; the sum then goes through DeepSpeed's reduction by the
        surrogate backward, rounded to the model's dtype once (see the module doc)."""
        loss_sum = torch.zeros((), device=self.params[0].device)
        grads_sum = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]
        products_sum = [torch.zeros_like(p, dtype=torch.float32) for p in self.params] if hessian else None
        got = [False] * len(self.params)
        for chunk in chunks:
            loss = weighted(self.loss_fn(self.model, chunk.batch), chunk.weight)
            loss_sum += loss.detach().float()
            live = [i for i, p in enumerate(self.params) if p.requires_grad]  # frozen since: none
            grads = torch.autograd.grad(
                loss, [self.params[i] for i in live], create_graph=hessian and not separate, allow_unused=True
            )
            found = [(i, g) for i, g in zip(live, grads) if g is not None]
            if not found:
                continue
            torch._foreach_add_([grads_sum[i] for i, _ in found], [g.detach().float() for _, g in found])
            for i, _ in found:
                got[i] = True
            if hessian and separate:
                if chunk.curvature is None:
                    continue
                curvature = weighted(self.loss_fn(self.model, chunk.curvature), chunk.curvature_weight)
                grads = torch.autograd.grad(
                    curvature, [self.params[i] for i in live], create_graph=True, allow_unused=True
                )
                found = [(i, g) for i, g in zip(live, grads) if g is not None]
            if products_sum is not None and found:
                assert isinstance(self.optimizer, PartitionedAdaHessian) and self._probes is not None
                products = hutchinson_products(
                    [g for _, g in found],
                    [self.params[i] for i, _ in found],
                    [self.optimizer.trainable.keys[i] for i, _ in found],
                    self._probes,
                    self.optimizer.hessian_steps_done,
                    self.optimizer.hyperparameters.n_samples,
                )
                torch._foreach_add_([products_sum[i] for i, _ in found], [t.float() for t in products])
        self.engine.set_gradient_accumulation_boundary(True)
        surrogate = sum(
            ((self.params[i] * grads_sum[i].to(self.dtype)).sum() for i in range(len(self.params)) if got[i]),
            torch.zeros((), device=loss_sum.device, dtype=self.dtype),
        )
        self.engine.backward(surrogate)
        return loss_sum, products_sum

    def average_buffers(self) -> None:
        average_buffers(self.model)

    def evaluation(self) -> AbstractContextManager[nn.Module]:
        return evaluation_mode(self.model)

    # -- checkpoints ---------------------------------------------------------------------------

    def save_checkpoint(self, directory: Path, step: int) -> bool:
        """Collective: the engine writes this rank's ZeRO partition (with the optimizer's state)
        and, from rank 0, the model under ``directory/deepspeed/CHECKPOINT_TAG``; rank 0 adds the
        progress (:func:`trainer.checkpoint.write_engine_progress`). Every rank writes."""
        engine_directory = directory / DEEPSPEED_DIR
        engine_directory.mkdir(parents=True, exist_ok=True)
        self.engine.save_checkpoint(str(engine_directory), tag=CHECKPOINT_TAG, save_latest=False)
        if dist.get_rank() == 0:
            write_engine_progress(directory, step, self.world_size, "deepspeed")
        return True

    def load_checkpoint(self, directory: Path) -> int:
        """Collective: load what :meth:`save_checkpoint` wrote (every rank's files must be there,
        from a group of the same size)."""
        step = int(read_engine_progress(directory, "deepspeed")["step"])  # refuses other backends'
        engine_directory = directory / DEEPSPEED_DIR
        path, _ = self.engine.load_checkpoint(
            str(engine_directory),
            tag=CHECKPOINT_TAG,
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
        )
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {engine_directory / CHECKPOINT_TAG}")
        return step
