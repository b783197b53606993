"""The service under load: a burst of jobs through a real `hutch serve` and its local Ray head
(2 CPUs) while a busy loop holds one of the machine's two cores.

Five 2-worker jobs are submitted at once; one is cancelled while queued, four run. The cluster
fits one at a time, so hutch keeps the rest QUEUED (visible with their queue positions,
cancellable) and hands Ray one job at a time: never more than one job started and one trainer
driver process alive. A job submitted last with a higher priority starts next, the cancelled job
never reaches Ray, and the four others end SUCCEEDED with all their metric records, each state
entered once.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import psutil
import pytest

from api.client import Client
from tests.e2e.conftest import TOKEN, ServiceProcess, local_ray_env, running_service
from tests.e2e.test_api_contract import spec_with

pytestmark = pytest.mark.slow

JOBS, STEPS, LOG_EVERY = 5, 24, 4  # one is cancelled while queued: four run


@pytest.fixture(scope="module")
def busy_core() -> Iterator[None]:
    """A busy loop on one core for the whole module (what other work on the machine does)."""
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        hog.kill()
        hog.wait(10)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, busy_core: None) -> Iterator[ServiceProcess]:
    with running_service(tmp_path_factory.mktemp("load"), local_ray_env()) as service:
        yield service


def soak_spec(index: int, priority: int = 0) -> dict:
    return spec_with(
        name=f"soak-{index}",
        labels={"suite": "soak"},
        priority=priority,
        **{"training.steps": STEPS, "training.log_every": LOG_EVERY, "training.eval_every": STEPS,
           "training.checkpoint_every": STEPS, "training.global_batch_size": 32,
           "optimizer.warmup_steps": 2, "scaling.num_workers": 2},
    )  # fmt: skip


def trainer_drivers(service: ServiceProcess) -> int:
    """`python -m trainer` processes of this service's jobs (their run directories are its own)."""
    marker = str(service.data_dir)
    count = 0
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if "trainer" in cmdline and "-m" in cmdline and any(marker in word for word in cmdline):
            count += 1
    return count


@pytest.mark.timeout(1500)  # four jobs one after another, each ~25 s here with a core taken
def test_a_burst_of_jobs_waits_in_hutchs_queue_and_every_one_succeeds(service: ServiceProcess) -> None:
    began = time.monotonic()
    with Client(service.url, TOKEN, timeout=60) as client:
        jobs = [client.submit(soak_spec(i)) for i in range(JOBS - 1)]
        urgent = client.submit(soak_spec(JOBS - 1, priority=5))
        dropped = jobs.pop(-1)  # cancelled while queued: never handed to Ray
        assert client.cancel(dropped.id).state == "CANCELLED"
        jobs.append(urgent)

        queued = [client.get(job.id) for job in jobs]
        positions = sorted(job.queue_position for job in queued if job.state == "QUEUED")
        assert positions == list(range(1, len(positions) + 1)), positions  # a queue, no gaps
        assert len(positions) >= len(jobs) - 1  # at most one started so far
        assert min(job.queue_position or 0 for job in queued if job.id == urgent.id) <= 2

        most_started = most_drivers = 0
        deadline = time.monotonic() + 1400
        while True:
            page = client.list(labels={"suite": "soak"}, limit=50).jobs
            started = [job for job in page if job.state in ("STARTING", "RUNNING")]
            most_started = max(most_started, len(started))
            most_drivers = max(most_drivers, trainer_drivers(service))
            for job in page:
                assert job.state != "FAILED", f"{job.id} failed: {job.failure_reason}"
                assert (job.queue_position is not None) == (job.state == "QUEUED")
            if all(job.state in ("SUCCEEDED", "CANCELLED") for job in page):
                break
            assert time.monotonic() < deadline, [(job.id, job.state) for job in page]
            time.sleep(0.5)
        elapsed = time.monotonic() - began

        assert most_started == 1, "hutch handed Ray more jobs than the cluster fits"
        assert most_drivers == 1, f"{most_drivers} trainer drivers ran at once"
        assert client.get(dropped.id).ray_job_id is None
        starts = {}
        for job in jobs:
            final = client.get(job.id)
            assert final.state == "SUCCEEDED", (final.id, final.failure_reason)
            steps = [r["step"] for r in client.metrics(job.id).records]
            assert steps == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY)), (job.id, steps)
            assert "eval_accuracy" in (final.latest_metrics or {})
            events = client.events(job.id)
            assert [e.state for e in events] == ["QUEUED", "STARTING", "RUNNING", "SUCCEEDED"]
            starts[job.id] = events[1].at
        order = sorted(starts, key=starts.__getitem__)
        assert order.index(urgent.id) <= 1, order  # behind at most the job that had already started
        rest = [job_id for job_id in order if job_id != urgent.id]
        assert rest == [job.id for job in jobs if job.id != urgent.id]  # then oldest first
    print(f"{len(jobs)} jobs in {elapsed:.0f}s under a busy core")
