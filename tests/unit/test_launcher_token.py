"""The launcher against a stand-in for Ray's job API (a real HTTP server on loopback, token
checked as Ray checks it): a token file re-read when Ray rejects the token, the new token used
from then on by Ray's job client and the dashboard calls alike, the rejected call made again;
and the drivers' resources sent with every submission.

The whole path with real Ray heads, a rotation among them, is tests/e2e/test_ray_token_auth.py;
a driver placed by its resources on a real worker node is tests/e2e/test_driver_resources.py.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from service.launcher import RayAuthFailed, RayLauncher
from service.settings import SettingError
from trainer.rundir import RunLayout
from trainer.spec import validate_spec


class FakeRay(ThreadingHTTPServer):
    """Answers the few job-API routes the launcher calls; 403 unless the bearer token is
    :attr:`accepted`, as a Ray head with ``RAY_AUTH_MODE=token`` does."""

    def __init__(self, accepted: str) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.accepted = accepted
        self.submissions: list[dict[str, Any]] = []
        self.tokens_seen: set[str] = set()

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: FakeRay

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def _answer(self, status: int, body: Any) -> None:
        data = (body if isinstance(body, str) else json.dumps(body)).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _authorized(self) -> bool:
        given = self.headers.get("Authorization", "")
        self.server.tokens_seen.add(given.removeprefix("Bearer "))
        if given != f"Bearer {self.server.accepted}":
            self._answer(403, "Forbidden: Invalid authentication token")
            return False
        return True

    def do_GET(self) -> None:
        if not self._authorized():
            return
        import ray

        if self.path == "/api/version":
            self._answer(200, {"version": "4", "ray_version": ray.__version__, "ray_commit": "x"})
        elif self.path.startswith("/api/v0/nodes"):
            node = {"state": "ALIVE", "resources_total": {"CPU": 2.0, "hutch-driver": 1.0}}
            self._answer(200, {"data": {"result": {"result": [node]}}})
        elif self.path.startswith("/api/jobs/"):
            self._answer(404, f"Job {self.path.rsplit('/', 1)[-1]} does not exist")
        else:
            self._answer(404, "no such route")

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        if not self._authorized():
            return
        self.server.submissions.append(body)
        self._answer(200, {"submission_id": body["submission_id"], "job_id": None})


@pytest.fixture
def fake_ray() -> Iterator[FakeRay]:
    server = FakeRay("token-a")
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def token_file(tmp_path: Path, token: str) -> Path:
    path = tmp_path / "auth_token"
    path.write_text(f"{token}\n")
    return path


def job_spec() -> dict[str, Any]:
    spec = {"name": "j", "model": "mlp", "data": "digits", "training": {"global_batch_size": 8}}
    return validate_spec(spec).model_dump(mode="json")


def test_a_rejected_token_is_read_again_from_its_file_and_the_call_made_again(
    fake_ray: FakeRay, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = token_file(tmp_path, "token-a")
    launcher = RayLauncher(fake_ray.address, RunLayout(tmp_path / "storage"), auth_token_file=path)
    try:
        launcher.ping()
        assert launcher.status("hutch-x-1") is None  # Ray's job client, with token A
        assert launcher.capacity().total["hutch-driver"] == 1.0

        # Ray's token rotated; the file still holds the old one: every call is refused, naming
        # the setting and the file (never a token), and the service goes on with what it has.
        fake_ray.accepted = "token-b"
        for call in (launcher.ping, lambda: launcher.status("hutch-x-1"), lambda: launcher.capacity(0)):
            with pytest.raises(RayAuthFailed) as refused:
                call()
            assert "rejected the Ray token" in str(refused.value)
            assert f"HUTCH_RAY_AUTH_TOKEN_FILE ({path}" in str(refused.value)
            assert "token-a" not in str(refused.value) and "token-b" not in str(refused.value)
        with pytest.raises(RayAuthFailed):
            launcher.capacity()  # the kept failure, while the file holds no other token

        # The file is updated: the kept failure gives way at once, and the very call that was
        # rejected is made again with the new token, by both clients.
        caplog.set_level(logging.INFO, logger="hutch.launcher")
        path.write_text("token-b\n")
        assert launcher.capacity().total["CPU"] == 2.0
        assert launcher.status("hutch-x-1") is None  # a new job client, built with token B
        launcher.ping()
        launcher.submit("x", 1, job_spec(), "j")
        assert len(fake_ray.submissions) == 1
        picked = [r.getMessage() for r in caplog.records if "new token" in r.getMessage()]
        assert picked == [f"Ray rejected the token; using the new token found in {path}"]
        assert "token-b" not in caplog.text
    finally:
        launcher.close()


def test_an_unreadable_token_file_keeps_the_token_in_use(
    fake_ray: FakeRay, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = token_file(tmp_path, "token-a")
    launcher = RayLauncher(fake_ray.address, RunLayout(tmp_path / "storage"), auth_token_file=path)
    try:
        launcher.ping()
        fake_ray.accepted = "token-b"
        path.unlink()  # between the old file and the new, as a rotation may leave it for a moment
        for _ in range(3):
            with pytest.raises(RayAuthFailed):
                launcher.ping()
        failures = [r for r in caplog.records if "reading it again failed" in r.getMessage()]
        assert len(failures) == 1 and str(path) in failures[0].getMessage()  # said once
        path.write_text("token-b")
        launcher.ping()
    finally:
        launcher.close()


def test_a_token_file_that_cannot_be_read_at_start_is_a_setting_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(SettingError) as error:
        RayLauncher("http://127.0.0.1:1", RunLayout(tmp_path), auth_token_file=missing)
    assert error.value.variable == "HUTCH_RAY_AUTH_TOKEN_FILE" and str(missing) in str(error.value)


def test_a_fixed_token_is_never_read_from_anywhere_else(fake_ray: FakeRay, tmp_path: Path) -> None:
    launcher = RayLauncher(fake_ray.address, RunLayout(tmp_path), auth_token="token-a")
    try:
        launcher.ping()
        fake_ray.accepted = "token-b"
        with pytest.raises(RayAuthFailed, match="check HUTCH_RAY_AUTH_TOKEN "):
            launcher.ping()
    finally:
        launcher.close()


@pytest.mark.parametrize("driver", [{}, {"hutch-driver": 1.0}, {"hutch-driver": 0.5, "special": 2.0}])
def test_every_submission_asks_for_the_drivers_resources(
    fake_ray: FakeRay, tmp_path: Path, driver: dict[str, float]
) -> None:
    launcher = RayLauncher(
        fake_ray.address, RunLayout(tmp_path), auth_token="token-a", driver_resources=driver
    )
    try:
        assert launcher.submit("x", 1, job_spec(), "j") == "hutch-x-1"
        launcher.submit("y", 2, job_spec(), "j")
    finally:
        launcher.close()
    for body in fake_ray.submissions:
        # None is left out of the request by Ray's client: the driver goes where Ray puts it.
        assert body.get("entrypoint_resources") == (driver or None)
        assert body.get("entrypoint_num_cpus") is None and body.get("entrypoint_num_gpus") is None
