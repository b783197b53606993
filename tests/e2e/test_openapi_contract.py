"""The OpenAPI document is the contract, checked by schemathesis against a real `hutch serve`.

``st run /openapi.json --checks all`` (bounded examples, a fixed seed) must find no failure: no
request the schema allows that the server refuses, none it forbids that the server takes, no 5xx,
and no answer the schema does not describe (status, media type, body, ``Allow`` header). The
service's Ray address is a closed port, so submitted jobs stay QUEUED and nothing trains.

What a JSON Schema cannot carry, and nothing else, is added by tests/e2e/schemathesis_hooks.py
(a zip serializer, the spec's two rules across sections, the uploaded package's name) and
tests/e2e/schemathesis.toml (the readiness probe's documented 503).
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import ROOT, TOKEN, ServiceProcess
from tests.support import free_port

pytest.importorskip("schemathesis", reason="schemathesis is in the dev extra: pip install -e '.[dev]'")

pytestmark = pytest.mark.slow

MAX_EXAMPLES = int(os.environ.get("HUTCH_SCHEMATHESIS_EXAMPLES", "10"))
SEED = int(os.environ.get("HUTCH_SCHEMATHESIS_SEED", "1"))


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    env = {"HUTCH_RAY_ADDRESS": f"http://127.0.0.1:{free_port()}", "HUTCH_MAX_PACKAGE_BYTES": "4000000"}
    service = ServiceProcess(tmp_path_factory.mktemp("schemathesis"), env)
    service.start(ready_path="/healthz")
    try:
        yield service
    finally:
        if service.process and service.process.poll() is None:
            service.stop()


def _uploaded_package(service: ServiceProcess) -> str:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("pkg/__init__.py", "")
    with service.client() as http:
        zipped = {"Content-Type": "application/zip"}
        answer = http.post("/v1/packages", content=buffer.getvalue(), headers=zipped)
    assert answer.status_code in (200, 201), answer.text
    return answer.json()["uri"]


def test_schemathesis_finds_no_contract_failure(service: ServiceProcess, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "SCHEMATHESIS_HOOKS": "tests.e2e.schemathesis_hooks",
        "HUTCH_TEST_PACKAGE_URI": _uploaded_package(service),
    }
    command = [
        sys.executable, "-m", "schemathesis.cli",
        "--config-file", str(ROOT / "tests" / "e2e" / "schemathesis.toml"),
        "run", f"{service.url}/openapi.json",
        "--checks", "all",
        "--max-examples", str(MAX_EXAMPLES),
        "--seed", str(SEED),
        "--header", f"Authorization: Bearer {TOKEN}",
        "--request-timeout", "30",
        "--generation-database", "none",
        "--no-color",
    ]  # fmt: skip
    began = time.monotonic()
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    took = time.monotonic() - began
    output = run.stdout + run.stderr
    tail = "\n".join(output.splitlines()[-150:])
    assert run.returncode == 0, f"schemathesis found failures (seed {SEED}, {took:.0f} s):\n{tail}"
    selected = re.search(r"Selected: (\d+)/(\d+)", output)
    tested = re.search(r"Tested: (\d+)", output)
    assert selected and tested, tail
    assert int(tested[1]) == int(selected[1]) == int(selected[2]) >= 14, tail  # every operation ran
