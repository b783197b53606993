"""Benchmarks stay runnable: each `--quick` run finishes and writes its JSON and plot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_quick(name: str, out: Path, timeout: float, *extra: str) -> dict:
    """Run ``benchmarks/NAME.py --quick EXTRA...`` into ``out``; return its JSON report (plot checked)."""
    done = subprocess.run(
        [sys.executable, str(ROOT / f"benchmarks/{name}.py"), "--quick", "--out", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out / f"{name}.png").stat().st_size > 0
    return json.loads((out / f"{name}.json").read_text())


@pytest.mark.slow
def test_optimizer_cost_quick(tmp_path: Path) -> None:
    report = run_quick("optimizer_cost", tmp_path, timeout=300)
    for workload in report["workloads"]:
        names = [row["name"] for row in workload["summary"]["rows"]]
        assert names[:3] == ["SGD (momentum 0.9)", "AdamW", "torch-optimizer Adahessian"]
        assert [f"AdaHessian k={k}" for k in range(1, 6)] == names[3:]
        assert all(row["ms_per_step"] > 0 for row in workload["summary"]["rows"])


@pytest.mark.slow
def test_hessian_precision_quick(tmp_path: Path) -> None:
    report = run_quick("hessian_precision", tmp_path, timeout=120)
    assert [w["name"] for w in report["workloads"]] == ["transformer", "resnet20"]
    for workload in report["workloads"]:
        for point in workload["points"].values():
            assert 0 < point["diag_bf16_error"] < point["diag_probe_noise"]
        assert workload["cost"]["fp32_ms"] > 0 and workload["cost"]["bf16_ms"] > 0


@pytest.mark.slow
def test_sharded_cost_quick(tmp_path: Path) -> None:
    report = run_quick("sharded_cost", tmp_path, timeout=400)
    assert [w["world_size"] for w in report["worlds"]] == [1, 2, 4]
    assert report["summary"]["reported_equals_ring"] is True
    assert report["summary"]["max_reported_over_minimum"] < 1.2


@pytest.mark.slow
def test_service_latency_quick_api(tmp_path: Path) -> None:
    # Part A only: part B (a local Ray head and two training jobs) takes minutes; run it by hand.
    report = run_quick("service_latency", tmp_path, 300, "--part", "api")
    api = report["api"]
    assert [p["phase"] for p in api["phases"]] == ["submit", "list", "mixed"]
    for phase in api["phases"]:
        for op, row in phase["ops"].items():
            assert row["errors"] == {}, (phase["phase"], op, row["errors"])
            assert row["p50_ms"] > 0
    assert api["jobs_submitted"] == 2 * 20 * 3
    assert api["stored_after_total"] == 500 + api["jobs_submitted"]
    assert api["server_log"]["tracebacks_or_db_errors"] == 0
    assert "ray" not in report


@pytest.mark.slow
def test_study_quick_runs_every_task_and_optimizer_and_resumes(tmp_path: Path) -> None:
    report = run_quick("study", tmp_path, timeout=400)
    summary = report["summary"]
    assert list(summary) == ["char_lm", "images", "digits", "tabular"]
    for task in summary.values():
        assert [line["line"] for line in task["lines"]] == ["adahessian", "adamw", "adam", "sgd"]
        for line in task["lines"]:
            assert line["ms_per_step"] > 0 and len(line["metric"]["values"]) + line["metric"]["diverged"] == 2
            assert [s["scale"] for s in line["scales"]] == [0.3]
            assert len(line["steps_to_target"]) == 2
        adamw = next(line for line in task["lines"] if line["line"] == "adamw")
        assert adamw["median_steps_to_target"] is not None  # its own median reaches its target
        assert "spec defaults" in task["defaults"] and "update_clip 1" in task["ablations"]
        fraction = task["ablations"]["products of 0.25 of each batch"]
        assert fraction["ratio_to_adamw"] > 0 and "hfrac0.25" in fraction["setting"]
    tried = {t["setting"] for t in summary["char_lm"]["lines"][1]["settings_tried"]}
    assert {"β2=0.95, wd 0.01", "β2=0.98, clip 1, wd 0.01", "β2=0.999, wd 0"} <= tried  # AdamW on the LM
    assert "blocks of 4, 1-D tensors unaveraged" in summary["char_lm"]["ablations"]
    adahessian = [r for r in report["runs"].values() if r["spec"]["optimizer"] == "adahessian"]
    assert adahessian and all(r["trace"] for r in adahessian if not r["diverged"])
    for name in ("time", "robustness", "trace"):
        assert (tmp_path / f"study-{name}.png").stat().st_size > 0
    assert "## digits CNN (smoke)" in (tmp_path / "study.md").read_text()
    # A second run finds every run in study.json and trains nothing.
    again = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/study.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stderr.count(" 0 runs to do") == 4, again.stderr[-2000:]


def test_a_study_grid_grows_past_the_edge_and_chooses_by_the_mean_over_seeds(tmp_path: Path) -> None:
    from benchmarks.study import LR_GRIDS, RunSpec, Study, _tasks, grid, past_edge, shortlist

    study = Study(tmp_path / "study.json", quick=False, jobs=1, seeds=3, tasks=_tasks(False))
    digits = study.tasks["digits"]
    specs = grid(digits, "adam", quick=False)
    assert [s.lr for s in specs] == list(LR_GRIDS["adam"])  # 1e-4 ... 1e-2, half-decades

    def scored(accuracies: list[float], seed: int = 0) -> None:
        for spec, accuracy in zip(specs, accuracies):
            run = RunSpec("digits", "adam", spec.lr, seed=seed)
            study.runs[run.key] = {"metric": accuracy, "diverged": False}

    scored([0.90, 0.95, 0.97, 0.98, 0.99])  # best at the top edge: the next half-decade up
    assert past_edge(study, specs) == RunSpec("digits", "adam", 3e-2)
    scored([0.99, 0.95, 0.97, 0.98, 0.90])  # best at the bottom edge: the next one down
    assert past_edge(study, specs) == RunSpec("digits", "adam", 3e-5)
    scored([0.90, 0.97, 0.99, 0.98, 0.95])  # an inner best: the grid is done
    assert past_edge(study, specs) is None
    # Seed 0's best two go on; seeds 1 and 2 overturn seed 0's winner (a winner's curse).
    short = shortlist(study, specs)
    assert [s.lr for s in short] == [1e-3, 3e-3]
    scored([0.0, 0.0, 0.90, 0.97, 0.0], seed=1)
    scored([0.0, 0.0, 0.91, 0.97, 0.0], seed=2)
    assert study.best(short, over_seeds=False).lr == 1e-3
    assert study.best(short, over_seeds=True).lr == 3e-3
