"""The monitoring, proved against a real Prometheus (Debian's package; .ci/run installs it).

Prometheus runs deploy/monitoring/prometheus.yml (its targets pointed at this test's ports, every
interval shortened) and hutch.rules.yml, scraping a real `hutch serve`, its local Ray head's
metrics port and the real jobs on it: a digits job on two workers, and one whose learning rate
makes the loss overflow within a few steps. Then every PromQL expression of the Grafana dashboard
must return data for the finished job, every alert rule must evaluate without error, and the
non-finite-loss alert must fire. The dashboard's main queries are drawn into a PNG (into
``HUTCH_DASHBOARD_PNG`` if set, which is how deploy/monitoring/dashboard-example.png was made).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from api.client import Client
from benchmarks.harness import free_port, wait_for
from benchmarks.ray_nodes import end_process_group
from tests.e2e.conftest import ROOT, ServiceProcess, local_ray_env, running_service
from tests.e2e.test_api_contract import spec_with
from tests.unit.test_monitoring import alert_rules, dashboard, queries

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("prometheus") is None,
        reason="needs Debian's prometheus (.ci/run installs it when it can)",
    ),
]

MONITORING = ROOT / "deploy" / "monitoring"
RATE_WINDOW = "10s"  # what Grafana's $__rate_interval is at a 2 s scrape interval: 4 scrapes and more


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    env = {**local_ray_env(), "HUTCH_LOCAL_RAY_METRICS_PORT": str(free_port())}
    with running_service(tmp_path_factory.mktemp("monitored"), env) as service:
        yield service


@pytest.fixture(scope="module")
def prometheus(service: ServiceProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Prometheus on the shipped configuration, its targets this test's service and Ray head."""
    head = json.loads((service.data_dir / "local-ray.json").read_text())
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "2s", "scrape_timeout": "2s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(MONITORING / name) for name in config["rule_files"]]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    jobs["hutch"]["static_configs"][0]["targets"] = [f"127.0.0.1:{service.port}"]
    jobs["ray"]["static_configs"][0]["targets"] = [f"127.0.0.1:{head['metrics_port']}"]
    folder = tmp_path_factory.mktemp("prometheus")
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    url = f"http://127.0.0.1:{free_port()}"
    log = (folder / "prometheus.log").open("wb")
    process = subprocess.Popen(
        ["prometheus", f"--config.file={folder / 'prometheus.yml'}", f"--storage.tsdb.path={folder / 'data'}",
         f"--web.listen-address={url.removeprefix('http://')}"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        wait_for(lambda: _ready(url, process, folder), 60, "Prometheus to be ready", 0.5)
        wait_for(lambda: _targets_up(url), 60, "Prometheus to scrape the service and the Ray head", 0.5)
        yield url
    finally:
        end_process_group(process.pid)


def _ready(url: str, process: subprocess.Popen, folder: Path) -> bool:
    if process.poll() is not None:
        raise AssertionError(f"prometheus exited:\n{(folder / 'prometheus.log').read_text()[-3000:]}")
    try:
        return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _targets_up(url: str) -> bool:
    targets = api(url, "targets")["activeTargets"]
    return {t["labels"]["job"] for t in targets if t["health"] == "up"} == {"hutch", "ray"}


def api(url: str, path: str, **params: Any) -> Any:
    answer = httpx.get(f"{url}/api/v1/{path}", params=params, timeout=30).json()
    assert answer["status"] == "success", answer
    return answer["data"]


def series(url: str, expr: str, start: float, end: float) -> list[dict[str, Any]]:
    return api(url, "query_range", query=expr, start=start, end=end, step=2)["result"]


def as_run(expr: str, job_id: str) -> str:
    """A dashboard query as Grafana sends it with the job and the local cluster chosen."""
    return (
        expr.replace("$job_id", job_id).replace("$cluster", "local").replace("$__rate_interval", RATE_WINDOW)
    )


def test_every_dashboard_query_has_data_and_every_alert_evaluates_for_real_jobs(
    service: ServiceProcess, client: Client, prometheus: str, tmp_path: Path
) -> None:
    began = time.time()
    good = client.submit(spec_with(
        name="monitored",
        **{"training.steps": 500, "training.log_every": 5, "training.eval_every": 100,
           "training.checkpoint_every": 500, "training.global_batch_size": 32, "scaling.num_workers": 2},
    ))  # fmt: skip
    diverging = client.submit(spec_with(
        name="diverging",
        **{"optimizer.lr": 1.0e6, "optimizer.warmup_steps": 0, "training.steps": 50, "training.log_every": 1,
           "training.checkpoint_every": 1000, "training.global_batch_size": 32, "scaling.num_workers": 1},
    ))  # fmt: skip
    finished = client.wait(good.id, timeout=400, poll_interval=1)
    assert finished.state == "SUCCEEDED", finished.failure_reason
    failed = client.wait(diverging.id, timeout=300, poll_interval=1)
    assert failed.state == "FAILED" and re.search(r"loss is -?(nan|inf)", failed.failure_reason or ""), failed

    # The non-finite-loss alert fires, and every alert rule evaluates without error.
    def firing() -> list[dict[str, Any]]:
        return [a for a in api(prometheus, "alerts")["alerts"] if a["state"] == "firing"]

    fired = wait_for(firing, 60, "the non-finite-loss alert to fire", 1)
    assert "HutchJobLossNotFinite" in {a["labels"]["alertname"] for a in fired}, fired
    evaluated = [rule for group in api(prometheus, "rules")["groups"] for rule in group["rules"]]
    assert sorted(rule["name"] for rule in evaluated) == sorted(rule["alert"] for rule in alert_rules())
    broken = [(rule["name"], rule.get("lastError")) for rule in evaluated if rule["health"] != "ok"]
    assert not broken, f"alert rules that do not evaluate: {broken}"

    # Every query of the dashboard (panels and variables) returns data for the finished job.
    end = time.time()
    wait_for(
        lambda: series(prometheus, f'ray_hutch_step{{job_id="{good.id}"}}', began, time.time()),
        60, "the job's gauges in Prometheus", 1,
    )  # fmt: skip
    empty = []
    for title, expr in queries(dashboard()):
        if expr.startswith("label_values("):  # Grafana's variable function: the series it lists
            expr = expr.removeprefix("label_values(").rsplit(",", 1)[0]
        if not series(prometheus, as_run(expr, good.id), began, time.time()):
            empty.append((title, as_run(expr, good.id)))
    assert not empty, "dashboard queries without data for a real job:\n" + "\n".join(map(str, empty))
    per_rank = series(prometheus, f'ray_hutch_worker_step_seconds{{job_id="{good.id}"}}', began, end)
    assert {s["metric"]["rank"] for s in per_rank} == {"0", "1"}, "not one step-time series per worker"

    picture = Path(os.environ.get("HUTCH_DASHBOARD_PNG") or tmp_path / "dashboard.png")
    draw(prometheus, good.id, began, time.time(), picture)
    assert picture.stat().st_size > 10_000


def draw(url: str, job_id: str, start: float, end: float, out: Path) -> None:
    """The dashboard's main per-job panels for ``job_id``, from Prometheus, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    board = {p["title"]: p for p in dashboard()["panels"] if p["type"] != "row"}
    shown = ["Hessian trace", "Loss", "Held-out metrics", "Learning rate", "Step time per worker",
             "Samples per second per worker"]  # fmt: skip
    figure, axes = plt.subplots(2, 3, figsize=(15, 7.5))
    for axis, title in zip(axes.flat, shown, strict=True):
        for target in board[title]["targets"]:
            for line in series(url, as_run(target["expr"], job_id), start, end):
                times = [float(t) - start for t, _ in line["values"]]
                values = [float(v) for _, v in line["values"]]
                label = target["legendFormat"]
                for key, value in line["metric"].items():
                    label = label.replace("{{" + key + "}}", value)
                axis.plot(times, values, label=label.replace(job_id, "").strip() or title)
        axis.set_title(title)
        axis.set_xlabel("seconds since submission")
        axis.legend(fontsize=7)
    figure.suptitle(f"hutch dashboard, job {job_id} (queried from Prometheus)")
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=90)
    plt.close(figure)
