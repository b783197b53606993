"""``/healthz``, ``/readyz`` and ``/metrics``: open (no token), for Kubernetes' probes and
Prometheus."""

from collections.abc import Iterator

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from starlette.datastructures import State

from api import schemas
from api.deps import Plane

UNREADY = {503: {"model": schemas.Health, "description": "The database is unreachable"}}

router = APIRouter(tags=["probes"])


@router.get("/healthz", response_model=schemas.Health)
async def healthz() -> schemas.Health:  # async: liveness never waits for the API's threads
    """The process is up."""
    return schemas.Health(status="ok")


@router.get("/readyz", response_model=schemas.Health, responses=UNREADY)
def readyz(plane: Plane) -> JSONResponse:
    """200 while this replica can serve the API (its database answers), 503 otherwise. The body
    says how the rest is: ``status`` ``ok``, ``degraded`` (Ray unreachable or refusing jobs:
    submissions queue) or ``unavailable``; each check; whether the queue is held; this replica
    and the one that reconciles."""
    checks = plane.readiness()
    ready = plane.ready(checks)
    status = "unavailable" if not ready else "ok" if all(v == "ok" for v in checks.values()) else "degraded"
    body = schemas.Health(
        status=status,
        checks=checks,
        queue="held" if plane.reconciler.hold_queue else "open",
        replica=plane.lease.replica,
        leader=plane.leader() if ready else None,
    )
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


@router.get("/metrics", response_class=PlainTextResponse)
def metrics(request: Request) -> Response:
    """Prometheus metrics: requests by route and status, latency, jobs by state, the queue's
    oldest wait, Ray's reachability, reconciler passes, errors and time, webhook deliveries."""
    return Response(generate_latest(request.app.state.metrics), media_type=CONTENT_TYPE_LATEST)


class ServiceNumbers:
    """The control plane's own gauges and counters, read at each scrape (none before the app's
    lifespan has opened its control plane)."""

    def __init__(self, app_state: State) -> None:
        self.app_state = app_state

    def collect(self) -> Iterator[Metric]:
        plane = getattr(self.app_state, "plane", None)
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
        yield GaugeMetricFamily("hutch_ray_up", "1 if the Ray cluster answers, else 0", value=int(now.ray_up))
        yield GaugeMetricFamily(
            "hutch_reconciler_leader",
            "1 on the replica whose reconciler leads (starts and follows jobs), 0 on the others",
            value=int(now.leading),
        )
        yield GaugeMetricFamily(
            "hutch_queue_held",
            "1 while HUTCH_HOLD_QUEUE keeps queued jobs from starting",
            value=int(now.queue_held),
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
        yield CounterMetricFamily(
            "hutch_job_retries",
            "Attempts the service started again by itself after an infrastructure failure",
            value=passes.retried_jobs,
        )  # fmt: skip
        sent = CounterMetricFamily(
            "hutch_webhook_deliveries",
            "Webhook sendings of this replica by outcome: delivered, retried (failed, to be sent again), "
            "failed (failed the last time: given up)",
            labels=["outcome"],
        )
        for outcome, count in now.webhook_outcomes.items():
            sent.add_metric([outcome], count)
        yield sent
        if now.webhooks_pending is not None:
            yield GaugeMetricFamily(
                "hutch_webhook_deliveries_pending", "Webhook deliveries waiting to be sent or sent again",
                value=now.webhooks_pending,
            )  # fmt: skip
