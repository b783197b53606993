"""deploy/monitoring: the Prometheus operator's objects validate strictly against its schemas
(../shared/k8s-schemas), they select what the manifests really run, the alert rules exist once
in two spellings, and the Grafana dashboard has what Grafana needs.

Whether every query returns data for a real job is tested against a real Prometheus in
tests/e2e/test_prometheus.py.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.unit.test_deploy import (
    ROOT,
    SCHEMAS,
    _matches,
    _strict,
    find,
    needs_schema,
    one,
    ray_pods,
    render,
    schema_problems,
)

MONITORING = ROOT / "deploy" / "monitoring"
AUTOSCALER_METRIC_PORT, DASHBOARD_METRIC_PORT = 44217, 44227  # Ray's defaults (checked below)
WITH_MONITORING = ["deploy/overlays/gpu"]  # the overlays that include the component
OPERATOR_KINDS = {kind: kind.lower() for kind in ("PodMonitor", "ServiceMonitor", "PrometheusRule")}


def dashboard() -> dict[str, Any]:
    return json.loads((MONITORING / "hutch-dashboard.json").read_text())


def queries(board: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query of the dashboard, its variables' included."""
    found = [(p["title"], t["expr"]) for p in board["panels"] for t in p.get("targets", [])]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            found.append((f"variable {variable['name']}", variable["query"]["query"]))
    return found


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((MONITORING / "hutch.rules.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


@functools.cache
def _operator_validator(kind: str) -> Any:
    import jsonschema

    schema = json.loads((SCHEMAS / f"monitoring.coreos.com_{OPERATOR_KINDS[kind]}_v1.json").read_text())
    return jsonschema.Draft7Validator(_strict(schema))


def _operator_problems(obj: dict[str, Any]) -> list[str]:
    return schema_problems(_operator_validator(obj["kind"]), obj)


needs_schemas = needs_schema("monitoring.coreos.com_podmonitor_v1.json", "the Prometheus operator's schemas")


@needs_schemas
@pytest.mark.parametrize("target", WITH_MONITORING)
def test_operator_objects_validate_strictly(target: str) -> None:
    docs = render(target)
    objects = [obj for kind in OPERATOR_KINDS for obj in find(docs, kind)]
    assert sorted(obj["kind"] for obj in objects) == sorted(OPERATOR_KINDS), f"{target}: {objects}"
    problems = [problem for obj in objects for problem in _operator_problems(obj)]
    assert not problems, f"{target}: the Prometheus operator's schemas refuse:\n" + "\n".join(problems)


@needs_schemas
def test_operator_validation_is_strict() -> None:
    docs = render("deploy/overlays/gpu")
    for kind, mutate in (
        ("PodMonitor", lambda o: o["spec"]["podMetricsEndpoints"][0].update(prot="metrics")),
        ("ServiceMonitor", lambda o: o["spec"]["endpoints"][0].update(interval=15)),
        ("PrometheusRule", lambda o: o["spec"]["groups"][0]["rules"][0].update(expresion="up")),
    ):
        broken = copy.deepcopy(one(docs, kind))
        mutate(broken)
        assert _operator_problems(broken), f"a {kind} with a misspelt or mistyped field passed validation"


@pytest.mark.parametrize("target", WITH_MONITORING)
def test_monitors_select_the_pods_and_ports_that_run(target: str) -> None:
    docs = render(target)
    service_monitor = one(docs, "ServiceMonitor")
    scraped: dict[str, set[int]] = {}  # pod -> the ports some PodMonitor scrapes on it
    for pod_monitor in find(docs, "PodMonitor"):
        ports = {e["port"] for e in pod_monitor["spec"]["podMetricsEndpoints"]}
        for pod in ray_pods(docs):
            if _matches(pod_monitor["spec"]["selector"], pod.labels):
                named = {p["name"]: p["containerPort"] for p in pod.ray_container.get("ports", [])}
                scraped.setdefault(pod.where, set()).update(named[p] for p in ports & named.keys())
    from ray.autoscaler._private.constants import AUTOSCALER_METRIC_PORT as autoscaler
    from ray.dashboard.consts import DASHBOARD_METRIC_PORT as dashboard

    assert (autoscaler, dashboard) == (AUTOSCALER_METRIC_PORT, DASHBOARD_METRIC_PORT)
    head, *workers = ray_pods(docs)
    assert scraped.get(head.where) == {8080, AUTOSCALER_METRIC_PORT, DASHBOARD_METRIC_PORT}, scraped
    for worker in workers:
        assert scraped.get(worker.where) == {8080}, f"{target}: {worker.where} scraped on {scraped}"
    service = one(docs, "Service", "hutch")
    assert _matches(service_monitor["spec"]["selector"], service["metadata"]["labels"])
    served = {p["name"] for p in service["spec"]["ports"]}
    assert {e["port"] for e in service_monitor["spec"]["endpoints"]} <= served


@pytest.mark.parametrize("target", WITH_MONITORING)
def test_the_ray_head_points_its_dashboard_at_prometheus_and_grafana(target: str) -> None:
    head = ray_pods(render(target))[0]
    env = {e["name"]: e.get("value") for e in head.ray_container.get("env", [])}
    for name in ("RAY_PROMETHEUS_HOST", "RAY_GRAFANA_HOST", "RAY_GRAFANA_IFRAME_HOST"):
        assert (env.get(name) or "").startswith("http"), f"{target}: {head.where} sets no {name}"


def test_the_prometheus_rule_holds_the_rule_file_unchanged() -> None:
    rule = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    assert rule["spec"] == yaml.safe_load((MONITORING / "hutch.rules.yml").read_text())
    plain = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    assert plain["rule_files"] == ["hutch.rules.yml"]


def test_alerts_say_what_and_how_bad() -> None:
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names)) and len(names) >= 4, names
    for rule in rules:
        assert rule["expr"].strip() and rule["labels"]["severity"] in {"info", "warning", "critical"}, rule
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


def test_the_dashboard_has_what_grafana_needs() -> None:
    board = dashboard()
    panels = board["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    variables = {v["name"]: v for v in board["templating"]["list"]}
    source = variables["datasource"]
    assert source["type"] == "datasource" and source["query"] == "prometheus"
    assert {"job_id", "cluster"} <= variables.keys(), "the dashboard is not templated by job_id and cluster"
    data = {"type": "prometheus", "uid": "${datasource}"}
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == data, f"panel {panel['title']!r}: datasource"
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            assert target["expr"].strip() and target["datasource"] == data, (panel["title"], target)
    for variable in ("job_id", "cluster"):
        assert variables[variable]["datasource"] == data
    per_job = [p for p in panels if any("$job_id" in t["expr"] for t in p.get("targets", []))]
    titles = {p["title"] for p in per_job}
    for wanted in ("Hessian trace", "Loss", "Learning rate", "Step time per worker", "Gradient norm"):
        assert wanted in titles, f"no per-job panel {wanted!r}"
    assert panels[1]["title"] == "Hessian trace", "the Hessian trace is not the first panel"


def test_panels_do_not_overlap() -> None:
    taken: set[tuple[int, int]] = set()
    for panel in dashboard()["panels"]:
        grid = panel["gridPos"]
        cells = {(grid["x"] + dx, grid["y"] + dy) for dx in range(grid["w"]) for dy in range(grid["h"])}
        assert all(0 <= x < 24 for x, _ in cells), f"panel {panel['title']!r} is wider than the grid"
        assert not cells & taken, f"panel {panel['title']!r} overlaps another"
        taken |= cells


@pytest.mark.parametrize("target", WITH_MONITORING)
def test_the_dashboard_ships_as_a_configmap_for_grafanas_sidecar(target: str) -> None:
    config_map = one(render(target), "ConfigMap", "hutch-grafana-dashboard")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(config_map["data"]["hutch-dashboard.json"]) == dashboard()


def test_every_query_names_metrics_that_exist() -> None:
    """Each metric a query or an alert names is one the trainer or the control plane exports."""
    from trainer.metrics import GAUGES, WORKER_GAUGES

    known = {f"ray_hutch_{name}" for name in {*GAUGES, *WORKER_GAUGES}}
    known |= {
        "hutch_jobs", "hutch_queue_oldest_seconds", "hutch_ray_up", "hutch_reconciler_passes_total",
        "hutch_reconciler_errors_total", "hutch_reconciler_seconds_total", "hutch_job_failures_total",
        "hutch_job_retries_total", "hutch_reconciler_leader", "hutch_queue_held",
        "hutch_webhook_deliveries_total", "hutch_webhook_deliveries_pending",
        "hutch_http_requests_total", "hutch_http_request_duration_seconds_bucket",
    }  # fmt: skip
    expressions = [expr for _, expr in queries(dashboard())] + [rule["expr"] for rule in alert_rules()]
    for expr in expressions:
        for name in re.findall(r"\b((?:ray_)?hutch_[a-z_]+)\b", expr):
            if name != "ray_hutch_eval_":  # the prefix of a __name__ regex: every eval_* metric
                assert name in known, f"{expr}: {name} is not exported"


def test_readme_shows_the_monitoring_setup() -> None:
    readme = Path(ROOT / "deploy" / "README.md").read_text()
    for needed in ("kube-prometheus-stack", "grafana_dashboard", "RAY_GRAFANA_IFRAME_HOST", "prometheus.yml"):
        assert needed in readme, f"deploy/README.md does not mention {needed}"
