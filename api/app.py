"""The REST API: FastAPI routes over the control plane, versioned under ``/v1``.

Routes are thin: they parse, call :class:`~service.control_plane.ControlPlane`, and answer with
the models of :mod:`api.schemas`. Every ``/v1`` route needs a bearer token; ``/healthz``,
``/readyz`` and ``/metrics`` are open, for probes and Prometheus.
"""

# No `from __future__ import annotations`: FastAPI must see route annotations that use local names.
import asyncio
import gc
import hmac
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import anyio.to_thread
import pydantic_core
from fastapi import APIRouter, Body, Depends, FastAPI, Header, HTTPException, Query, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from pydantic import WithJsonSchema
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import schemas
from api.errors import ApiError, error_response, install_error_handlers
from service.control_plane import ControlPlane
from service.lifecycle import JobState
from service.runfiles import follow_lines, records_after, tail_lines
from service.settings import Settings
from service.store import CURSOR_PATTERN, JobRecord
from trainer.spec import JobSpec, displayed_spec

# Error answers are JSON in api.errors' one shape on every route, the text routes too (`logs` is a
# StreamingResponse route, so FastAPI files these under application/json, not under text/plain).
ERRORS = {
    400: {"model": schemas.ErrorResponse, "description": "The body cannot be read (e.g. not UTF-8)"},
    401: {"model": schemas.ErrorResponse, "description": "Missing or wrong bearer token"},
    404: {"model": schemas.ErrorResponse, "description": "No such job"},
    409: {"model": schemas.ErrorResponse, "description": "The job is in the wrong state for this"},
    413: {"model": schemas.ErrorResponse, "description": "The body is larger than the service takes"},
    422: {"model": schemas.ErrorResponse, "description": "Invalid request; details name the fields"},
}

LABEL_FILTER = r"^[^=]+="
"""``key=value`` (what :func:`_label_filter` accepts): a non-empty key, the first ``=``, any value."""


BEARER = HTTPBearer(auto_error=False, description="A token from HUTCH_API_TOKENS (or DATA_DIR/api-token).")


def create_app(settings: Settings | None = None, plane: ControlPlane | None = None) -> FastAPI:
    """The ASGI app. Without ``plane`` the app opens its own control plane when it starts."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = plane is None
        # The sync routes run in anyio's thread pool; its size is how many requests share the CPUs.
        anyio.to_thread.current_default_thread_limiter().total_tokens = settings.api_threads
        app.state.plane = plane or ControlPlane.open(settings)
        # What exists now lives as long as the service: frozen, it is left out of the collector's
        # full passes, which otherwise walked ~100k start-up objects and held every request in
        # flight for up to 120 ms (the API's p99 under load).
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            if owned:
                app.state.plane.close()

    app = FastAPI(
        title="hutch",
        version="1",
        summary="Distributed training with a sharded, delayed-Hessian AdaHessian on Ray.",
        lifespan=lifespan,
    )
    tokens = [token.encode() for token in settings.accepted_tokens()]
    registry = CollectorRegistry()
    install_error_handlers(app)
    limits = {"/v1/packages": (settings.max_package_bytes, "HUTCH_MAX_PACKAGE_BYTES")}
    app.add_middleware(BodyLimit, max_bytes=settings.max_request_bytes, per_path=limits)
    app.add_middleware(RequestMetrics, registry=registry)
    app.include_router(_v1_router(tokens, settings))
    _install_probes(app, registry)
    return app


async def _plane(request: Request) -> ControlPlane:  # async: a sync dependency costs a thread hop
    return request.app.state.plane


Plane = Annotated[ControlPlane, Depends(_plane)]


def _v1_router(tokens: list[bytes], settings: Settings) -> APIRouter:
    Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]

    async def authenticate(credentials: Credentials) -> None:  # async: no thread hop for a compare
        if credentials is None:
            raise ApiError(401, "missing bearer token (Authorization: Bearer <token>)")
        given = credentials.credentials.encode()
        # Compare against every token, in constant time each, so timing says nothing.
        matches = [hmac.compare_digest(given, token) for token in tokens]
        if not any(matches):
            raise ApiError(401, "invalid bearer token")

    router = APIRouter(
        prefix="/v1", dependencies=[Depends(authenticate)], responses={401: ERRORS[401], 422: ERRORS[422]}
    )

    @router.post(
        "/jobs",
        status_code=201,
        response_model=schemas.Job,
        responses={200: {"model": schemas.Job, "description": "Replayed: the job this Idempotency-Key made"},
                   400: ERRORS[400], 409: ERRORS[409], 413: ERRORS[413], 422: ERRORS[422]},
        summary="Submit a job",
    )  # fmt: skip
    def submit_job(
        plane: Plane,
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
        ``scaling.num_workers``; ``training.chunk_size`` a divisor of each worker's share), that
        names a package not uploaded (``unknown_package``) or that can never fit the cluster
        (``unschedulable``)."""
        submitted = plane.submit(spec, idempotency_key)
        if submitted.created:
            return _json(_job(plane, submitted.job), 201)
        return _json(_job(plane, submitted.job), 200, {"Idempotent-Replayed": "true"})

    zip_body = {"content": {"application/zip": {"schema": {"type": "string", "format": "binary"}}}}

    @router.post(
        "/packages",
        status_code=201,
        response_model=schemas.Package,
        responses={200: {"model": schemas.Package, "description": "This content was uploaded before"},
                   413: ERRORS[413], 415: {"model": schemas.ErrorResponse, "description": "Not a zip"},
                   422: ERRORS[422]},
        openapi_extra={"requestBody": {"required": True, **zip_body}},
        summary="Upload a working directory",
    )  # fmt: skip
    async def upload_package(request: Request, response: Response, plane: Plane) -> schemas.Package:
        """Keep a zip archive of a job's code (what `hutch submit --working-dir` sends) and name it:
        put the answer's ``uri`` in a spec's ``runtime_env.working_dir``. Content already kept
        answers 200 with the same ``uri``; a refused or interrupted upload leaves nothing behind."""
        media_type = request.headers.get("content-type", "").split(";")[0].strip()
        if media_type not in ("application/zip", "application/octet-stream"):
            raise ApiError(415, "send the zip archive as the body, with Content-Type: application/zip")
        spooled = plane.packages.spool()
        path = Path(spooled.name)
        try:
            with spooled:
                async for chunk in request.stream():
                    spooled.write(chunk)
            # Not in the API's threads (HUTCH_API_THREADS): checking a large archive takes a while.
            package, created = await asyncio.to_thread(plane.keep_package, path)
        finally:
            path.unlink(missing_ok=True)
        if not created:
            response.status_code = 200
        return schemas.Package(
            uri=package.uri, sha256=package.sha256, size_bytes=package.size_bytes, files=package.files
        )

    @router.get("/jobs", response_model=schemas.JobPage, responses={422: ERRORS[422]}, summary="List jobs")
    def list_jobs(
        plane: Plane,
        state: Annotated[list[JobState] | None, Query(description="Only jobs in these states.")] = None,
        label: Annotated[
            list[Annotated[str, WithJsonSchema({"type": "string", "pattern": LABEL_FILTER})]] | None,
            Query(description="key=value; all must match."),
        ] = None,
        limit: Annotated[int, Query(ge=1, le=settings.max_page_size)] = 50,
        cursor: Annotated[
            Annotated[str, WithJsonSchema({"type": "string", "pattern": CURSOR_PATTERN})] | None,
            Query(description="next_cursor of the previous page (opaque)."),
        ] = None,
    ) -> Response:
        """Jobs newest first, one page at a time."""
        labels = _label_filter(label or [])
        jobs, next_cursor = plane.store.list(state or [], labels, limit, cursor)
        positions = plane.store.queue_positions(job for job in jobs if job.state == JobState.QUEUED)
        return _json({"jobs": [_job(plane, job, positions) for job in jobs], "next_cursor": next_cursor})

    @router.get(
        "/jobs/{job_id}", response_model=schemas.Job, responses={404: ERRORS[404]}, summary="Get a job"
    )
    def get_job(plane: Plane, job_id: str) -> Response:
        """State, timestamps, attempt, failure reason, latest metrics and the Ray dashboard link."""
        return _json(_job(plane, plane.get(job_id)))

    @router.get("/jobs/{job_id}/events", response_model=list[schemas.JobEvent], responses={404: ERRORS[404]})
    def job_events(plane: Plane, job_id: str) -> list[schemas.JobEvent]:
        """Every state change of the job, oldest first."""
        plane.get(job_id)
        return [schemas.JobEvent(**vars(event)) for event in plane.store.events(job_id)]

    @router.post("/jobs/{job_id}/cancel", status_code=202, response_model=schemas.Job,
                 responses={404: ERRORS[404], 409: ERRORS[409]}, summary="Cancel a job")  # fmt: skip
    def cancel_job(plane: Plane, job_id: str) -> Response:
        """A queued job is cancelled at once; a started one is stopped in Ray and becomes
        CANCELLED when Ray confirms (``cancel_requested`` is true meanwhile)."""
        return _json(_job(plane, plane.cancel(job_id)), 202)

    @router.post("/jobs/{job_id}/retry", status_code=202, response_model=schemas.Job,
                 responses={404: ERRORS[404], 409: ERRORS[409]}, summary="Retry a job")  # fmt: skip
    def retry_job(plane: Plane, job_id: str) -> Response:
        """A new attempt of the same job, resuming from its latest checkpoint."""
        return _json(_job(plane, plane.retry(job_id)), 202)

    @router.delete("/jobs/{job_id}", status_code=204, responses={404: ERRORS[404], 409: ERRORS[409]},
                   summary="Delete a finished job")  # fmt: skip
    def delete_job(plane: Plane, job_id: str) -> Response:
        """Remove a finished job, its files and its checkpoints."""
        plane.delete(job_id)
        return Response(status_code=204)

    log_text = {"description": "The log's lines", "content": {"text/plain": {"schema": {"type": "string"}}}}

    @router.get(
        "/jobs/{job_id}/logs",
        response_class=StreamingResponse,
        responses={
            200: log_text,
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
        job = plane.get(job_id)
        attempt = attempt or job.attempt
        if attempt > job.attempt:  # schema-valid, but names nothing that exists
            raise ApiError(404, f"job {job_id} has no attempt {attempt} (it has {job.attempt})")
        path = plane.layout.log_file(job_id, attempt)
        if tail is not None:
            head, offset = tail_lines(path, tail)
        else:
            head, offset = [], 0

        def finished() -> bool:
            current = plane.store.get(job_id)
            return current is None or current.attempt != attempt or current.state.terminal

        async def stream() -> AsyncIterator[str]:
            for line in head:
                yield line
            if tail is not None and not follow:
                return
            async for line in follow_lines(path, offset, finished if follow else lambda: True):
                yield line

        return StreamingResponse(stream(), media_type="text/plain; charset=utf-8")

    @router.get("/jobs/{job_id}/metrics", response_model=schemas.MetricRecords, responses={404: ERRORS[404]})
    def job_metrics(
        plane: Plane,
        job_id: str,
        since: Annotated[int | None, Query(ge=0, description="Only records with step > since.")] = None,
    ) -> schemas.MetricRecords:
        """The job's metric records (loss, lr, Hessian trace, throughput, eval), in step order."""
        plane.get(job_id)
        records = records_after(plane.layout.run_dir(job_id) / "metrics.jsonl", since)
        return schemas.MetricRecords(job_id=job_id, records=records)

    @router.get(
        "/jobs/{job_id}/checkpoints", response_model=schemas.CheckpointList, responses={404: ERRORS[404]}
    )
    def job_checkpoints(plane: Plane, job_id: str) -> schemas.CheckpointList:
        """The checkpoints kept for the job; a retry resumes from the newest."""
        plane.get(job_id)
        found = [schemas.Checkpoint(**vars(c)) for c in plane.launcher.checkpoints(job_id)]
        return schemas.CheckpointList(job_id=job_id, checkpoints=found)

    return router


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
    plane: ControlPlane, job: JobRecord, queue_positions: Mapping[str, int] | None = None
) -> dict[str, Any]:
    """The API's view of a job: a :class:`schemas.Job`'s fields, in its order (the contract test
    checks them). ``queue_positions`` (of a page's queued jobs) saves a query per job."""
    known = queue_positions is not None
    position = queue_positions.get(job.id) if known else plane.store.queue_position(job)
    return {
        "id": job.id,
        "name": job.name,
        "state": job.state.value,  # a str: to_json infers an enum's type for each one, slowly
        "labels": job.labels,
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


def _install_probes(app: FastAPI, registry: CollectorRegistry) -> None:
    @app.get("/healthz", response_model=schemas.Health, tags=["probes"])
    async def healthz() -> schemas.Health:  # async: liveness never waits for the API's threads
        """The process is up."""
        return schemas.Health(status="ok")

    unready = {503: {"model": schemas.Health, "description": "Database or Ray unreachable"}}

    @app.get("/readyz", response_model=schemas.Health, tags=["probes"], responses=unready)
    def readyz(plane: Plane) -> JSONResponse:
        """The database and the Ray cluster answer."""
        checks = plane.readiness()
        ready = all(value == "ok" for value in checks.values())
        body = schemas.Health(status="ok" if ready else "unavailable", checks=checks)
        return JSONResponse(body.model_dump(), status_code=200 if ready else 503)

    class ServiceNumbers:
        """The control plane's own gauges and counters, read at each scrape."""

        def collect(self) -> Iterator[Metric]:
            plane = getattr(app.state, "plane", None)
            if plane is None:
                return
            now = plane.telemetry()
            jobs = GaugeMetricFamily("hutch_jobs", "Jobs in the store by state", labels=["state"])
            for state, count in now.jobs_by_state.items():  # none while the database is out of reach
                jobs.add_metric([str(state)], count)
            yield jobs
            if now.oldest_queued_s is not None:
                yield GaugeMetricFamily(
                    "hutch_queue_oldest_seconds", "How long the longest-waiting QUEUED job has waited",
                    value=now.oldest_queued_s,
                )  # fmt: skip
            yield GaugeMetricFamily(
                "hutch_ray_up", "1 if the Ray cluster answers, else 0", value=int(now.ray_up)
            )
            passes = now.reconciler
            yield CounterMetricFamily("hutch_reconciler_passes", "Reconciler passes", value=passes.passes)
            yield CounterMetricFamily(
                "hutch_reconciler_errors", "Reconciler passes that failed (the database out of reach, …)",
                value=passes.failed_passes,
            )  # fmt: skip
            yield CounterMetricFamily(
                "hutch_reconciler_seconds", "Time spent in reconciler passes", value=passes.seconds
            )
            failed = CounterMetricFamily(
                "hutch_job_failures", "Jobs this service saw fail, by cause", labels=["cause"]
            )
            for cause, count in passes.failed_jobs.items():
                failed.add_metric([str(cause)], count)
            yield failed

    registry.register(ServiceNumbers())

    @app.get("/metrics", response_class=PlainTextResponse, tags=["probes"])
    def metrics() -> Response:
        """Prometheus metrics: requests by route and status, latency, jobs by state, the queue's
        oldest wait, Ray's reachability, reconciler passes, errors and time."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


class RequestMetrics:
    """Counts answered requests by method, route template and status, and times them to the
    first byte. Plain ASGI: Starlette's ``@app.middleware`` wrapper costs more than the routes."""

    def __init__(self, app: ASGIApp, registry: CollectorRegistry) -> None:
        self.app = app
        self.requests = Counter(
            "hutch_http_requests", "HTTP requests answered", ["method", "route", "status"], registry=registry
        )
        self.latency = Histogram(
            "hutch_http_request_duration_seconds", "Time to answer (to the first byte)", ["method", "route"],
            registry=registry,
        )  # fmt: skip

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began = time.perf_counter()

        async def observe(message: Message) -> None:
            if message["type"] == "http.response.start":
                route = getattr(scope.get("route"), "path", "unmatched")
                self.requests.labels(scope["method"], route, str(message["status"])).inc()
                self.latency.labels(scope["method"], route).observe(time.perf_counter() - began)
            await send(message)

        await self.app(scope, receive, observe)


class BodyLimit:
    """Refuses request bodies over ``max_bytes`` (or a path's own limit in ``per_path``: path ->
    (bytes, setting)) with a JSON 413: at once when Content-Length says so, else as soon as the
    body read so far is too large (chunked uploads)."""

    def __init__(
        self, app: ASGIApp, max_bytes: int, per_path: dict[str, tuple[int, str]] | None = None
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.per_path = per_path or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        max_bytes, setting = self.per_path.get(scope["path"], (self.max_bytes, "HUTCH_MAX_REQUEST_BYTES"))
        message = f"the request body is larger than {max_bytes} bytes ({setting})"
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > max_bytes:
            await error_response(413, "payload_too_large", message)(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            chunk = await receive()
            if chunk["type"] == "http.request":
                received += len(chunk.get("body", b""))
                if received > max_bytes:
                    raise HTTPException(413, message)  # FastAPI lets it through its body parsing
            return chunk

        await self.app(scope, limited, send)
