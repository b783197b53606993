"""Elastic jobs on a Ray cluster of several nodes: a worker node lost mid-run, a node joining.

The cluster is what a KubeRay cluster looks like to hutch: a head that runs no training (0 CPUs)
and worker nodes of one CPU each, every one a separate `ray start` in a session and temp
directory of its own, all sharing the storage path. A node is lost by SIGKILLing its whole
session (raylet, object store, workers) at once, as when a machine goes away; before that, Ray
is told it will go (``ray drain-node``, as an autoscaler does before a spot reclaim).

A job with ``num_workers: {min: 1, max: 2}`` grows onto a node that joins, then goes on with one
worker when that node is lost, each time resuming from its latest checkpoint at the new world size;
its final parameters equal those of a fixed 2-worker run (the same spec through the worker loop
on gloo processes, no Ray): the global batch is the spec's at every size, and ``chunk_size``
makes the sums the same.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from benchmarks.harness import wait_for
from benchmarks.ray_nodes import NodesCluster
from tests.support import run_worker_jobs
from trainer.rundir import records_after
from trainer.spec import validate_spec

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

STEPS = 1600


@pytest.fixture(scope="module")
def cluster() -> Iterator[NodesCluster]:
    running = NodesCluster()
    try:
        running.add_node("a")
        yield running
    finally:
        running.close()


def elastic_spec(name: str) -> dict[str, Any]:
    """Digits on {min: 1, max: 2} workers; a checkpoint every 20 steps; resizes looked for every 2 s."""
    return validate_spec({
        "name": name,
        "model": {"name": "cnn"},
        "data": {"name": "digits"},
        "optimizer": {"name": "adahessian", "hessian_update_freq": 2},
        "training": {"steps": STEPS, "global_batch_size": 32, "chunk_size": 16, "seed": 0,
                     "eval_every": STEPS, "checkpoint_every": 20, "log_every": 5},
        "scaling": {"num_workers": {"min": 1, "max": 2, "resize_interval_s": 2}},
        "max_failures": 2,
    }).model_dump(mode="json")  # fmt: skip


@pytest.fixture(scope="module")
def fixed_two_workers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, float]:
    """The parameter checksum of the spec on a fixed group of 2 (gloo processes, no Ray)."""
    spec = elastic_spec("fixed")
    spec["scaling"]["num_workers"] = 2
    run_dir = tmp_path_factory.mktemp("fixed")
    run_worker_jobs(2, [{"spec": spec, "run_dir": str(run_dir), "job_id": "fixed"}])
    return json.loads((run_dir / "result.json").read_text())["param_checksum"]


def start_job(cluster: NodesCluster, spec: dict[str, Any], run_dir: Path) -> subprocess.Popen:
    run_dir.mkdir(parents=True)
    (run_dir / "spec.yaml").write_text(yaml.safe_dump(spec))
    storage = run_dir.parent / "storage"  # every node's storage: this machine's
    # After a node dies at once, Ray Train first asks for the group size it had and waits for it
    # (60 s by default, what benchmarks/fault_recovery.py measures); the test waits 15 s.
    env = {**cluster.env, "HUTCH_STORAGE_PATH": str(storage), "RAY_ADDRESS": cluster.address,
           "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "15"}  # fmt: skip
    log = (run_dir / "driver.log").open("w")
    return subprocess.Popen(
        [sys.executable, "-m", "trainer", str(run_dir / "spec.yaml"), "--run-dir", str(run_dir),
         "--job-id", spec["name"]],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip


def training_on(job: subprocess.Popen, run_dir: Path, workers: int, after_step: int = 0) -> int | None:
    """The first logged step past ``after_step`` trained by ``workers`` workers, or None."""
    assert job.poll() is None, (run_dir / "driver.log").read_text()[-4000:]
    records = records_after(run_dir / "metrics.jsonl", None)
    steps = [r["step"] for r in records if r["workers"] == workers and r["step"] > after_step]
    return min(steps) if steps else None


def finished_like_the_fixed_run(job: subprocess.Popen, run_dir: Path, expected: dict[str, float]) -> None:
    code = job.wait(timeout=600)
    log = (run_dir / "driver.log").read_text()
    assert code == 0, log[-4000:]
    steps = [r["step"] for r in records_after(run_dir / "metrics.jsonl", None)]
    assert steps == sorted(set(steps)) and steps[-1] == STEPS  # each step recorded once
    result = json.loads((run_dir / "result.json").read_text())
    for key in ("sum", "l2"):
        assert result["param_checksum"][key] == pytest.approx(expected[key], rel=1e-5)


def test_an_elastic_job_grows_onto_a_joining_node_and_goes_on_when_it_is_lost(
    cluster: NodesCluster, fixed_two_workers, tmp_path
) -> None:
    run_dir = tmp_path / "elastic"
    job = start_job(cluster, elastic_spec("elastic"), run_dir)
    one = wait_for(lambda: training_on(job, run_dir, 1), 240, "training on the one node", 0.2)
    cluster.add_node("b")
    two = wait_for(lambda: training_on(job, run_dir, 2, one), 240, "training on two nodes", 0.2)
    # As a spot reclaim goes: Ray is told the node will go (the group checkpoints at its next
    # logging step and trains on), then the node is gone.
    cluster.drain_node("b", deadline_s=60)
    log = run_dir / "driver.log"
    drained = wait_for(
        lambda: re.search(r"Ray is draining the node of rank [01], to be stopped in \d+ s: saving a "
                          r"checkpoint at step (\d+), then training on", log.read_text()),
        60, "the drain notice in the log", 0.2,
    )  # fmt: skip
    step = int(drained.group(1))
    wait_for(lambda: training_on(job, run_dir, 2, step), 60, "training on past the drain checkpoint", 0.1)
    cluster.lose_node("b")
    alone = wait_for(lambda: training_on(job, run_dir, 1, step), 240, "training on the node left", 0.2)
    assert one < two < step < alone <= STEPS, (one, two, step, alone)
    resumed = [int(s) for s in re.findall(r"resumed from the checkpoint at step (\d+)", log.read_text())]
    assert len(resumed) >= 2 and resumed[0] < step <= resumed[-1], resumed  # grown, then shrunk
    finished_like_the_fixed_run(job, run_dir, fixed_two_workers)
