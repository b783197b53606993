"""Real `hutch serve` processes on free ports, reached over HTTP.

`ServiceProcess` starts the server as a subprocess with its settings in the environment, waits
for it to answer, and can stop it cleanly (SIGTERM) or kill it (SIGKILL) and start it again on
the same data directory and port.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from api.client import Client
from benchmarks.harness import free_port, wait_for

ROOT = Path(__file__).resolve().parents[2]
HUTCH = Path(sys.executable).with_name("hutch")
TOKEN = "e2e-token"


class ServiceProcess:
    """One `hutch serve` on a free port; its output goes to ``data_dir/service.log``."""

    def __init__(self, data_dir: Path, env: dict[str, str]) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "HUTCH_DATA_DIR": str(data_dir),
            "HUTCH_API_TOKENS": TOKEN,
            "HUTCH_RECONCILE_INTERVAL_S": "0.5",
            "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
            **env,
        }
        self.env.pop("RAY_ADDRESS", None)
        self.process: subprocess.Popen | None = None

    def start(self, ready_path: str = "/readyz", timeout: float = 180) -> None:
        self.launch()
        self.wait_ready(ready_path, timeout)

    def launch(self) -> None:
        """Start the process without waiting for it (several can then start side by side)."""
        log = (self.data_dir / "service.log").open("ab")
        self.process = subprocess.Popen(
            [str(HUTCH), "serve", "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def wait_ready(self, ready_path: str = "/readyz", timeout: float = 180) -> None:
        wait_for(lambda: self._answers(ready_path), timeout, f"the service on {self.url}{ready_path}", 0.3)

    def _answers(self, path: str) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"the service exited with {self.process.returncode}:\n{self.log_tail()}")
        try:
            return httpx.get(self.url + path, timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM and wait: the clean stop a user's Ctrl-C makes."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(30)

    def log_tail(self, lines: int = 40) -> str:
        path = self.data_dir / "service.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def client(self, token: str | None = TOKEN) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)


def stop_local_ray(data_dir: Path) -> None:
    """Safety net: end the local Ray head a service left behind (after a failed test)."""
    record = data_dir / "local-ray.json"
    if record.exists():
        pid = json.loads(record.read_text())["pid"]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                return
            time.sleep(3)


def local_ray_env() -> dict[str, str]:
    """Settings of a service that starts its own local Ray head (2 CPUs, a free dashboard port)."""
    return {"HUTCH_LOCAL_RAY_NUM_CPUS": "2", "HUTCH_LOCAL_RAY_DASHBOARD_PORT": str(free_port())}


@contextlib.contextmanager
def running_service(
    data_dir: Path, env: dict[str, str], ready_path: str = "/readyz"
) -> Iterator[ServiceProcess]:
    """A started service, stopped (SIGTERM) at the end, and its local Ray head with it: also when
    the service never got ready, since it may have started the head by then."""
    service = ServiceProcess(data_dir, env)
    try:
        service.start(ready_path)
        yield service
    finally:
        if service.process is not None and service.process.poll() is None:
            service.stop()
        stop_local_ray(data_dir)


@contextlib.contextmanager
def service_without_ray(request: pytest.FixtureRequest, data_dir: Path) -> Iterator[ServiceProcess]:
    """A service whose Ray cluster is unreachable (jobs are stored and stay QUEUED, nothing
    trains), on its default SQLite file or, for ``request.param == "postgres"``, a real Postgres."""
    env = {"HUTCH_RAY_ADDRESS": f"http://127.0.0.1:{free_port()}", "HUTCH_MAX_PACKAGE_BYTES": "4000000"}
    if request.param == "postgres":
        env["HUTCH_DATABASE_URL"] = request.getfixturevalue("postgres_url")
    with running_service(data_dir, env, ready_path="/healthz") as service:
        yield service


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def lite_service(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    """For what needs only the API and the store (validation, auth, idempotency, paging): see
    :func:`service_without_ray`, once on SQLite and once on Postgres."""
    with service_without_ray(request, tmp_path_factory.mktemp(f"lite-{request.param}")) as service:
        yield service


@pytest.fixture()
def client(service: ServiceProcess) -> Iterator[Client]:
    """The Python client on the module's ``service``."""
    with Client(service.url, TOKEN) as c:
        yield c
