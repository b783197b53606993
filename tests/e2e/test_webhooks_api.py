"""Webhooks over HTTP, through a real `hutch serve` on SQLite and on Postgres: subscriptions are
made, read and removed like every other ``/v1`` resource (bearer token, 422 naming the field, 404),
and the changes of jobs submitted and cancelled over HTTP arrive, signed, at a receiver on loopback
(tests/webhook_receiver.py); the deliveries route and ``/metrics`` say how it went.

No Ray: jobs stay QUEUED, and cancelling one is a real change, QUEUED → CANCELLED. Failures,
restarts, ordering and the leader are tested without a server in tests/integration/test_webhooks.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.harness import wait_for
from tests.e2e.conftest import ServiceProcess
from tests.webhook_receiver import Receiver

pytestmark = pytest.mark.slow

SECRET = "e2e-webhook-secret-0123456789"
SPEC = {"name": "hooked", "model": "mlp", "data": "digits", "labels": {"team": "hooks"}}


@pytest.fixture()
def receiver() -> Iterator[Receiver]:
    server = Receiver(SECRET)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def field_of(answer: httpx.Response) -> list[str | None]:
    """The fields a 422 names (a webhook's body is a request, not a job spec)."""
    assert answer.status_code == 422 and answer.json()["error"]["code"] == "invalid_request", answer.text
    return [detail["field"] for detail in answer.json()["error"]["details"]]


def test_subscriptions_are_checked_like_every_v1_resource(lite_service: ServiceProcess) -> None:
    with lite_service.client() as http:
        for body, field in [
            ({"url": "ftp://example.com/hook"}, "url"),
            ({"url": "http://user@example.com/"}, "url"),
            ({"events": ["FAILED"]}, "url"),
            ({"url": "http://x/", "events": ["SUCCEEDED", "DONE"]}, "events[1]"),
            ({"url": "http://x/", "events": []}, "events"),
            ({"url": "http://x/", "secret": "short"}, "secret"),
            ({"url": "http://x/", "event": ["FAILED"]}, "event"),
        ]:
            assert field_of(http.post("/v1/webhooks", json=body)) == [field], body
        refused = http.post("/v1/webhooks", json={"url": "ftp://x/"}).json()["error"]["message"]
        assert "url: must be an http:// or https:// URL" in refused
        secret = "not a secret: it has spaces"
        echoed = http.post("/v1/webhooks", json={"url": "http://x/", "secret": secret})
        assert field_of(echoed) == ["secret"] and secret not in echoed.text
        extra = http.post("/v1/webhooks", json={"url": "http://x/", "name": "x"}).json()["error"]
        assert extra["details"][0]["message"] == "unknown field"
        lost = http.get("/v1/webhooks/wh-0/deliveries", params={"status": "lost"})
        assert field_of(lost) == ["query.status[0]"]
        for method, path in (("GET", "/v1/webhooks/wh-none"), ("DELETE", "/v1/webhooks/wh-none"),
                             ("GET", "/v1/webhooks/wh-none/deliveries")):  # fmt: skip
            missing = http.request(method, path)
            assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found", missing.text
            assert "no webhook with id 'wh-none'" in missing.json()["error"]["message"]

        made = http.post("/v1/webhooks", json={"url": "https://ci.example/hutch?x=1"})
        assert made.status_code == 201, made.text
        hook = made.json()
        assert len(hook["secret"]) >= 32 and hook["secret_hint"] == "****" + hook["secret"][-4:]
        assert hook["events"] is None and hook["id"].startswith("wh-")
        shown = http.get(f"/v1/webhooks/{hook['id']}").json()
        assert "secret" not in shown and shown == {key: hook[key] for key in shown}
        assert shown in http.get("/v1/webhooks").json()["webhooks"]
        assert hook["secret"] not in http.get("/v1/webhooks").text
        assert http.delete(f"/v1/webhooks/{hook['id']}").status_code == 204
        assert http.get(f"/v1/webhooks/{hook['id']}").status_code == 404
    with lite_service.client("wrong-token") as http:
        assert http.get("/v1/webhooks").status_code == 401
        assert http.post("/v1/webhooks", json={"url": "http://x/"}).status_code == 401


def test_submitted_and_cancelled_jobs_arrive_signed(lite_service: ServiceProcess, receiver: Receiver) -> None:
    with lite_service.client() as http:
        made = http.post("/v1/webhooks", json={"url": receiver.url("/hutch"), "secret": SECRET})
        ended = http.post(
            "/v1/webhooks", json={"url": receiver.url("/ended"), "secret": SECRET, "events": ["CANCELLED"]}
        )
        assert made.status_code == ended.status_code == 201, made.text + ended.text
        hook, only_ended = made.json(), ended.json()
        assert hook["secret"] == SECRET and only_ended["events"] == ["CANCELLED"]
        jobs = [http.post("/v1/jobs", json=SPEC).json()["id"] for _ in range(2)]
        for job_id in jobs:
            assert http.post(f"/v1/jobs/{job_id}/cancel").status_code == 202

        def arrived(path: str) -> list[tuple[str, str]]:
            return [(r.body["job"]["id"], r.body["job"]["state"]) for r in receiver.accepted
                    if r.path == path and r.body["job"]["id"] in jobs]  # fmt: skip

        wanted = [(job_id, state) for job_id in jobs for state in ("QUEUED", "CANCELLED")]
        wait_for(lambda: sorted(arrived("/hutch")) == sorted(wanted), 20, "each change of each job")
        wait_for(lambda: len(arrived("/ended")) == 2, 20, "the cancellations")
        assert receiver.refused == []
        for job_id in jobs:
            assert [state for job, state in arrived("/hutch") if job == job_id] == ["QUEUED", "CANCELLED"]
        body = next(r.body for r in receiver.accepted if r.body["job"]["id"] == jobs[0])
        assert body["type"] == "job.state_changed" and body["webhook_id"] == hook["id"]
        assert body["job"]["name"] == "hooked" and body["job"]["labels"] == {"team": "hooks"}
        assert body["job"]["attempt"] == 1 and body["message"] == "submitted"

        def metrics() -> dict[tuple[str, tuple[str, ...]], float]:
            text = httpx.get(lite_service.url + "/metrics").text
            return {
                (sample.name, tuple(sample.labels.values())): sample.value
                for family in text_string_to_metric_families(text)
                for sample in family.samples
            }

        delivered = ("hutch_webhook_deliveries_total", ("delivered",))
        samples = wait_for(lambda: (now := metrics())[delivered] >= 6 and now, 20, "6 deliveries recorded")
        assert ("hutch_webhook_deliveries_total", ("failed",)) in samples
        assert ("hutch_webhook_deliveries_pending", ()) in samples

        deliveries = f"/v1/webhooks/{hook['id']}/deliveries"
        page = http.get(deliveries, params={"status": "delivered", "limit": 3})
        assert page.status_code == 200, page.text
        first = page.json()
        assert len(first["deliveries"]) == 3 and first["next_cursor"]
        rest = http.get(deliveries, params={"cursor": first["next_cursor"]}).json()
        listed = first["deliveries"] + rest["deliveries"]
        in_order = [(job_id, "QUEUED") for job_id in jobs] + [(job_id, "CANCELLED") for job_id in jobs]
        assert [(d["job_id"], d["state"]) for d in reversed(listed)] == in_order
        assert all(d["status"] == "delivered" and d["attempts"] == 1 and d["next_attempt_at"] is None
                   for d in listed)  # fmt: skip

        assert http.delete(f"/v1/webhooks/{hook['id']}").status_code == 204
        later = http.post("/v1/jobs", json=SPEC).json()["id"]
        assert http.post(f"/v1/jobs/{later}/cancel").status_code == 202
        jobs.append(later)
        wait_for(lambda: len(arrived("/ended")) == 3, 20, "the later job's cancellation")
        assert [job for job, _ in arrived("/hutch") if job == later] == [], "sent after the webhook went"
