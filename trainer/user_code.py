"""The user's own code, imported and called on the workers.

A spec names a model or data factory, a loss or a metrics function by import path
(``"package.module:factory"``); :mod:`trainer.spec` checks only the path's syntax, because the
control plane has not the user's code. Here the path is imported and the factory called with the
spec's arguments; every failure is a :class:`~trainer.spec.SpecError` that names what the spec
asked for, so a typo reads as the user's mistake, not as a traceback from inside hutch.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from trainer.spec import IMPORT_PATH, SpecError


def import_factory(path: str, what: str | None = None) -> Callable[..., Any]:
    """Import ``"package.module:attribute"`` and return it if callable; raises :class:`SpecError`.

    ``what`` names the thing in error messages (e.g. ``model 'pkg.nets:big'``).
    """
    what = what or f"import path {path!r}"
    if not IMPORT_PATH.fullmatch(path):
        raise SpecError(f"{what}: malformed import path, expected 'package.module:factory'")
    module_name, attribute = path.split(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or whatever the module raises while importing
        raise SpecError(
            f"{what}: cannot import module {module_name!r}: {type(exc).__name__}: {exc}"
        ) from None
    try:
        factory = getattr(module, attribute)
    except AttributeError:
        raise SpecError(f"{what}: module {module_name!r} has no attribute {attribute!r}") from None
    if not callable(factory):
        raise SpecError(f"{what}: {path} is a {type(factory).__name__}, not a callable factory")
    return factory


def call_factory(
    factory: Callable[..., Any], args: Mapping[str, Any], defaults: Mapping[str, Any], what: str
) -> Any:
    """Call ``factory(**defaults_it_accepts, **args)``; raises :class:`SpecError` on arguments it rejects.

    ``defaults`` (e.g. a data set's number of classes) are passed only where the factory's
    signature takes them; every key of ``args`` (the user's) must be accepted.
    """
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # some builtins have no signature: pass everything
        signature = None
    kwargs = dict(args)
    if signature is not None:
        params = signature.parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        named = [
            n
            for n, p in params.items()
            if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        ]
        if not takes_any:
            unknown = sorted(set(args) - set(named))
            if unknown:
                raise SpecError(
                    f"{what}: does not accept argument{'s' if len(unknown) > 1 else ''} "
                    f"{', '.join(map(repr, unknown))}; it takes: {', '.join(named) or 'no arguments'}"
                )
        kwargs = {k: v for k, v in defaults.items() if takes_any or k in named} | kwargs
        try:
            signature.bind(**kwargs)
        except TypeError as exc:
            raise SpecError(f"{what}: {exc}") from None
    try:
        return factory(**kwargs)
    except (TypeError, ValueError) as exc:
        raise SpecError(f"{what}: rejected arguments {kwargs}: {exc}") from exc
