"""What Ray is handed as a job's runtime_env (service.launcher.RayLauncher.runtime_env), and how a
spec's runtime_env is shown (trainer.spec.displayed_spec). No Ray is needed: the launcher only
builds the dictionary here."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.launcher import RayLauncher
from service.packages import UnknownPackage
from trainer.rundir import RunLayout
from trainer.spec import displayed_spec

HUTCH_VARS = {"RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0", "RAY_COLOR_PREFIX": "0"}


@pytest.fixture()
def launcher(tmp_path: Path) -> RayLauncher:
    return RayLauncher("http://127.0.0.1:9", RunLayout(tmp_path))


def test_a_job_without_runtime_env_gets_hutchs_variables_only(launcher: RayLauncher) -> None:
    assert launcher.runtime_env({"name": "j", "runtime_env": None}) == {"env_vars": HUTCH_VARS}


def test_remote_uris_pip_and_env_vars_go_to_ray_as_given(launcher: RayLauncher) -> None:
    user = {
        "working_dir": "s3://bucket/code.zip?versionId=3",
        "py_modules": ["https://example.invalid/helpers.whl"],
        "pip": ["inflection==0.5.1"],
        "env_vars": {"LOG_LEVEL": "debug", "RAY_COLOR_PREFIX": "1"},
    }
    env = launcher.runtime_env({"runtime_env": user})
    assert env["working_dir"] == user["working_dir"] and env["py_modules"] == user["py_modules"]
    assert env["pip"] == ["inflection==0.5.1"]
    assert env["env_vars"] == {"LOG_LEVEL": "debug", **HUTCH_VARS}  # hutch's own settings win


def test_an_uploaded_package_is_handed_to_ray_as_its_kept_file(launcher: RayLauncher, tmp_path: Path) -> None:
    digest = "ab" * 32
    kept = tmp_path / "packages" / f"{digest}.zip"
    uri = f"hutch://packages/{digest}.zip"
    with pytest.raises(UnknownPackage, match=uri):
        launcher.runtime_env({"runtime_env": {"working_dir": uri}})
    kept.parent.mkdir()
    kept.write_bytes(b"PK")
    assert launcher.runtime_env({"runtime_env": {"working_dir": uri}})["working_dir"] == str(kept)


def test_credential_like_env_vars_are_shown_masked() -> None:
    env_vars = {"AWS_SECRET_ACCESS_KEY": "x", "db_password": "y", "N": "1"}
    spec = {"name": "j", "runtime_env": {"env_vars": env_vars}}
    shown = displayed_spec(spec)
    masked = {"AWS_SECRET_ACCESS_KEY": "***", "db_password": "***", "N": "1"}
    assert shown["runtime_env"]["env_vars"] == masked
    assert spec["runtime_env"]["env_vars"]["db_password"] == "y"  # the stored spec is not changed
