"""The API's contract over real HTTP: validation errors, auth on every route, idempotent
submission under concurrency, paging and filters, the error shape, probes.

The service runs as a real `hutch serve` process with a real SQLite store; its Ray address is
unreachable, so submitted jobs stay QUEUED and nothing trains (Ray's side is tested in
test_service_ray.py).
"""

from __future__ import annotations

import copy
import io
import json
import stat
import subprocess
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from api.client import Client
from benchmarks.harness import wait_for
from tests.e2e.conftest import ROOT, TOKEN, ServiceProcess

SPEC: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "digits-adahessian.yaml").read_text())


def spec_with(**changes: Any) -> dict[str, Any]:
    """The example spec with dotted-path changes, e.g. ``{"optimizer.lr": -1}``."""
    spec = copy.deepcopy(SPEC)
    for path, value in changes.items():
        *parents, last = path.split(".")
        node = spec
        for key in parents:
            node = node[key]
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value
    return spec


_DELETE = object()


def assert_error(response: httpx.Response, status: int, code: str, *fragments: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    error = body["error"]
    assert set(error) == {"status", "code", "message", "details"}
    assert error["status"] == status and error["code"] == code, error
    text = error["message"] + " " + " ".join(f"{d['field']}: {d['message']}" for d in error["details"])
    for fragment in fragments:
        assert fragment in text, f"{fragment!r} not in {text!r}"
    return error


BAD_SUBMISSIONS = [
    # (case, body bytes or spec, expected status, code, fragments in message/details)
    ("not JSON", b"{name: oops", 422, "invalid_spec", ["not valid JSON"]),
    ("a list, not a mapping", b"[1, 2]", 422, "invalid_spec", ["must be a mapping"]),
    ("no name", spec_with(name=_DELETE), 422, "invalid_spec", ["name: required field is missing"]),
    ("negative lr", spec_with(**{"optimizer.lr": -1}), 422, "invalid_spec", ["optimizer.lr", "than 0"]),
    ("typo in a section", {**spec_with(), "optimiser": {}}, 422, "invalid_spec", ["did you mean 'optim"]),
    ("unknown model", spec_with(**{"model.name": "cnnn"}), 422, "invalid_spec", ["model.name", "cnn"]),
    ("name not a DNS label", spec_with(name="Digits_Job"), 422, "invalid_spec", ["name", "DNS label"]),
    ("uneven batch", spec_with(**{"training.global_batch_size": 63}), 422, "invalid_spec",
     ["training.global_batch_size", "divisible"]),
    ("steps a string", spec_with(**{"training.steps": "many"}), 422, "invalid_spec", ["training.steps"]),
    ("hessian freq zero", spec_with(**{"optimizer.hessian_update_freq": 0}), 422, "invalid_spec",
     ["optimizer.hessian_update_freq"]),
    ("fp16 precision", spec_with(**{"backend.precision": "fp16"}), 422, "invalid_spec",
     ["backend.precision", "'fp32' or 'bf16'"]),
    ("body over the limit", {**spec_with(), "labels": {"x": "y" * 2_000_000}}, 413, "payload_too_large",
     ["larger than"]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "body", "status", "code", "fragments"), BAD_SUBMISSIONS, ids=[c[0] for c in BAD_SUBMISSIONS]
)
def test_bad_submissions_are_refused_with_the_field_and_reason(
    lite_service: ServiceProcess, case: str, body: Any, status: int, code: str, fragments: list[str]
) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    with lite_service.client() as http:
        before = http.get("/v1/jobs", params={"limit": 200}).json()["jobs"]
        response = http.post("/v1/jobs", content=content, headers={"Content-Type": "application/json"})
        assert_error(response, status, code, *fragments)
        assert http.get("/v1/jobs", params={"limit": 200}).json()["jobs"] == before, (
            "a refused job was stored"
        )


BAD_REQUESTS = [
    # (case, method, path, params, expected status, code, fragments)
    ("unknown state", "GET", "/v1/jobs", {"state": "DONE"}, 422, "invalid_request", ["query.state"]),
    ("limit zero", "GET", "/v1/jobs", {"limit": 0}, 422, "invalid_request", ["query.limit"]),
    ("limit too big", "GET", "/v1/jobs", {"limit": 100_000}, 422, "invalid_request", ["query.limit"]),
    ("garbage cursor", "GET", "/v1/jobs", {"cursor": "not-a-cursor"}, 422, "invalid_request", ["cursor"]),
    ("label without =", "GET", "/v1/jobs", {"label": "team"}, 422, "invalid_request", ["key=value"]),
    ("missing job", "GET", "/v1/jobs/nope-00000000", {}, 404, "not_found", ["nope-00000000"]),
    ("cancel missing job", "POST", "/v1/jobs/nope/cancel", {}, 404, "not_found", []),
    ("retry missing job", "POST", "/v1/jobs/nope/retry", {}, 404, "not_found", []),
    ("delete missing job", "DELETE", "/v1/jobs/nope", {}, 404, "not_found", []),
    ("logs of missing job", "GET", "/v1/jobs/nope/logs", {}, 404, "not_found", []),
    ("metrics since negative", "GET", "/v1/jobs/nope/metrics", {"since": -1}, 422, "invalid_request",
     ["query.since"]),
    ("unknown route", "GET", "/v1/widgets", {}, 404, "not_found", []),
    ("wrong method", "PUT", "/v1/jobs", {}, 405, "method_not_allowed", []),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "method", "path", "params", "status", "code", "fragments"),
    BAD_REQUESTS,
    ids=[c[0] for c in BAD_REQUESTS],
)
def test_bad_requests_get_json_errors(
    lite_service: ServiceProcess, case: str, method: str, path: str, params: dict, status: int, code: str,
    fragments: list[str],
) -> None:  # fmt: skip
    with lite_service.client() as http:
        assert_error(http.request(method, path, params=params), status, code, *fragments)


def test_actions_in_the_wrong_state_are_conflicts(lite_service: ServiceProcess) -> None:
    with lite_service.client() as http:
        job = http.post("/v1/jobs", json=spec_with(name="conflicts")).json()
        assert job["state"] == "QUEUED"
        assert_error(http.post(f"/v1/jobs/{job['id']}/retry"), 409, "conflict", "only FAILED or CANCELLED")
        assert_error(http.delete(f"/v1/jobs/{job['id']}"), 409, "conflict", "cancel it first")
        cancelled = http.post(f"/v1/jobs/{job['id']}/cancel")
        assert cancelled.status_code == 202 and cancelled.json()["state"] == "CANCELLED"
        assert_error(http.post(f"/v1/jobs/{job['id']}/cancel"), 409, "conflict", "already CANCELLED")
        events = [e["state"] for e in http.get(f"/v1/jobs/{job['id']}/events").json()]
        assert events == ["QUEUED", "CANCELLED"]
        assert http.delete(f"/v1/jobs/{job['id']}").status_code == 204
        assert_error(http.get(f"/v1/jobs/{job['id']}"), 404, "not_found")


def _v1_operations(service: ServiceProcess) -> list[tuple[str, str]]:
    schema = httpx.get(service.url + "/openapi.json").json()
    operations = []
    for path, methods in schema["paths"].items():
        if path.startswith("/v1"):
            concrete = path.replace("{job_id}", "some-job")
            operations += [(method.upper(), concrete) for method in methods]
    return operations


@pytest.mark.parametrize(
    "token", [None, "wrong-token", TOKEN + "x", TOKEN[:-1]], ids=["missing", "wrong", "longer", "prefix"]
)
def test_every_v1_route_refuses_a_missing_or_wrong_token(
    lite_service: ServiceProcess, token: str | None
) -> None:
    operations = _v1_operations(lite_service)
    assert len(operations) >= 9, operations
    with lite_service.client(token) as http:
        for method, path in operations:
            body = json.dumps(SPEC).encode() if method == "POST" else None
            response = http.request(method, path, content=body, headers={"Content-Type": "application/json"})
            error = assert_error(response, 401, "unauthorized")
            assert TOKEN not in response.text and (token is None or token not in error["message"])
            assert response.headers.get("www-authenticate") == "Bearer"
    log = lite_service.log_tail(10_000)
    assert TOKEN not in log and (token is None or token not in log), "a token reached the service log"


def test_probes_need_no_token(lite_service: ServiceProcess) -> None:
    assert httpx.get(lite_service.url + "/healthz").json()["status"] == "ok"
    ready = httpx.get(lite_service.url + "/readyz")
    # Ray is unreachable here: ready all the same (the API answers, jobs queue), saying so.
    assert ready.status_code == 200 and ready.json()["status"] == "degraded", ready.text
    assert ready.json()["checks"]["database"] == "ok" and ready.json()["checks"]["ray"].startswith("error")
    metrics = httpx.get(lite_service.url + "/metrics").text
    assert 'hutch_jobs{state="QUEUED"}' in metrics and "hutch_http_requests_total" in metrics


def test_metrics_say_what_the_service_sees(lite_service: ServiceProcess) -> None:
    """The control plane's own numbers, read as Prometheus parses them: Ray unreachable, the
    queue's oldest wait growing, reconciler passes counted, a failure counter for every cause
    from the start (so the first failure of a kind is an increase, not a new series), requests
    counted by the route's full template (what the dashboard groups by)."""
    from prometheus_client.parser import text_string_to_metric_families

    with lite_service.client() as http:
        assert http.post("/v1/jobs", json=spec_with(name="metrics-queued")).status_code == 201
        assert http.get("/v1/jobs/no-such-job").status_code == 404

    def read() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = httpx.get(lite_service.url + "/metrics").text
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    first = read()
    passes = ("hutch_reconciler_passes_total", ())
    assert first[("hutch_ray_up", ())] == 0
    assert first[("hutch_jobs", (("state", "QUEUED"),))] >= 1
    for cause in ("non_finite_loss", "job_error", "infrastructure"):
        assert ("hutch_job_failures_total", (("cause", cause),)) in first
    later = wait_for(lambda: (now := read())[passes] > first[passes] and now, 30, "another reconciler pass")
    assert later[("hutch_queue_oldest_seconds", ())] > first[("hutch_queue_oldest_seconds", ())] > 0
    assert later[("hutch_reconciler_seconds_total", ())] > 0
    requests = "hutch_http_requests_total"
    assert first[(requests, (("method", "POST"), ("route", "/v1/jobs"), ("status", "201")))] >= 1
    assert first[(requests, (("method", "GET"), ("route", "/v1/jobs/{job_id}"), ("status", "404")))] >= 1


def test_same_idempotency_key_makes_one_job_under_20_concurrent_submissions(
    lite_service: ServiceProcess,
) -> None:
    spec = spec_with(name="idem-same")

    def submit(key: str) -> httpx.Response:
        with lite_service.client() as http:
            return http.post("/v1/jobs", json=spec, headers={"Idempotency-Key": key})

    with ThreadPoolExecutor(20) as pool:
        same = list(pool.map(submit, ["one-key"] * 20))
        different = list(pool.map(submit, [f"key-{i}" for i in range(20)]))
    assert all(r.status_code in (200, 201) for r in same + different), [r.text for r in same + different]
    assert len({r.json()["id"] for r in same}) == 1
    assert sorted(r.status_code for r in same) == [200] * 19 + [201]
    assert sum(r.headers.get("idempotent-replayed") == "true" for r in same) == 19
    assert len({r.json()["id"] for r in different}) == 20
    with lite_service.client() as http:
        stored = http.get("/v1/jobs", params={"label": "example=true", "limit": 200}).json()["jobs"]
        assert len([j for j in stored if j["name"] == "idem-same"]) == 21
        replay = http.post(
            "/v1/jobs", json=spec_with(name="idem-other"), headers={"Idempotency-Key": "one-key"}
        )
        assert_error(replay, 409, "idempotency_conflict", "different spec")
        assert_error(
            http.post("/v1/jobs", json=spec, headers={"Idempotency-Key": "k" * 300}), 422, "invalid_request",
            "header.idempotency-key",
        )  # fmt: skip


def test_a_used_key_returns_its_job_even_when_the_spec_would_now_be_refused(
    lite_service: ServiceProcess, tmp_path: Path
) -> None:
    """A new submission pays no lookup of its key (the store's unique index finds a used one), so
    the refusals that come before the store (a package gone, a cluster too small) ask for it."""
    (tmp_path / "mynet.py").write_text("def build(**kwargs):\n    return None\n")
    with Client(lite_service.url, TOKEN) as client:
        package = client.upload_package(tmp_path)
    spec = spec_with(name="idem-package", runtime_env={"working_dir": package.uri})
    key = {"Idempotency-Key": "package-key"}
    with lite_service.client() as http:
        made = http.post("/v1/jobs", json=spec, headers=key)
        assert made.status_code == 201, made.text
        shown = http.get(f"/v1/jobs/{made.json()['id']}").json()
        assert made.json()["queue_position"] == shown["queue_position"] is not None
        (lite_service.data_dir / "storage" / "packages" / f"{package.sha256}.zip").unlink()
        again = http.post("/v1/jobs", json=spec, headers=key)
        assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true", again.text
        assert again.json()["id"] == made.json()["id"]
        assert again.json()["queue_position"] == made.json()["queue_position"]
        assert_error(http.post("/v1/jobs", json=spec), 422, "unknown_package")
        other = spec_with(name="idem-package-2", runtime_env={"working_dir": package.uri})
        assert_error(http.post("/v1/jobs", json=other, headers=key), 409, "idempotency_conflict")


def test_list_pages_newest_first_and_filters(lite_service: ServiceProcess) -> None:
    with lite_service.client() as http:
        made = []
        for i in range(7):
            spec = spec_with(
                name=f"page-{i}", labels={"suite": "paging", "parity": "even" if i % 2 == 0 else "odd"}
            )
            made.append(http.post("/v1/jobs", json=spec).json()["id"])
        http.post(f"/v1/jobs/{made[0]}/cancel")
        seen, cursor = [], None
        while True:
            params: dict[str, Any] = {"label": "suite=paging", "limit": 3}
            if cursor:
                params["cursor"] = cursor
            page = http.get("/v1/jobs", params=params).json()
            assert len(page["jobs"]) <= 3
            seen += [job["id"] for job in page["jobs"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen == made[::-1]
        both = http.get("/v1/jobs", params=[("label", "suite=paging"), ("label", "parity=even")]).json()[
            "jobs"
        ]
        assert [j["id"] for j in both] == [made[6], made[4], made[2], made[0]]
        queued = http.get("/v1/jobs", params=[("label", "suite=paging"), ("state", "QUEUED")]).json()["jobs"]
        assert made[0] not in {j["id"] for j in queued} and len(queued) == 6
        either = http.get(
            "/v1/jobs", params=[("label", "suite=paging"), ("state", "QUEUED"), ("state", "CANCELLED")]
        ).json()["jobs"]
        assert len(either) == 7


def test_curl_submission_and_read_back(lite_service: ServiceProcess) -> None:
    """What a user types: curl with a YAML spec converted to JSON, then GET it."""
    body = json.dumps(spec_with(name="from-curl"))
    out = subprocess.run(
        ["curl", "-sS", "-X", "POST", f"{lite_service.url}/v1/jobs", "-H", f"Authorization: Bearer {TOKEN}",
         "-H", "Content-Type: application/json", "-d", body, "-w", "\n%{http_code}"],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    text, status = out.stdout.rsplit("\n", 1)
    assert status == "201"
    job = json.loads(text)
    url = f"{lite_service.url}/v1/jobs/{job['id']}"
    got = subprocess.run(
        ["curl", "-sS", "-f", url, "-H", f"Authorization: Bearer {TOKEN}"],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    assert json.loads(got.stdout)["spec"]["training"]["steps"] == SPEC["training"]["steps"]


def test_a_chunked_body_over_the_limit_is_refused_while_read(lite_service: ServiceProcess) -> None:
    """No Content-Length to go by: the body is counted as it arrives."""
    chunks = iter([b'{"name": "big", "labels": {"x": "', b"y" * 700_000, b"y" * 700_000, b'"}}'])
    with lite_service.client() as http:
        response = http.post("/v1/jobs", content=chunks, headers={"Content-Type": "application/json"})
    assert "content-length" not in response.request.headers
    assert_error(response, 413, "payload_too_large", "larger than 1048576 bytes")


# -- uploaded working directories -------------------------------------------------------------


def _zip(entries: dict[str, bytes], symlink: str | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
        if symlink is not None:
            link = zipfile.ZipInfo(symlink)
            link.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(link, "/etc/passwd")
    return buffer.getvalue()


def _corrupted(archive: bytes) -> bytes:
    """The archive with one byte of its first file's data flipped: its CRC no longer matches."""
    broken = bytearray(archive)
    offset = 30 + len("model.py")  # local file header, then the name, then the data
    broken[offset] ^= 0xFF
    return bytes(broken)


def _packages_left(service: ServiceProcess) -> list[str]:
    root = service.data_dir / "storage" / "packages"
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def test_a_working_directory_is_uploaded_once_and_named_in_a_spec(
    lite_service: ServiceProcess, tmp_path: Path
) -> None:
    (tmp_path / "mynet.py").write_text("def build(**kwargs):\n    return None\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "big.bin").write_bytes(b"x" * 1000)
    (tmp_path / ".hutchignore").write_text("data/\n")
    with Client(lite_service.url, TOKEN) as client:
        first = client.upload_package(tmp_path)
        again = client.upload_package(tmp_path)  # unchanged files: the same bytes, kept once
        assert first == again and first.files == 1 and first.uri == f"hutch://packages/{first.sha256}.zip"
        assert _packages_left(lite_service) == [f"{first.sha256}.zip"]
        with zipfile.ZipFile(lite_service.data_dir / "storage" / "packages" / f"{first.sha256}.zip") as kept:
            assert kept.namelist() == ["mynet.py"]  # .hutchignore's data/ and itself are left out

        env_vars = {"WANDB_API_KEY": "s3cr3t-value", "HF_TOKEN": "hf_abc", "LOG_LEVEL": "debug"}
        spec = spec_with(name="own-code", runtime_env={"env_vars": env_vars, "pip": ["humanize==4.9.0"]})
        job = client.submit(spec, working_dir=tmp_path)
        shown = job.spec["runtime_env"]
        assert shown["working_dir"] == first.uri and shown["pip"] == ["humanize==4.9.0"]
        assert shown["env_vars"] == {"WANDB_API_KEY": "***", "HF_TOKEN": "***", "LOG_LEVEL": "debug"}
    with lite_service.client() as http:
        for path in (f"/v1/jobs/{job.id}", "/v1/jobs?limit=200"):
            text = http.get(path).text
            assert "s3cr3t-value" not in text and "hf_abc" not in text and '"***"' in text
    assert "s3cr3t-value" not in lite_service.log_tail(10_000)


UNKNOWN_PACKAGE = "hutch://packages/" + "0" * 64 + ".zip"


@pytest.mark.parametrize(
    ("case", "runtime_env", "code", "field", "fragment"),
    [
        ("unknown key", {"conda": "env.yaml"}, "invalid_spec", "runtime_env.conda", "cluster image's Python"),
        ("typo", {"working_directory": "x"}, "invalid_spec", "runtime_env.working_directory", "working_dir"),
        ("local path", {"working_dir": "./src"}, "invalid_spec", "runtime_env.working_dir", "remote URI"),
        ("not a zip URI", {"working_dir": "s3://b/c.tar"}, "invalid_spec", "runtime_env.working_dir", ".zip"),
        ("pip option", {"pip": ["--index-url=http://x"]}, "invalid_spec", "runtime_env.pip", "no options"),
        ("reserved env var", {"env_vars": {"RAY_ADDRESS": "x"}}, "invalid_spec", "runtime_env.env_vars",
         "set by Ray and hutch"),
        ("not uploaded", {"working_dir": UNKNOWN_PACKAGE}, "unknown_package", "runtime_env.working_dir",
         "no uploaded package"),
    ],
)  # fmt: skip
def test_bad_runtime_envs_are_refused_with_the_field(
    lite_service: ServiceProcess, case: str, runtime_env: dict, code: str, field: str, fragment: str
) -> None:
    with lite_service.client() as http:
        response = http.post("/v1/jobs", json=spec_with(name="bad-env", runtime_env=runtime_env))
    error = assert_error(response, 422, code)
    assert any(d["field"] == field and fragment in d["message"] for d in error["details"]), error


def test_an_env_var_value_is_never_echoed_in_an_error(lite_service: ServiceProcess) -> None:
    runtime_env = {"env_vars": {"MY_SECRET": "hunter2-" + "x" * 5000}}
    with lite_service.client() as http:
        response = http.post("/v1/jobs", json=spec_with(name="bad-env", runtime_env=runtime_env))
    error = assert_error(response, 422, "invalid_spec")
    assert error["details"][0]["field"] == "runtime_env.env_vars.MY_SECRET" and "hunter2" not in response.text


@pytest.mark.parametrize(
    ("case", "body", "fragment"),
    [
        ("not a zip", b"this is not an archive", "not a readable zip archive"),
        ("truncated", _zip({"model.py": b"x = 1\n" * 100})[:-30], "not a readable zip archive"),
        ("corrupt data", _corrupted(_zip({"model.py": b"x = 1\n" * 100})), "fails its CRC check"),
        ("path escape", _zip({"../../evil.py": b"x = 1\n"}), "outside the working directory"),
        ("absolute path", _zip({"/etc/cron.d/evil": b"x"}), "outside the working directory"),
        ("symbolic link", _zip({"model.py": b"x = 1\n"}, symlink="passwd"), "symbolic link"),
        ("empty", _zip({}), "no files"),
    ],
)
def test_bad_packages_are_refused_and_leave_nothing_behind(
    lite_service: ServiceProcess, case: str, body: bytes, fragment: str
) -> None:
    before = _packages_left(lite_service)
    with lite_service.client() as http:
        response = http.post("/v1/packages", content=body, headers={"Content-Type": "application/zip"})
    error = assert_error(response, 422, "bad_package", fragment)
    assert error["details"][0]["field"] == "body"
    assert _packages_left(lite_service) == before


def test_package_uploads_over_the_limit_or_of_another_type_are_refused(lite_service: ServiceProcess) -> None:
    before = _packages_left(lite_service)
    headers = {"Content-Type": "application/zip"}
    with lite_service.client() as http:
        declared = http.post("/v1/packages", content=b"x" * 4_000_001, headers=headers)
        assert_error(declared, 413, "payload_too_large", "than 4000000 bytes", "HUTCH_MAX_PACKAGE_BYTES")
        chunks = iter([b"PK" + b"x" * 2_000_000, b"x" * 2_000_000, b"x" * 100])  # no Content-Length
        streamed = http.post("/v1/packages", content=chunks, headers=headers)
        assert_error(streamed, 413, "payload_too_large", "HUTCH_MAX_PACKAGE_BYTES")
        typed = http.post("/v1/packages", json={"not": "a zip"})
        assert_error(typed, 415, "unsupported_media_type", "application/zip")
    assert _packages_left(lite_service) == before


def test_queued_jobs_show_their_place_in_the_queue(lite_service: ServiceProcess) -> None:
    """Nothing starts here (Ray is out of reach), so the queue only grows: priority first, then age."""
    with lite_service.client() as http:
        made = {}
        for name, priority in [("q-a", 0), ("q-b", 0), ("q-urgent", 7), ("q-later", -1)]:
            made[name] = http.post("/v1/jobs", json={**spec_with(name=name), "priority": priority}).json()
        place = {name: http.get(f"/v1/jobs/{j['id']}").json()["queue_position"] for name, j in made.items()}
        assert place["q-urgent"] == 1
        assert place["q-a"] < place["q-b"] == place["q-a"] + 1 < place["q-later"]
        listed = {job["id"]: job for job in http.get("/v1/jobs", params={"limit": 200}).json()["jobs"]}
        assert {name: listed[job["id"]]["queue_position"] for name, job in made.items()} == place
        assert listed[made["q-urgent"]["id"]]["priority"] == 7
        http.post(f"/v1/jobs/{made['q-urgent']['id']}/cancel")
        cancelled = http.get(f"/v1/jobs/{made['q-urgent']['id']}").json()
        assert cancelled["state"] == "CANCELLED" and cancelled["queue_position"] is None
        assert http.get(f"/v1/jobs/{made['q-a']['id']}").json()["queue_position"] == place["q-a"] - 1
        for job in made.values():
            http.post(f"/v1/jobs/{job['id']}/cancel")
        refused = http.post("/v1/jobs", json={**spec_with(name="q-bad"), "priority": 5000})
        assert_error(refused, 422, "invalid_spec", "priority")
