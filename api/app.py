"""The REST API's app: its routes (``api.routes``, one module per resource), middleware, error
handlers and lifespan, assembled.

Routes are thin: they parse, call :class:`~service.control_plane.ControlPlane`, and answer with
the models of :mod:`api.schemas`. Every ``/v1`` route needs a bearer token; ``/healthz``,
``/readyz`` and ``/metrics`` are open, for probes and Prometheus.
"""

from __future__ import annotations

import gc
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio.to_thread
from fastapi import Depends, FastAPI, HTTPException
from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.audit import AuditLog
from api.deps import ERRORS, RequireToken
from api.errors import error_response, install_error_handlers
from api.routes import jobs, packages, probes, webhooks
from service.control_plane import ControlPlane
from service.settings import Settings


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
    app.state.metrics = CollectorRegistry()  # what /metrics shows
    app.state.metrics.register(probes.ServiceNumbers(app.state))
    install_error_handlers(app)
    limits = {"/v1/packages": (settings.max_package_bytes, "HUTCH_MAX_PACKAGE_BYTES")}
    app.add_middleware(BodyLimit, max_bytes=settings.max_request_bytes, per_path=limits)
    app.add_middleware(AuditLog)
    app.add_middleware(RequestMetrics, registry=app.state.metrics)
    # Each router is included here, flat: a router within a router costs every request a
    # second round of matching.
    v1_only = {
        "dependencies": [Depends(RequireToken(settings.callers()))],
        "responses": {401: ERRORS[401], 422: ERRORS[422]},
    }
    app.include_router(jobs.router(settings), **v1_only)
    app.include_router(packages.router, **v1_only)
    app.include_router(webhooks.router(settings), **v1_only)
    app.include_router(probes.router)
    return app


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
