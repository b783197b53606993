"""The `hutch` console script: the demo runs and writes its results; bad input exits with 2,
other failures with 1, always with a one-line `error:` and never a traceback.

The control-plane commands are checked here without a control plane: against a closed port, or
against ``_canned_server``, a standard-library HTTP server that stands in for the control plane
for wire-format checks only (the real server is exercised in ``tests/e2e``).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import types
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import api.client
from api.cli import app
from service.settings import Settings, settings_table

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "digits-adahessian.yaml"


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


# -- the control-plane commands ---------------------------------------------------------------------


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> CliRunner:
    """A runner with no HUTCH_* from the developer's shell and no retry pauses."""
    for name in ("HUTCH_URL", "HUTCH_TOKEN", "HUTCH_API_TOKENS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HUTCH_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(api.client, "RETRY_DELAYS", ())
    return CliRunner()


@pytest.fixture
def closed_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


Routes = dict[tuple[str, str], list[tuple[int, Any]]]


@pytest.fixture
def canned_server() -> Iterator[tuple[str, Routes]]:
    """(url, routes): each (method, path) answers its (status, JSON body) pairs in turn, the last repeats."""
    routes: Routes = {}

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            answers = routes[(self.command, self.path.split("?")[0])]
            status, body = answers.pop(0) if len(answers) > 1 else answers[0]
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _answer

        def log_message(self, format: str, *args: Any) -> None:
            """Quiet."""

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", routes
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def _job(state: str, **fields: Any) -> dict[str, Any]:
    return {
        "id": "digits-adahessian-x1",
        "name": "digits-adahessian",
        "state": state,
        "created_at": "2025-01-01T00:00:00Z",
        "updated_at": "2025-01-01T00:00:00Z",
        "attempt": 1,
        "steps": 300,
        "spec": {},
    } | fields


def test_serve_help_lists_every_setting(cli: CliRunner) -> None:
    done = cli.invoke(app, ["serve", "--help"])
    assert done.exit_code == 0
    for variable, _, _ in settings_table():
        assert variable in done.stdout
    assert "HUTCH_DATABASE_URL" in done.stdout and "HUTCH_API_TOKENS" in done.stdout
    assert "[sqlite:///DATA_DIR/hutch.db]" in done.stdout  # not swallowed as rich markup


@pytest.fixture
def server_module(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Stands in for ``api.server`` (the real one starts uvicorn): records the calls and, like
    the real one, reads the settings first."""
    calls: list[tuple[str, int]] = []

    def serve(host: str, port: int) -> None:
        Settings()
        calls.append((host, port))

    module = types.ModuleType("api.server")
    module.serve = serve  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "api.server", module)
    return calls


def test_serve_runs_the_server_on_the_given_address(
    cli: CliRunner, server_module: list[tuple[str, int]]
) -> None:
    done = cli.invoke(app, ["serve", "--host", "0.0.0.0", "--port", "9000"])
    assert done.exit_code == 0, done.output
    assert server_module == [("0.0.0.0", 9000)]


def test_serve_with_an_invalid_setting_exits_2_naming_it(
    cli: CliRunner, server_module: list[tuple[str, int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HUTCH_MAX_PAGE_SIZE", "lots")
    done = cli.invoke(app, ["serve"])
    assert done.exit_code == 2 and server_module == []
    assert done.stderr.startswith("error: invalid settings:\n  HUTCH_MAX_PAGE_SIZE: ")
    assert "Traceback" not in done.output


def test_serve_with_an_unreachable_database_exits_1_saying_so(
    cli: CliRunner, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from benchmarks.harness import free_port

    monkeypatch.setenv("HUTCH_DATA_DIR", str(tmp_path))
    monkeypatch.setenv(
        "HUTCH_DATABASE_URL", f"postgresql+psycopg://hutch:secret@127.0.0.1:{free_port()}/hutch"
    )
    done = cli.invoke(app, ["serve"])
    assert done.exit_code == 1, done.output
    assert done.stderr.startswith("error: cannot use the job store's database: connection failed")
    assert "Traceback" not in done.output and "secret" not in done.output


def test_submit_refuses_a_bad_spec_file_with_exit_2(cli: CliRunner, closed_url: str, tmp_path: Path) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text("name: x\nmodel: {name: alexnet}\ndata: {name: digits}\n")
    done = cli.invoke(app, ["--url", closed_url, "submit", str(spec)])
    assert done.exit_code == 2  # refused before connecting: an unreachable server would be 1
    assert done.stderr.startswith(f"error: {spec}:")
    assert "model.name: unknown model" in done.stderr and "Traceback" not in done.output


def test_submit_with_a_working_dir_that_cannot_be_packed_exits_2(
    cli: CliRunner, closed_url: str, tmp_path: Path
) -> None:
    submit = ["--url", closed_url, "submit", str(EXAMPLE), "--working-dir"]
    missing = cli.invoke(app, [*submit, str(tmp_path / "x")])
    assert missing.exit_code == 2  # refused before connecting: an unreachable server would be 1
    assert missing.stderr == f"error: --working-dir {tmp_path / 'x'}: not a directory\n"
    (tmp_path / ".hutchignore").write_text("*\n")
    empty = cli.invoke(app, [*submit, str(tmp_path)])
    assert empty.exit_code == 2 and "no files to pack" in empty.stderr and "Traceback" not in empty.output


@pytest.mark.parametrize("command", [["submit", str(EXAMPLE)], ["jobs"]])
@pytest.mark.parametrize("label", ["team", "=ml"])
def test_a_malformed_label_exits_2(cli: CliRunner, closed_url: str, command: list[str], label: str) -> None:
    done = cli.invoke(app, ["--url", closed_url, *command, "--label", label])
    assert done.exit_code == 2
    assert "--label" in done.stderr and "KEY=VALUE" in done.stderr


@pytest.mark.parametrize("command", [["jobs"], ["status", "some-job"], ["cancel", "some-job"]])
def test_an_unreachable_server_exits_1_with_a_hint(
    cli: CliRunner, closed_url: str, command: list[str]
) -> None:
    done = cli.invoke(app, ["--url", closed_url, *command])
    assert done.exit_code == 1
    assert done.stderr.startswith(f"error: cannot reach the hutch control plane at {closed_url}")
    assert "hutch serve" in done.stderr and "Traceback" not in done.output


def test_an_invalid_spec_answer_exits_2_with_its_details(
    cli: CliRunner, canned_server: tuple[str, Routes]
) -> None:
    url, routes = canned_server
    error = {
        "status": 422,
        "code": "unschedulable",
        "message": "the job can never fit the cluster",
        "details": [{"field": "scaling.num_workers", "message": "needs 64 CPUs, the cluster has 8"}],
    }
    routes[("POST", "/v1/jobs")] = [(422, {"error": error})]
    done = cli.invoke(app, ["--url", url, "--token", "t", "submit", str(EXAMPLE)])
    assert done.exit_code == 2
    assert "the job can never fit the cluster" in done.stderr
    assert "scaling.num_workers: needs 64 CPUs, the cluster has 8" in done.stderr


def test_submit_wait_exits_1_when_the_job_fails(cli: CliRunner, canned_server: tuple[str, Routes]) -> None:
    url, routes = canned_server
    routes[("POST", "/v1/jobs")] = [(201, _job("QUEUED"))]
    failed = _job(
        "FAILED", failure_reason="loss became NaN at step 40", latest_metrics={"step": 40, "loss": 3.5}
    )
    routes[("GET", "/v1/jobs/digits-adahessian-x1")] = [(200, failed)]
    done = cli.invoke(app, ["--url", url, "--token", "t", "submit", str(EXAMPLE), "--wait", "-l", "team=ml"])
    assert done.exit_code == 1
    assert done.stdout.splitlines()[0] == "digits-adahessian-x1"
    assert "FAILED" in done.stdout and "loss became NaN at step 40" in done.stdout
    assert "loss=3.5" in done.stdout


def test_jobs_shows_a_table_of_jobs(cli: CliRunner, canned_server: tuple[str, Routes]) -> None:
    url, routes = canned_server
    running = _job("RUNNING", id="digits-adahessian-running1", latest_metrics={"step": 120, "loss": 0.51234})
    routes[("GET", "/v1/jobs")] = [(200, {"jobs": [running, _job("QUEUED")], "next_cursor": None})]
    done = cli.invoke(app, ["--url", url, "--token", "t", "jobs", "--state", "running", "--state", "QUEUED"])
    assert done.exit_code == 0, done.output
    row = next(line for line in done.stdout.splitlines() if "running1" in line)
    cells = row.split()
    assert cells[0] == "digits-adahessian-running1" and cells[2:6] == ["RUNNING", "1", "120/300", "0.5123"]
    assert cells[6].endswith("d")  # created long ago: its age in days


def test_status_shows_the_workers_of_a_fixed_or_an_elastic_job(
    cli: CliRunner, canned_server: tuple[str, Routes]
) -> None:
    url, routes = canned_server
    elastic = {"scaling": {"num_workers": {"min": 1, "max": 4, "resize_interval_s": 60.0}}}
    shown = {
        "2": _job("RUNNING", spec={"scaling": {"num_workers": 2}}),
        "1-4 (elastic; 3 now)": _job("RUNNING", spec=elastic, latest_metrics={"step": 40, "workers": 3}),
        "1-4 (elastic)": _job("QUEUED", spec=elastic),
    }
    for expected, job in shown.items():
        routes[("GET", "/v1/jobs/digits-adahessian-x1")] = [(200, job)]
        done = cli.invoke(app, ["--url", url, "--token", "t", "status", "digits-adahessian-x1"])
        assert done.exit_code == 0, done.output
        assert f"workers:   {expected}\n" in done.stdout, done.stdout
