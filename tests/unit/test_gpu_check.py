"""The GPU check stays runnable between GPU loans: ``scripts/gpu-check --cpu`` runs every check and
the cost table at tiny sizes on the CPU, and a check that does not hold fails the command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHECKS = [
    "collectives", "adahessian/resnet20", "adahessian/lm", "sharded/resnet20", "sharded/lm",
    "fsdp2/resnet20", "fsdp2/lm",
    "deepspeed-zero1/resnet20", "deepspeed-zero1/lm", "deepspeed-zero2/resnet20", "deepspeed-zero2/lm",
    "deepspeed-zero1-bf16/lm", "deepspeed-zero2-bf16/lm", "bf16-ddp/resnet20", "bf16-ddp/lm",
    "sdpa-switch/lm",
]  # fmt: skip
OPTIMIZERS = ["SGD (momentum 0.9)", "AdamW", "torch-optimizer Adahessian"]
OPTIMIZERS += [f"AdaHessian k={k}" for k in range(1, 6)]


def gpu_check(out: Path, *options: str) -> tuple[subprocess.CompletedProcess[str], dict]:
    """Run ``scripts/gpu-check --cpu OPTIONS`` into ``out``; its process and its JSON report."""
    done = subprocess.run(
        [str(ROOT / "scripts/gpu-check"), "--cpu", "--out", str(out), *options],
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=300,
    )
    return done, json.loads((out / "gpu_check.json").read_text())


@pytest.mark.slow
def test_every_check_holds_and_the_cost_table_is_measured_on_the_cpu(tmp_path: Path) -> None:
    done, report = gpu_check(tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert [c["name"] for c in report["checks"]] == CHECKS
    for check in report["checks"]:
        assert check["held"] and check["failure"] is None, check
        assert all(0 <= check["errors"][k] <= limit for k, limit in check["tolerances"].items()), check
    assert report["all_held"] and report["process_group"] == "gloo"
    sdpa = report["checks"][-1]["details"]
    assert sdpa["refused"] and "double backward" in sdpa["refusal"]
    blocks = [(b["workload"], b["precision"]) for b in report["costs"]]
    assert blocks == [("resnet20", "fp32"), ("resnet20", "bf16"), ("lm", "fp32"), ("lm", "bf16")]
    for block in report["costs"]:
        rows = block["summary"]["rows"]
        assert [r["name"] for r in rows] == OPTIMIZERS
        assert all(r["ms_per_step"] > 0 for r in rows)
        assert [r["paper_ratio_to_sgd"] for r in rows[3:]] == [2.42, 1.71, 1.47, 1.36, 1.28]
    for text in ("every check held", "sdpa-switch/lm", "AdaHessian k=5", "paper × SGD"):
        assert text in done.stdout


@pytest.mark.slow
def test_a_check_that_does_not_hold_fails_the_command(tmp_path: Path) -> None:
    done, report = gpu_check(tmp_path, "--only", "sdpa-switch", "--no-costs", "--tolerance-scale", "0")
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    (check,) = report["checks"]
    assert check["name"] == "sdpa-switch/lm" and check["failure"] is None
    assert check["errors"]["products"] > check["tolerances"]["products"] == 0 and not check["held"]
    assert not report["all_held"] and report["costs"] == []
    assert "FAILED" in done.stdout
