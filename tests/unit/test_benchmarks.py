"""Benchmarks stay runnable: each `--quick` run finishes and writes its JSON and plot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_quick(name: str, out: Path, timeout: float) -> dict:
    """Run ``benchmarks/NAME.py --quick`` into ``out``; return its JSON report (plot checked too)."""
    done = subprocess.run(
        [sys.executable, str(ROOT / f"benchmarks/{name}.py"), "--quick", "--out", str(out)],
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
def test_sharded_cost_quick(tmp_path: Path) -> None:
    report = run_quick("sharded_cost", tmp_path, timeout=400)
    assert [w["world_size"] for w in report["worlds"]] == [1, 2, 4]
    assert report["summary"]["reported_equals_ring"] is True
    assert report["summary"]["max_reported_over_minimum"] < 1.2
