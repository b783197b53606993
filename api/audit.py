"""The audit trail: one structured line per request that changes something (a job submitted,
cancelled, retried or deleted, a package uploaded, …), with who, what, which object and the
outcome, on the ``hutch.audit`` logger.

A line is ``audit {"who": …, "action": …, "job": …, "status": …, "outcome": …}``: ``who`` is the
token's name (null when no valid token came), ``outcome`` ``ok`` or the error's code
(``forbidden``, ``conflict``, ``invalid_spec``, …). Refused requests are audited too: they are
what an audit is read for.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("hutch.audit")

READS = frozenset({"GET", "HEAD", "OPTIONS"})
ACTIONS = {
    ("POST", "/v1/jobs"): "submit",
    ("POST", "/v1/jobs/{job_id}/cancel"): "cancel",
    ("POST", "/v1/jobs/{job_id}/retry"): "retry",
    ("DELETE", "/v1/jobs/{job_id}"): "delete",
    ("POST", "/v1/packages"): "upload",
}
"""Names of the audited routes; any other that changes something is named ``METHOD route``."""


class AuditLog:
    """Plain ASGI middleware: writes the line once the answer's status and (for an error) its
    code are known. Routes add what only they know to ``request.state``: ``audit_job`` (the id of
    a job just submitted), ``audit_object`` (e.g. a package's uri)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in READS or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        status = 500
        error_body = b""

        async def observe(message: Message) -> None:
            nonlocal status, error_body
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and status >= 400 and len(error_body) < 4096:
                error_body += message.get("body", b"")
            await send(message)

        try:
            await self.app(scope, receive, observe)
        finally:
            log.info("audit %s", json.dumps(_line(scope, status, error_body)))


def _line(scope: Scope, status: int, error_body: bytes) -> dict[str, Any]:
    state = scope.get("state") or {}
    caller = state.get("caller")
    route = getattr(scope.get("route"), "path", None)
    action = ACTIONS.get((scope["method"], route or ""), f"{scope['method']} {route or scope['path']}")
    job = (scope.get("path_params") or {}).get("job_id") or state.get("audit_job")
    line: dict[str, Any] = {"who": caller.name if caller else None, "action": action, "job": job}
    if state.get("audit_object"):
        line["object"] = state["audit_object"]
    line.update(status=status, outcome="ok" if status < 400 else _code(error_body, status))
    return line


def _code(body: bytes, status: int) -> str:
    """The error's ``code`` (api.errors' one shape), else the status."""
    try:
        return str(json.loads(body)["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return str(status)
