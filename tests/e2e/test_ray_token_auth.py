"""The service against a Ray cluster with token authentication on, as KubeRay's
``authOptions: {mode: token}`` makes it: a real Ray head started with ``RAY_AUTH_MODE=token``,
real `hutch serve` processes pointed at its job API, jobs trained on it.

With a wrong or a missing token, `/readyz` says which (`degraded`, the reason in the body; still
ready, as jobs queue), and a submitted job waits QUEUED; restarted with the right token, the same
service on the same store runs that job to SUCCEEDED, refuses a job larger than the cluster, and
stops a running one.

With the token in a file (HUTCH_RAY_AUTH_TOKEN_FILE, as a mounted Secret), a rotation is followed
without a restart: the cluster comes back with a new token, a job waits QUEUED while the file
holds the old one, and runs once the file holds the new one.
"""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.client import Client, InvalidRequest
from benchmarks.harness import free_port, wait_for
from benchmarks.ray_nodes import end_process_group, start_ray_head
from service.local_ray import own_port_options
from tests.e2e.conftest import TOKEN, ServiceProcess
from tests.e2e.test_api_contract import spec_with
from trainer.launch import ONE_MACHINE_RAY_ENV

pytestmark = pytest.mark.slow

RAY_TOKEN = secrets.token_hex(16)


def start_token_head(token: str, gcs_port: int, dashboard_port: int) -> int:
    """A 2-CPU Ray head with token auth on and ``token``, its job API up; its process group. Its
    job drivers find hutch's `python` on PATH, as in the Ray image, and Ray Train's controller takes
    the settings of a one-machine cluster."""
    env = {
        **ONE_MACHINE_RAY_ENV,
        **os.environ,
        "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    env.pop("RAY_ADDRESS", None)
    pgid = start_ray_head(
        env, f"--port={gcs_port}", "--num-cpus=2", "--object-store-memory=200000000",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", *own_port_options(),
    )  # fmt: skip
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        auth = {"Authorization": f"Bearer {token}"}
        wait_for(lambda: _job_api_up(address, auth), 120, "the token-protected Ray job API", 0.5)
    except BaseException:
        end_process_group(pgid)
        raise
    return pgid


@pytest.fixture(scope="module")
def token_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A 2-CPU Ray head with token auth on (:func:`start_token_head`)."""
    dashboard_port = free_port()
    pgid = start_token_head(RAY_TOKEN, free_port(), dashboard_port)
    try:
        address = f"http://127.0.0.1:{dashboard_port}"
        yield {"address": address, "storage": tmp_path_factory.mktemp("token-storage")}
    finally:
        end_process_group(pgid)


def _job_api_up(address: str, headers: dict[str, str]) -> bool:
    try:
        nodes = httpx.get(f"{address}/api/v0/nodes", headers=headers, timeout=5).json()
        jobs = httpx.get(f"{address}/api/jobs/", headers=headers, timeout=5)
        return bool(nodes["data"]["result"]["total"]) and jobs.status_code == 200
    except (httpx.HTTPError, ValueError, KeyError):
        return False


def service_on(
    cluster: dict[str, Any], data_dir: Path, ray_token: str | None, token_file: Path | None = None
) -> ServiceProcess:
    env = {"HUTCH_RAY_ADDRESS": cluster["address"], "HUTCH_STORAGE_PATH": str(cluster["storage"])}
    if ray_token is not None:
        env["HUTCH_RAY_AUTH_TOKEN"] = ray_token
    if token_file is not None:
        env["HUTCH_RAY_AUTH_TOKEN_FILE"] = str(token_file)
    service = ServiceProcess(data_dir, env)
    names = (
        "RAY_AUTH_TOKEN",
        "RAY_AUTH_MODE",
        "RAY_AUTH_TOKEN_PATH",
        "HUTCH_RAY_AUTH_TOKEN",
        "HUTCH_RAY_AUTH_TOKEN_FILE",
    )
    for name in names:
        if name not in env:
            service.env.pop(name, None)  # only what this test sets reaches the service
    return service


def readiness(service: ServiceProcess) -> httpx.Response:
    return httpx.get(f"{service.url}/readyz", timeout=10)


def refusing_jobs(service: ServiceProcess) -> dict[str, str] | None:
    """/readyz's checks once they say jobs cannot be submitted: still ready (200), ``degraded``."""
    response = readiness(service)
    checks = response.json()["checks"]
    degraded = response.status_code == 200 and response.json()["status"] == "degraded"
    return checks if degraded and checks["job_submission"] != "ok" else None


def test_token_auth_wrong_then_missing_then_right(
    token_cluster: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> None:
    data_dir = tmp_path_factory.mktemp("token-service")
    small = spec_with(
        name="token-digits",
        **{"training.steps": 30, "training.checkpoint_every": 15, "training.eval_every": 30,
           "training.log_every": 5, "scaling.num_workers": 1, "training.global_batch_size": 32},
    )  # fmt: skip

    # A wrong token: not ready, saying so; a submission is kept, QUEUED.
    wrong = service_on(token_cluster, data_dir, "not-the-token")
    wrong.start(ready_path="/healthz")
    try:
        with Client(wrong.url, TOKEN) as client:
            job = client.submit(small)  # admission cannot ask Ray: accepted, waits
            assert job.state == "QUEUED"
            checks = wait_for(lambda: refusing_jobs(wrong), 60, "/readyz to report the rejected token")
            assert checks["database"] == "ok"
            for check in ("ray", "job_submission"):
                assert "rejected the Ray token" in checks[check] and "HUTCH_RAY_AUTH_TOKEN" in checks[check]
            assert "not-the-token" not in readiness(wrong).text
            assert client.get(job.id).state == "QUEUED"
        assert "not-the-token" not in wrong.log_tail(400)
    finally:
        wrong.stop()

    # No token at all: the other message; the job still waits.
    missing = service_on(token_cluster, data_dir, None)
    missing.start(ready_path="/healthz")
    try:
        response = wait_for(
            lambda: (r := readiness(missing)).status_code == 200 and "no Ray token" in r.text and r,
            60,
            "/readyz to report the missing token",
        )
        assert "no Ray token is configured" in response.json()["checks"]["ray"]
        with Client(missing.url, TOKEN) as client:
            assert client.get(job.id).state == "QUEUED"
    finally:
        missing.stop()

    # The right token: ready; the queued job runs; admission, logs, checkpoints and stop work.
    right = service_on(token_cluster, data_dir, RAY_TOKEN)
    right.start()  # /readyz answers 200
    try:
        assert readiness(right).json()["checks"] == {"database": "ok", "ray": "ok", "job_submission": "ok"}
        with Client(right.url, TOKEN) as client:
            huge = spec_with(name="token-huge", **{"scaling.num_workers": 4, "training.global_batch_size": 8})
            with pytest.raises(InvalidRequest) as refused_job:
                client.submit(huge)
            assert refused_job.value.code == "unschedulable"
            assert "the cluster has 2" in refused_job.value.message

            # A second job, run beside the first (one worker each on the 2 CPUs), to be stopped.
            long = client.submit(spec_with(
                name="token-stop",
                **{"training.steps": 100_000, "training.log_every": 5, "training.eval_every": 100_000,
                   "training.checkpoint_every": 100_000, "scaling.num_workers": 1},
            ))  # fmt: skip
            wait_for(lambda: client.get(long.id).latest_metrics, 300, "the long job's first metrics", 0.5)
            client.cancel(long.id)
            stopped = client.wait(long.id, timeout=120, poll_interval=0.5)
            assert stopped.state == "CANCELLED"
            assert _ray_job_info(token_cluster["address"], stopped.ray_job_id)["status"] == "STOPPED"

            final = client.wait(job.id, timeout=300, poll_interval=0.5)
            assert final.state == "SUCCEEDED", final.failure_reason
            assert [e.state for e in client.events(job.id)] == ["QUEUED", "STARTING", "RUNNING", "SUCCEEDED"]
            assert [c.step for c in client.checkpoints(job.id).checkpoints] == [15, 30]
            assert any(f"job {job.id} succeeded" in line for line in client.logs(job.id, tail=5))
            info = _ray_job_info(token_cluster["address"], final.ray_job_id)
            assert info["status"] == "SUCCEEDED"
            assert info["metadata"]["job_name"] == "token-digits"  # the dashboard's "Job name" column
            assert RAY_TOKEN not in str(info)  # the token travels in headers, never in the job
    finally:
        right.stop()


def _ray_job_info(address: str, submission_id: str | None, token: str = RAY_TOKEN) -> dict[str, Any]:
    """What the Ray dashboard's Jobs page reads for one job (its REST API, with the token)."""
    response = httpx.get(
        f"{address}/api/jobs/{submission_id}", headers={"Authorization": f"Bearer {token}"}, timeout=10
    )
    response.raise_for_status()
    return response.json()


def tiny(name: str) -> dict[str, Any]:
    """A digits job of a few steps on one worker: a few seconds of training."""
    return spec_with(
        name=name,
        **{"training.steps": 10, "training.checkpoint_every": 10, "training.eval_every": 10,
           "training.log_every": 5, "scaling.num_workers": 1, "training.global_batch_size": 32},
    )  # fmt: skip


def write_token(path: Path, token: str) -> None:
    """Replace the file at once, as Kubernetes updates a mounted Secret (a new file, renamed in)."""
    new = path.with_name(f".{path.name}.new")
    new.write_text(token + "\n")
    new.replace(path)


def test_a_rotated_token_file_is_followed_without_a_restart(tmp_path_factory: pytest.TempPathFactory) -> None:
    token_a, token_b = secrets.token_hex(16), secrets.token_hex(16)
    gcs_port, dashboard_port = free_port(), free_port()
    cluster = {
        "address": f"http://127.0.0.1:{dashboard_port}",
        "storage": tmp_path_factory.mktemp("rotation-storage"),
    }
    data_dir = tmp_path_factory.mktemp("rotation-service")
    token_file = tmp_path_factory.mktemp("ray-token") / "auth_token"
    write_token(token_file, token_a)
    heads = [start_token_head(token_a, gcs_port, dashboard_port)]
    service = service_on(cluster, data_dir, None, token_file)
    try:
        service.start()
        assert service.process is not None
        pid = service.process.pid
        with Client(service.url, TOKEN) as client:
            first = client.submit(tiny("rotation-before"))
            done = client.wait(first.id, timeout=180, poll_interval=0.5)
            assert done.state == "SUCCEEDED", done.failure_reason

            # The rotation: the cluster comes back on the same address with token B; the file
            # still holds A.
            end_process_group(heads.pop())
            heads.append(start_token_head(token_b, gcs_port, dashboard_port))
            second = client.submit(tiny("rotation-after"))  # admission cannot ask Ray: accepted
            assert second.state == "QUEUED"
            checks = wait_for(lambda: refusing_jobs(service), 60, "/readyz to report the rejected token")
            for check in ("ray", "job_submission"):
                assert "rejected the Ray token" in checks[check], checks
                assert f"HUTCH_RAY_AUTH_TOKEN_FILE ({token_file}" in checks[check], checks
            assert [e.state for e in client.events(second.id)] == ["QUEUED"]  # waits, does not fail

            write_token(token_file, token_b)  # Kubernetes updates the mounted Secret
            final = client.wait(second.id, timeout=180, poll_interval=0.5)
            assert final.state == "SUCCEEDED", final.failure_reason
            lifecycle = ["QUEUED", "STARTING", "RUNNING", "SUCCEEDED"]
            assert [e.state for e in client.events(second.id)] == lifecycle
            assert _ray_job_info(cluster["address"], final.ray_job_id, token_b)["status"] == "SUCCEEDED"
            response = wait_for(lambda: (r := readiness(service)).json()["status"] == "ok" and r, 30, "ok")
            assert response.json()["checks"] == {"database": "ok", "ray": "ok", "job_submission": "ok"}

            # The same process all along, and nothing lost: the first job is still listed,
            # SUCCEEDED, with its metrics.
            assert service.process.poll() is None and service.process.pid == pid
            listed = {job.id: job for job in client.list(limit=10).jobs}
            assert listed[first.id].state == "SUCCEEDED"
            assert listed[first.id].latest_metrics and listed[first.id].latest_metrics["step"] == 10
            assert [r["step"] for r in client.metrics(first.id).records] == [5, 10]
            assert [e.state for e in client.events(first.id)] == lifecycle
        log = service.log_tail(2000)
        assert log.count(f"using the new token found in {token_file}") == 1, log
        assert token_a not in log and token_b not in log
    finally:
        if service.process is not None and service.process.poll() is None:
            service.stop()
        for pgid in heads:
            end_process_group(pgid)
