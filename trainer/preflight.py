"""Checks a spec must pass before anything starts: user factories and the backend must import.

Validation of values happens in :mod:`trainer.spec`; here the import paths a spec names are
resolved, so a typo fails in a second with a clear message instead of on every Ray worker.
Built-in data sets are not generated here (that is the workers' job).
"""

from __future__ import annotations

import importlib.util

from trainer.spec import BUILTIN_DATASETS, BUILTIN_MODELS, JobSpec, SpecError
from trainer.user_code import import_factory


def check_spec(spec: JobSpec) -> None:
    """Raise :class:`~trainer.spec.SpecError` if a named factory cannot be imported, or the
    spec asks for a backend this installation cannot run."""
    if spec.backend.name == "deepspeed":
        if importlib.util.find_spec("deepspeed") is None:
            raise SpecError(
                "backend.name: 'deepspeed' needs the DeepSpeed package, which is not installed; "
                "pip install 'hutch[deepspeed]' (on the workers too), or use 'ddp'"
            )
        if spec.optimizer.name == "adahessian" and spec.optimizer.hessian_scope != "global":
            raise SpecError("optimizer.hessian_scope: the deepspeed backend supports 'global' only")
    if spec.model.name == "hf":
        from trainer.models.hf import check_args

        check_args(spec.model.args)
    if spec.model.name not in BUILTIN_MODELS:
        import_factory(spec.model.name, f"model {spec.model.name!r}")
    if spec.data.name not in BUILTIN_DATASETS:
        import_factory(spec.data.name, f"data {spec.data.name!r}")
    for field, path in (("training.loss", spec.training.loss), ("training.metrics", spec.training.metrics)):
        if path is not None:
            import_factory(path, f"{field} {path!r}")
