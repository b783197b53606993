"""Faults, for real: processes killed, the database stopped, the storage made read-only or full.

One real `hutch serve` (uvicorn) on a Postgres server of its own (pgserver, so it can be stopped
and started), its storage on a small tmpfs (as root; else the storage tests skip), and its own
local Ray head. Nothing is mocked: the job's driver and the Ray head are SIGKILLed, Postgres is
stopped with `pg_ctl` and started again on the same data directory, the storage is bind-mounted
read-only over itself or filled up to its last byte.

The tests share the service (a start costs ~15 s of these 2 cores) and run in file order; each
one puts back what it broke. The Ray head is killed last.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
import pytest

from api.client import Client
from benchmarks.harness import wait_for
from benchmarks.ray_nodes import kill_session
from tests.e2e.conftest import HUTCH, TOKEN, ServiceProcess, local_ray_env, running_service
from tests.e2e.test_api_contract import assert_error, spec_with
from tests.e2e.test_service_ray import ray_jobs, submit_with_working_dir
from tests.support import run_worker_jobs
from trainer.notice import train_worker_pids
from trainer.rundir import records_after

pytestmark = pytest.mark.slow

FINISHED = ("SUCCEEDED", "FAILED", "CANCELLED")


class Postgres:
    """A pgserver Postgres of this module alone, so stopping it disturbs no other test."""

    def __init__(self) -> None:
        pgserver = pytest.importorskip("pgserver")
        self.server = pgserver.get_server(tempfile.mkdtemp(prefix="hutch-pg-faults-"), cleanup_mode="delete")
        self.url = self.server.get_uri().replace("postgresql://", "postgresql+psycopg://")
        self._socket_dir = self.server.get_postmaster_info().socket_dir

    def _pg_ctl(self, *args: str) -> None:
        from pgserver._commands import pg_ctl

        pg_ctl(["-w", *args], pgdata=self.server.pgdata, user=self.server.system_user, timeout=60)

    def stop(self) -> None:
        """`pg_ctl stop -m fast`: connections are cut, the server process exits."""
        self._pg_ctl("-m", "fast", "stop")

    def start(self) -> None:
        """Start it again on the same data directory and socket (pgserver's own start command)."""
        self._pg_ctl("-o", '-h ""', "-o", f"-k {self._socket_dir}", "-l", str(self.server.log), "start")

    def running(self) -> bool:
        return (self.server.pgdata / "postmaster.pid").exists()

    def close(self) -> None:
        if self.running():  # pgserver only knows the first server process, not a restarted one
            with contextlib.suppress(subprocess.CalledProcessError):
                self.stop()
        self.server.cleanup()


class Storage:
    """The service's storage path: a 64 MiB tmpfs when this runs as root (else a plain folder)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.mounted = os.geteuid() == 0 and _mount(
            "-t", "tmpfs", "-o", "size=64m", "hutch-faults", str(path)
        )

    def require_mount(self) -> None:
        if not self.mounted:
            pytest.skip("needs root to mount a tmpfs and read-only binds (here: not root, or mount refused)")

    @contextlib.contextmanager
    def read_only(self, *folders: Path) -> Iterator[None]:
        """``folders`` (default: the whole storage) bind-mounted read-only over themselves: every
        new open for writing there fails with EROFS; files open already stay writable, as when a
        volume is remounted read-only under running processes."""
        self.require_mount()
        bound: list[Path] = []
        try:
            for folder in folders or (self.path,):
                assert _mount("--bind", str(folder), str(folder))
                bound.append(folder)
                assert _mount("-o", "remount,bind,ro", str(folder))
            yield
        finally:
            for folder in reversed(bound):
                subprocess.run(["umount", "-l", str(folder)], check=True)

    @contextlib.contextmanager
    def full(self) -> Iterator[None]:
        """A file fills the tmpfs to its last byte: every write that needs space fails with ENOSPC."""
        self.require_mount()
        filler = self.path / "filler"
        try:
            with filler.open("wb", buffering=0) as out:  # unbuffered: nothing left to flush at close
                chunk = bytes(1 << 20)
                while chunk:
                    try:
                        out.write(chunk)
                    except OSError as error:
                        assert error.errno == errno.ENOSPC, error
                        chunk = chunk[: len(chunk) // 2]
            yield
        finally:
            filler.unlink(missing_ok=True)

    def close(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.path)], check=True)


def _mount(*args: str) -> bool:
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    server = Postgres()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Storage]:
    place = Storage(tmp_path_factory.mktemp("storage"))
    try:
        yield place
    finally:
        place.close()


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory, postgres: Postgres, storage: Storage
) -> Iterator[ServiceProcess]:
    env = {**local_ray_env(), "HUTCH_DATABASE_URL": postgres.url, "HUTCH_STORAGE_PATH": str(storage.path)}
    with running_service(tmp_path_factory.mktemp("faults"), env) as service:
        yield service


def long_job(name: str, **changes: Any) -> dict[str, Any]:
    """A one-worker digits job far longer than any test waits, checkpointing every 20 steps."""
    return spec_with(
        name=name,
        **{"training.steps": 100_000, "training.checkpoint_every": 20, "training.eval_every": 100_000,
           "training.log_every": 5, "scaling.num_workers": 1, "training.global_batch_size": 32, **changes},
    )  # fmt: skip


def checkpointed(client: Client, job_id: str) -> int:
    """Wait until the job runs and has a registered checkpoint; its latest step."""
    steps = wait_for(
        lambda: [c.step for c in client.checkpoints(job_id).checkpoints], 240, "a first checkpoint", 0.5
    )
    wait_for(lambda: client.get(job_id).state == "RUNNING", 30, "the job to be RUNNING", 0.2)
    return max(steps)


def drivers(job_id: str) -> list[psutil.Process]:
    """The job's `python -m trainer` processes (the Ray job's entrypoint)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        words = process.info["cmdline"] or []
        if "trainer" in words and "--job-id" in words and job_id in words:
            found.append(process)
    return found


def training_processes(storage: Storage, job_id: str) -> list[int]:
    """Pids of the job's driver and of its Ray Train workers (each writes a pid file) still running."""
    pids = [p.pid for p in drivers(job_id)]
    for pid_file in (storage.path / "runs" / job_id / "workers").glob("rank-*.pid"):
        with contextlib.suppress(psutil.NoSuchProcess, ValueError):
            if psutil.Process(int(pid_file.read_text())).status() != psutil.STATUS_ZOMBIE:
                pids.append(int(pid_file.read_text()))
    return pids


def assert_stays(condition: Any, seconds: float, what: str) -> None:
    """A negative check: ``condition`` holds at every look for ``seconds`` (several reconciler ticks)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert condition(), what
        time.sleep(0.25)


def job_log(client: Client, job_id: str) -> str:
    """The end of the job's log, for a failure message (the storage goes with the tmpfs)."""
    return "\n".join(client.logs(job_id, tail=40))


def events(client: Client, job_id: str) -> list[tuple[int, str]]:
    return [(e.attempt, str(e.state)) for e in client.events(job_id)]


def finish(client: Client, job_id: str) -> None:
    """Cancel a job the test no longer needs and wait for it to end."""
    if client.get(job_id).state not in FINISHED:
        client.cancel(job_id)
    assert client.wait(job_id, timeout=120, poll_interval=0.5).state in FINISHED


def retries_counted(service: ServiceProcess) -> float:
    """``hutch_job_retries_total`` on the service's /metrics."""
    metrics = service.client().get("/metrics").text
    found = re.search(r"^hutch_job_retries_total (\S+)$", metrics, re.MULTILINE)
    assert found, metrics[-2000:]
    return float(found.group(1))


NO_RETRY = {"max_attempts": 1}
"""Automatic retries off: the failure itself is what these tests look at."""


def test_a_killed_driver_fails_the_job_once_with_its_reason_and_keeps_its_checkpoints(
    service: ServiceProcess, client: Client, storage: Storage
) -> None:
    job = client.submit(long_job("fault-driver", retry=NO_RETRY))
    checkpointed(client, job.id)
    [driver] = drivers(job.id)
    driver.send_signal(signal.SIGKILL)

    final = client.wait(job.id, timeout=120, poll_interval=0.5)
    assert final.state == "FAILED"
    saved = [c.step for c in client.checkpoints(job.id).checkpoints]
    assert saved, "the checkpoints of the killed run are gone"
    reason = final.failure_reason or ""
    assert "driver (python -m trainer) was killed by SIGKILL" in reason, reason
    assert f"retry it to resume from its last checkpoint at step {max(saved)}" in reason, reason
    assert len(reason) < 300, f"Ray's log dump instead of a reason: {reason!r}"
    # Retries off: the job stays FAILED in its first attempt, and Ray ran it once.
    assert_stays(
        lambda: (client.get(job.id).state, client.get(job.id).attempt) == ("FAILED", 1), 2, "retried"
    )
    assert events(client, job.id) == [(1, "QUEUED"), (1, "STARTING"), (1, "RUNNING"), (1, "FAILED")]
    mine = [j for j in ray_jobs(service).list_jobs() if (j.metadata or {}).get("hutch_job_id") == job.id]
    assert [(j.submission_id, str(j.status.value)) for j in mine] == [(final.ray_job_id, "FAILED")]
    wait_for(lambda: not training_processes(storage, job.id), 60, "the job's workers to exit")


def test_a_database_outage_answers_503_and_loses_or_doubles_nothing(
    service: ServiceProcess, client: Client, postgres: Postgres
) -> None:
    job = client.submit(long_job("fault-db", **{"training.steps": 300, "training.checkpoint_every": 100}))
    wait_for(lambda: client.get(job.id).latest_metrics, 240, "the job's first metrics", 0.5)
    ray_job_id = client.get(job.id).ray_job_id
    again = long_job("fault-db-later", **{"training.steps": 40})
    http = service.client()
    postgres.stop()
    stopped = datetime.now(UTC)
    try:
        calls = [("GET", "/v1/jobs"), ("GET", f"/v1/jobs/{job.id}"), ("GET", f"/v1/jobs/{job.id}/events"),
                 ("POST", f"/v1/jobs/{job.id}/cancel")]  # fmt: skip
        for method, path in calls:
            assert_error(http.request(method, path), 503, "unavailable", "database")
        submitted = http.post("/v1/jobs", json=again, headers={"Idempotency-Key": "fault-db-later"})
        assert_error(submitted, 503, "unavailable", "database")
        assert submitted.headers["Retry-After"]
        ready = http.get("/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["database"].startswith("error"), ready.text
        assert http.get("/healthz").status_code == 200 and http.get("/metrics").status_code == 200
        # The reconciler saw the outage and goes on; meanwhile Ray finishes the job.
        wait_for(lambda: "a reconciler tick failed" in service.log_tail(200), 30, "the reconciler to notice")
        wait_for(lambda: str(ray_jobs(service).get_job_info(ray_job_id).status.value) in FINISHED, 120,
                 "the job to end on Ray during the outage", 0.5)  # fmt: skip
        assert service.process is not None and service.process.poll() is None
    finally:
        postgres.start()

    final = client.wait(job.id, timeout=60, poll_interval=0.5)
    assert final.state == "SUCCEEDED", final.failure_reason
    assert client.events(job.id)[-1].at > stopped, "the job ended before the outage: nothing was tested"
    assert final.latest_metrics is not None and final.latest_metrics["step"] == 300
    assert events(client, job.id) == [(1, "QUEUED"), (1, "STARTING"), (1, "RUNNING"), (1, "SUCCEEDED")]
    assert "reconciling again after: OperationalError" in service.log_tail(400)
    wait_for(lambda: http.get("/readyz").status_code == 200, 30, "/readyz to recover")
    # The submission refused during the outage left nothing behind (a client sends it again).
    assert not [j for j in client.iter_jobs() if j.name == "fault-db-later"]


def test_read_only_or_full_storage_fails_running_jobs_with_that_reason_and_holds_new_ones(
    service: ServiceProcess, client: Client, storage: Storage
) -> None:
    """Both storage faults in one test, so their two jobs start together (a job start is the
    dearest part of these tests): first the whole storage read-only, where the service cannot
    write new jobs' run directories; then one job's folders read-only and, last, the storage full."""
    storage.require_mount()
    http = service.client()
    with storage.read_only():
        read_only_victim = client.submit(long_job("fault-ro", retry=NO_RETRY))
        full_victim = client.submit(long_job("fault-full", retry=NO_RETRY))

        def says_read_only() -> dict[str, Any] | None:
            answer = http.get("/readyz")
            checks = answer.json()["checks"]
            degraded = answer.status_code == 200 and answer.json()["status"] == "degraded"
            return checks if degraded and "Read-only" in checks["job_submission"] else None

        checks = wait_for(says_read_only, 30, "/readyz to say the storage is read-only")
        assert checks["job_submission"].endswith("Read-only file system") and checks["database"] == "ok", (
            checks
        )
        assert_stays(
            lambda: {client.get(j.id).state for j in (read_only_victim, full_victim)} == {"QUEUED"},
            2, "a job was started on read-only storage",
        )  # fmt: skip
        assert http.get("/v1/jobs").status_code == 200
    for job in (read_only_victim, full_victim):  # writable again: both start, once
        checkpointed(client, job.id)
    wait_for(lambda: http.get("/readyz").json()["status"] == "ok", 30, "/readyz to recover")

    own = [storage.path / "runs" / read_only_victim.id, storage.path / "checkpoints" / read_only_victim.id]
    with storage.read_only(*own):
        final = client.wait(read_only_victim.id, timeout=120, poll_interval=0.5)
        reason = final.failure_reason or ""
        assert (
            final.state == "FAILED"
            and "the storage is read-only ([Errno 30] Read-only file system)" in reason
        ), (final.state, reason, job_log(client, read_only_victim.id))
        other = client.get(full_victim.id)
        assert other.state == "RUNNING", (other.state, other.failure_reason, job_log(client, other.id))
    with storage.full():
        final = client.wait(full_victim.id, timeout=120, poll_interval=0.5)
        reason = final.failure_reason or ""
        assert (
            final.state == "FAILED" and "the storage is full ([Errno 28] No space left on device)" in reason
        ), (final.state, reason, job_log(client, full_victim.id))
        assert http.get("/v1/jobs").status_code == 200 and http.get("/healthz").status_code == 200
    assert service.process is not None and service.process.poll() is None
    for job in (read_only_victim, full_victim):
        assert events(client, job.id) == [(1, "QUEUED"), (1, "STARTING"), (1, "RUNNING"), (1, "FAILED")]


RAISING_LOSS = """
def loss(model, batch):
    return model(batch["inputs"]).logsumexp(1).mean()  # written for dict batches; digits gives pairs
"""


def test_a_jobs_own_errors_fail_it_once_and_are_never_retried(
    service: ServiceProcess, client: Client, tmp_path: Path
) -> None:
    # Both jobs have the default retry policy (3 attempts): their failures are their own.
    diverging = client.submit(spec_with(
        name="fault-diverging",
        **{"optimizer.lr": 1.0e6, "optimizer.warmup_steps": 0, "training.steps": 50, "training.log_every": 1,
           "training.checkpoint_every": 1000, "training.global_batch_size": 32, "scaling.num_workers": 1},
    ))  # fmt: skip
    code = tmp_path / "own"
    (code / "objectives").mkdir(parents=True)
    (code / "objectives" / "__init__.py").write_text("")
    (code / "objectives" / "losses.py").write_text(RAISING_LOSS)
    raising_spec = spec_with(
        name="fault-raising-loss",
        **{"training.loss": "objectives.losses:loss", "training.steps": 50, "training.global_batch_size": 32,
           "scaling.num_workers": 2},
    )  # fmt: skip
    raising = submit_with_working_dir(service, raising_spec, tmp_path / "job.yaml", code)
    expected = {
        diverging.id: r"training stopped: .*loss is -?(nan|inf)",
        raising: r"^training stopped: the job.s own code raised: "
        r"training\.loss: objectives\.losses:loss raised "
        r"TypeError: tuple indices must be integers or slices, not str$",
    }
    for job_id, reason in expected.items():
        final = client.wait(job_id, timeout=300, poll_interval=0.5)
        assert final.state == "FAILED" and re.search(reason, final.failure_reason or ""), final.failure_reason
        assert events(client, job_id) == [(1, "QUEUED"), (1, "STARTING"), (1, "RUNNING"), (1, "FAILED")]
        assert final.attempt == 1


def logged_step(run_dir: Path) -> int:
    """The last step in a run's ``metrics.jsonl`` (0 before the first)."""
    return max([0, *(record["step"] for record in records_after(run_dir / "metrics.jsonl", None))])


def uninterrupted_checksum(spec: dict[str, Any], run_dir: Path) -> dict[str, float]:
    """The parameter checksum of ``spec`` trained without a fault: the same worker loop on one
    gloo process (no Ray); with ``chunk_size`` that is the arithmetic of any number of workers."""
    one_worker = {**spec, "scaling": {**spec["scaling"], "num_workers": 1}}
    run_worker_jobs(1, [{"spec": one_worker, "run_dir": str(run_dir), "job_id": "uninterrupted"}])
    return json.loads((run_dir / "result.json").read_text())["param_checksum"]


def test_a_sigtermed_worker_checkpoints_that_step_and_the_retry_ends_as_if_uninterrupted(
    service: ServiceProcess, client: Client, storage: Storage, tmp_path: Path
) -> None:
    # Two workers, a periodic checkpoint every 100 steps; rank 1 (which writes no checkpoint
    # files of its own) gets the SIGTERM Kubernetes sends before it kills a drained pod. With
    # max_failures 0 (the default) the service retries; with more, Ray Train restarts the group
    # from the same checkpoint within the attempt.
    spec = long_job(
        "fault-sigterm", retry={"max_attempts": 2, "backoff_s": 1}, max_failures=0,
        **{"training.steps": 400, "training.checkpoint_every": 100, "scaling.num_workers": 2,
           "training.chunk_size": 16},
    )  # fmt: skip
    job = client.submit(spec)
    run_dir = storage.path / "runs" / job.id
    wait_for(lambda: logged_step(run_dir) >= 130, 240, "step 130 to be logged", 0.1)
    noticed_after = logged_step(run_dir)
    ranks = [int((run_dir / "workers" / f"rank-{rank}.pid").read_text()) for rank in (0, 1)]
    assert set(ranks) <= set(train_worker_pids())  # what the pods' preStop hook SIGTERMs
    os.kill(ranks[1], signal.SIGTERM)

    wait_for(lambda: client.get(job.id).attempt == 2, 120, "attempt 2 to be queued", 0.2)
    failed = [e for e in client.events(job.id) if e.attempt == 1 and e.state == "FAILED"]
    assert len(failed) == 1, failed
    match = re.fullmatch(
        r"training stopped on notice: rank 1 got SIGTERM \(a drain or preemption gives one before the "
        r"kill\); the checkpoint at step (\d+) is saved and a retry resumes from it",
        failed[0].message or "",
    )
    assert match, failed[0].message
    saved = int(match.group(1))
    assert noticed_after <= saved < 400 and saved % 100 != 0, (noticed_after, saved)  # not a periodic one
    resumed_at = None
    for line in client.logs(job.id, attempt=2, follow=True):
        if found := re.search(r"resumed from the checkpoint at step (\d+)", line):
            resumed_at = int(found.group(1))
            break
    assert resumed_at == saved
    final = client.wait(job.id, timeout=300, poll_interval=0.5)
    assert final.state == "SUCCEEDED" and final.attempt == 2, (final.state, final.failure_reason)
    result = json.loads((run_dir / "result.json").read_text())
    expected = uninterrupted_checksum(spec, tmp_path / "uninterrupted")
    for key in ("sum", "l2"):
        assert result["param_checksum"][key] == pytest.approx(expected[key], rel=1e-5)


def test_a_killed_local_ray_head_is_restarted_and_its_job_retried_to_the_uninterrupted_result(
    service: ServiceProcess, client: Client, storage: Storage, tmp_path: Path
) -> None:
    # 400 steps, a checkpoint every 20: each report waits for the controller (~0.5 s), so the
    # job trains for well over the time the test takes to kill the head after its first one.
    spec = long_job("fault-head", retry={"max_attempts": 3, "backoff_s": 1}, **{"training.steps": 400})
    retries_before = retries_counted(service)
    job = client.submit(spec)
    checkpointed(client, job.id)
    head = json.loads((service.data_dir / "local-ray.json").read_text())
    kill_session(head["pid"])  # the head's every process at once: GCS, raylet, dashboard, workers

    # Attempt 1 fails naming Ray; the service queues attempt 2 by itself, which resumes from the
    # last checkpoint attempt 1 saved (attempt 2 saves its first 20 steps after it starts).
    wait_for(lambda: client.get(job.id).attempt == 2, 180, "attempt 2 to be queued", 0.2)
    saved = max(c.step for c in client.checkpoints(job.id).checkpoints)
    resumed_at = None
    for line in client.logs(job.id, attempt=2, follow=True):
        if match := re.search(r"resumed from the checkpoint at step (\d+)", line):
            resumed_at = int(match.group(1))
            break
    failed = [e for e in client.events(job.id) if e.attempt == 1 and e.state == "FAILED"]
    assert len(failed) == 1 and "the Ray cluster restarted (its head was lost) while the job ran" in (
        failed[0].message or ""
    ), failed
    assert 0 < resumed_at == saved < 400, (resumed_at, saved)
    retried = [e for e in client.events(job.id) if e.attempt == 2 and e.state == "QUEUED"]
    assert len(retried) == 1 and (retried[0].message or "").startswith(
        "retried automatically (attempt 2 of 3, starting in 1 s) after an infrastructure failure: the Ray job"
    ), retried
    new_head = json.loads((service.data_dir / "local-ray.json").read_text())
    assert new_head["pid"] != head["pid"]
    assert "the local Ray head (pid" in service.log_tail(400)
    ray_job = client.get(job.id).ray_job_id
    assert ray_job is not None and ray_job.endswith("-2")
    env = {**os.environ, "HUTCH_URL": service.url, "HUTCH_TOKEN": TOKEN}
    command = [str(HUTCH), "status", job.id]
    shown = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert "attempt:   2 (retried automatically (attempt 2 of 3" in shown.stdout, shown.stdout
    assert retries_counted(service) == retries_before + 1

    # Nobody intervenes: attempt 2 trains to the end, to the parameters of a run never interrupted
    # (the same spec through the same worker loop on one gloo process, no Ray).
    final = client.wait(job.id, timeout=300, poll_interval=0.5)
    assert final.state == "SUCCEEDED" and final.attempt == 2, (final.state, final.failure_reason)
    assert events(client, job.id) == [
        (1, "QUEUED"), (1, "STARTING"), (1, "RUNNING"), (1, "FAILED"),
        (2, "QUEUED"), (2, "STARTING"), (2, "RUNNING"), (2, "SUCCEEDED"),
    ]  # fmt: skip
    retried_run = json.loads((storage.path / "runs" / job.id / "result.json").read_text())
    expected = uninterrupted_checksum(spec, tmp_path / "uninterrupted")
    for key in ("sum", "l2"):
        assert retried_run["param_checksum"][key] == pytest.approx(expected[key], rel=1e-5)
