"""Settings that are checked beyond their type: the Ray token from a file (HUTCH_RAY_AUTH_TOKEN_FILE,
not with HUTCH_RAY_AUTH_TOKEN; a file that cannot be read or is empty stops the start, naming
the setting and the path) and the drivers' custom resources (HUTCH_DRIVER_RESOURCES)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from api.cli import app
from api.client import settings_problems
from benchmarks.harness import free_port
from service.settings import SettingError, Settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Only what a test sets: no HUTCH_* or RAY_* of the machine's."""
    for name in list(os.environ):
        if name.startswith("HUTCH_") or name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HUTCH_DATA_DIR", str(tmp_path / "data"))


def problems(error: pytest.ExceptionInfo[ValidationError]) -> str:
    return settings_problems(error.value)


def test_the_token_file_is_read_whitespace_stripped(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "auth_token"
    path.write_text("  the-token\n")
    monkeypatch.setenv("HUTCH_RAY_AUTH_TOKEN_FILE", str(path))
    settings = Settings()
    assert settings.ray_auth_token_file == path and settings.ray_token() == "the-token"
    path.write_text("rotated\n")
    assert settings.ray_token() == "rotated"  # read when asked, not kept


def test_a_fixed_token_works_as_before(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HUTCH_RAY_AUTH_TOKEN", " fixed ")
    assert Settings().ray_token() == "fixed"
    monkeypatch.delenv("HUTCH_RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "fallback")
    assert Settings().ray_token() == "fallback"
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("HUTCH_RAY_AUTH_TOKEN_FILE", "")  # blank: unset
    assert Settings().ray_token() is None


@pytest.mark.parametrize("variable", ["HUTCH_RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN"])
def test_a_token_and_a_token_file_together_are_refused_naming_both(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, variable: str
) -> None:
    path = tmp_path / "auth_token"
    path.write_text("from-the-file")
    monkeypatch.setenv(variable, "from-the-variable")
    monkeypatch.setenv("HUTCH_RAY_AUTH_TOKEN_FILE", str(path))
    with pytest.raises(ValidationError) as refused:
        Settings()
    text = problems(refused)
    assert text.startswith("  HUTCH_RAY_AUTH_TOKEN_FILE: ")
    assert "HUTCH_RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN) and HUTCH_RAY_AUTH_TOKEN_FILE are both set" in text
    assert "from-the-variable" not in str(refused.value)


@pytest.mark.parametrize(
    ("content", "reason"),
    [(None, "cannot read the Ray token file {path}: No such file or directory"),
     ("", "the Ray token file {path} is empty"),
     (" \n\n", "the Ray token file {path} is empty")],
)  # fmt: skip
def test_a_token_file_missing_or_empty_stops_the_start_naming_setting_and_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, content: str | None, reason: str
) -> None:
    path = tmp_path / "secret" / "auth_token"
    if content is not None:
        path.parent.mkdir()
        path.write_text(content)
    monkeypatch.setenv("HUTCH_RAY_AUTH_TOKEN_FILE", str(path))
    monkeypatch.setenv("HUTCH_RAY_ADDRESS", f"http://127.0.0.1:{free_port()}")
    settings = Settings()  # the path itself parses: it is read at start-up
    with pytest.raises(SettingError) as error:
        settings.ray_token()
    assert error.value.variable == "HUTCH_RAY_AUTH_TOKEN_FILE"
    assert str(error.value) == f"HUTCH_RAY_AUTH_TOKEN_FILE: {reason.format(path=path)}"

    # `hutch serve` stops before it listens or starts anything, with that line and exit code 2.
    done = CliRunner().invoke(app, ["serve", "--port", str(free_port())])
    assert done.exit_code == 2, done.output
    assert done.stderr == f"error: invalid settings:\n  {error.value}\n"


def test_a_directory_as_token_file_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HUTCH_RAY_AUTH_TOKEN_FILE", str(tmp_path))
    with pytest.raises(SettingError, match=f"cannot read the Ray token file {tmp_path}: Is a directory"):
        Settings().ray_token()


@pytest.mark.parametrize(
    ("value", "parsed"),
    [("", {}), ('{"hutch-driver": 1}', {"hutch-driver": 1.0}), ('{"a": 0.5, "b": 2}', {"a": 0.5, "b": 2.0})],
)
def test_driver_resources_parse(monkeypatch: pytest.MonkeyPatch, value: str, parsed: dict) -> None:
    monkeypatch.setenv("HUTCH_DRIVER_RESOURCES", value)
    assert Settings().driver_resources == parsed


def test_driver_resources_default_to_none() -> None:
    assert Settings().driver_resources == {}


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("hutch-driver", "must be a JSON object of resource name -> amount"),
        ('["hutch-driver"]', "must be a JSON object of resource name -> amount"),
        ('{"": 1}', "resource names must be non-empty strings"),
        ('{"hutch-driver": 0}', "the amount of 'hutch-driver' must be a positive number"),
        ('{"hutch-driver": -1}', "must be a positive number"),
        ('{"hutch-driver": "1"}', "must be a positive number"),
        ('{"hutch-driver": true}', "must be a positive number"),
        ('{"hutch-driver": 0.00001}', "at least 0.0001"),
        ('{"CPU": 1}', "'CPU' is not a custom resource: CPU, GPU and memory have their own parameters"),
        ('{"GPU": 1}', "entrypoint_num_gpus"),
        ('{"memory": 1000}', "entrypoint_memory"),
        ('{"cpu": 1}', "is not a custom resource"),
    ],
)
def test_bad_driver_resources_are_refused_saying_why(
    monkeypatch: pytest.MonkeyPatch, value: str, fragment: str
) -> None:
    monkeypatch.setenv("HUTCH_DRIVER_RESOURCES", value)
    with pytest.raises(ValidationError) as refused:
        Settings()
    text = problems(refused)
    assert text.startswith("  HUTCH_DRIVER_RESOURCES: ") and fragment in text, text


def test_serve_help_tells_both_settings() -> None:
    done = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200"})
    assert done.exit_code == 0
    text = " ".join(done.stdout.split())
    assert "HUTCH_RAY_AUTH_TOKEN_FILE" in text and "read again whenever Ray rejects the token" in text
    assert "HUTCH_DRIVER_RESOURCES" in text and '{"hutch-driver": 1}' in text
