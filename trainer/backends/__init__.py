"""Training backends: one training step, whatever runs it (plain torch.distributed, DeepSpeed, FSDP2).

:class:`~trainer.backends.base.TrainingBackend` is the whole contract with the worker loop;
:data:`BACKENDS` names the backends a job spec's ``backend.name`` picks from, so a new backend is
one module with one class, and one entry here. Importing them needs no DeepSpeed:
:class:`DeepSpeedBackend` imports it when one is built.
"""

from __future__ import annotations

from torch import nn

from trainer.backends.base import Batch, LossFn, StepStats, TrainingBackend
from trainer.backends.ddp import DDPBackend
from trainer.backends.deepspeed import DeepSpeedBackend
from trainer.backends.fsdp import FSDPBackend
from trainer.spec import JobSpec

BACKENDS: dict[str, type[TrainingBackend]] = {
    "ddp": DDPBackend,
    "deepspeed": DeepSpeedBackend,
    "fsdp": FSDPBackend,
}
"""``backend.name`` of a job spec → the class that trains it."""


def build_backend(spec: JobSpec, model: nn.Module, loss_fn: LossFn) -> TrainingBackend:
    """The backend ``spec.backend.name`` names, around ``model`` (collective: every rank builds one)."""
    return BACKENDS[spec.backend.name].from_spec(spec, model, loss_fn)


__all__ = [
    "BACKENDS",
    "Batch",
    "DDPBackend",
    "DeepSpeedBackend",
    "FSDPBackend",
    "LossFn",
    "StepStats",
    "TrainingBackend",
    "build_backend",
]
