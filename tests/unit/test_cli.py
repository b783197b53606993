"""The `hutch` console script: the demo runs and writes its results; bad input exits with 2."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest


def _hutch(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "api.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_console_script_is_installed() -> None:
    (script,) = [ep for ep in entry_points(group="console_scripts") if ep.name == "hutch"]
    assert script.value == "api.cli:app"


def test_demo_trains_and_writes_results(tmp_path: Path) -> None:
    done = _hutch("demo", "--steps", "150", "--batch-size", "32", "--out-dir", str(tmp_path))
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "result.json").read_text())
    losses = json.loads((tmp_path / "metrics.json").read_text())["loss"]
    assert result["steps"] == 150 and len(losses) == 150
    assert sum(losses[-5:]) < sum(losses[:5])  # it learns
    assert result["test_accuracy"] > 0.9 and result["hessian_trace"] is not None
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "held-out accuracy" in done.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--lr", "-1"], "must be positive"),
        (["--steps", "0"], "--steps"),
        (["--hessian-update-freq", "0"], "--hessian-update-freq"),
        (["--batch-size", "many"], "--batch-size"),
    ],
)
def test_demo_bad_input_exits_2(args: list[str], message: str) -> None:
    done = _hutch("demo", *args)
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_train_refuses_a_bad_spec_with_exit_2(tmp_path: Path) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text("name: x\nmodel: {name: alexnet}\ndata: {name: digits}\n")
    done = _hutch("train", str(spec))
    assert done.returncode == 2
    assert "model.name: unknown model" in done.stderr and "Traceback" not in done.stderr
