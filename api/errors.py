"""Every error the API returns has one shape: ``{"error": {status, code, message, details}}``.

Handlers here turn FastAPI's validation errors (field paths, readable reasons), HTTP errors and
the control plane's exceptions into that shape; nothing reaches a client as a stack trace.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from api.schemas import ErrorBody, ErrorDetail, ErrorResponse
from service.admission import Unschedulable
from service.control_plane import JobNotFound, NotYours, WrongState
from service.packages import BadPackage, UnknownPackage
from service.store import BadCursor, IdempotencyConflict
from service.webhooks import WebhookNotFound
from trainer.spec import validation_problem

log = logging.getLogger("hutch.api")

CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    503: "unavailable",
}


class ApiError(Exception):
    """An error answer: raise it from a route."""

    def __init__(
        self, status: int, message: str, code: str | None = None, details: Sequence[ErrorDetail] = ()
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code or CODES.get(status, "error")
        self.message = message
        self.details = list(details)


def error_response(
    status: int,
    code: str,
    message: str,
    details: Sequence[ErrorDetail] = (),
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = ErrorResponse(error=ErrorBody(status=status, code=code, message=message, details=list(details)))
    return JSONResponse(body.model_dump(mode="json"), status_code=status, headers=headers)


SPEC_BODY = "/v1/jobs"
"""The route whose body is a job spec (``invalid_spec``); other bodies are ``invalid_request``."""
UNECHOED = frozenset({"secret"})
"""Body fields whose value an error never shows (a webhook's secret)."""


def _validation_details(errors: Sequence[Any], spec: bool = True) -> tuple[str, list[ErrorDetail]]:
    """(code, details) for FastAPI's validation errors: field paths without the ``body``/``query``
    prefix for the body (a job spec if ``spec``), with it for query and header parameters."""
    details: list[ErrorDetail] = []
    in_body = False
    for error in errors:
        loc = tuple(error.get("loc", ()))
        if loc and loc[0] == "body":
            in_body = spec
            if error.get("type") == "json_invalid":
                reason = error.get("ctx", {}).get("error", "not valid JSON")
                details.append(ErrorDetail(field=None, message=f"the body is not valid JSON: {reason}"))
                continue
            if not spec and error.get("type") == "extra_forbidden":  # the spec's reason lists its fields
                field, reason = ".".join(map(str, loc[1:])), "unknown field"
            else:
                field, reason = validation_problem({**error, "loc": loc[1:]})
            if not spec and field in UNECHOED:
                reason = reason.partition(" (got ")[0]
        else:
            field, reason = validation_problem({**error, "loc": loc})
        details.append(ErrorDetail(field=field, message=reason))
    return ("invalid_spec" if in_body else "invalid_request"), details


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def _allowed_methods(request: Request) -> str:
    """Every method some route of the app serves at the request's path, for a 405's ``Allow``:
    each is asked of the routes as the router would (routers included in the app too)."""
    routes = request.app.router.routes
    allowed = [
        method
        for method in _METHODS
        if any(route.matches({**request.scope, "method": method})[0] == Match.FULL for route in routes)
    ]
    return ", ".join(allowed)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        code, details = _validation_details(exc.errors(), spec=request.url.path == SPEC_BODY)
        what = "the job spec is invalid" if code == "invalid_spec" else "the request is invalid"
        summary = "; ".join(f"{d.field}: {d.message}" if d.field else d.message for d in details[:3])
        return error_response(422, code, f"{what}: {summary}", details)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = exc.headers
        if exc.status_code == 405:  # Starlette's Allow names only the first route at the path
            headers = {**(headers or {}), "Allow": _allowed_methods(request)}
        return error_response(
            exc.status_code, CODES.get(exc.status_code, "error"), str(exc.detail), headers=headers
        )

    @app.exception_handler(ApiError)
    async def _api(_: Request, exc: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return error_response(exc.status, exc.code, exc.message, exc.details, headers)

    @app.exception_handler(JobNotFound)
    async def _missing(_: Request, exc: JobNotFound) -> JSONResponse:
        return error_response(404, "not_found", str(exc))

    @app.exception_handler(NotYours)
    async def _not_yours(_: Request, exc: NotYours) -> JSONResponse:
        return error_response(403, "forbidden", str(exc))

    @app.exception_handler(WebhookNotFound)
    async def _no_webhook(_: Request, exc: WebhookNotFound) -> JSONResponse:
        return error_response(404, "not_found", str(exc))

    @app.exception_handler(WrongState)
    async def _state(_: Request, exc: WrongState) -> JSONResponse:
        return error_response(409, "conflict", str(exc))

    @app.exception_handler(IdempotencyConflict)
    async def _replay(_: Request, exc: IdempotencyConflict) -> JSONResponse:
        return error_response(409, "idempotency_conflict", str(exc))

    @app.exception_handler(Unschedulable)
    async def _too_big(_: Request, exc: Unschedulable) -> JSONResponse:
        detail = ErrorDetail(field=exc.field, message=str(exc))
        return error_response(422, "unschedulable", f"the job can never be scheduled: {exc}", [detail])

    @app.exception_handler(BadPackage)
    async def _bad_package(_: Request, exc: BadPackage) -> JSONResponse:
        detail = ErrorDetail(field="body", message=str(exc))
        return error_response(422, "bad_package", f"the package is refused: {exc}", [detail])

    @app.exception_handler(UnknownPackage)
    async def _unknown_package(_: Request, exc: UnknownPackage) -> JSONResponse:
        detail = ErrorDetail(field="runtime_env.working_dir", message=str(exc))
        return error_response(422, "unknown_package", f"runtime_env.working_dir: {exc}", [detail])

    @app.exception_handler(BadCursor)
    async def _cursor(_: Request, exc: BadCursor) -> JSONResponse:
        return error_response(
            422, "invalid_request", f"cursor: {exc}", [ErrorDetail(field="cursor", message=str(exc))]
        )

    @app.exception_handler(DBAPIError)
    @app.exception_handler(PoolTimeout)
    async def _database(_: Request, exc: Exception) -> JSONResponse:
        # Out of reach (stopped, restarting, network) or out of connections: a 503 the client may
        # retry. Other database errors are bugs, answered as one. The driver's text can name the
        # host and user, so only its class is shown.
        lost = isinstance(exc, (OperationalError, InterfaceError, PoolTimeout))
        if not (lost or getattr(exc, "connection_invalidated", False)):
            return await _internal(_, exc)
        log.warning("the job database is unreachable: %s", exc)
        message = f"the job database is unreachable ({type(exc).__name__}); try again shortly"
        return error_response(503, "unavailable", message, headers={"Retry-After": "5"})

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(500, "internal", "internal error; the service log has the details")
