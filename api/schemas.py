"""What the REST API returns, declared once: the server answers with these models and the
Python client parses into them."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from service.lifecycle import JobState


class Job(BaseModel):
    """One training job as the control plane knows it."""

    id: str = Field(description="hutch's id of the job (also the Ray Train run name).")
    name: str
    state: JobState
    labels: dict[str, str] = Field(default_factory=dict)
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None = Field(None, description="When the current attempt's Ray job began running.")
    finished_at: datetime | None = None
    attempt: int = Field(description="1 for the first submission, +1 per retry.")
    failure_reason: str | None = None
    cancel_requested: bool = False
    priority: int = Field(0, description="The spec's priority: queued jobs start highest first, then oldest.")
    queue_position: int | None = Field(
        None,
        description="Place in hutch's queue while QUEUED (1 starts next, when the cluster has room "
        "for it); null in every other state.",
    )
    steps: int = Field(description="The spec's training.steps.")
    latest_metrics: dict[str, Any] | None = Field(
        None, description="The newest metric record (step, loss, lr, hessian_trace, eval_*)."
    )
    ray_job_id: str | None = Field(None, description="Submission id of the current attempt's Ray job.")
    ray_dashboard_url: str | None = Field(None, description="The Ray dashboard page of that Ray job.")
    spec: dict[str, Any] = Field(description="The job spec, with defaults filled in.")


class Package(BaseModel):
    """An uploaded working directory, kept by content."""

    uri: str = Field(description="Name it as runtime_env.working_dir in a job spec.")
    sha256: str = Field(description="SHA-256 of the zip archive.")
    size_bytes: int
    files: int = Field(description="Files in the archive.")


class JobPage(BaseModel):
    """One page of ``GET /v1/jobs``, newest first."""

    jobs: list[Job]
    next_cursor: str | None = Field(None, description="Pass as ?cursor= for the next page; null on the last.")


class JobEvent(BaseModel):
    """A state change of a job."""

    at: datetime
    attempt: int
    state: JobState
    message: str | None = None


class MetricRecords(BaseModel):
    job_id: str
    records: list[dict[str, Any]] = Field(description="Metric records with step > since, in step order.")


class Checkpoint(BaseModel):
    name: str
    step: int
    path: str
    created_at: datetime


class CheckpointList(BaseModel):
    job_id: str
    checkpoints: list[Checkpoint] = Field(description="Kept checkpoints, oldest first.")


class ErrorDetail(BaseModel):
    field: str | None = Field(None, description="Dotted path of the offending field, when there is one.")
    message: str


class ErrorBody(BaseModel):
    status: int
    code: str = Field(description="Stable machine-readable code, e.g. invalid_spec, not_found, conflict.")
    message: str
    details: list[ErrorDetail] = Field(default_factory=list)


class ErrorResponse(BaseModel):
    """The shape of every error the API returns."""

    error: ErrorBody


class Health(BaseModel):
    status: str
    checks: dict[str, str] = Field(default_factory=dict)
    queue: Literal["open", "held"] | None = Field(
        default=None,
        description="/readyz only: `held` while HUTCH_HOLD_QUEUE keeps every queued job from "
        "starting (the service is ready all the same).",
    )
