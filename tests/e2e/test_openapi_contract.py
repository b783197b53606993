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

import httpx
import pytest

from api import schemas
from tests.e2e.conftest import ROOT, TOKEN, ServiceProcess, service_without_ray

pytest.importorskip("schemathesis", reason="schemathesis is in the dev extra: pip install -e '.[dev]'")

pytestmark = pytest.mark.slow

MAX_EXAMPLES = int(os.environ.get("HUTCH_SCHEMATHESIS_EXAMPLES", "10"))
SEED = int(os.environ.get("HUTCH_SCHEMATHESIS_SEED", "1"))
# The run takes 20-60 s a store on 2 cores: SQLite (the default store) in the suite; Postgres's own
# limits are tested below, and HUTCH_SCHEMATHESIS_STORES=sqlite,postgres runs it on both.
STORES = os.environ.get("HUTCH_SCHEMATHESIS_STORES", "sqlite").split(",")


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def service(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    """A service of its own, since schemathesis fills its store: Ray unreachable, nothing trains."""
    with service_without_ray(request, tmp_path_factory.mktemp(f"schemathesis-{request.param}")) as service:
        yield service


def _uploaded_package(service: ServiceProcess) -> str:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("pkg/__init__.py", "")
    with service.client() as http:
        zipped = {"Content-Type": "application/zip"}
        answer = http.post("/v1/packages", content=buffer.getvalue(), headers=zipped)
    assert answer.status_code in (200, 201), answer.text
    return answer.json()["uri"]


@pytest.mark.parametrize("service", STORES, indirect=True)
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


def test_a_405_allows_every_method_the_path_has(service: ServiceProcess) -> None:
    """``Allow`` names all the methods of the path (Starlette's named only the first route's)."""
    paths = httpx.get(f"{service.url}/openapi.json").json()["paths"]
    with service.client() as http:
        for path, operations in paths.items():
            declared = {method.upper() for method in operations}
            unused = next(m for m in ("PUT", "PATCH", "DELETE", "POST") if m not in declared)
            answer = http.request(unused, path.replace("{job_id}", "some-job"))
            assert answer.status_code == 405, (path, unused, answer.text)
            allowed = {method.strip() for method in answer.headers["allow"].split(",")}
            assert allowed - {"HEAD"} == declared, (path, answer.headers["allow"])


def test_jobs_are_answered_in_the_shape_of_the_job_model(service: ServiceProcess) -> None:
    """The job routes write their JSON without the response model (it costs a second validation):
    the fields are the model's, in its order."""
    fields = list(schemas.Job.model_fields)
    spec = {"name": "shape", "model": "mlp", "data": "digits", "labels": {"team": "shape"}}
    with service.client() as http:
        created = http.post("/v1/jobs", json=spec)
        assert created.status_code == 201, created.text
        job = created.json()
        assert list(job) == fields
        assert list(http.get(f"/v1/jobs/{job['id']}").json()) == fields
        page = http.get("/v1/jobs", params={"label": "team=shape"}).json()
        assert list(page) == list(schemas.JobPage.model_fields)
        assert [list(j) for j in page["jobs"]] == [fields]
        assert schemas.Job.model_validate(page["jobs"][0]) == schemas.Job.model_validate(job)
        cancelled = http.post(f"/v1/jobs/{job['id']}/cancel")
        assert cancelled.status_code == 202 and list(cancelled.json()) == fields
        retried = http.post(f"/v1/jobs/{job['id']}/retry")
        assert retried.status_code == 202 and retried.json()["attempt"] == 2


def test_what_the_store_cannot_hold_is_refused_or_matches_nothing(service: ServiceProcess) -> None:
    """Postgres keeps no NUL in text and 200 characters in a label, and its seq is an INTEGER: the
    schema says so where a request can carry them, and nothing of it is a 5xx."""
    spec = {"name": "limits", "model": "mlp", "data": "digits"}
    with service.client() as http:
        for labels in ({"team": "x" * 201}, {"team": "a\x00b"}, {"a\x00b": "team"}):
            answer = http.post("/v1/jobs", json={**spec, "labels": labels})
            assert answer.status_code == 422 and answer.json()["error"]["code"] == "invalid_spec", answer.text
        assert http.post("/v1/jobs", json={**spec, "labels": {"team": "x" * 200}}).status_code == 201
        assert http.get("/v1/jobs/a%00b").status_code == 404
        page = http.get("/v1/jobs", params={"label": "team=a\x00b"})
        assert page.status_code == 200 and page.json()["jobs"] == []
        last = http.get("/v1/jobs", params={"cursor": "f_________8"})  # seq 2**63-1: every job is older
        assert last.status_code == 200 and last.json()["jobs"], last.text
