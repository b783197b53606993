"""Helpers for tests that drive real processes: Ray heads in process groups of their own, ranks
spawned as processes, a headless browser. A free port and waiting on a condition come from
:mod:`benchmarks.harness`, which the benchmarks that start servers share."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def forget_current_cluster(gcs_port: int) -> None:
    """Remove Ray's "current cluster" record if it names this head, as `ray stop` would."""
    current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    if current.exists() and current.read_text().strip().endswith(f":{gcs_port}"):
        current.unlink()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def rendered_dom(url: str, user_data_dir: Path, budget_ms: int = 20_000) -> str:
    """The page at ``url`` as headless Chromium renders it, scripts run (what a person would see)."""
    if CHROMIUM is None:
        raise AssertionError("chromium is not installed (.ci/run installs Debian's chromium)")
    command = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={user_data_dir}", f"--virtual-time-budget={budget_ms}", "--dump-dom", url,
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout


def spawn_ranks(fn: Callable[..., None], args: tuple[Any, ...], nprocs: int) -> None:
    """Run ``fn(rank, *args)`` in ``nprocs`` processes and wait for them all, as
    ``torch.multiprocessing.spawn`` does.

    The processes are forked from a forkserver that imported torch and the trainer once, instead
    of each starting a fresh interpreter that imports them again (about 3 s of CPU per process
    on these 2 cores; the sharded tests start 25). The forkserver has run no torch op, so no
    thread pool is forked."""
    import multiprocessing

    import torch.multiprocessing

    multiprocessing.set_forkserver_preload(["torch", "torch.distributed", "trainer.backends", "trainer.data"])
    torch.multiprocessing.start_processes(fn, args=args, nprocs=nprocs, join=True, start_method="forkserver")


class GlooSession:
    """A plain ``torch.distributed`` rank for :func:`trainer.worker.run_worker`: nothing to resume
    from, reports dropped (tests/integration/test_ray_jobs.py covers Ray's session)."""

    export_metrics = False

    def __init__(self) -> None:
        import torch
        import torch.distributed as dist

        self.rank, self.world, self.device = dist.get_rank(), dist.get_world_size(), torch.device("cpu")

    @contextlib.contextmanager
    def restored(self) -> Iterator[None]:
        yield None

    def report(self, metrics: dict[str, Any], directory: Path | None) -> None:
        pass

    def wait_until_registered(self) -> None:
        pass

    def drain_notice(self) -> None:
        return None


def _run_worker_jobs(
    rank: int, world: int, port: int, jobs: list[dict[str, Any]], syspath: list[str]
) -> None:
    import torch
    import torch.distributed as dist

    sys.path[:0] = syspath  # as a job's working_dir would be
    from trainer.worker import run_worker

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        for job in jobs:
            run_worker(job, GlooSession())
            dist.barrier()
    finally:
        dist.destroy_process_group()


def run_worker_jobs(world: int, jobs: list[dict[str, Any]], syspath: list[str] | None = None) -> None:
    """Run each job (``{"spec", "run_dir", "job_id"}``, as Ray Train's config) in turn through the
    worker loop on ``world`` gloo processes, with ``syspath`` importable."""
    from benchmarks.harness import free_port

    for job in jobs:
        Path(job["run_dir"]).mkdir(parents=True, exist_ok=True)
    spawn_ranks(_run_worker_jobs, (world, free_port(), jobs, syspath or []), world)


REMOVE_PLACEMENT_GROUPS = """
import json, sys, time
from pathlib import Path
import ray
from ray.util import placement_group_table, remove_placement_group
from ray.util.placement_group import PlacementGroup
from ray._raylet import PlacementGroupID

address, trigger, min_step = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
ray.init(address=address, logging_level="ERROR", log_to_driver=False)


def due():
    if trigger.name != "metrics.jsonl":
        return trigger.exists()
    lines = trigger.read_text().splitlines() if trigger.exists() else []
    return any(json.loads(line)["step"] >= min_step for line in lines if line.strip())


while not due():
    time.sleep(0.01)
created = [pg for pg, info in placement_group_table().items() if info["state"] == "CREATED"]
for pg in created:
    remove_placement_group(PlacementGroup(PlacementGroupID.from_hex(pg)))
print(json.dumps({"removed": created}), flush=True)
"""


def remove_placement_groups_when(address: str, trigger: Path, min_step: int = 0) -> subprocess.Popen:
    """A process joined to the cluster at ``address`` that removes every live placement group as
    soon as ``trigger`` exists (or, for a ``metrics.jsonl``, holds a record at ``min_step`` or
    later): what Ray Train's placement-group cleaner does when it wrongly judges the controller
    dead. Started ahead, so the removal lands within ~10 ms of the trigger. Its stdout says what
    it removed."""
    return subprocess.Popen(
        [sys.executable, "-c", REMOVE_PLACEMENT_GROUPS, address, str(trigger), str(min_step)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "RAY_AUTH_MODE": "disabled"},
    )  # fmt: skip
