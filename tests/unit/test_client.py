"""The Python client without a control plane: where it finds its URL and token, what it raises
when the server is unreachable or answers with an error, what it retries, how it streams logs.

``CannedServer`` is a real HTTP server from the standard library that stands in for the control
plane for wire-format checks only (status codes, headers, bodies, streaming); the end-to-end
tests against the real server live in ``tests/e2e``.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from api.client import (
    ApiError,
    Client,
    Conflict,
    ConnectionFailed,
    HutchError,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    ServiceUnavailable,
    Unauthorized,
    WaitTimeout,
)
from service.lifecycle import JobState
from trainer.spec import SpecError, load_spec

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "digits-adahessian.yaml"


@dataclass
class Canned:
    """One answer: a status, a body (bytes, or chunks written and flushed one by one), headers."""

    status: int
    body: bytes | Iterable[bytes] = b""
    content_type: str = "application/json"


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes


@dataclass
class CannedServer:
    """Answers each (method, path) with its queued answers in turn (the last one repeats)."""

    url: str = ""
    routes: dict[tuple[str, str], list[Canned]] = field(default_factory=dict)
    requests: list[Recorded] = field(default_factory=list)

    def answer(self, method: str, path: str, *answers: Canned) -> None:
        self.routes[(method, path)] = list(answers)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def _handle(self) -> None:
        canned = self.server.canned
        parts = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        canned.requests.append(
            Recorded(self.command, parts.path, parse_qs(parts.query), dict(self.headers.items()), body)
        )
        answers = canned.routes.get((self.command, parts.path))
        if not answers:
            answer = Canned(500, b"no canned answer", "text/plain")
        else:
            answer = answers.pop(0) if len(answers) > 1 else answers[0]
        self.send_response(answer.status)
        self.send_header("Content-Type", answer.content_type)
        if isinstance(answer.body, bytes):
            self.send_header("Content-Length", str(len(answer.body)))
            self.end_headers()
            self.wfile.write(answer.body)
            return
        self.end_headers()  # no length: HTTP/1.0, the body ends when the connection closes
        for chunk in answer.body:
            self.wfile.write(chunk)
            self.wfile.flush()

    do_GET = do_POST = do_DELETE = _handle

    def log_message(self, format: str, *args: Any) -> None:
        """Keep the test output quiet."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    canned: CannedServer


@pytest.fixture
def server() -> Iterator[CannedServer]:
    httpd = _Server(("127.0.0.1", 0), _Handler)
    httpd.canned = CannedServer(url=f"http://127.0.0.1:{httpd.server_address[1]}")
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    yield httpd.canned
    httpd.shutdown()
    httpd.server_close()
    thread.join()


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No HUTCH_* from the developer's shell; the data dir (token file) is a fresh temporary one."""
    for name in ("HUTCH_URL", "HUTCH_TOKEN", "HUTCH_API_TOKENS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HUTCH_DATA_DIR", str(tmp_path))
    return tmp_path


@pytest.fixture
def closed_port_url() -> str:
    """The URL of a port that nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _json(value: Any) -> bytes:
    return json.dumps(value).encode()


def _job(state: str = "QUEUED", **overrides: Any) -> dict[str, Any]:
    job = {
        "id": "digits-adahessian-x1",
        "name": "digits-adahessian",
        "state": state,
        "created_at": "2025-01-01T00:00:00Z",
        "updated_at": "2025-01-01T00:00:00Z",
        "attempt": 1,
        "steps": 300,
        "spec": {"name": "digits-adahessian"},
    }
    return job | overrides


def _error(status: int, code: str, message: str, details: list[dict[str, Any]] | None = None) -> Canned:
    body = {"error": {"status": status, "code": code, "message": message, "details": details or []}}
    return Canned(status, _json(body))


PROXY_502 = Canned(502, b"<html><body><h1>502 Bad Gateway</h1></body></html>", "text/html")


# -- where the client finds its server and token -------------------------------------------------


def test_url_and_token_come_from_arguments_then_environment(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Client() as client:
        assert client.url == "http://127.0.0.1:8000" and client.token is None
    monkeypatch.setenv("HUTCH_URL", "http://hutch.example:9000/")
    monkeypatch.setenv("HUTCH_TOKEN", "from-env")
    with Client() as client:
        assert client.url == "http://hutch.example:9000" and client.token == "from-env"
    with Client("http://other:1", "from-arg") as client:
        assert client.url == "http://other:1" and client.token == "from-arg"


def test_token_falls_back_to_the_servers_tokens_then_its_token_file(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (clean_env / "api-token").write_text("generated-token\n")
    with Client() as client:
        assert client.token == "generated-token"
    monkeypatch.setenv("HUTCH_API_TOKENS", "first, second")
    with Client() as client:
        assert client.token == "first"


def test_the_token_is_sent_as_a_bearer_header(clean_env: Path, server: CannedServer) -> None:
    server.answer("GET", "/v1/jobs/j", Canned(200, _json(_job())))
    with Client(server.url, "s3cret") as client:
        client.get("j")
    assert server.requests[0].headers["Authorization"] == "Bearer s3cret"


def test_without_a_token_none_is_sent_and_the_401_says_how_to_give_one(
    clean_env: Path, server: CannedServer
) -> None:
    server.answer("GET", "/v1/jobs/j", _error(401, "unauthorized", "missing bearer token"))
    with Client(server.url) as client, pytest.raises(Unauthorized, match="HUTCH_TOKEN") as raised:
        client.get("j")
    assert "Authorization" not in server.requests[0].headers
    assert raised.value.status == 401 and raised.value.code == "unauthorized"


# -- failures before or instead of an answer -----------------------------------------------------


def test_an_unreachable_server_raises_connection_failed_naming_the_url(
    clean_env: Path, closed_port_url: str
) -> None:
    client = Client(closed_port_url, "t", retry_delays=(0, 0))
    with client, pytest.raises(ConnectionFailed) as raised:
        client.list()
    assert closed_port_url in str(raised.value) and "hutch serve" in str(raised.value)


def test_an_invalid_spec_file_is_refused_before_any_request(
    clean_env: Path, closed_port_url: str, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: {name: cnn}\ndata: {name: digits}\noptimizer: {lr: -1}\n")
    with Client(closed_port_url, "t") as client:  # any request would raise ConnectionFailed instead
        with pytest.raises(SpecError, match=r"bad\.yaml.*\n.*optimizer\.lr"):
            client.submit(bad)
        with pytest.raises(SpecError, match="no such file"):
            client.submit(str(tmp_path / "missing.yaml"))


# -- error answers ---------------------------------------------------------------------------------


def test_an_error_body_becomes_an_api_error_with_its_details(clean_env: Path, server: CannedServer) -> None:
    details = [
        {"field": "optimizer.lr", "message": "must be greater than 0"},
        {"field": None, "message": "x"},
    ]
    server.answer("POST", "/v1/jobs", _error(422, "invalid_spec", "the job spec is invalid", details))
    with Client(server.url, "t") as client, pytest.raises(InvalidRequest) as raised:
        client.submit({"name": "x"})
    error = raised.value
    assert (error.status, error.code, error.message) == (422, "invalid_spec", "the job spec is invalid")
    assert [(d.field, d.message) for d in error.details] == [
        ("optimizer.lr", "must be greater than 0"),
        (None, "x"),
    ]
    assert "optimizer.lr: must be greater than 0" in str(error)


@pytest.mark.parametrize(
    ("status", "code", "error_type"),
    [
        (401, "unauthorized", Unauthorized),
        (404, "not_found", NotFound),
        (409, "conflict", Conflict),
        (409, "idempotency_conflict", Conflict),
        (413, "payload_too_large", PayloadTooLarge),
        (422, "unschedulable", InvalidRequest),
        (503, "unavailable", ServiceUnavailable),
        (500, "internal", ApiError),
    ],
)
def test_each_status_raises_its_error_type(
    clean_env: Path, server: CannedServer, status: int, code: str, error_type: type[ApiError]
) -> None:
    server.answer("POST", "/v1/jobs/j/cancel", _error(status, code, "no"))
    with Client(server.url, "t") as client, pytest.raises(ApiError) as raised:
        client.cancel("j")
    assert type(raised.value) is error_type
    assert (raised.value.status, raised.value.code) == (status, code)


def test_a_proxys_html_error_page_gives_a_clear_api_error(clean_env: Path, server: CannedServer) -> None:
    server.answer("GET", "/v1/jobs/j", PROXY_502)
    with Client(server.url, "t", retry_delays=()) as client, pytest.raises(ApiError) as raised:
        client.get("j")
    assert (raised.value.status, raised.value.code) == (502, "http_502")
    assert "502 Bad Gateway" in str(raised.value) and "text/html" in str(raised.value)
    assert "<html>" not in str(raised.value)


def test_a_plain_text_error_is_quoted(clean_env: Path, server: CannedServer) -> None:
    server.answer("GET", "/v1/jobs/j", Canned(404, b"no route here\nmore", "text/plain"))
    with Client(server.url, "t") as client, pytest.raises(NotFound, match=r"404 Not Found: no route here \("):
        client.get("j")


def test_an_unexpected_success_body_is_a_hutch_error(clean_env: Path, server: CannedServer) -> None:
    server.answer("GET", "/v1/jobs/j", Canned(200, b"<html>a web page</html>", "text/html"))
    with Client(server.url, "t") as client, pytest.raises(HutchError, match="not a Job"):
        client.get("j")


# -- retries -------------------------------------------------------------------------------------


def test_a_read_is_retried_through_gateway_errors(clean_env: Path, server: CannedServer) -> None:
    server.answer(
        "GET", "/v1/jobs/j", PROXY_502, _error(503, "unavailable", "db down"), Canned(200, _json(_job()))
    )
    with Client(server.url, "t", retry_delays=(0, 0, 0)) as client:
        assert client.get("j").id == "digits-adahessian-x1"
    assert len(server.requests) == 3


def test_a_read_gives_up_after_its_retries(clean_env: Path, server: CannedServer) -> None:
    server.answer("GET", "/v1/jobs/j", _error(503, "unavailable", "db down"))
    with Client(server.url, "t", retry_delays=(0, 0)) as client, pytest.raises(ServiceUnavailable):
        client.get("j")
    assert len(server.requests) == 3


def test_submit_retries_under_one_generated_idempotency_key(clean_env: Path, server: CannedServer) -> None:
    server.answer("POST", "/v1/jobs", PROXY_502, Canned(201, _json(_job())))
    spec = load_spec(EXAMPLE)
    with Client(server.url, "t", retry_delays=(0,)) as client:
        assert client.submit(spec).state is JobState.QUEUED
        first, retried = server.requests
        assert first.headers["Idempotency-Key"] == retried.headers["Idempotency-Key"] != ""
        assert json.loads(first.body) == spec.model_dump(mode="json")
        client.submit(EXAMPLE)  # a new call: a new key
        client.submit(spec, idempotency_key="mine")
    assert server.requests[2].headers["Idempotency-Key"] not in ("", first.headers["Idempotency-Key"])
    assert server.requests[3].headers["Idempotency-Key"] == "mine"


def test_actions_without_an_idempotency_key_are_not_retried(clean_env: Path, server: CannedServer) -> None:
    server.answer("POST", "/v1/jobs/j/retry", PROXY_502, Canned(202, _json(_job())))
    with Client(server.url, "t", retry_delays=(0, 0)) as client, pytest.raises(ApiError):
        client.retry("j")
    assert len(server.requests) == 1


# -- reading jobs ----------------------------------------------------------------------------------


def test_list_sends_filters_and_iter_jobs_follows_cursors(clean_env: Path, server: CannedServer) -> None:
    first = {"jobs": [_job(id="c"), _job(id="b")], "next_cursor": "after-b"}
    last = {"jobs": [_job(id="a")], "next_cursor": None}
    server.answer("GET", "/v1/jobs", Canned(200, _json(first)), Canned(200, _json(last)))
    with Client(server.url, "t") as client:
        jobs = list(client.iter_jobs(["RUNNING", JobState.QUEUED], {"team": "ml", "x": "a=b"}, page_size=2))
    assert [job.id for job in jobs] == ["c", "b", "a"]
    query = server.requests[0].query
    assert query == {"limit": ["2"], "state": ["RUNNING", "QUEUED"], "label": ["team=ml", "x=a=b"]}
    assert server.requests[1].query["cursor"] == ["after-b"]


def test_job_ids_cannot_reach_other_routes(clean_env: Path, server: CannedServer) -> None:
    server.answer("GET", "/v1/jobs/a%2Fcancel", Canned(200, _json(_job())))
    with Client(server.url, "t") as client:
        client.get("a/cancel")
    assert server.requests[0].path == "/v1/jobs/a%2Fcancel"


def test_wait_polls_until_the_job_ends(clean_env: Path, server: CannedServer) -> None:
    running = _job("RUNNING", latest_metrics={"step": 120, "loss": 0.5})
    done = _job("SUCCEEDED", latest_metrics={"step": 300, "loss": 0.1})
    server.answer("GET", "/v1/jobs/j", Canned(200, _json(running)), Canned(200, _json(done)))
    with Client(server.url, "t") as client:
        job = client.wait("j", poll_interval=0, progress=True)
    assert job.state is JobState.SUCCEEDED and len(server.requests) == 2


def test_wait_raises_a_timeout_error_at_its_deadline(clean_env: Path, server: CannedServer) -> None:
    server.answer("GET", "/v1/jobs/j", Canned(200, _json(_job("RUNNING"))))
    with Client(server.url, "t") as client, pytest.raises(WaitTimeout, match="still RUNNING") as raised:
        client.wait("j", timeout=0)
    assert isinstance(raised.value, TimeoutError) and isinstance(raised.value, HutchError)


def test_logs_are_streamed_line_by_line(clean_env: Path, server: CannedServer) -> None:
    first_line_read = threading.Event()

    def body() -> Iterator[bytes]:
        yield b"line 1\n"
        # Only a client that hands out line 1 before the body ends gets the rest.
        yield b"line 2\r\nline 3\n" if first_line_read.wait(10) else b"not streamed\n"

    server.answer("GET", "/v1/jobs/j/logs", Canned(200, body(), "text/plain"))
    with Client(server.url, "t") as client:
        lines = client.logs("j", tail=5, follow=True, attempt=2)
        assert next(lines) == "line 1"
        first_line_read.set()
        assert list(lines) == ["line 2", "line 3"]
    assert server.requests[0].query == {"follow": ["true"], "tail": ["5"], "attempt": ["2"]}


def test_a_logs_error_is_parsed_from_the_stream(clean_env: Path, server: CannedServer) -> None:
    server.answer("GET", "/v1/jobs/j/logs", _error(404, "not_found", "no job j"))
    with Client(server.url, "t") as client, pytest.raises(NotFound, match="no job j"):
        next(client.logs("j"))


def test_typed_results_of_the_other_routes(clean_env: Path, server: CannedServer) -> None:
    event = {"at": "2025-01-01T00:00:00Z", "attempt": 1, "state": "QUEUED"}
    server.answer("GET", "/v1/jobs/j/events", Canned(200, _json([event])))
    server.answer("GET", "/v1/jobs/j/metrics", Canned(200, _json({"job_id": "j", "records": [{"step": 20}]})))
    server.answer("GET", "/v1/jobs/j/checkpoints", Canned(200, _json({"job_id": "j", "checkpoints": []})))
    server.answer("DELETE", "/v1/jobs/j", Canned(204))
    server.answer("GET", "/healthz", Canned(200, _json({"status": "ok"})))
    server.answer("GET", "/readyz", Canned(503, _json({"status": "unavailable", "checks": {"ray": "down"}})))
    with Client(server.url, "t") as client:
        assert client.events("j")[0].state is JobState.QUEUED
        assert client.metrics("j", since=10).records == [{"step": 20}]
        assert client.checkpoints("j").checkpoints == []
        assert client.delete("j") is None
        assert client.health().status == "ok"
        assert client.ready().checks == {"ray": "down"}  # "not ready" is an answer, not an error
    metrics_request = next(r for r in server.requests if r.path.endswith("/metrics"))
    assert metrics_request.query == {"since": ["10"]}
