"""Optimizers that run on the workers: AdaHessian and its Hutchinson estimator."""

from trainer.optim.adahessian import AdaHessian, NonFiniteError, adahessian_update
from trainer.optim.hutchinson import ProbeSource, hessian_diagonal, hutchinson_products, probe_seed

__all__ = [
    "AdaHessian",
    "NonFiniteError",
    "ProbeSource",
    "adahessian_update",
    "hessian_diagonal",
    "hutchinson_products",
    "probe_seed",
]
