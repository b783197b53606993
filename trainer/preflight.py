"""Checks a spec must pass before anything starts: user factories must import.

Validation of values happens in :mod:`trainer.spec`; here the import paths a spec names are
resolved, so a typo fails in a second with a clear message instead of on every Ray worker.
Built-in data sets are not generated here (that is the workers' job).
"""

from __future__ import annotations

from trainer.spec import BUILTIN_DATASETS, BUILTIN_MODELS, JobSpec, SpecError, import_factory


def check_spec(spec: JobSpec) -> None:
    """Raise :class:`~trainer.spec.SpecError` if a named factory cannot be imported, or the
    spec asks for a backend this version cannot run."""
    if spec.backend.name != "ddp":
        name = spec.backend.name
        raise SpecError(f"backend.name: {name!r} is not available in this version yet; use 'ddp'")
    if spec.model.name not in BUILTIN_MODELS:
        import_factory(spec.model.name, f"model {spec.model.name!r}")
    if spec.data.name not in BUILTIN_DATASETS:
        import_factory(spec.data.name, f"data {spec.data.name!r}")
