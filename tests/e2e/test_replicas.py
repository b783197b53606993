"""Two real `hutch serve` replicas on one database and one Ray head, as two pods of the control
plane's Deployment: both serve the API, only the holder of the reconciler's lease starts and
follows jobs (service/leader.py).

On a SQLite file and on a pgserver Postgres: jobs are submitted through the replica that does not
lead; the leader is SIGKILLed with jobs queued and running, and the other takes over; a new
replica starts; then the leader is paused (SIGSTOP) past its lease, the other takes over, and the
paused one is woken (SIGCONT). Every job ends SUCCEEDED exactly once: one attempt, each state
entered once, one Ray job. The handovers are measured: a replica SIGKILLed on the same machine
is seen dead at once; a paused one (or one on another machine) is followed when its lease ends.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.client import Client
from benchmarks.harness import free_port, wait_for
from benchmarks.ray_nodes import end_process_group, start_ray_head
from service.local_ray import own_port_options
from tests.e2e.conftest import TOKEN, ServiceProcess
from tests.e2e.test_api_contract import spec_with
from tests.e2e.test_driver_resources import ray_env

pytestmark = pytest.mark.slow

LEASE_S = 10.0  # the default HUTCH_LEADER_LEASE_S: the handovers below are what users get
HANDOVER_LIMIT_S = 15.0


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    """A Ray head of this module's own (1 CPU: one one-worker job at a time)."""
    env = ray_env()
    dashboard_port = free_port()
    group = start_ray_head(
        env, f"--port={free_port()}", "--num-cpus=1", "--object-store-memory=150000000",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", *own_port_options(),
    )  # fmt: skip
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        wait_for(lambda: _answers(address + "/api/version"), 120, "the Ray head's job API", 0.5)
        yield address
    finally:
        end_process_group(group)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def replica(name: str, root: Path, database_url: str, ray_address: str) -> ServiceProcess:
    data_dir = root / name
    data_dir.mkdir(exist_ok=True)
    return ServiceProcess(
        data_dir,
        {
            "HUTCH_REPLICA_NAME": name,
            "HUTCH_DATABASE_URL": database_url,
            "HUTCH_RAY_ADDRESS": ray_address,
            "HUTCH_STORAGE_PATH": str(root / "storage"),
        },
    )


def readiness(service: ServiceProcess) -> dict[str, Any]:
    response = httpx.get(service.url + "/readyz", timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def leads(service: ServiceProcess) -> bool:
    """The replica's own view: it leads, and /metrics says so too."""
    if readiness(service)["leader"] != readiness(service)["replica"]:
        return False
    metrics = httpx.get(service.url + "/metrics", timeout=10).text
    return "hutch_reconciler_leader 1.0" in metrics


def job(name: str) -> dict[str, Any]:
    """A one-worker digits job of a few seconds' training."""
    return spec_with(
        name=name,
        **{"training.steps": 100, "training.checkpoint_every": 50, "training.eval_every": 100,
           "training.log_every": 50, "scaling.num_workers": 1, "training.global_batch_size": 32},
    )  # fmt: skip


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'shared.db'}"
    from sqlalchemy import create_engine, make_url, text

    url = request.getfixturevalue("postgres_url")  # one server per session: a database of our own
    name = f"replicas_{os.getpid()}_{int(time.time() * 1000)}"
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(text(f"CREATE DATABASE {name}"))
    engine.dispose()
    return make_url(url).set(database=name).render_as_string(hide_password=False)


def test_replicas_hand_over_and_every_job_ends_once(
    database_url: str, ray_address: str, tmp_path: Path
) -> None:
    first = replica("a", tmp_path, database_url, ray_address)
    replicas = {"a": first}
    try:
        first.start()
        wait_for(lambda: leads(first), 20, "the first replica to lead", 0.2)
        others = [replica(name, tmp_path, database_url, ray_address) for name in ("b", "c")]
        replicas.update(b=others[0], c=others[1])
        for service in others:  # started side by side: a start is mostly imports
            service.launch()
        for service in others:
            service.wait_ready()
            assert readiness(service)["leader"] == "a" and not leads(service)

        with Client(others[0].url, TOKEN) as client:  # a replica that does not lead takes submissions
            jobs = [client.submit(job(f"replicated-{i}")).id for i in range(2)]
            wait_for(lambda: client.get(jobs[0]).state == "RUNNING", 120, "the first job to run", 0.2)
            assert client.get(jobs[1]).state == "QUEUED"  # one one-worker job fits at a time

        killed_at = time.monotonic()
        first.kill()  # a job running, one queued
        second = wait_for(lambda: leader_among(others), HANDOVER_LIMIT_S + 5, "a new leader", 0.1)
        after_kill = time.monotonic() - killed_at
        third = next(service for service in others if service is not second)

        with Client(third.url, TOKEN) as client:  # the replica that stays awake
            assert second.process is not None
            paused_at = time.monotonic()
            second.process.send_signal(signal.SIGSTOP)  # alive and silent: its lease must run out
            try:
                wait_for(lambda: leads(third), HANDOVER_LIMIT_S + 5, "the last replica to lead", 0.1)
                after_pause = time.monotonic() - paused_at
                assert any(client.get(j).state != "SUCCEEDED" for j in jobs), "nothing left to lead"
            finally:
                second.process.send_signal(signal.SIGCONT)
            woken = readiness(second)
            assert woken["leader"] == third.env["HUTCH_REPLICA_NAME"] and not leads(second), woken

            for job_id in jobs:
                final = client.wait(job_id, timeout=300, poll_interval=0.5)
                assert final.state == "SUCCEEDED" and final.attempt == 1, final
                states = [str(e.state) for e in client.events(job_id)]
                assert states == ["QUEUED", "STARTING", "RUNNING", "SUCCEEDED"], (job_id, states)
        from ray.job_submission import JobSubmissionClient

        submitted = [info.submission_id for info in JobSubmissionClient(ray_address).list_jobs()]
        for job_id in jobs:  # one Ray job per attempt, and no other
            assert sum(1 for s in submitted if s and job_id in s) == 1, (job_id, submitted)
        print(f"\nhandover: after SIGKILL {after_kill:.1f} s, after SIGSTOP {after_pause:.1f} s")
        assert after_kill < HANDOVER_LIMIT_S and after_pause < HANDOVER_LIMIT_S
        assert after_pause > LEASE_S / 2, "a paused leader was followed before its lease could end"
    finally:
        for service in replicas.values():
            if service.process is not None and service.process.poll() is None:
                service.stop()


def leader_among(services: list[ServiceProcess]) -> ServiceProcess | None:
    return next((service for service in services if leads(service)), None)
