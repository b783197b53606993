"""Ray nodes as real processes on this machine, each `ray start` in a session of its own.

The session is one node alone, so ending it stops that node without `ray stop`, which would end
every Ray instance on the machine; SIGKILLing all of it at once is a node lost, as when a machine
goes away (:func:`kill_session`). :class:`NodesCluster` is what a KubeRay cluster looks like to hutch: a head
that trains nothing and worker nodes that join it. Tests and benchmarks share these.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def end_process_group(pgid: int, grace: float = 3) -> None:
    """SIGTERM the process group, then SIGKILL whatever is left after ``grace`` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


def start_ray_head(
    env: dict[str, str], *options: str, timeout: float = 120, temp_dir: Path | None = None
) -> int:
    """`ray start --head` in a session of its own; returns its process group id.

    The group is this cluster alone, so :func:`end_process_group` ends it without `ray stop`,
    which would end every Ray instance on the machine. Its Ray temp dir is a new one unless
    ``temp_dir`` is given: in the shared ``/tmp/ray`` a head becomes "the latest cluster" that
    every job supervisor on the machine hands its drivers (what the service's own heads avoid)."""
    temp_dir = temp_dir or Path(tempfile.mkdtemp(prefix="hutch-test-ray-"))
    return _ray_start(env, ["--head", f"--temp-dir={temp_dir}", *options], timeout)


def start_ray_node(
    env: dict[str, str], address: str, *options: str, timeout: float = 120, temp_dir: Path | None = None
) -> int:
    """`ray start --address` (a worker node joining the head at ``address``) in a session of its
    own, with a temp dir of its own; returns its process group id: SIGKILL that group and the
    node is lost, as when a machine goes away."""
    temp_dir = temp_dir or Path(tempfile.mkdtemp(prefix="hutch-test-ray-node-"))
    return _ray_start(env, [f"--address={address}", f"--temp-dir={temp_dir}", *options], timeout)


def _ray_start(env: dict[str, str], options: list[str], timeout: float) -> int:
    """Run `ray start` (which returns once its processes run) in a new session; its process group."""
    ray = Path(sys.executable).with_name("ray")
    starter = subprocess.Popen(
        [str(ray), "start", *options, "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    _, errors = starter.communicate(timeout=timeout)
    if starter.returncode != 0:
        end_process_group(starter.pid)
        raise AssertionError(f"ray start failed:\n{errors.decode()[-2000:]}")
    return starter.pid


def kill_session(sid: int) -> list[int]:
    """SIGKILL every process of session ``sid`` at once (a `ray start` and all it started: Ray's
    workers lead process groups of their own, but stay in the node's session), as when the
    machine goes away; their pids."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if os.getsid(int(entry.name)) == sid:
                    members.append(int(entry.name))
    for pid in members:
        with contextlib.suppress(ProcessLookupError):  # ended meanwhile
            os.kill(pid, signal.SIGKILL)
    return members


class NodesCluster:
    """A head of 0 CPUs and worker nodes of ``cpus_per_node`` CPUs, each ended by its own group.

    The GCS declares a silent node dead after 3 missed checks 1 s apart (Ray's default: 5 x 3 s),
    Ray Train's controller polls its workers every 0.5 s (as on one machine) and its preemption
    watcher looks for drains every 1 s (default 5 s): a lost or drained node is noticed in
    seconds. Drivers joining it take :attr:`env` and :attr:`address`."""

    def __init__(self, cpus_per_node: int = 1) -> None:
        from benchmarks.harness import free_port

        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.cpus_per_node = cpus_per_node
        self.env = {
            **os.environ, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0", "RAY_AUTH_MODE": "disabled",
            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "1",
            "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",
        }  # fmt: skip
        self.head = start_ray_head(
            self.env, f"--port={self.port}", "--num-cpus=0", "--object-store-memory=100000000",
            "--include-dashboard=false",
        )  # fmt: skip
        self.nodes: dict[str, int] = {}
        self.temp_dirs: dict[str, Path] = {}

    def add_node(self, name: str) -> None:
        self.temp_dirs[name] = Path(tempfile.mkdtemp(prefix="hutch-test-ray-node-"))
        self.nodes[name] = start_ray_node(
            self.env, self.address, f"--num-cpus={self.cpus_per_node}", "--object-store-memory=80000000",
            temp_dir=self.temp_dirs[name],
        )  # fmt: skip

    def node_id(self, name: str) -> str:
        """Ray's id of the node (found by its object store, which lies in the node's temp dir)."""
        find = (
            "import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR', log_to_driver=False); "
            "print(next(n['NodeID'] for n in ray.nodes() if n['Alive'] "
            "and n['ObjectStoreSocketName'].startswith(sys.argv[2])))"
        )
        found = subprocess.run(
            [sys.executable, "-c", find, self.address, str(self.temp_dirs[name])],
            env=self.env, capture_output=True, text=True, timeout=120, check=True,
        )  # fmt: skip
        return found.stdout.strip().splitlines()[-1]

    def drain_node(self, name: str, deadline_s: int) -> None:
        """Tell Ray the node will be preempted in ``deadline_s`` seconds (``ray drain-node``, what
        an autoscaler does before it takes a node away)."""
        ray = Path(sys.executable).with_name("ray")
        subprocess.run(
            [str(ray), "drain-node", f"--address={self.address}", f"--node-id={self.node_id(name)}",
             "--reason=DRAIN_NODE_REASON_PREEMPTION", "--reason-message=spot reclaim (test)",
             f"--deadline-remaining-seconds={deadline_s}"],
            env=self.env, capture_output=True, text=True, timeout=120, check=True,
        )  # fmt: skip

    def lose_node(self, name: str) -> None:
        """SIGKILL the node's processes at once: raylet, object store and its workers."""
        kill_session(self.nodes.pop(name))

    def close(self) -> None:
        for pgid in [*self.nodes.values(), self.head]:
            end_process_group(pgid)
        self.nodes.clear()
