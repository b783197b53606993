"""``/v1/jobs``: submit, list, read, cancel, retry and delete jobs; read a job's events, log,
metrics and checkpoints."""

# No `from __future__ import annotations`: FastAPI must see route annotations that use local names.
from collections.abc import Mapping
from typing import Annotated, Any

import pydantic_core
from fastapi import APIRouter, Body, Header, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import WithJsonSchema

from api import schemas
from api.deps import ERRORS, V1, Cursor, Plane, Who
from api.errors import ApiError
from service.control_plane import ControlPlane
from service.identity import NAME_PATTERN
from service.lifecycle import JobState
from service.settings import Settings
from service.store import JobRecord
from trainer.spec import JobSpec, displayed_spec

LABEL_FILTER = r"^[^=]+="
"""``key=value`` (what :func:`_label_filter` accepts): a non-empty key, the first ``=``, any value."""

CHANGE_ERRORS: dict[int | str, dict[str, Any]] = {403: ERRORS[403], 404: ERRORS[404], 409: ERRORS[409]}
"""What cancelling, retrying or deleting a job can answer: another's job, no such job, its state."""

LOG_TEXT = {"description": "The log's lines", "content": {"text/plain": {"schema": {"type": "string"}}}}


def router(settings: Settings) -> APIRouter:
    """The job routes. Built per app, not once per module: a page's largest size is a setting
    (``HUTCH_MAX_PAGE_SIZE``), and the schema states it as the bound of ``limit``."""
    jobs = APIRouter(prefix=V1)

    @jobs.post(
        "/jobs",
        status_code=201,
        response_model=schemas.Job,
        responses={200: {"model": schemas.Job, "description": "Replayed: the job this Idempotency-Key made"},
                   400: ERRORS[400], 409: ERRORS[409], 413: ERRORS[413], 422: ERRORS[422]},
        summary="Submit a job",
    )  # fmt: skip
    def submit_job(
        plane: Plane,
        who: Who,
        request: Request,
        spec: Annotated[JobSpec, Body(description="The job spec (see examples/).")],
        idempotency_key: Annotated[
            str | None,
            Header(
                max_length=200, description="Retrying with the same key returns the same job, not a new one."
            ),
        ] = None,
    ) -> Response:
        """Validate the spec, check that it can ever fit the cluster, and queue it.

        The schema states every rule of one field. Beyond it, a 422 names the field of a spec
        that breaks a rule across sections (``training.global_batch_size`` a multiple of
        ``scaling.num_workers``, of every count from ``min`` to ``max`` for an elastic job;
        ``training.chunk_size`` a divisor of each worker's share;
        ``optimizer.hessian_batch_fraction`` × ``training.global_batch_size`` at least 1), that
        names a package not uploaded (``unknown_package``) or that can never fit the cluster
        (``unschedulable``)."""
        submitted = plane.submit(spec, idempotency_key, submitted_by=who.name)
        request.state.audit_job = submitted.job.id
        job = _job(plane, submitted.job, {submitted.job.id: submitted.queue_position})
        if submitted.created:
            return _json(job, 201)
        return _json(job, 200, {"Idempotent-Replayed": "true"})

    @jobs.get("/jobs", response_model=schemas.JobPage, responses={422: ERRORS[422]}, summary="List jobs")
    def list_jobs(
        plane: Plane,
        state: Annotated[list[JobState] | None, Query(description="Only jobs in these states.")] = None,
        label: Annotated[
            list[Annotated[str, WithJsonSchema({"type": "string", "pattern": LABEL_FILTER})]] | None,
            Query(description="key=value; all must match."),
        ] = None,
        limit: Annotated[int, Query(ge=1, le=settings.max_page_size)] = 50,
        cursor: Cursor = None,
        submitted_by: Annotated[
            str | None,
            Query(
                pattern=NAME_PATTERN, description="Only jobs submitted with this token name (GET /v1/whoami)."
            ),
        ] = None,
    ) -> Response:
        """Jobs newest first, one page at a time."""
        page = plane.list_jobs(state or [], _label_filter(label or []), limit, cursor, submitted_by)
        listed = [_job(plane, job, page.queue_positions) for job in page.jobs]
        return _json({"jobs": listed, "next_cursor": page.next_cursor})

    @jobs.get("/jobs/{job_id}", response_model=schemas.Job, responses={404: ERRORS[404]}, summary="Get a job")
    def get_job(plane: Plane, job_id: str) -> Response:
        """State, timestamps, attempt, failure reason, latest metrics and the Ray dashboard link."""
        return _json(_job(plane, plane.get(job_id)))

    @jobs.get("/jobs/{job_id}/events", response_model=list[schemas.JobEvent], responses={404: ERRORS[404]})
    def job_events(plane: Plane, job_id: str) -> list[schemas.JobEvent]:
        """Every state change of the job, oldest first."""
        return [schemas.JobEvent(**vars(event)) for event in plane.events(job_id)]

    @jobs.post("/jobs/{job_id}/cancel", status_code=202, response_model=schemas.Job,
               responses=CHANGE_ERRORS, summary="Cancel a job")  # fmt: skip
    def cancel_job(plane: Plane, who: Who, job_id: str) -> Response:
        """A queued job is cancelled at once; a started one is stopped in Ray and becomes
        CANCELLED when Ray confirms (``cancel_requested`` is true meanwhile)."""
        return _json(_job(plane, plane.cancel(job_id, who)), 202)

    @jobs.post("/jobs/{job_id}/retry", status_code=202, response_model=schemas.Job,
               responses=CHANGE_ERRORS, summary="Retry a job")  # fmt: skip
    def retry_job(plane: Plane, who: Who, job_id: str) -> Response:
        """A new attempt of the same job, resuming from its latest checkpoint."""
        return _json(_job(plane, plane.retry(job_id, who)), 202)

    @jobs.delete("/jobs/{job_id}", status_code=204,
                 responses=CHANGE_ERRORS,
                 summary="Delete a finished job")  # fmt: skip
    def delete_job(plane: Plane, who: Who, job_id: str) -> Response:
        """Remove a finished job, its files and its checkpoints."""
        plane.delete(job_id, who)
        return Response(status_code=204)

    @jobs.get(
        "/jobs/{job_id}/logs",
        response_class=StreamingResponse,
        responses={
            200: LOG_TEXT,
            404: {**ERRORS[404], "description": "No such job, or no such attempt of it"},
        },
        summary="Read or follow a job's log",
    )
    async def job_logs(
        plane: Plane,
        job_id: str,
        tail: Annotated[int | None, Query(ge=0, description="Only the last N lines.")] = None,
        follow: Annotated[bool, Query(description="Keep streaming new lines until the job ends.")] = False,
        attempt: Annotated[
            int | None, Query(ge=1, description="Which attempt [the latest]; one the job lacks is a 404.")
        ] = None,
    ) -> StreamingResponse:
        """The log of one attempt (driver and every worker), streamed; never read whole."""
        lines = plane.job_log(job_id, attempt, tail, follow)
        return StreamingResponse(lines, media_type="text/plain; charset=utf-8")

    @jobs.get("/jobs/{job_id}/metrics", response_model=schemas.MetricRecords, responses={404: ERRORS[404]})
    def job_metrics(
        plane: Plane,
        job_id: str,
        since: Annotated[int | None, Query(ge=0, description="Only records with step > since.")] = None,
    ) -> schemas.MetricRecords:
        """The job's metric records (loss, lr, Hessian trace, throughput, eval), in step order."""
        return schemas.MetricRecords(job_id=job_id, records=plane.metric_records(job_id, since))

    @jobs.get(
        "/jobs/{job_id}/checkpoints", response_model=schemas.CheckpointList, responses={404: ERRORS[404]}
    )
    def job_checkpoints(plane: Plane, job_id: str) -> schemas.CheckpointList:
        """The checkpoints kept for the job; a retry resumes from the newest."""
        found = [schemas.Checkpoint(**vars(c)) for c in plane.checkpoints(job_id)]
        return schemas.CheckpointList(job_id=job_id, checkpoints=found)

    @jobs.get("/whoami", response_model=schemas.Caller, summary="Who this token is")
    async def whoami(who: Who) -> schemas.Caller:
        """The name of the request's token and whether it is an admin's (who may change any job)."""
        return schemas.Caller(name=who.name, admin=who.admin)

    return jobs


def _label_filter(labels: list[str]) -> dict[str, str]:
    parsed = {}
    for item in labels:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ApiError(
                422,
                f"label: {item!r} must look like key=value",
                code="invalid_request",
                details=[schemas.ErrorDetail(field="label", message="must look like key=value")],
            )
        parsed[key] = value
    return parsed


def _job(
    plane: ControlPlane, job: JobRecord, queue_positions: Mapping[str, int | None] | None = None
) -> dict[str, Any]:
    """The API's view of a job: a :class:`schemas.Job`'s fields, in its order (the contract test
    checks them). ``queue_positions`` (of a page's queued jobs) saves a query per job."""
    known = queue_positions is not None
    position = queue_positions.get(job.id) if known else plane.queue_position(job)
    return {
        "id": job.id,
        "name": job.name,
        "state": job.state.value,  # a str: to_json infers an enum's type for each one, slowly
        "labels": job.labels,
        "submitted_by": job.submitted_by,
        "created_at": job.created_at,
        "updated_at": job.updated_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "attempt": job.attempt,
        "failure_reason": job.failure_reason,
        "cancel_requested": job.cancel_requested,
        "priority": job.priority,
        "queue_position": position,
        "steps": int(job.spec.get("training", {}).get("steps", 0)),
        "latest_metrics": job.latest_metrics,
        "ray_job_id": job.ray_job_id,
        "ray_dashboard_url": plane.dashboard_url(job),
        "spec": displayed_spec(job.spec),
    }


def _json(content: Any, status_code: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    """JSON of data the store already validated, in the route's response_model shape (which stays
    the documented one), written in one pass. Returned as a Response, it skips FastAPI's second
    validation of every job against the model, which cost more than reading them from the store."""
    return Response(pydantic_core.to_json(content), status_code, headers, media_type="application/json")
