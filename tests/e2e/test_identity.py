"""Named API tokens over HTTP, on a real `hutch serve` (its Ray out of reach: jobs stay QUEUED,
which cancel, retry and delete all work on): who submitted a job is recorded and shown by the
API, the client and the CLI; a token may change only its own jobs unless it is an admin's (403
naming the owner otherwise); a plain token of before names is an admin; and every request that
changes something is one audit line with who, what, which job and the outcome."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.client import Client
from benchmarks.harness import free_port
from service.identity import plain_token_name
from tests.e2e.conftest import HUTCH, running_service
from tests.e2e.test_api_contract import assert_error, spec_with

TOKENS = {"alice": "tok-alice", "bob": "tok-bob", "ops": "tok-ops", "legacy": "tok-legacy"}
SETTING = "alice:tok-alice,bob:tok-bob,ops:tok-ops:admin,tok-legacy"


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    env = {"HUTCH_RAY_ADDRESS": f"http://127.0.0.1:{free_port()}", "HUTCH_API_TOKENS": SETTING}
    with running_service(tmp_path_factory.mktemp("identity"), env, ready_path="/healthz") as running:
        yield running


def http(service: Any, who: str) -> httpx.Client:
    return service.client(TOKENS[who])


def hutch(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(HUTCH), *args], capture_output=True, text=True, env=env, timeout=60)


def audit_lines(service: Any) -> list[dict[str, Any]]:
    lines = (service.data_dir / "service.log").read_text().splitlines()
    return [json.loads(line.split(" audit ", 1)[1]) for line in lines if " hutch.audit: audit " in line]


def test_tokens_own_their_jobs_and_every_change_is_audited(service: Any) -> None:
    legacy = plain_token_name(TOKENS["legacy"])
    for who, expected in [("alice", False), ("ops", True), ("legacy", True)]:
        answer = http(service, who).get("/v1/whoami").json()
        assert answer == {"name": legacy if who == "legacy" else who, "admin": expected}, answer

    a = http(service, "alice").post("/v1/jobs", json=spec_with(name="alices")).json()
    b = http(service, "bob").post("/v1/jobs", json=spec_with(name="bobs")).json()
    assert (a["submitted_by"], b["submitted_by"]) == ("alice", "bob")
    mine = http(service, "alice").get("/v1/jobs", params={"submitted_by": "alice"}).json()["jobs"]
    assert [job["id"] for job in mine] == [a["id"]]

    # Bob may not touch Alice's job; the answer says whose it is and what would do.
    refused = http(service, "bob").post(f"/v1/jobs/{a['id']}/cancel")
    assert_error(refused, 403, "forbidden", "submitted by alice")
    assert "admin token" in refused.json()["error"]["message"]
    assert http(service, "bob").get(f"/v1/jobs/{a['id']}").json()["state"] == "QUEUED"  # reads are open
    # His own: cancel, retry, cancel again, delete.
    for method, path, status in [
        ("POST", f"/v1/jobs/{b['id']}/cancel", 202), ("POST", f"/v1/jobs/{b['id']}/retry", 202),
        ("POST", f"/v1/jobs/{b['id']}/cancel", 202), ("DELETE", f"/v1/jobs/{b['id']}", 204),
    ]:  # fmt: skip
        assert http(service, "bob").request(method, path).status_code == status, (method, path)
    # An admin, and the plain token of before names, may change anyone's.
    assert http(service, "ops").post(f"/v1/jobs/{a['id']}/cancel").status_code == 202
    assert http(service, "legacy").post(f"/v1/jobs/{a['id']}/retry").status_code == 202
    assert_error(http(service, "alice").delete(f"/v1/jobs/{a['id']}"), 409, "conflict", "cancel it first")
    assert (
        httpx.post(
            f"{service.url}/v1/jobs/{a['id']}/cancel", headers={"Authorization": "Bearer x"}
        ).status_code
        == 401
    )

    lines = audit_lines(service)
    seen = [(line["who"], line["action"], line["job"], line["status"], line["outcome"]) for line in lines]
    assert seen == [
        ("alice", "submit", a["id"], 201, "ok"),
        ("bob", "submit", b["id"], 201, "ok"),
        ("bob", "cancel", a["id"], 403, "forbidden"),
        ("bob", "cancel", b["id"], 202, "ok"),
        ("bob", "retry", b["id"], 202, "ok"),
        ("bob", "cancel", b["id"], 202, "ok"),
        ("bob", "delete", b["id"], 204, "ok"),
        ("ops", "cancel", a["id"], 202, "ok"),
        (legacy, "retry", a["id"], 202, "ok"),
        ("alice", "delete", a["id"], 409, "conflict"),
        (None, "cancel", a["id"], 401, "unauthorized"),
    ], seen
    assert not any(token in (service.data_dir / "service.log").read_text() for token in TOKENS.values())

    # Webhooks see every team's jobs: an admin's to manage.
    hook = {"url": "http://127.0.0.1:9/hooks"}
    assert_error(http(service, "alice").post("/v1/webhooks", json=hook), 403, "forbidden", "admin token")
    assert_error(http(service, "alice").get("/v1/webhooks"), 403, "forbidden", "alice's is not one")
    created = http(service, "ops").post("/v1/webhooks", json=hook)
    assert created.status_code == 201, created.text
    assert http(service, "ops").delete(f"/v1/webhooks/{created.json()['id']}").status_code == 204

    # The client and the CLI show who submitted what, and `--mine` lists one's own.
    with Client(service.url, TOKENS["alice"]) as client:
        assert client.whoami().name == "alice"
        assert client.get(a["id"]).submitted_by == "alice"
        assert [job.id for job in client.iter_jobs(submitted_by="bob")] == []  # deleted
    env = {**os.environ, "HUTCH_URL": service.url, "HUTCH_TOKEN": TOKENS["alice"], "COLUMNS": "200"}
    listed = subprocess.run(
        [str(HUTCH), "jobs", "--mine"], capture_output=True, text=True, env=env, timeout=60
    )
    assert listed.returncode == 0 and a["id"] in listed.stdout and "alice" in listed.stdout, listed
    shown = subprocess.run(
        [str(HUTCH), "status", a["id"]], capture_output=True, text=True, env=env, timeout=60
    )
    assert shown.returncode == 0 and "by:" in shown.stdout and "alice" in shown.stdout, shown.stdout
    env["HUTCH_TOKEN"] = TOKENS["bob"]
    cancelled = hutch(env, "cancel", a["id"])
    assert cancelled.returncode != 0 and "submitted by alice" in cancelled.stderr, cancelled


def test_a_malformed_token_setting_stops_the_start_naming_it(tmp_path: Path) -> None:
    env = {**os.environ, "HUTCH_DATA_DIR": str(tmp_path), "HUTCH_API_TOKENS": "alice:tok-a,carol:tok-c:root"}
    started = subprocess.run([str(HUTCH), "serve"], capture_output=True, text=True, env=env, timeout=60)
    assert started.returncode == 2, started
    assert "HUTCH_API_TOKENS" in started.stderr and "entry 2" in started.stderr, started.stderr
    assert "tok-c" not in started.stderr + started.stdout
