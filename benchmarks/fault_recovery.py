"""Recovery from what GPU clusters do to jobs: seconds from the fault to the next training step,
and steps trained twice.

Run from the repository root::

    .venv/bin/python benchmarks/fault_recovery.py            # full run, ~6 minutes on 2 cores
    .venv/bin/python benchmarks/fault_recovery.py --quick    # the same faults, shorter jobs

Each fault is made for real on a digits job (AdaHessian, a periodic checkpoint every 100 steps, a
record every step) once it has trained past step 130, and nobody intervenes:

1. **Head lost** — the service on its embedded default (its own local Ray head); every process
   of the head (its ``ray start`` session: GCS, raylet, dashboard, workers) SIGKILLed at once.
   The service starts a new head and retries the job (attempt 2, after the spec's
   ``retry.backoff_s``) from its last checkpoint.
2. **Worker SIGTERM** — the same service, 2 workers; rank 1 gets the SIGTERM Kubernetes sends a
   drained pod. The group checkpoints the next step and stops; the service's retry resumes there.
3. **Worker SIGKILL** — the same, without notice: the retry resumes from the periodic checkpoint.
4. **Node lost** — a cluster of a head and two 1-CPU worker nodes (separate ``ray start``
   sessions); an elastic ``{min: 1, max: 2}`` job; every process of one node SIGKILLed at once. Ray
   Train restarts the group on the node left (``max_failures``), from its latest checkpoint.

Measured from the job's ``metrics.jsonl`` (one record per step, each with its wall time) and its
log: *to next step* = the first record after the fault of a step the new group trained, minus the
time of the fault; *steps redone* = the last step recorded before the fault minus the step
resumed from. The service's retries run with ``backoff_s`` 10 (its default), which is part of
the figure; the rest is Ray starting a head or a worker group, and the job's start-up.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from api.client import Client
from benchmarks.harness import (
    apply_mode,
    console,
    figure,
    finish,
    free_port,
    log,
    machine_info,
    markdown_table,
    parser,
    settings,
    table,
    wait_for,
)
from benchmarks.ray_nodes import NodesCluster, kill_session
from benchmarks.service_latency import TOKEN, Service
from trainer.rundir import records_after

ROOT = Path(__file__).resolve().parents[1]
FAULT_AFTER = 130
"""The fault is made once a record past this step exists (the first periodic checkpoint is 100)."""


def records(run_dir: Path) -> list[dict[str, Any]]:
    return records_after(run_dir / "metrics.jsonl", None)


def last_step(run_dir: Path) -> int:
    return max([0, *(r["step"] for r in records(run_dir))])


def spec(name: str, steps: int, workers: Any, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "model": {"name": "cnn"},
        "data": {"name": "digits"},
        "optimizer": {"name": "adahessian", "hessian_update_freq": 2},
        "training": {"steps": steps, "global_batch_size": 32, "chunk_size": 16, "seed": 0,
                     "eval_every": steps, "checkpoint_every": 100, "log_every": 1},
        "scaling": {"num_workers": workers},
        **extra,
    }  # fmt: skip


def measure(run_dir: Path, fault: Callable[[], None], resumed: Callable[[], int | None]) -> dict[str, Any]:
    """Make ``fault`` once the run is past :data:`FAULT_AFTER`; wait for the step resumed from
    (``resumed``) and the first record of a step trained after it."""
    wait_for(lambda: last_step(run_dir) > FAULT_AFTER, 300, f"a record past step {FAULT_AFTER}", 0.05)
    before = last_step(run_dir)
    at = time.time()
    fault()
    start = wait_for(resumed, 600, "the step resumed from", 0.2)

    def next_step() -> dict[str, Any] | None:
        after = [r for r in records(run_dir) if r["step"] == start + 1 and r["time"] > at]
        return after[0] if after else None

    first = wait_for(next_step, 300, "the first step after the fault", 0.1)
    return {"to_next_step_s": first["time"] - at, "steps_redone": max(0, before - start),
            "fault_at_step": before, "resumed_from": start}  # fmt: skip


def resumed_in(log_text: Callable[[], str]) -> Callable[[], int | None]:
    """The step of the last "resumed from the checkpoint at step N" line of a log, or None."""

    def step() -> int | None:
        found = re.findall(r"resumed from the checkpoint at step (\d+)", log_text())
        return int(found[-1]) if found else None

    return step


@contextmanager
def embedded_service(data_dir: Path) -> Iterator[tuple[Service, Client]]:
    env = {"HUTCH_LOCAL_RAY_NUM_CPUS": "2", "HUTCH_LOCAL_RAY_DASHBOARD_PORT": str(free_port())}
    data_dir.mkdir(parents=True)
    service = Service(data_dir, env)
    try:
        service.wait_up("/readyz", {200}, 240)
        with Client(service.url, TOKEN) as client:
            yield service, client
    finally:
        service.stop()


def service_fault(
    service: Service, client: Client, name: str, workers: int, steps: int, fault: Callable[[Path], None]
) -> dict[str, Any]:
    job = client.submit(spec(name, steps, workers))
    run_dir = service.data_dir / "storage" / "runs" / job.id

    def attempt_two_log() -> str:
        if client.get(job.id).attempt < 2:
            return ""
        return "\n".join(client.logs(job.id, attempt=2))

    result = measure(run_dir, lambda: fault(run_dir), resumed_in(attempt_two_log))
    final = client.wait(job.id, timeout=600, poll_interval=1)
    result["ended"] = f"{final.state.value}, attempt {final.attempt}"
    return result


def sigterm_rank_1(run_dir: Path) -> None:
    os.kill(int((run_dir / "workers" / "rank-1.pid").read_text()), signal.SIGTERM)


def sigkill_rank_1(run_dir: Path) -> None:
    os.kill(int((run_dir / "workers" / "rank-1.pid").read_text()), signal.SIGKILL)


def node_lost(steps: int, tmp: Path) -> dict[str, Any]:
    cluster = NodesCluster()
    try:
        cluster.add_node("a")
        cluster.add_node("b")
        run_dir = tmp / "node-lost"
        run_dir.mkdir()
        job_spec = spec("node-lost", steps, {"min": 1, "max": 2}, max_failures=2)
        (run_dir / "spec.json").write_text(json.dumps(job_spec))
        env = {**cluster.env, "HUTCH_STORAGE_PATH": str(tmp / "storage"), "RAY_ADDRESS": cluster.address}
        driver_log = run_dir / "driver.log"
        with driver_log.open("w") as out:
            driver = subprocess.Popen(
                [sys.executable, "-m", "trainer", str(run_dir / "spec.json"), "--run-dir", str(run_dir),
                 "--job-id", "node-lost"],
                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
            wait_for(lambda: any(r["workers"] == 2 for r in records(run_dir)), 300, "two workers", 0.2)
            result = measure(run_dir, lambda: cluster.lose_node("b"), resumed_in(driver_log.read_text))
            code = driver.wait(timeout=600)
        result["ended"] = f"exit {code}, {records(run_dir)[-1]['workers']} worker(s)"
        return result
    finally:
        cluster.close()


FAULTS = {
    "head lost": "service (local head), 1 worker: new head, retry after 10 s",
    "worker SIGTERM": "service, 2 workers: checkpoint at the next step, retry after 10 s",
    "worker SIGKILL": "service, 2 workers: retry after 10 s from the periodic checkpoint",
    "node lost": "2 worker nodes, elastic {1, 2}: Ray Train restarts on 1",
}


def run(args: Any) -> dict[str, Any]:
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="hutch-fault-recovery-") as tmp:
        with embedded_service(Path(tmp) / "service") as (service, client):

            def kill_head(_: Path) -> None:
                head = json.loads((service.data_dir / "local-ray.json").read_text())
                kill_session(head["pid"])  # every process of the head at once

            for name, workers, fault in (
                ("worker SIGTERM", 2, sigterm_rank_1),
                ("worker SIGKILL", 2, sigkill_rank_1),
                ("head lost", 1, kill_head),  # last: the service's head is new after it
            ):
                log(f"{name}: {FAULTS[name]}")
                job_name = name.replace(" ", "-").lower()
                results[name] = service_fault(service, client, job_name, workers, args.steps, fault)
                log(f"  {results[name]}")
        log(f"node lost: {FAULTS['node lost']}")
        results["node lost"] = node_lost(args.steps, Path(tmp))
        log(f"  {results['node lost']}")
    return {"machine": machine_info(), "settings": settings(args), "faults": results, "how": FAULTS}


def rows(report: dict[str, Any]) -> list[list[Any]]:
    return [
        [name, report["how"][name], f"{r['to_next_step_s']:.1f}", r["steps_redone"],
         f"{r['fault_at_step']} → {r['resumed_from']}", r["ended"]]
        for name, r in report["faults"].items()
    ]  # fmt: skip


COLUMNS = ["fault", "recovery", "to next step (s)", "steps redone", "fault at → resumed from", "ended"]


def print_report(report: dict[str, Any]) -> None:
    console().print(
        table("Fault recovery (digits job, no person involved)", COLUMNS, rows(report), COLUMNS[:2])
    )
    print(markdown_table(COLUMNS, rows(report)))


def save_plot(report: dict[str, Any], path: Path) -> None:
    names = list(report["faults"])
    with figure(path, 1, 2, size=(5.5, 3.5), title="Fault recovery, no person involved") as axes:
        seconds = [report["faults"][n]["to_next_step_s"] for n in names]
        redone = [report["faults"][n]["steps_redone"] for n in names]
        axes[0][0].barh(names, seconds, color="tab:blue")
        axes[0][0].set_xlabel("seconds from the fault to the next step")
        axes[0][1].barh(names, redone, color="tab:orange")
        axes[0][1].set_xlabel("steps trained twice")


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--steps", type=int, default=None, help="steps of each job")
    args = apply_mode(p.parse_args(), full={"steps": 600}, quick={"steps": 300})
    started = time.perf_counter()
    finish(args.out, "fault_recovery", run(args), started, save_plot, print_report)


if __name__ == "__main__":
    main()
