"""The local Ray head of the embedded default: started with the service, stopped with it.

``ray start --head --block`` runs in its own session, so a service killed with SIGKILL leaves
it (and the jobs on it) running; the head's pid and addresses are recorded in
``DATA_DIR/local-ray.json`` and the restarted service adopts it. A clean stop signals the
whole process group, which ends the head, its workers and its jobs.

Several Ray clusters on one machine (a user's own, a test suite's) must not see each other.
Ray resolves "no address" to the latest cluster started in a temp dir, ``/tmp/ray`` unless
told otherwise, so each head gets a temp dir of its own (:func:`ray_temp_dir`: Ray's job
supervisor gives a job's driver the latest cluster of the head's temp dir) and its processes
get ``RAY_ADDRESS`` (Ray's State API, asked without an address from inside, e.g. by Ray Train's
placement-group cleaner, reads the environment, then ``/tmp/ray``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from trainer.launch import ONE_MACHINE_RAY_ENV


@dataclass(frozen=True)
class LocalRayHead:
    pid: int
    gcs_address: str
    dashboard_url: str
    temp_dir: str | None = None  # None in records of versions before it had one
    metrics_port: int | None = None  # Prometheus endpoint of the head node (None: as temp_dir)

    def alive(self) -> bool:
        """Running, and its dashboard answers: a recorded head that can be adopted."""
        return self.running() and _dashboard_up(self.dashboard_url)

    def running(self) -> bool:
        """Whether the head's process (``ray start --block``) still runs: False once it was
        killed or crashed. Unlike :meth:`alive` it does not ask the dashboard, which a busy head
        can be slow to answer, so False means gone, never merely slow."""
        with contextlib.suppress(ChildProcessError):  # our own child: reap it, or its zombie "runs"
            os.waitpid(self.pid, os.WNOHANG)
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # someone else's process: it exists
            return True
        return True


class LocalRayError(RuntimeError):
    """The local Ray head could not be started."""


def _free_port(preferred: int | None = None) -> int:
    for port in ([preferred] if preferred else []) + [0]:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise LocalRayError("no free port")


def own_port_options(metrics_port: int | None = None) -> list[str]:
    """``ray start`` options giving a head every port of its own: Ray's fixed defaults (agent
    52365, client server 10001, …) collide with any other Ray on the machine, and a head whose
    agent cannot bind accepts no jobs. The metrics port is ``metrics_port`` if given (Prometheus
    scrapes it), else a free one too."""
    names = (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
        "ray-client-server-port", "node-manager-port", "object-manager-port",
    )  # fmt: skip
    ports = {name: _free_port() for name in names} | {"metrics-export-port": metrics_port or _free_port()}
    return [f"--{name}={port}" for name, port in ports.items()]


def _dashboard_up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/api/version", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def ray_temp_dir(data_dir: Path) -> Path:
    """The Ray temp dir of ``data_dir``'s head: short (Ray's socket paths must fit in 107 bytes)
    and the same for the same data dir."""
    digest = hashlib.sha256(str(data_dir.absolute()).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"hutch-ray-{digest}"


def ensure_local_head(
    data_dir: Path, num_cpus: int | None, dashboard_port: int, metrics_port: int, timeout: float = 120
) -> LocalRayHead:
    """Adopt the head recorded in ``data_dir`` if it still runs, else start a new one (on the
    dashboard and metrics ports asked for, or free ones where they are taken)."""
    record = data_dir / "local-ray.json"
    if record.exists():
        head = LocalRayHead(**json.loads(record.read_text()))
        if head.alive():
            return head
    gcs_port, port, metrics = _free_port(), _free_port(dashboard_port), _free_port(metrics_port)
    cpus = num_cpus or os.cpu_count() or 1
    temp_dir = ray_temp_dir(data_dir)
    ray = Path(sys.executable).with_name("ray")
    env = {
        **ONE_MACHINE_RAY_ENV,
        **os.environ,
        "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
        # Loopback-only head of one user: Ray's token authentication is off, hutch's is on.
        "RAY_AUTH_MODE": "disabled",
        # The cluster's own address for its processes: Ray's State API, asked without one inside
        # the cluster (Ray Train's placement-group cleaner does), would otherwise find "the
        # latest Ray" on the machine, where our controllers do not exist, take them for dead and
        # remove their placement groups.
        "RAY_ADDRESS": f"127.0.0.1:{gcs_port}",
    }
    log = (data_dir / "local-ray.log").open("ab")
    process = subprocess.Popen(
        [str(ray) if ray.exists() else "ray", "start", "--head", "--block", f"--port={gcs_port}",
         f"--num-cpus={cpus}", "--object-store-memory=300000000", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={port}", f"--temp-dir={temp_dir}", *own_port_options(metrics),
         "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    head = LocalRayHead(
        process.pid, f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{port}", str(temp_dir), metrics
    )
    deadline = time.monotonic() + timeout
    while not _dashboard_up(head.dashboard_url):
        if process.poll() is not None:
            raise LocalRayError(
                f"`ray start` exited with {process.returncode}; see {data_dir / 'local-ray.log'}"
            )
        if time.monotonic() > deadline:
            stop_local_head(head)
            raise LocalRayError(f"the local Ray head did not come up in {timeout:.0f}s")
        time.sleep(0.5)
    _wait_for_job_agent(head.dashboard_url, deadline)
    record.write_text(json.dumps(asdict(head)))
    return head


def _wait_for_job_agent(url: str, deadline: float) -> None:
    """Job submission needs the head node registered and its agent up, a little after the dashboard."""
    while time.monotonic() < deadline:
        try:
            nodes = httpx.get(f"{url}/api/v0/nodes", timeout=5).json()["data"]["result"]["total"]
            if nodes and httpx.get(f"{url}/api/jobs/", timeout=5).status_code == 200:
                return
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        time.sleep(0.5)


def stop_local_head(head: LocalRayHead, data_dir: Path | None = None, grace: float = 5) -> None:
    """End the head's process group (its workers and jobs with it) and forget it.

    SIGTERM first; `ray start --block`, the GCS and the raylet do not all exit on it, so
    whatever is left after ``grace`` seconds is killed."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(head.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and _group_alive(head.pid):
            time.sleep(0.2)
        if not _group_alive(head.pid):
            break
    if data_dir is not None:
        (data_dir / "local-ray.json").unlink(missing_ok=True)


def _group_alive(pgid: int) -> bool:
    with contextlib.suppress(ChildProcessError):  # reap our child, else its zombie keeps the group
        os.waitpid(pgid, os.WNOHANG)
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
