"""Job drivers off the head: with HUTCH_DRIVER_RESOURCES, every job's driver (`python -m trainer`)
asks Ray for a custom resource that only a worker node offers, so it runs there, never on the head.

A real Ray head (job API, 1 CPU, no `hutch-driver`) and a real `hutch serve` pointed at it, with
``HUTCH_DRIVER_RESOURCES={"hutch-driver": 1}`` and no autoscaling limits. While no node offers the
resource, a job is refused, the answer naming it; once a worker node with ``{"hutch-driver": 1}``
has joined, a job runs to SUCCEEDED with its driver on that node.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.client import Client, InvalidRequest
from benchmarks.harness import free_port, wait_for
from benchmarks.ray_nodes import end_process_group, start_ray_head, start_ray_node
from service.local_ray import own_port_options
from tests.e2e.conftest import TOKEN, running_service
from tests.e2e.test_ray_token_auth import tiny
from trainer.launch import ONE_MACHINE_RAY_ENV

pytestmark = pytest.mark.slow

DRIVER = {"hutch-driver": 1}


def ray_env() -> dict[str, str]:
    """Ray's nodes without token auth, all on this machine; drivers find hutch's `python` on PATH,
    as in the Ray image."""
    env = {
        **ONE_MACHINE_RAY_ENV,
        **os.environ,
        "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
        "RAY_AUTH_MODE": "disabled",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    env.pop("RAY_ADDRESS", None)
    return env


def nodes(address: str) -> list[dict[str, Any]]:
    """The alive nodes, as Ray's state API lists them."""
    try:
        answer = httpx.get(f"{address}/api/v0/nodes", params={"detail": "true"}, timeout=5).json()
        return [node for node in answer["data"]["result"]["result"] if node["state"] == "ALIVE"]
    except (httpx.HTTPError, ValueError, KeyError):
        return []


def submitted(client: Client, spec: dict[str, Any]) -> Any:
    """The job, once the service admits it (it keeps the cluster's resources up to 10 s)."""
    try:
        return client.submit(spec)
    except InvalidRequest as refused:
        assert refused.code == "unschedulable", refused
        return None


def test_a_jobs_driver_runs_on_the_node_that_offers_the_driver_resource(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    env = ray_env()
    gcs_port, dashboard_port = free_port(), free_port()
    address = f"http://127.0.0.1:{dashboard_port}"
    groups = [
        start_ray_head(
            env, f"--port={gcs_port}", "--num-cpus=1", "--object-store-memory=150000000",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", *own_port_options(),
        )
    ]  # fmt: skip
    settings = {
        "HUTCH_RAY_ADDRESS": address,
        "HUTCH_STORAGE_PATH": str(tmp_path_factory.mktemp("driver-storage")),
        "HUTCH_DRIVER_RESOURCES": json.dumps(DRIVER),
    }
    try:
        wait_for(lambda: nodes(address), 120, "the Ray head's state API", 0.5)
        data_dir = tmp_path_factory.mktemp("driver-service")
        with running_service(data_dir, settings) as service, Client(service.url, TOKEN) as client:
            # No node offers hutch-driver and the cluster does not autoscale: refused, saying why.
            with pytest.raises(InvalidRequest) as refused:
                client.submit(tiny("driver-nowhere"))
            assert refused.value.code == "unschedulable"
            assert "1 hutch-driver (HUTCH_DRIVER_RESOURCES)" in refused.value.message
            assert "nodes offer none" in refused.value.message

            # A worker node offering it joins (ports of its own: other Rays may run here).
            worker_ports = [o for o in own_port_options() if not o.startswith("--ray-client-server-port")]
            groups.append(
                start_ray_node(
                    env, f"127.0.0.1:{gcs_port}", "--num-cpus=1", "--object-store-memory=100000000",
                    f"--resources={json.dumps(DRIVER)}", *worker_ports,
                )
            )  # fmt: skip
            offering = wait_for(
                lambda: [n for n in nodes(address) if (n.get("resources_total") or {}).get("hutch-driver")],
                60, "the worker node with hutch-driver", 0.5,
            )  # fmt: skip
            head = next(n["node_id"] for n in nodes(address) if n["is_head_node"])
            worker = offering[0]["node_id"]
            assert worker != head

            job = wait_for(lambda: submitted(client, tiny("driver-placed")), 30, "the job to be admitted", 1)
            final = client.wait(job.id, timeout=180, poll_interval=0.5)
            assert final.state == "SUCCEEDED", final.failure_reason
            # Ray pins a driver that asks for no resources to the head: on the worker, it asked.
            info = httpx.get(f"{address}/api/jobs/{final.ray_job_id}", timeout=10).json()
            assert info["driver_node_id"] == worker, (info["driver_node_id"], worker, head)
    finally:
        for pgid in reversed(groups):
            end_process_group(pgid)
