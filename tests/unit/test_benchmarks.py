"""Benchmarks stay runnable: each `--quick` run finishes and writes its JSON and plot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_optimizer_cost_quick(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/optimizer_cost.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "optimizer_cost.json").read_text())
    for workload in report["workloads"]:
        names = [row["name"] for row in workload["summary"]["rows"]]
        assert names[:3] == ["SGD (momentum 0.9)", "AdamW", "torch-optimizer Adahessian"]
        assert [f"AdaHessian k={k}" for k in range(1, 6)] == names[3:]
        assert all(row["ms_per_step"] > 0 for row in workload["summary"]["rows"])
    assert (tmp_path / "optimizer_cost.png").stat().st_size > 0


@pytest.mark.slow
def test_sharded_cost_quick(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/sharded_cost.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "sharded_cost.json").read_text())
    assert [w["world_size"] for w in report["worlds"]] == [1, 2, 4]
    assert report["summary"]["reported_equals_ring"] is True
    assert report["summary"]["max_reported_over_minimum"] < 1.2
    assert (tmp_path / "sharded_cost.png").stat().st_size > 0
