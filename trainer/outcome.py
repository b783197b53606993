"""Why a run failed, in a word: the ``cause`` of ``failure.json`` and of a failed ``result.json``.

The reason is for people; the cause is for machines (the control plane counts failures by
cause, and an alert fires on non-finite losses), so it is one of a few fixed words.
"""

from __future__ import annotations

from enum import StrEnum


class FailureCause(StrEnum):
    NON_FINITE_LOSS = "non_finite_loss"  # the loss, a gradient or the Hessian estimate was NaN or inf
    JOB_ERROR = "job_error"  # the job's own spec, code or data stopped it
    INFRASTRUCTURE = "infrastructure"  # Ray, the driver process, the storage: a retry may succeed
