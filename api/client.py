"""The Python client of the control plane: typed calls over the REST API, one method per route.

::

    from api.client import Client

    with Client() as hutch:  # HUTCH_URL / HUTCH_TOKEN, or the local server's token file
        job = hutch.submit("examples/digits-adahessian.yaml")
        job = hutch.wait(job.id, progress=True)
        for line in hutch.logs(job.id, tail=20):
            print(line)

Every failure is a :class:`HutchError`: the server's answers become :class:`ApiError` subclasses
carrying its ``code``, ``message`` and per-field ``details``; an unreachable server becomes
:class:`ConnectionFailed`. Reads are retried on connection errors and 502-504 answers; a
submission is retried too, safely, because it always carries an ``Idempotency-Key``.
"""

from __future__ import annotations

import builtins
import os
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import suppress
from functools import cache
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
from pydantic import TypeAdapter, ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from api.packing import DEFAULT_MAX_PACKAGE_BYTES, pack_directory
from api.schemas import (
    Caller,
    CheckpointList,
    ErrorDetail,
    ErrorResponse,
    Health,
    Job,
    JobEvent,
    JobPage,
    MetricRecords,
    Package,
)
from service.settings import TokenSettings
from trainer.spec import JobSpec, load_spec

DEFAULT_URL = "http://127.0.0.1:8000"

RETRY_DELAYS: tuple[float, ...] = (0.2, 0.5, 1.0)
"""Seconds to wait before each retry of a retryable request (so at most len + 1 attempts)."""

_RETRY_STATUSES = frozenset({502, 503, 504})

_T = TypeVar("_T")


class HutchError(Exception):
    """Base of everything this client raises; the message is meant for the user."""


class ConnectionFailed(HutchError):
    """The server could not be reached (refused, DNS, timeout, connection dropped)."""


class WaitTimeout(HutchError, TimeoutError):
    """:meth:`Client.wait` ran out of time before the job ended."""


class ApiError(HutchError):
    """The server answered with an error; ``code`` is the API's stable machine-readable code."""

    def __init__(self, status: int, code: str, message: str, details: Sequence[ErrorDetail] = ()) -> None:
        self.status = status
        self.code = code
        self.message = message
        self.details = builtins.list(details)
        lines = [f"{message} ({status} {code})"]
        for detail in self.details:
            lines.append(f"  {detail.field}: {detail.message}" if detail.field else f"  {detail.message}")
        super().__init__("\n".join(lines))


class Unauthorized(ApiError):
    """401: no token or a wrong one."""


class NotFound(ApiError):
    """404: no such job (or route)."""


class Conflict(ApiError):
    """409: the job is in the wrong state for the action, or an Idempotency-Key was reused."""


class PayloadTooLarge(ApiError):
    """413: the request body is larger than the server accepts."""


class InvalidRequest(ApiError):
    """422 (or 400): an invalid spec, a job that can never fit the cluster, or bad parameters."""


class ServiceUnavailable(ApiError):
    """503: the control plane cannot serve now (e.g. its database or Ray is down)."""


# Status -> (class, code used when the body is not hutch's error shape).
_ERRORS: dict[int, tuple[type[ApiError], str]] = {
    400: (InvalidRequest, "invalid_request"),
    401: (Unauthorized, "unauthorized"),
    404: (NotFound, "not_found"),
    409: (Conflict, "conflict"),
    413: (PayloadTooLarge, "payload_too_large"),
    422: (InvalidRequest, "invalid_request"),
    503: (ServiceUnavailable, "unavailable"),
}


def _resolve_url(url: str | None = None) -> str:
    """The control plane's base URL: ``url``, else ``HUTCH_URL``, else the local default."""
    return (url or os.environ.get("HUTCH_URL") or DEFAULT_URL).rstrip("/")


def _resolve_token(token: str | None = None) -> str | None:
    """The bearer token: ``token``, else ``HUTCH_TOKEN``, else the server's own settings on this
    machine (first of ``HUTCH_API_TOKENS``, else the generated token file), else None."""
    token = token or os.environ.get("HUTCH_TOKEN")
    if token:
        return token
    try:
        settings = TokenSettings()
    except ValidationError as exc:
        raise HutchError(
            f"cannot look for the API token in the HUTCH_* settings (set HUTCH_TOKEN instead):\n"
            f"{settings_problems(exc)}"
        ) from None
    try:
        return settings.client_token()
    except OSError as exc:
        raise HutchError(f"cannot read the API token file {settings.token_file}: {exc}") from exc


def settings_problems(exc: ValidationError) -> str:
    """One line per invalid ``HUTCH_*`` variable of a :class:`Settings` error: ``VARIABLE: reason``."""
    lines = []
    for error in exc.errors():
        name = str(error["loc"][0]) if error["loc"] else ""
        variable = name if name.isupper() else f"HUTCH_{name.upper()}"
        lines.append(f"  {variable}: {error['msg'].removeprefix('Value error, ')}")
    return "\n".join(lines)


class Client:
    """A synchronous client of one hutch control plane; use it as a context manager or ``close()`` it.

    ``retry_delays`` are the pauses before each retry of a retryable request (reads, and
    submissions, which always carry an idempotency key); ``()`` turns retries off.
    """

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        timeout: float = 30.0,
        *,
        retry_delays: Sequence[float] | None = None,
    ) -> None:
        self.url = _resolve_url(url)
        self.token = _resolve_token(token)
        self.timeout = timeout
        self._retry_delays = tuple(RETRY_DELAYS if retry_delays is None else retry_delays)
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    # -- jobs ------------------------------------------------------------------------------------

    def upload_package(self, directory: str | Path, max_bytes: int = DEFAULT_MAX_PACKAGE_BYTES) -> Package:
        """Pack a working directory (see :mod:`api.packing`) and upload it; the answer's ``uri``
        goes in a spec's ``runtime_env.working_dir``. Uploading the same files again is free.
        Raises :class:`~api.packing.PackingError` for a directory that cannot be packed."""
        archive = pack_directory(directory, max_bytes)
        headers = {"Content-Type": "application/zip"}
        response = self._send("POST", "/v1/packages", content=archive, headers=headers, retry=True)
        return _parse(Package, response)

    def submit(
        self,
        spec: JobSpec | Mapping[str, Any] | str | Path,
        idempotency_key: str | None = None,
        working_dir: str | Path | None = None,
    ) -> Job:
        """Submit a job; returns it QUEUED. A path is loaded and validated here first, so a bad
        file raises :class:`~trainer.spec.SpecError` before any request. Without an
        ``idempotency_key`` a fresh one is made, so the automatic retry can never submit twice;
        give your own to make resubmitting the same job from elsewhere safe too. With
        ``working_dir`` the directory is uploaded first (:meth:`upload_package`) and becomes the
        job's ``runtime_env.working_dir``: its modules are importable on the workers."""
        if isinstance(spec, (str, Path)):
            spec = load_spec(spec)
        body = spec.model_dump(mode="json") if isinstance(spec, JobSpec) else dict(spec)
        if working_dir is not None:
            package = self.upload_package(working_dir)
            body["runtime_env"] = {**(body.get("runtime_env") or {}), "working_dir": package.uri}
        key = idempotency_key or uuid.uuid4().hex
        response = self._send("POST", "/v1/jobs", json=body, headers={"Idempotency-Key": key}, retry=True)
        return _parse(Job, response)

    def get(self, job_id: str) -> Job:
        """One job, with its state, progress (``latest_metrics``) and failure reason."""
        return _parse(Job, self._send("GET", _job_path(job_id)))

    def list(
        self,
        state: str | Sequence[str] | None = None,
        labels: Mapping[str, str] | None = None,
        limit: int = 50,
        cursor: str | None = None,
        submitted_by: str | None = None,
    ) -> JobPage:
        """One page of jobs, newest first, in any of ``state``, carrying all of ``labels`` (and
        submitted with the token named ``submitted_by``); pass the page's ``next_cursor`` as
        ``cursor`` for the next one."""
        params: builtins.list[tuple[str, str | int]] = [("limit", limit)]
        if submitted_by is not None:
            params.append(("submitted_by", submitted_by))
        states = [state] if isinstance(state, str) else builtins.list(state or ())
        params += [("state", str(s)) for s in states]
        params += [("label", f"{key}={value}") for key, value in (labels or {}).items()]
        if cursor is not None:
            params.append(("cursor", cursor))
        return _parse(JobPage, self._send("GET", "/v1/jobs", params=params))

    def iter_jobs(
        self,
        state: str | Sequence[str] | None = None,
        labels: Mapping[str, str] | None = None,
        page_size: int = 50,
        submitted_by: str | None = None,
    ) -> Iterator[Job]:
        """Every matching job, newest first, fetching pages as it goes."""
        cursor: str | None = None
        while True:
            page = self.list(state, labels, page_size, cursor, submitted_by)
            yield from page.jobs
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    def whoami(self) -> Caller:
        """The name of this client's token, and whether it is an admin's."""
        return _parse(Caller, self._send("GET", "/v1/whoami"))

    def events(self, job_id: str) -> builtins.list[JobEvent]:
        """The job's state changes, oldest first."""
        return _parse(builtins.list[JobEvent], self._send("GET", _job_path(job_id, "events")))

    def wait(
        self, job_id: str, timeout: float | None = None, poll_interval: float = 1.0, progress: bool = False
    ) -> Job:
        """Poll until the job is SUCCEEDED, FAILED or CANCELLED and return it; raises
        :class:`WaitTimeout` after ``timeout`` seconds. ``progress`` draws a bar on stderr:
        steps done of total, state, loss."""
        deadline = None if timeout is None else time.monotonic() + timeout
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[state]}  loss {task.fields[loss]}"),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=Console(stderr=True), disable=not progress) as bar:
            task = bar.add_task(job_id, total=None, state="", loss="-")
            while True:
                job = self.get(job_id)
                metrics = job.latest_metrics or {}
                loss = metrics.get("loss")
                bar.update(
                    task,
                    total=job.steps,
                    completed=metrics.get("step") or 0,
                    state=job.state.value,
                    loss=f"{loss:.4g}" if isinstance(loss, (int, float)) else "-",
                )
                if job.state.terminal:
                    return job
                pause = poll_interval
                if deadline is not None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise WaitTimeout(f"job {job_id} is still {job.state.value} after {timeout:g}s")
                    pause = min(pause, remaining)
                time.sleep(pause)

    def logs(
        self, job_id: str, tail: int | None = None, follow: bool = False, attempt: int | None = None
    ) -> Iterator[str]:
        """The job's log lines (without newlines), streamed as they arrive, never held whole.
        ``tail``: only the last N; ``follow``: keep streaming until the job ends; ``attempt``:
        an earlier attempt's log [the current one]. Errors are raised on the first iteration."""
        params: dict[str, str | int] = {"follow": "true" if follow else "false"}
        if tail is not None:
            params["tail"] = tail
        if attempt is not None:
            params["attempt"] = attempt
        # Following waits for new lines indefinitely: no read timeout, but keep the connect one.
        timeout = httpx.Timeout(self.timeout, read=None) if follow else self.timeout
        response = self._send("GET", _job_path(job_id, "logs"), params=params, timeout=timeout, stream=True)
        try:
            # A drop mid-stream is not retried: reconnecting would repeat lines already yielded.
            yield from response.iter_lines()
        except httpx.TransportError as exc:
            raise self._connection_failed(exc) from exc
        finally:
            response.close()

    def metrics(self, job_id: str, since: int | None = None) -> MetricRecords:
        """The job's metric records (step, loss, lr, hessian_trace, eval_*) in step order; with
        ``since``, only those after that step (to poll for new ones)."""
        params = {} if since is None else {"since": since}
        return _parse(MetricRecords, self._send("GET", _job_path(job_id, "metrics"), params=params))

    def checkpoints(self, job_id: str) -> CheckpointList:
        """The job's kept checkpoints, oldest first."""
        return _parse(CheckpointList, self._send("GET", _job_path(job_id, "checkpoints")))

    def cancel(self, job_id: str) -> Job:
        """Cancel a job: a queued one is CANCELLED at once, a running one gets ``cancel_requested``
        and reaches CANCELLED shortly (:meth:`wait` for it)."""
        return _parse(Job, self._send("POST", _job_path(job_id, "cancel"), retry=False))

    def retry(self, job_id: str) -> Job:
        """Run a FAILED or CANCELLED job again as a new attempt, resuming from its latest checkpoint."""
        return _parse(Job, self._send("POST", _job_path(job_id, "retry"), retry=False))

    def delete(self, job_id: str) -> None:
        """Forget a finished job (the server refuses, 409, while it is active)."""
        self._send("DELETE", _job_path(job_id), retry=False)

    # -- the service -----------------------------------------------------------------------------

    def health(self) -> Health:
        """Liveness: the process answers."""
        return _parse(Health, self._send("GET", "/healthz"))

    def ready(self) -> Health:
        """Readiness, with a check per dependency. A 503 "not ready" answer is returned, not
        raised, so that its ``checks`` can be read: look at ``status``."""
        response = self._send("GET", "/readyz", retry=False, check=False)
        if response.status_code == 503:
            with suppress(ValidationError):
                return Health.model_validate_json(response.content)
        if response.is_error:
            self._raise_for(response)
        return _parse(Health, response)

    # -- plumbing --------------------------------------------------------------------------------

    def _send(
        self,
        method: str,
        path: str,
        *,
        retry: bool | None = None,
        check: bool = True,
        stream: bool = False,
        **kwargs: Any,
    ) -> httpx.Response:
        """Send one request. With ``retry`` (default: for GETs) connection errors and 502-504
        answers are retried after short pauses; with ``check`` an error answer raises its
        :class:`ApiError`. A ``stream`` response is left open for the caller to read and close."""
        retry = method == "GET" if retry is None else retry
        delays = self._retry_delays if retry else ()
        request = self._http.build_request(method, path, **kwargs)
        for delay in (*delays, None):
            try:
                response = self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                if delay is None:
                    raise self._connection_failed(exc) from exc
            else:
                if response.status_code not in _RETRY_STATUSES or delay is None:
                    break
                response.close()
            time.sleep(delay)
        if check and response.is_error:
            response.read()
            response.close()
            self._raise_for(response)
        return response

    def _connection_failed(self, exc: httpx.TransportError) -> ConnectionFailed:
        if isinstance(exc, httpx.TimeoutException):
            return ConnectionFailed(
                f"no answer from the hutch control plane at {self.url} within {self.timeout:g}s ({exc})"
            )
        return ConnectionFailed(
            f"cannot reach the hutch control plane at {self.url} ({exc or type(exc).__name__}); "
            "is it running? Start one with `hutch serve`, or point --url / HUTCH_URL at yours."
        )

    def _raise_for(self, response: httpx.Response) -> None:
        """Raise the :class:`ApiError` for an error answer, whatever its body looks like."""
        status = response.status_code
        cls, default_code = _ERRORS.get(status, (ApiError, f"http_{status}"))
        try:
            body = ErrorResponse.model_validate_json(response.content).error
        except ValidationError:
            # Not hutch's error shape: a proxy's HTML page, a plain-text error, another service.
            raise cls(status, default_code, _foreign_error_message(response)) from None
        message = body.message
        if cls is Unauthorized and self.token is None:
            message += " (no token was sent: set HUTCH_TOKEN or pass one)"
        raise cls(status, body.code, message, body.details)


def _job_path(job_id: str, action: str = "") -> str:
    """``/v1/jobs/ID[/action]``, the id quoted so that a stray ``/`` or ``?`` cannot reach another route."""
    return f"/v1/jobs/{quote(job_id, safe='')}" + (f"/{action}" if action else "")


def _foreign_error_message(response: httpx.Response) -> str:
    """A readable message for an error answer that is not hutch's JSON error."""
    what = f"{response.request.method} {response.request.url} answered {response.status_code}"
    if response.reason_phrase:
        what += f" {response.reason_phrase}"
    content_type = response.headers.get("content-type", "").split(";")[0].strip()
    text = response.text.strip()
    if not text:
        return what
    if content_type in ("text/plain", "application/json"):
        return f"{what}: {text.splitlines()[0][:200]}"
    return f"{what} with a {content_type or 'non-JSON'} body, not a hutch error (a proxy in the way?)"


@cache
def _adapter(kind: Any) -> TypeAdapter[Any]:
    return TypeAdapter(kind)


def _parse(kind: type[_T], response: httpx.Response) -> _T:
    """The answer's JSON as ``kind``; a body of another shape is a :class:`HutchError`, not a crash."""
    try:
        return _adapter(kind).validate_json(response.content)
    except ValidationError as exc:
        name = getattr(kind, "__name__", str(kind))
        raise HutchError(
            f"{response.request.url}: unexpected answer, not a {name} ({exc.error_count()} problems)"
        ) from None
