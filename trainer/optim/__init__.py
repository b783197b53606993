"""Optimizers that run on the workers: AdaHessian (its core, and the single-process, sharded and
DeepSpeed-partitioned optimizers around it), its Hutchinson estimator, and the replicated
first-order baselines."""

from trainer.optim.adahessian import AdaHessian
from trainer.optim.core import (
    AdaHessianHyperparameters,
    HessianSchedule,
    NonFiniteError,
    adahessian_update,
    check_finite,
)
from trainer.optim.hutchinson import ProbeSource, hessian_diagonal, hutchinson_products, probe_seed

__all__ = [
    "AdaHessian",
    "AdaHessianHyperparameters",
    "HessianSchedule",
    "NonFiniteError",
    "ProbeSource",
    "adahessian_update",
    "check_finite",
    "hessian_diagonal",
    "hutchinson_products",
    "probe_seed",
]
