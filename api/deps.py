"""What the routes share: the control plane they call, the bearer-token check of every ``/v1``
route, and the error answers their OpenAPI entries name."""

import hmac
from collections.abc import Mapping
from typing import Annotated

from fastapi import Depends, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import WithJsonSchema

from api import schemas
from api.errors import ApiError
from service.control_plane import ControlPlane
from service.identity import Caller
from service.store import CURSOR_PATTERN

# Error answers are JSON in api.errors' one shape on every route, the text routes too (`logs` is a
# StreamingResponse route, so FastAPI files these under application/json, not under text/plain).
ERRORS = {
    400: {"model": schemas.ErrorResponse, "description": "The body cannot be read (e.g. not UTF-8)"},
    401: {"model": schemas.ErrorResponse, "description": "Missing or wrong bearer token"},
    403: {"model": schemas.ErrorResponse, "description": "Another's job, and not an admin token"},
    404: {"model": schemas.ErrorResponse, "description": "No such job"},
    409: {"model": schemas.ErrorResponse, "description": "The job is in the wrong state for this"},
    413: {"model": schemas.ErrorResponse, "description": "The body is larger than the service takes"},
    422: {"model": schemas.ErrorResponse, "description": "Invalid request; details name the fields"},
}

V1 = "/v1"
"""The prefix of the versioned routes, on their own routers: a route's path (the ``route`` label of
the request metrics) is the one a client calls."""

Cursor = Annotated[
    Annotated[str, WithJsonSchema({"type": "string", "pattern": CURSOR_PATTERN})] | None,
    Query(description="next_cursor of the previous page (opaque)."),
]
"""A paged list's ``cursor`` parameter (the schema states its pattern; the store checks it)."""

BEARER = HTTPBearer(auto_error=False, description="A token from HUTCH_API_TOKENS (or DATA_DIR/api-token).")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]


async def control_plane(request: Request) -> ControlPlane:  # async: a sync dependency costs a thread hop
    """The app's control plane (opened by its lifespan)."""
    return request.app.state.plane


Plane = Annotated[ControlPlane, Depends(control_plane)]


class RequireToken:
    """The dependency that refuses a request without one of the ``callers``' tokens as its bearer
    token, and records who holds it (``request.state.caller``: see :func:`caller`)."""

    def __init__(self, callers: Mapping[str, Caller]) -> None:
        self.callers = [(token.encode(), caller) for token, caller in callers.items()]

    async def __call__(self, request: Request, credentials: Credentials) -> None:  # async: no thread hop
        if credentials is None:
            raise ApiError(401, "missing bearer token (Authorization: Bearer <token>)")
        given = credentials.credentials.encode()
        # Compare against every token, in constant time each, so timing says nothing.
        matches = [caller for token, caller in self.callers if hmac.compare_digest(given, token)]
        if not matches:
            raise ApiError(401, "invalid bearer token")
        request.state.caller = matches[0]


async def caller(request: Request) -> Caller:
    """Who sent the request (its token's holder; :class:`RequireToken` ran first)."""
    return request.state.caller


Who = Annotated[Caller, Depends(caller)]


async def admin_only(who: Who) -> None:
    """Refuse a caller whose token is not an admin's (for what is the whole service's, not a job's)."""
    if not who.admin:
        raise ApiError(403, f"only an admin token may do this; {who.name}'s is not one", code="forbidden")
