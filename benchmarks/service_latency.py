"""Latency of the control plane: submit and list under 20 concurrent clients over 10,000 stored
jobs, and the time from ``POST /v1/jobs`` to the first training step against submitting the same
entrypoint straight through Ray's job submission client.

Run from the repository root::

    .venv/bin/python benchmarks/service_latency.py                      # full run, ~6-10 min on 2 cores
    .venv/bin/python benchmarks/service_latency.py --quick --part api   # part A smoke run, < 1 min
    .venv/bin/python benchmarks/service_latency.py --quick --part ray   # part B smoke run, ~2-3 min

Part A (``--part api``): API latency. A fresh SQLite store is pre-filled with ``--stored-jobs``
terminal jobs (one bulk insert through the store's SQLAlchemy models; a sample through
``JobStore.create`` + ``move``, timed, shows what a loop of those would cost), labelled ``team``
(4 values, 25 % each) and ``priority=high`` (1 %). The service (``api.server.serve`` under
uvicorn, a subprocess) gets a closed port as its Ray address, so submissions are stored and stay
QUEUED and nothing trains; its admission check (cluster capacity) is skipped when Ray is
unreachable. ``--clients`` asyncio clients, each with its own ``httpx.AsyncClient`` (its own
connection), run three phases in turn: ``submit`` (N ``POST /v1/jobs``, each with its own
``Idempotency-Key``), ``list`` (N ``GET /v1/jobs?limit=50``, rotating through no filter,
``label=team=nlp``, the rare ``label=priority=high``, a deep ``cursor`` page and
``state=FAILED``) and ``mixed`` (N of each, alternating). After each phase the benchmark cancels
the QUEUED jobs it made, so every phase starts without a backlog. Per operation: p50/p99/max of
the client-observed latency and errors (any non-2xx); per phase: throughput, the server-side mean
from the service's own histogram (``hutch_http_request_duration_seconds``) and the server's CPU
time per request. Two in-process diagnostics price what an unreachable Ray adds: one failed
capacity call (the service keeps a failure for 10 s, so submissions and reconciler ticks make one
at most that often) and one reconciler pass over the phase's backlog.

A change's cost (``--against REF``, instead of the parts): part A's phases on this tree and on git
commit ``REF`` (a temporary worktree) at once. Both services run side by side, each on a store
prefilled by its own code; each round runs every phase on one, then the other (ABBA across
rounds), so the machine's drift over minutes falls on both alike. Reported per phase: the median
server CPU per request and throughput of each, and the ratio of CPU per request (this tree over
``REF``) per round and its median: what "not slower than the commit before" is judged by::

    .venv/bin/python benchmarks/service_latency.py --against HEAD~1 --rounds 16

Part B (``--part ray``): POST to first training step. The service starts its own local Ray head
(``HUTCH_LOCAL_RAY_NUM_CPUS=2``). A small digits job (1 worker, ``log_every: 1``) is submitted
by ``POST /v1/jobs``; the same entrypoint (``RayLauncher.entrypoint``, its own run directory,
the launcher's runtime env) is submitted straight through
``ray.job_submission.JobSubmissionClient.submit_job`` to the same cluster. Time to first step =
the first ``metrics.jsonl`` record's ``time`` (worker wall clock when step 1 ended) minus the
wall clock just before the request. The paths alternate (ABBA), one job at a time, each waited
for until it ends; the full run first runs one uncounted warm-up job per path (the service
imports Ray's job client on its first submission). Reported per run: request answered, Ray job
created (Ray's ``start_time``), first step; medians, the ratio service/direct and the overhead.

Clients and server share the machine's CPUs (2 here): latencies include CPU queueing on both
sides, and other load on the machine shows directly (the load average is recorded). Before each
phase the benchmark freezes its own heap (``gc.freeze()``, as the service does at start-up), so
its collector's full passes over the prefilled jobs do not pause the clients mid-request.

Results go to ``--out`` (default ``benchmarks/results/``): ``service_latency.json`` (machine,
load average, settings, raw latencies, summaries) and ``service_latency.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import (
    apply_mode,
    console,
    figure,
    finish,
    free_port,
    load_avg,
    log,
    machine_info,
    parser,
    percentiles,
    settings,
    table,
    wait_for,
)
from service.launcher import RayLauncher, RayUnavailable
from service.lifecycle import JobState
from service.store import EventRow, JobRow, JobStore, LabelRow, encode_cursor, request_hash
from trainer.rundir import RunLayout
from trainer.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "digits-adahessian.yaml"
TOKEN = "service-latency-benchmark"
TEAMS = ("vision", "nlp", "speech", "rl")
RARE_EVERY = 100  # one stored job in 100 has priority=high
TERMINAL_MIX = ((JobState.SUCCEEDED, 0.85), (JobState.FAILED, 0.10), (JobState.CANCELLED, 0.05))
STARTED_PATH = (JobState.QUEUED, JobState.STARTING, JobState.RUNNING)
RUNTIME_ENV = {"env_vars": {"RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0", "RAY_COLOR_PREFIX": "0"}}  # the launcher's
LIST_KINDS = (
    "list",
    "list label=team",
    "list label=priority (1%)",
    "list cursor (deep page)",
    "list state=FAILED (10%)",
)
HISTOGRAM = re.compile(
    r'^hutch_http_request_duration_seconds_(sum|count)\{method="(\w+)",route="([^"]+)"\} (\S+)$', re.M
)


# -- the service as a subprocess ----------------------------------------------------------------


class Service:
    """``api.server.serve`` in a subprocess on a free port; stopped with SIGTERM."""

    def __init__(self, data_dir: Path, env: dict[str, str], root: Path = ROOT) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = data_dir / "server.log"
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("HUTCH_") and k != "RAY_ADDRESS"}
        full_env.update({"HUTCH_DATA_DIR": str(data_dir), "HUTCH_API_TOKENS": TOKEN, **env})
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-c", f"from api.server import serve; serve('127.0.0.1', {self.port})"],
            cwd=root, env=full_env, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip

    def wait_up(self, probe: str, want: set[int], timeout: float) -> httpx.Response:
        """Poll ``probe`` until it answers with a status in ``want``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the service exited with {self.process.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                response = httpx.get(f"{self.url}{probe}", timeout=10)
                if response.status_code in want:
                    return response
            time.sleep(0.1)
        raise RuntimeError(
            f"the service did not answer {probe} with {want} in {timeout:.0f}s:\n{self.log_tail()}"
        )

    def stop(self, timeout: float = 60) -> float:
        """SIGTERM and wait (the service stops its local Ray head, if any); seconds it took."""
        began = time.perf_counter()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                log(f"the service did not stop in {timeout:.0f}s after SIGTERM; killing it")
                self.process.kill()
                self.process.wait(10)
        self._log.close()
        return time.perf_counter() - began

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def log_count(self, pattern: str) -> int:
        try:
            return len(re.findall(pattern, self.log_path.read_text(errors="replace")))
        except OSError:
            return 0


@contextlib.contextmanager
def running_service(
    data_dir: Path, env: dict[str, str], probe: str, want: set[int], timeout: float
) -> Iterator[tuple[Service, float, httpx.Response]]:
    """Start the service, wait for ``probe``; yield (service, seconds to come up, probe answer)."""
    began = time.perf_counter()
    service = Service(data_dir, env)
    try:
        answer = service.wait_up(probe, want, timeout)
        yield service, time.perf_counter() - began, answer
    finally:
        service.stop()


def server_histogram(url: str) -> dict[tuple[str, str], tuple[float, float]]:
    """(method, route) -> (sum seconds, count) of the service's request-duration histogram."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    found: dict[tuple[str, str], list[float]] = {}
    for kind, method, route, value in HISTOGRAM.findall(text):
        entry = found.setdefault((method, route), [0.0, 0.0])
        entry[0 if kind == "sum" else 1] = float(value)
    return {key: (s, c) for key, (s, c) in found.items()}


# -- part A: API latency ------------------------------------------------------------------------


@functools.cache
def _example_json() -> str:
    return json.dumps(load_spec(EXAMPLE).model_dump(mode="json"))


def bench_spec(**labels: str) -> dict[str, Any]:
    """The example digits spec as JSON (a fresh copy), with ``labels``."""
    spec = json.loads(_example_json())
    spec["labels"] = dict(labels)
    return spec


def prefill(url: str, n: int, sample: int, seed: int) -> dict[str, Any]:
    """Store ``n`` terminal jobs: ``sample`` through ``JobStore.create`` + ``move`` (timed), the
    rest by one bulk insert through the same models. Returns timings."""
    rng = np.random.default_rng(seed)
    store = JobStore(url)
    states = [state for state, _ in TERMINAL_MIX]
    weights = [w for _, w in TERMINAL_MIX]
    chosen = rng.choice(len(states), size=n, p=weights)
    base = datetime.now(UTC) - timedelta(days=30)
    bulk = n - sample

    def labels_of(i: int) -> dict[str, str]:
        labels = {"team": TEAMS[i % len(TEAMS)]}
        if i % RARE_EVERY == RARE_EVERY - 1:
            labels["priority"] = "high"
        return labels

    began = time.perf_counter()
    jobs, label_rows, events = [], [], []
    for i in range(bulk):
        spec = bench_spec(**labels_of(i))
        state = states[chosen[i]]
        created = base + timedelta(seconds=200 * i)
        finished = created + timedelta(seconds=120)
        job_id = f"stored-{i:06d}"
        jobs.append({
            "seq": i + 1, "id": job_id, "name": spec["name"], "state": str(state), "spec": spec,
            "idempotency_key": None, "request_hash": request_hash(spec), "created_at": created,
            "updated_at": finished, "started_at": created + timedelta(seconds=5), "finished_at": finished,
            "attempt": 1, "ray_job_id": f"hutch-{job_id}-1",
            "failure_reason": "training failed: example" if state == JobState.FAILED else None,
            "cancel_requested": state == JobState.CANCELLED,
            "latest_metrics": {"step": 300, "time": finished.timestamp(), "loss": 0.05, "lr": 0.0,
                               "eval_loss": 0.1, "eval_accuracy": 0.97},
        })  # fmt: skip
        label_rows += [{"job_seq": i + 1, "key": k, "value": v} for k, v in spec["labels"].items()]
        events += [
            {"job_id": job_id, "at": created, "attempt": 1, "state": "QUEUED", "message": "submitted"},
            {"job_id": job_id, "at": finished, "attempt": 1, "state": str(state), "message": None},
        ]
    from sqlalchemy import insert
    from sqlalchemy.orm import Session

    with Session(store.engine) as session, session.begin():
        for model, rows in ((JobRow, jobs), (LabelRow, label_rows), (EventRow, events)):
            for start in range(0, len(rows), 5000):
                session.execute(insert(model), rows[start : start + 5000])
    bulk_s = time.perf_counter() - began

    create_s, move_s = [], []
    for i in range(bulk, n):
        spec = bench_spec(**labels_of(i))
        t0 = time.perf_counter()
        job, _, _ = store.create(f"stored-{i:06d}", spec)
        t1 = time.perf_counter()
        final = states[chosen[i]]
        path = [JobState.QUEUED] if final == JobState.CANCELLED else [*STARTED_PATH]
        for old, new in zip(path, [*path[1:], final]):
            store.move(job.id, old, new, attempt=1, message="prefill")
        create_s.append(t1 - t0)
        move_s.append((time.perf_counter() - t1) / len(path))
    counts = {str(k): v for k, v in store.count_by_state().items() if v}
    db_file = url.removeprefix("sqlite:///")
    db_bytes = sum(os.path.getsize(f) for f in (db_file, f"{db_file}-wal") if os.path.exists(f))
    store.close()
    return {
        "stored_jobs": n,
        "bulk_inserted": bulk,
        "bulk_insert_s": bulk_s,
        "store_create_sample": len(create_s),
        "store_create": percentiles(create_s),
        "store_move": percentiles(move_s),
        "states": counts,
        "database_bytes": db_bytes,
    }


@dataclass
class Sample:
    phase: str
    op: str
    status: int
    seconds: float


def list_params(kind: str, deep_cursor: str) -> list[tuple[str, str]]:
    params = [("limit", "50")]
    if kind == "list label=team":
        params.append(("label", "team=nlp"))
    elif kind == "list label=priority (1%)":
        params.append(("label", "priority=high"))
    elif kind == "list cursor (deep page)":
        params.append(("cursor", deep_cursor))
    elif kind == "list state=FAILED (10%)":
        params.append(("state", "FAILED"))
    return params


async def one_client(
    index: int, url: str, phase: str, ops: list[str], deep_cursor: str, samples: list[Sample]
) -> None:
    """One client: its own connection, ``ops`` in order, one request at a time."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120) as client:
        await client.get("/v1/jobs", params={"limit": "1"})  # connect first, not timed
        for n, op in enumerate(ops):
            if op == "submit":
                spec = bench_spec(team=TEAMS[(index + n) % len(TEAMS)], bench="service-latency")
                spec["name"] = f"bench-c{index}"
                request = client.build_request(
                    "POST", "/v1/jobs", json=spec, headers={"Idempotency-Key": uuid.uuid4().hex}
                )
            else:
                request = client.build_request("GET", "/v1/jobs", params=list_params(op, deep_cursor))
            began = time.perf_counter()
            try:
                response = await client.send(request)
                await response.aread()
                status = response.status_code
            except httpx.HTTPError as error:
                log(f"client {index} {op}: {type(error).__name__}: {error}")
                status = 0
            samples.append(Sample(phase, op, status, time.perf_counter() - began))


def phase_ops(phase: str, index: int, per_client: int) -> list[str]:
    """The operations one client runs in a phase; list kinds rotate, offset by client."""
    lists = [LIST_KINDS[(index + n) % len(LIST_KINDS)] for n in range(per_client)]
    if phase == "submit":
        return ["submit"] * per_client
    if phase == "list":
        return lists
    return [op for pair in zip(["submit"] * per_client, lists) for op in pair]


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process so far (None without psutil)."""
    try:
        import psutil

        times = psutil.Process(pid).cpu_times()
    except Exception:  # psutil missing or the process gone: no CPU figure
        return None
    return times.user + times.system


def run_phase(
    url: str, pid: int, phase: str, clients: int, per_client: int, deep_cursor: str
) -> dict[str, Any]:
    """``clients`` clients at once, each running its ``phase_ops``; latencies by operation."""
    samples: list[Sample] = []
    before = server_histogram(url)
    cpu_before = cpu_seconds(pid)

    async def everyone() -> float:
        tasks = [one_client(i, url, phase, phase_ops(phase, i, per_client), deep_cursor, samples)
                 for i in range(clients)]  # fmt: skip
        began = time.perf_counter()
        await asyncio.gather(*tasks)
        return time.perf_counter() - began

    # The clients' own collector must not pause them mid-request: what the benchmark made so far
    # (the 10,000 prefilled specs among it) is frozen out of its full passes, as the server does.
    gc.collect()
    gc.freeze()
    wall = asyncio.run(everyone())
    cpu_after = cpu_seconds(pid)
    after = server_histogram(url)
    server = {}
    for method, route in (("POST", "/v1/jobs"), ("GET", "/v1/jobs")):
        s1, c1 = after.get((method, route), (0.0, 0.0))
        s0, c0 = before.get((method, route), (0.0, 0.0))
        if c1 > c0:
            server[method] = {"mean_ms": (s1 - s0) / (c1 - c0) * 1e3, "count": int(c1 - c0)}
    ops: dict[str, Any] = {}
    for op in ["submit", *LIST_KINDS]:
        mine = [s for s in samples if s.op == op]
        if not mine:
            continue
        errors: dict[str, int] = {}
        for s in mine:
            if not 200 <= s.status < 300:
                errors[str(s.status)] = errors.get(str(s.status), 0) + 1
        ops[op] = {
            "count": len(mine),
            **percentiles([s.seconds for s in mine]),
            "errors": errors,
            "seconds": [round(s.seconds, 6) for s in mine],
        }
    lists = [s.seconds for s in samples if s.op != "submit"]
    if phase != "submit" and lists:
        ops["list (all kinds)"] = {"count": len(lists), **percentiles(lists), "errors": {}, "seconds": []}
    return {
        "phase": phase,
        "requests": len(samples),
        "wall_s": wall,
        "throughput_rps": len(samples) / wall if wall > 0 else None,
        "server_mean": server,
        "server_cpu_s": cpu_after - cpu_before if cpu_before is not None and cpu_after is not None else None,
        "ops": ops,
    }


def cancel_backlog(store: JobStore) -> int:
    """Cancel every QUEUED job (as ``POST /cancel`` would), so the next phase starts without one."""
    queued = store.in_states([JobState.QUEUED])
    for job in queued:
        store.move(
            job.id, JobState.QUEUED, JobState.CANCELLED, attempt=job.attempt, message="benchmark phase over"
        )
    return len(queued)


def reconciler_pass(url: str, data_dir: Path, ray_address: str, queued: int) -> dict[str, Any]:
    """Seconds of one ``Reconciler.reconcile_once`` over ``queued`` QUEUED jobs with Ray unreachable
    (in this process, the service stopped): what each tick of the service's reconciler costs."""
    from service.reconciler import Reconciler

    store = JobStore(url)
    for i in range(queued):
        store.create(f"backlog-{i:05d}", bench_spec(team="backlog"))
    reconciler = Reconciler(store, RayLauncher(ray_address, RunLayout(data_dir / "storage")))
    reconciler.reconcile_once()  # imports and first connections, as in the running service: not timed
    cpu0, began = time.process_time(), time.perf_counter()
    reconciler.reconcile_once()
    wall, cpu = time.perf_counter() - began, time.process_time() - cpu0
    cancel_backlog(store)
    store.close()
    return {"queued_jobs": queued, "wall_s": wall, "cpu_s": cpu, "per_job_ms": wall / max(queued, 1) * 1e3}


def admission_check_cost(data_dir: Path, ray_address: str, repeats: int = 20) -> dict[str, float]:
    """Per-call cost of ``RayLauncher.capacity()`` failing against an unreachable Ray, asked anew
    each time (``max_age_s=0``; the service keeps a failure for 10 s), in this process: wall and
    CPU ms."""
    launcher = RayLauncher(ray_address, RunLayout(data_dir / "storage"))
    cpu0, began = time.process_time(), time.perf_counter()
    for _ in range(repeats):
        with contextlib.suppress(RayUnavailable):
            launcher.capacity(max_age_s=0)
    return {
        "calls": repeats,
        "wall_ms": (time.perf_counter() - began) / repeats * 1e3,
        "cpu_ms": (time.process_time() - cpu0) / repeats * 1e3,
    }


def part_api(args: argparse.Namespace) -> dict[str, Any]:
    data_dir = Path(tempfile.mkdtemp(prefix="hutch-bench-api-"))
    try:
        url = f"sqlite:///{data_dir / 'hutch.db'}"
        sample = min(args.create_sample, args.stored_jobs)
        log(f"A: storing {args.stored_jobs:,} jobs ({sample} through JobStore.create + move) in {data_dir}")
        fill = prefill(url, args.stored_jobs, sample, args.seed)
        create_p50 = fill["store_create"]["p50_ms"]
        log(f"A: bulk insert {fill['bulk_insert_s']:.1f} s; store.create p50 {create_p50:.1f} ms")
        closed = free_port()  # nothing listens there: Ray is unreachable, jobs stay QUEUED
        env = {"HUTCH_RAY_ADDRESS": f"http://127.0.0.1:{closed}"}
        with running_service(data_dir, env, "/readyz", {200}, timeout=120) as (service, up_s, ready):
            log(f"A: service up in {up_s:.1f} s; /readyz {ready.status_code} {ready.json().get('checks')}")
            deep_cursor = encode_cursor(args.stored_jobs // 2)
            phases = []
            store = JobStore(url)
            for phase in ("submit", "list", "mixed"):
                log(f"A: phase {phase}: {args.clients} clients x {args.requests} requests")
                result = run_phase(
                    service.url, service.process.pid, phase, args.clients, args.requests, deep_cursor
                )
                result["cancelled_after"] = cancel_backlog(store)
                log(f"A:   {result['requests']} requests in {result['wall_s']:.1f} s")
                phases.append(result)
            store.close()
            ray_warnings = service.log_count(r"Ray is unavailable")
            admission_skips = service.log_count(r"admission checks? skipped")
            server_errors = service.log_count(r"(?m)^Traceback|Exception in ASGI|sqlite3\.OperationalError")
        counts = {str(k): v for k, v in JobStore(url).count_by_state().items() if v}
        submitted = sum(p["ops"].get("submit", {}).get("count", 0) for p in phases)
        backlog = args.clients * args.requests
        log(f"A: one reconciler pass over {backlog} QUEUED jobs with Ray unreachable")
        tick = reconciler_pass(url, data_dir, env["HUTCH_RAY_ADDRESS"], backlog)
        admission = admission_check_cost(data_dir, env["HUTCH_RAY_ADDRESS"])
        return {
            "prefill": fill,
            "service_start_s": up_s,
            "readyz": {"status": ready.status_code, "body": ready.json()},
            "ray_address": env["HUTCH_RAY_ADDRESS"] + " (closed port: Ray unreachable)",
            "phases": phases,
            "store_after": counts,
            "jobs_submitted": submitted,
            "stored_after_total": sum(counts.values()),
            "reconciler_pass_ray_unreachable": tick,
            "admission_check_ray_unreachable": admission,
            "server_log": {
                "ray_unavailable_warnings": ray_warnings,
                "admission_check_skipped": admission_skips,
                "tracebacks_or_db_errors": server_errors,
            },
        }
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


# -- part A against another commit ---------------------------------------------------------------


def in_tree(root: Path, code: str) -> None:
    """Run ``code`` in a fresh interpreter in ``root`` (that commit's modules, its store's schema)."""
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True, stdout=subprocess.DEVNULL)


def part_against(args: argparse.Namespace) -> dict[str, Any]:
    """Part A's phases on this tree and on ``args.against`` at once, interleaved: both services run
    side by side, each on its own store prefilled by its own code, and each round runs every phase
    on one then the other (ABBA), so the machine's drift over minutes falls on both alike. The
    figure that counts is the per-round ratio of server CPU per request, this tree over the other."""
    work = Path(tempfile.mkdtemp(prefix="hutch-bench-against-"))
    other = work / "tree"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(other), args.against],
                   check=True)  # fmt: skip
    commit = subprocess.run(["git", "-C", str(other), "rev-parse", "HEAD"], capture_output=True, text=True,
                            check=True).stdout.strip()  # fmt: skip
    trees = {"this": ROOT, "against": other}
    services: dict[str, Service] = {}
    urls: dict[str, str] = {}
    try:
        for name, root in trees.items():
            data_dir = work / name
            data_dir.mkdir()
            urls[name] = f"sqlite:///{data_dir / 'hutch.db'}"
            log(f"A/B: storing {args.stored_jobs:,} jobs for {name} ({root})")
            sample = min(args.create_sample, args.stored_jobs)
            fill = f"prefill({urls[name]!r}, {args.stored_jobs}, {sample}, {args.seed})"
            in_tree(root, f"from benchmarks.service_latency import prefill; {fill}")
            env = {"HUTCH_RAY_ADDRESS": f"http://127.0.0.1:{free_port()}"}
            services[name] = Service(data_dir, env, root)
        for service in services.values():
            service.wait_up("/healthz", {200}, 120)
        deep_cursor = encode_cursor(args.stored_jobs // 2)
        rounds: list[dict[str, Any]] = []
        for r in range(args.rounds):
            order = ["this", "against"] if r % 2 == 0 else ["against", "this"]
            for phase in ("submit", "list", "mixed"):
                for name in order:
                    service = services[name]
                    result = run_phase(
                        service.url, service.process.pid, phase, args.clients, args.requests, deep_cursor
                    )
                    if phase != "list":
                        cancel = f"cancel_backlog(JobStore({urls[name]!r}))"
                        in_tree(
                            trees[name],
                            f"from benchmarks.service_latency import JobStore, cancel_backlog; {cancel}",
                        )
                    cpu_ms = result["server_cpu_s"] * 1e3 / result["requests"]
                    rounds.append({"round": r, "phase": phase, "tree": name, "cpu_ms": cpu_ms,
                                   "throughput_rps": result["throughput_rps"]})  # fmt: skip
                    rps = result["throughput_rps"]
                    where = f"round {r + 1}/{args.rounds} {phase} {name}"
                    log(f"A/B: {where}: {rps:.0f} req/s, {cpu_ms:.2f} ms CPU/req")
    finally:
        for service in services.values():
            service.stop()
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(other)], check=False)
        shutil.rmtree(work, ignore_errors=True)
    summary = {}
    for phase in ("submit", "list", "mixed"):
        mine = {(x["round"], x["tree"]): x for x in rounds if x["phase"] == phase}
        ratios = [mine[r, "this"]["cpu_ms"] / mine[r, "against"]["cpu_ms"] for r in range(args.rounds)]
        summary[phase] = {
            tree: {
                "median_cpu_ms": statistics.median(mine[r, tree]["cpu_ms"] for r in range(args.rounds)),
                "median_throughput_rps": statistics.median(
                    mine[r, tree]["throughput_rps"] for r in range(args.rounds)
                ),
            }
            for tree in trees
        } | {"cpu_ratios": ratios, "median_cpu_ratio": statistics.median(ratios)}
    return {"against": args.against, "commit": commit, "rounds": rounds, "summary": summary}


# -- part B: POST to the first training step -----------------------------------------------------


def first_record_time(path: Path) -> float | None:
    try:
        with path.open() as handle:
            line = handle.readline()
    except OSError:
        return None
    if not line.endswith("\n"):
        return None
    return float(json.loads(line)["time"])


def first_step_spec(steps: int) -> dict[str, Any]:
    spec = load_spec(EXAMPLE).model_dump(mode="json")
    spec["name"] = "latency-probe"
    spec["labels"] = {"bench": "service-latency"}
    spec["scaling"]["num_workers"] = 1
    spec["training"].update(steps=steps, log_every=1, eval_every=steps, checkpoint_every=steps)
    spec["optimizer"]["warmup_steps"] = 0
    return spec


@dataclass
class Run:
    path: str  # "service" or "direct"
    counted: bool
    job_id: str
    submission_id: str
    answered_s: float  # the request returned
    ray_created_s: float | None  # Ray's start_time of the job
    first_step_s: float | None
    finished_s: float | None
    outcome: str


def ray_created(client: Any, submission_id: str, t0: float) -> float | None:
    with contextlib.suppress(Exception):
        start = client.get_job_info(submission_id).start_time
        return start / 1e3 - t0 if start else None
    return None


def first_step_time(metrics: Path, ended: Callable[[], bool], timeout: float, what: str) -> float | None:
    """Wall clock of the first metric record; None if the job ends without one."""
    deadline = time.monotonic() + timeout
    next_check = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        found = first_record_time(metrics)
        if found is not None:
            return found
        if time.monotonic() > next_check:
            if ended():
                return first_record_time(metrics)
            next_check = time.monotonic() + 0.5
        time.sleep(0.02)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for the first step of {what}")


SERVICE_TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}
RAY_TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def run_service_job(api: httpx.Client, ray: Any, storage: Path, spec: dict[str, Any], counted: bool,
                    timeout: float) -> Run:  # fmt: skip
    t0 = time.time()
    response = api.post("/v1/jobs", json=spec, headers={"Idempotency-Key": uuid.uuid4().hex})
    answered = time.time() - t0
    response.raise_for_status()
    job_id = response.json()["id"]
    metrics = RunLayout(storage).run(job_id).metrics_file

    def job() -> dict[str, Any]:
        return api.get(f"/v1/jobs/{job_id}").json()

    first, finished = None, None
    try:
        found = first_step_time(metrics, lambda: job()["state"] in SERVICE_TERMINAL, timeout, job_id)
        first = found - t0 if found is not None else None
        done = wait_for(
            lambda: (j := job())["state"] in SERVICE_TERMINAL and j, timeout, f"{job_id} to end", 0.2
        )
        state = done["state"] + (f": {done['failure_reason']}" if done.get("failure_reason") else "")
        if done["finished_at"]:
            finished = datetime.fromisoformat(done["finished_at"]).timestamp() - t0
    except TimeoutError as error:
        log(f"B: {error}; cancelling it")
        api.post(f"/v1/jobs/{job_id}/cancel")
        with contextlib.suppress(TimeoutError):  # do not let it compete with the next job
            wait_for(lambda: job()["state"] in SERVICE_TERMINAL, 120, f"{job_id} to stop", 0.5)
        state = "timeout"
    submission = RayLauncher.submission_id(job_id, 1)
    return Run("service", counted, job_id, submission, answered, ray_created(ray, submission, t0), first,
               finished, state)  # fmt: skip


def run_direct_job(ray: Any, dashboard: str, storage: Path, spec: dict[str, Any], counted: bool,
                   timeout: float) -> Run:  # fmt: skip
    layout = RunLayout(storage)
    launcher = RayLauncher(dashboard, layout, local=True)  # only for its entrypoint: the service's
    job_id = f"direct-{uuid.uuid4().hex[:8]}"
    submission = f"bench-{job_id}"
    t0 = time.time()
    run = layout.run(job_id)
    run.write_spec(json.dumps(spec, indent=2))
    ray.submit_job(
        entrypoint=launcher.entrypoint(job_id, 1), submission_id=submission, runtime_env=RUNTIME_ENV
    )
    answered = time.time() - t0

    def status() -> str:
        return str(ray.get_job_status(submission).value)

    first, finished = None, None
    try:
        found = first_step_time(run.metrics_file, lambda: status() in RAY_TERMINAL, timeout, job_id)
        first = found - t0 if found is not None else None
        state = wait_for(lambda: (s := status()) in RAY_TERMINAL and s, timeout, f"{job_id} to end", 0.2)
        info = ray.get_job_info(submission)
        finished = info.end_time / 1e3 - t0 if info.end_time else None
        if state != "SUCCEEDED":
            state += f": {info.message}"
    except TimeoutError as error:
        log(f"B: {error}; stopping it")
        with contextlib.suppress(Exception):
            ray.stop_job(submission)
        with contextlib.suppress(TimeoutError):  # do not let it compete with the next job
            wait_for(lambda: status() in RAY_TERMINAL, 120, f"{job_id} to stop", 0.5)
        state = "timeout"
    return Run("direct", counted, job_id, submission, answered, ray_created(ray, submission, t0), first,
               finished, state)  # fmt: skip


def part_ray(args: argparse.Namespace) -> dict[str, Any]:
    from ray.job_submission import JobSubmissionClient

    data_dir = Path(tempfile.mkdtemp(prefix="hutch-bench-ray-"))
    storage = data_dir / "storage"
    spec = first_step_spec(args.steps)
    env = {
        "HUTCH_LOCAL_RAY_NUM_CPUS": "2",
        "HUTCH_LOCAL_RAY_DASHBOARD_PORT": str(free_port()),
        "RAY_AUTH_MODE": "disabled",
    }
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # our client talks to the same loopback head
    runs: list[Run] = []
    try:
        log(f"B: starting the service and its local Ray head (2 CPUs) in {data_dir}")
        with running_service(data_dir, env, "/readyz", {200}, timeout=240) as (service, up_s, _):
            dashboard = json.loads((data_dir / "local-ray.json").read_text())["dashboard_url"]
            log(f"B: service and Ray head up in {up_s:.1f} s; dashboard {dashboard}")
            ray = JobSubmissionClient(dashboard)
            with httpx.Client(base_url=service.url, headers={"Authorization": f"Bearer {TOKEN}"},
                              timeout=60) as api:  # fmt: skip
                # Warm-up: the service imports Ray's job client on its first submission; Ray's workers.
                plan: list[tuple[str, bool]] = [("service", False), ("direct", False)] * args.warmup
                for r in range(args.runs):
                    plan += [
                        (p, True) for p in (("service", "direct") if r % 2 == 0 else ("direct", "service"))
                    ]
                for path, counted in plan:
                    if path == "service":
                        run = run_service_job(api, ray, storage, spec, counted, args.job_timeout)
                    else:
                        run = run_direct_job(ray, dashboard, storage, spec, counted, args.job_timeout)
                    runs.append(run)
                    first = f"{run.first_step_s:.2f} s" if run.first_step_s is not None else "-"
                    what = path if counted else f"{path} (warm-up)"
                    log(f"B: {what}: first step after {first}; {run.outcome}")
                    time.sleep(args.pause)  # let Ray tear the workers down before the next job
            stop_began = time.perf_counter()
        stop_s = time.perf_counter() - stop_began
    except Exception:
        for name in ("server.log", "local-ray.log"):
            with contextlib.suppress(OSError):
                tail = (data_dir / name).read_text(errors="replace").splitlines()[-25:]
                log(f"B: the end of {name}:\n" + "\n".join(tail))
        raise
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    return {"service_and_head_start_s": up_s, "service_stop_s": stop_s, "spec": spec,
            "runs": [asdict(r) for r in runs], "summary": summarize_runs(runs)}  # fmt: skip


def summarize_runs(runs: list[Run]) -> dict[str, Any]:
    counted = [r for r in runs if r.counted and r.first_step_s is not None]
    out: dict[str, Any] = {}
    for path in ("service", "direct"):
        mine = [r for r in counted if r.path == path]
        created = [r.ray_created_s for r in mine if r.ray_created_s is not None]
        out[path] = {
            "runs": len(mine),
            "first_step_s": [r.first_step_s for r in mine],
            "median_first_step_s": statistics.median([r.first_step_s for r in mine]) if mine else None,
            "median_answered_s": statistics.median([r.answered_s for r in mine]) if mine else None,
            "median_ray_created_s": statistics.median(created) if created else None,
            "median_ray_to_first_step_s": statistics.median(
                [r.first_step_s - r.ray_created_s for r in mine if r.ray_created_s is not None]
            ) if created else None,
        }  # fmt: skip
    s, d = out["service"]["median_first_step_s"], out["direct"]["median_first_step_s"]
    out["ratio_service_over_direct"] = s / d if s and d else None
    out["overhead_s"] = s - d if s is not None and d is not None else None
    return out


# -- report ---------------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def print_report(report: dict[str, Any]) -> None:
    out = console(150)
    a = report.get("api")
    if a:
        fill = a["prefill"]
        title = (f"A. API latency: {report['settings']['clients']} concurrent clients, "
                 f"{fill['stored_jobs']:,} stored jobs, Ray unreachable (jobs stay QUEUED)")  # fmt: skip
        columns = ("phase", "operation", "n", "p50 ms", "p99 ms", "max ms", "mean ms", "server mean ms",
                   "errors", "phase req/s", "server CPU ms/req")  # fmt: skip
        latency = table(title, columns, [], left=("phase", "operation"))
        for phase in a["phases"]:
            first = True
            cpu_ms = phase["server_cpu_s"] * 1e3 / phase["requests"] if phase["server_cpu_s"] else None
            for op, row in phase["ops"].items():
                method = "POST" if op == "submit" else "GET"
                server = phase["server_mean"].get(method, {}).get("mean_ms")
                errors = ", ".join(f"{k}×{v}" for k, v in row["errors"].items()) or "0"
                latency.add_row(
                    phase["phase"] if first else "", op, str(row["count"]), _ms(row["p50_ms"]),
                    _ms(row["p99_ms"]), _ms(row["max_ms"]), _ms(row["mean_ms"]),
                    _ms(server) if op in ("submit", "list (all kinds)") else "",
                    errors if errors == "0" else f"[red]{errors}[/]",
                    f"{phase['throughput_rps']:.0f}" if first else "",
                    _ms(cpu_ms) if first and cpu_ms is not None else "",
                )  # fmt: skip
                first = False
            latency.add_section()
        out.print(latency)
        out.print(
            f"  prefill: {fill['bulk_inserted']:,} jobs bulk-inserted in {fill['bulk_insert_s']:.1f} s; "
            f"{fill['store_create_sample']} through JobStore.create: p50 "
            f"{_ms(fill['store_create']['p50_ms'])} ms, move p50 {_ms(fill['store_move']['p50_ms'])} ms; "
            f"database {fill['database_bytes'] / 1e6:.1f} MB"
        )
        skipped = a["server_log"]["admission_check_skipped"]
        cost = a["admission_check_ray_unreachable"]
        out.print(
            f"  /readyz {a['readyz']['status']} {a['readyz']['body'].get('checks')}: the admission check "
            f"(cluster capacity) is skipped when Ray is unreachable ({skipped} times in the log), after a "
            f"failed capacity call of {cost['wall_ms']:.1f} ms ({cost['cpu_ms']:.1f} ms CPU), made at most "
            "once per 10 s (the failure is kept)"
        )
        out.print(
            f"  store after: {a['store_after']} ({a['jobs_submitted']} submitted); server log: "
            f"{a['server_log']['tracebacks_or_db_errors']} tracebacks/DB errors; QUEUED jobs cancelled after "
            f"each phase: {[p['cancelled_after'] for p in a['phases']]}"
        )
        tick = a["reconciler_pass_ray_unreachable"]
        out.print(
            f"  one reconciler pass over {tick['queued_jobs']} QUEUED jobs with Ray unreachable: "
            f"{tick['wall_s']:.2f} s ({tick['per_job_ms']:.1f} ms/job, CPU {tick['cpu_s']:.2f} s); "
            "the service runs one per second and after every submission"
        )
    ab = report.get("against")
    if ab:
        rows = [
            [phase, _ms(x["this"]["median_cpu_ms"]), _ms(x["against"]["median_cpu_ms"]),
             f"{x['this']['median_throughput_rps']:.0f}", f"{x['against']['median_throughput_rps']:.0f}",
             f"{x['median_cpu_ratio']:.3f}", " ".join(f"{r:.2f}" for r in x["cpu_ratios"])]
            for phase, x in ab["summary"].items()
        ]  # fmt: skip
        columns = ("phase", "CPU ms/req here", "CPU ms/req there", "req/s here", "req/s there",
                   "median ratio", "ratio per round")  # fmt: skip
        title = f"A/B: this tree against {ab['against']} ({ab['commit'][:10]}), medians over rounds"
        out.print(table(title, columns, rows, left=("phase", "ratio per round")))
    b = report.get("ray")
    if b:
        rows = [[i, run["path"] + ("" if run["counted"] else " (warm-up)"), _s(run["answered_s"]),
                 _s(run["ray_created_s"]), _s(run["first_step_s"]), _s(run["finished_s"]), run["outcome"]]
                for i, run in enumerate(b["runs"], 1)]  # fmt: skip
        columns = ("#", "path", "request answered", "Ray job created", "first step", "job ended", "outcome")
        title = "B. Time from the request to the first training step (seconds after the request)"
        out.print(table(title, columns, rows, left=("path", "outcome")))
        s = b["summary"]
        rows = [[path, s[path]["runs"], _s(s[path]["median_answered_s"]), _s(s[path]["median_ray_created_s"]),
                 _s(s[path]["median_ray_to_first_step_s"]), _s(s[path]["median_first_step_s"])]
                for path in ("service", "direct")]  # fmt: skip
        columns = ("path", "runs", "answered s", "Ray job created s", "Ray → first step s", "first step s")
        out.print(table("B. Medians over the counted runs", columns, rows))
        ratio = s["ratio_service_over_direct"]
        out.print(
            f"  service / direct: [bold]{ratio:.2f}×[/]; overhead {s['overhead_s']:+.2f} s "
            f"(service and Ray head came up in {b['service_and_head_start_s']:.1f} s, stopped in "
            f"{b['service_stop_s']:.1f} s)"
            if ratio
            else "  no ratio: a path has no successful run"
        )
    m = report["machine"]
    out.print(f"  load average at start {m['load_average_start']}, at end {m['load_average_end']}; "
              f"{m['logical_cpus']} logical CPUs")  # fmt: skip
    for note in report["notes"]:
        out.print(f"[yellow]Note:[/] {note}")


def save_plot(report: dict[str, Any], path: Path) -> None:
    if report.get("against"):
        summary = report["against"]["summary"]
        with figure(path, 1, 1, (6, 4)) as axes:
            ax = axes[0][0]
            ax.boxplot([x["cpu_ratios"] for x in summary.values()], tick_labels=list(summary))
            ax.axhline(1.0, color="grey", linestyle=":")
            ax.set_ylabel("server CPU per request, this tree / the other")
            ax.set_title(f"A/B against {report['against']['against']}, per round", fontsize=9)
        return
    panels = [p for p in ("api", "ray") if report.get(p)]
    with figure(path, 1, len(panels), (7, 4.6)) as axes:
        for ax, part in zip(axes[0], panels):
            if part == "api":
                labels, data = [], []
                for phase in report["api"]["phases"]:
                    for op, row in phase["ops"].items():
                        if row["seconds"]:
                            labels.append(f"{phase['phase']}: {op}")
                            data.append(np.asarray(row["seconds"]) * 1e3)
                ax.boxplot(data, whis=(1, 99), showfliers=True, flierprops={"markersize": 2})
                ax.set_xticks(range(1, len(labels) + 1), labels, rotation=60, ha="right", fontsize=6)
                ax.set_yscale("log")
                ax.set_ylabel("latency (ms, client-observed)")
                stored = report["api"]["prefill"]["stored_jobs"]
                ax.set_title(f"A: {report['settings']['clients']} clients, {stored:,} stored jobs "
                             "(whiskers p1-p99)", fontsize=9)  # fmt: skip
            else:
                s = report["ray"]["summary"]
                names = ["service", "direct"]
                medians = [s[n]["median_first_step_s"] or 0.0 for n in names]
                created = [s[n]["median_ray_created_s"] or 0.0 for n in names]
                ax.bar(names, created, color="tab:gray", label="request → Ray job created")
                ax.bar(names, [m - c for m, c in zip(medians, created)], bottom=created, color="tab:blue",
                       label="Ray job created → first step")  # fmt: skip
                for i, n in enumerate(names):
                    points = s[n]["first_step_s"]
                    ax.plot([i] * len(points), points, "k.", markersize=6)
                ax.set_ylabel("seconds from the request to the first step")
                ratio = s["ratio_service_over_direct"]
                ax.set_title(
                    f"B: POST /v1/jobs vs JobSubmissionClient (medians, dots: runs); ratio "
                    f"{ratio:.2f}" if ratio else "B: no ratio", fontsize=9,
                )  # fmt: skip
                ax.legend(fontsize=7)


# -- command line ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser(__doc__, "few jobs and requests (smoke test)")
    p.add_argument("--part", choices=("all", "api", "ray"), default="all", help="which part to run")
    p.add_argument("--clients", type=int, default=20, help="concurrent API clients")
    p.add_argument(
        "--stored-jobs", type=int, default=None, help="jobs in the store before [10000; quick 500]"
    )
    p.add_argument("--requests", type=int, default=None, help="requests per client per phase [25; quick 3]")
    p.add_argument(
        "--create-sample", type=int, default=None, help="stored through JobStore.create [200; quick 20]"
    )
    p.add_argument("--runs", type=int, default=None, help="first-step runs per path [3; quick 1]")
    p.add_argument(
        "--warmup", type=int, default=None, help="uncounted first-step jobs per path first [1; quick 0]"
    )
    p.add_argument("--steps", type=int, default=4, help="training steps of the first-step job")
    p.add_argument("--job-timeout", type=float, default=300, help="seconds one first-step job may take")
    p.add_argument("--pause", type=float, default=1.0, help="seconds between first-step jobs")
    p.add_argument(
        "--against",
        metavar="REF",
        help="instead of the parts: part A's phases here and at git commit REF, both services side by "
        "side, phases alternating (ABBA); reports the ratio of server CPU per request",
    )
    p.add_argument("--rounds", type=int, default=None, help="rounds of --against [8; quick 2]")
    args = apply_mode(
        p.parse_args(argv),
        full={
            "stored_jobs": 10_000,
            "requests": 25,
            "create_sample": 200,
            "runs": 3,
            "warmup": 1,
            "rounds": 8,
        },
        quick={"stored_jobs": 500, "requests": 3, "create_sample": 20, "runs": 1, "warmup": 0, "rounds": 2},
    )
    counts = (args.clients, args.requests, args.runs, args.steps, args.stored_jobs, args.rounds)
    if min(counts) < 1 or args.warmup < 0:
        p.error("--clients, --requests, --runs, --steps, --stored-jobs and --rounds must be at least 1")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    started = time.perf_counter()
    load_start = load_avg()
    if load_start and load_start[0] > 1.0:
        log(f"warning: load average {load_start} on {os.cpu_count()} CPUs: other work shares the machine")
    report: dict[str, Any] = {
        "benchmark": "service_latency",
        "settings": settings(args),
        "notes": [],
    }
    notes = report["notes"]
    if args.against:
        report["against"] = part_against(args)
        notes.append(
            f"A/B: part A's phases on this tree and on {args.against} at once, each round both in turn "
            "(ABBA), each on its own store prefilled by its own code; ratio = this tree's server CPU per "
            "request over the other's, per round."
        )
    elif args.part in ("all", "api"):
        report["api"] = part_api(args)
        notes += [
            "Part A: the service's Ray address is a closed port, so submissions are stored and stay QUEUED "
            "(no training); the admission check (cluster capacity) is skipped after its Ray call fails (the "
            "failure is kept 10 s), and the reconciler, finding Ray out of reach, leaves the QUEUED jobs "
            "waiting, as in a Ray outage. The benchmark cancels the QUEUED jobs after each phase.",
            "Part A: clients (asyncio, one httpx.AsyncClient and connection each) share the machine's "
            f"{os.cpu_count()} CPUs with the server: latencies include CPU queueing on both sides.",
        ]
    if args.part in ("all", "ray") and not args.against:
        report["ray"] = part_ray(args)
        notes.append(
            "Part B: time to first step = the first metrics.jsonl record's 'time' (worker wall clock when "
            "step 1 ended) minus the wall clock just before the request; same entrypoint and runtime env "
            f"on both paths, one job at a time, ABBA order, {args.warmup} uncounted warm-up job(s) per path."
        )
    report["machine"] = machine_info(load_average_start=load_start, load_average_end=load_avg())
    if max(load_start[:1] + report["machine"]["load_average_end"][:1], default=0.0) > 1.0:
        notes.append(
            f"Other work shared the machine: 1-min load average {load_start[:1]} at start, "
            f"{report['machine']['load_average_end'][:1]} at end, on {os.cpu_count()} CPUs."
        )
    return finish(args.out, "service_latency", report, started, save_plot, print_report)


if __name__ == "__main__":
    main()
