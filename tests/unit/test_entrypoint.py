"""`python -m trainer SPEC` refuses bad specs with one clear line and exit code 2, before Ray."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from trainer.preflight import check_spec
from trainer.spec import SpecError, load_spec, validate_spec

ROOT = Path(__file__).resolve().parents[2]
GOOD = {"name": "job", "model": {"name": "mlp"}, "data": {"name": "digits"}}


def _run(spec_path: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "trainer", str(spec_path)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"epochs": 3}, "epochs: unknown field"),
        ({"optimizer": {"lr": -0.1}}, "optimizer.lr: must be greater than 0"),
        ({"optimizer": {"hessian_update_freq": 0}}, "optimizer.hessian_update_freq: must be greater than or"),
        ({"scaling": {"gpus_per_worker": 2}}, "scaling.gpus_per_worker: more GPUs than use_gpu allows"),
        ({"model": {"name": "alexnet"}}, "model.name: unknown model"),
        ({"model": {"name": "my..models:net"}}, "model.name"),
        ({"model": {"name": "no_such_package.models:net"}}, "model 'no_such_package.models:net'"),
        ({"data": {"name": "json:no_such_factory"}}, "data 'json:no_such_factory'"),
        ({"training": {"loss": "no_such_pkg.losses:mine"}}, "training.loss 'no_such_pkg.losses:mine'"),
        ({"training": {"metrics": "json:no_such_function"}}, "training.metrics 'json:no_such_function'"),
        (
            {"backend": {"name": "deepspeed"}, "optimizer": {"hessian_scope": "local"}},
            "optimizer.hessian_scope: the deepspeed backend supports 'global' only",
        ),
    ],
)
def test_bad_spec_exits_2_with_one_clear_line(tmp_path: Path, change: dict, message: str) -> None:
    spec = {**GOOD, **change}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    done = _run(path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"error: {path}")
    assert "Traceback" not in done.stderr
    # One problem, one line that names the field and the reason.
    assert [line for line in done.stderr.splitlines() if message in line]
    assert len([line for line in done.stderr.splitlines() if line.strip()]) <= 2, done.stderr


def test_missing_spec_file_exits_2(tmp_path: Path) -> None:
    done = _run(tmp_path / "nope.yaml")
    assert done.returncode == 2
    assert "nope.yaml" in done.stderr and "Traceback" not in done.stderr


def test_deepspeed_example_passes_preflight() -> None:
    check_spec(load_spec(ROOT / "examples" / "digits-deepspeed.yaml"))


def test_deepspeed_backend_without_the_package_is_refused_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args: object) -> object:
        return None if name == "deepspeed" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(SpecError, match=r"backend.name: 'deepspeed' needs the DeepSpeed package"):
        check_spec(validate_spec({**GOOD, "backend": {"name": "deepspeed"}}))
    check_spec(validate_spec(GOOD))  # ddp does not need it
