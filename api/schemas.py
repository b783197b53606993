"""What the REST API returns, declared once: the server answers with these models and the
Python client parses into them."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator

from service.lifecycle import JobState


class Job(BaseModel):
    """One training job as the control plane knows it."""

    id: str = Field(description="hutch's id of the job (also the Ray Train run name).")
    name: str
    state: JobState
    labels: dict[str, str] = Field(default_factory=dict)
    submitted_by: str | None = Field(
        None, description="The name of the API token that submitted it (null: before tokens had names)."
    )
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


class Caller(BaseModel):
    """The holder of an API token."""

    name: str = Field(description="The token's name (HUTCH_API_TOKENS `name:token`), as jobs record it.")
    admin: bool = Field(description="Whether it may cancel, retry and delete any job, not only its own.")


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


_PORT = r"(?:[1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
_HOST_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
WEBHOOK_URL = re.compile(rf"https?://(?:{_HOST_LABEL}\.)*{_HOST_LABEL}(?::{_PORT})?(?:[/?][!-~]*)?")
"""A webhook's URL (whole): http or https, a host name or IPv4 address, an optional port, then
printable ASCII (no spaces). No user info: credentials a receiver needs go in the path or query."""
MAX_URL_LENGTH = 2000
PRINTABLE = re.compile(r"[!-~]+")
"""A secret's characters: printable ASCII, no spaces."""
DeliveryStatus = Literal["pending", "delivered", "failed"]
# Checked by the validators of WebhookRequest (readable reasons, not a regular expression's text).
WebhookUrl = Annotated[str, WithJsonSchema({"type": "string", "pattern": f"^{WEBHOOK_URL.pattern}$",
                                            "maxLength": MAX_URL_LENGTH})]  # fmt: skip
WebhookSecret = Annotated[
    str,
    Field(min_length=16, max_length=200),
    WithJsonSchema(
        {"type": "string", "pattern": f"^{PRINTABLE.pattern}$", "minLength": 16, "maxLength": 200}
    ),
]


class WebhookRequest(BaseModel):
    """A subscription to job state changes (``POST /v1/webhooks``)."""

    model_config = ConfigDict(extra="forbid")

    url: WebhookUrl = Field(
        description="Where each change is POSTed: http:// or https://, a host name or IPv4 address, an "
        "optional port, then a path and query of printable ASCII."
    )
    events: Annotated[list[JobState], Field(min_length=1)] | None = Field(
        None, description="The states whose changes are sent, e.g. [\"SUCCEEDED\", \"FAILED\"]; null or "
        "left out: every state."
    )  # fmt: skip
    secret: WebhookSecret | None = Field(
        None,
        description="The key of each sending's Hutch-Signature (HMAC-SHA256): printable ASCII, no spaces. "
        "Left out: one is made. Shown in this request's answer only.",
    )

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        if len(url) > MAX_URL_LENGTH or not WEBHOOK_URL.fullmatch(url):
            raise ValueError(
                f"must be an http:// or https:// URL of at most {MAX_URL_LENGTH} characters: a host name "
                "or IPv4 address (no user@), an optional :port, then a path or query of printable ASCII"
            )
        return url

    @field_validator("secret")
    @classmethod
    def _printable(cls, secret: str | None) -> str | None:
        if secret is not None and not PRINTABLE.fullmatch(secret):
            raise ValueError("must be printable ASCII without spaces")
        return secret


class Webhook(BaseModel):
    """A subscription to job state changes."""

    id: str
    url: str
    events: list[JobState] | None = Field(description="The states whose changes are sent; null: every state.")
    secret_hint: str = Field(description="The secret's last 4 characters (it is shown once, when made).")
    created_at: datetime


class WebhookCreated(Webhook):
    """A new webhook, with its secret: the only answer that shows it."""

    secret: str = Field(description="The key of the Hutch-Signature header (README: Webhooks).")


class WebhookList(BaseModel):
    webhooks: list[Webhook] = Field(description="Every webhook, oldest first.")


class WebhookDelivery(BaseModel):
    """One state change of one job for a webhook, and how its sending goes."""

    id: int = Field(description="The delivery's number (the Hutch-Delivery header).")
    event_id: str = Field(
        description="The change's id (the body's `id`), the same at every sending: a receiver's key for "
        "the duplicates at-least-once delivery may bring."
    )
    job_id: str
    job_attempt: int = Field(description="The job's attempt the change belongs to.")
    state: JobState = Field(description="The state the job changed into.")
    at: datetime = Field(description="When it changed.")
    status: DeliveryStatus = Field(
        description="pending: to be sent (again) at next_attempt_at; delivered: the receiver answered 2xx; "
        "failed: given up after HUTCH_WEBHOOK_MAX_ATTEMPTS sendings."
    )
    attempts: int = Field(description="Sendings so far.")
    last_error: str | None = Field(description="What the last failed sending got (an HTTP status, an error).")
    next_attempt_at: datetime | None = Field(description="When it is sent next; null once finished.")
    finished_at: datetime | None = Field(description="When it was delivered or given up.")


class DeliveryPage(BaseModel):
    """One page of ``GET /v1/webhooks/{webhook_id}/deliveries``, newest first."""

    deliveries: list[WebhookDelivery]
    next_cursor: str | None = Field(None, description="Pass as ?cursor= for the next page; null on the last.")


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
    replica: str | None = Field(default=None, description="/readyz only: this replica's name.")
    leader: str | None = Field(
        default=None,
        description="/readyz only: the replica whose reconciler starts and follows jobs (replicas "
        "on one database take turns; null for a moment while the lead passes on).",
    )
