"""``/v1/packages``: upload a job's working directory (a zip archive), kept by its content."""

from fastapi import APIRouter, Request, Response

from api import schemas
from api.deps import ERRORS, V1, Plane
from api.errors import ApiError

ZIP_BODY = {"content": {"application/zip": {"schema": {"type": "string", "format": "binary"}}}}

router = APIRouter(prefix=V1)


@router.post(
    "/packages",
    status_code=201,
    response_model=schemas.Package,
    responses={200: {"model": schemas.Package, "description": "This content was uploaded before"},
               413: ERRORS[413], 415: {"model": schemas.ErrorResponse, "description": "Not a zip"},
               422: ERRORS[422]},
    openapi_extra={"requestBody": {"required": True, **ZIP_BODY}},
    summary="Upload a working directory",
)  # fmt: skip
async def upload_package(request: Request, response: Response, plane: Plane) -> schemas.Package:
    """Keep a zip archive of a job's code (what `hutch submit --working-dir` sends) and name it:
    put the answer's ``uri`` in a spec's ``runtime_env.working_dir``. Content already kept
    answers 200 with the same ``uri``; a refused or interrupted upload leaves nothing behind."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip()
    if media_type not in ("application/zip", "application/octet-stream"):
        raise ApiError(415, "send the zip archive as the body, with Content-Type: application/zip")
    package, created = await plane.receive_package(request.stream())
    request.state.audit_object = package.uri
    if not created:
        response.status_code = 200
    return schemas.Package(
        uri=package.uri, sha256=package.sha256, size_bytes=package.size_bytes, files=package.files
    )
