"""The service end to end on its embedded defaults: a real `hutch serve` (uvicorn, SQLite) that
starts its own local Ray head, real training jobs submitted through Ray's job API, driven over
HTTP with curl and with the Python client.

Covers: a digits job followed to SUCCEEDED (metrics, logs, checkpoints, the Ray job behind it,
the cluster its driver joined while another Ray runs on the machine); a job of the user's own
code cancelled while it runs and retried from its checkpoint; SIGKILL of the service while a job
runs; jobs that can never fit the cluster; the clean stop taking the local Ray head down.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from api.client import Client
from benchmarks.harness import free_port, wait_for
from benchmarks.ray_nodes import end_process_group, start_ray_head
from service.local_ray import own_port_options
from tests.e2e.conftest import HUTCH, TOKEN, ServiceProcess, local_ray_env, running_service
from tests.e2e.test_api_contract import spec_with
from tests.support import CHROMIUM, forget_current_cluster, rendered_dom

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """The service, and then another Ray head in Ray's default temp dir, as a user's own Ray on
    the same machine would be: the latest cluster there. Ray's job supervisor used to give it
    to the drivers of the service's jobs (they joined it and hung), and Ray's State API, asked
    without an address by Ray Train's placement-group cleaner, found it too and removed the
    runs' placement groups. Every job in this module runs beside it."""
    other_port, other = free_port(), None
    with running_service(tmp_path_factory.mktemp("service"), local_ray_env()) as service:
        try:
            other = start_ray_head(
                {**os.environ, "RAY_AUTH_MODE": "disabled"}, f"--port={other_port}", "--num-cpus=0",
                f"--dashboard-port={free_port()}", *own_port_options(),
                temp_dir=Path(tempfile.gettempdir()) / "ray",
            )  # fmt: skip
            yield service
        finally:
            if other is not None:
                end_process_group(other)
                forget_current_cluster(other_port)


def ray_jobs(service: ServiceProcess) -> Any:
    """Ray's own job client on the service's local head (to check what the service did)."""
    from ray.job_submission import JobSubmissionClient

    dashboard = json.loads((service.data_dir / "local-ray.json").read_text())["dashboard_url"]
    return JobSubmissionClient(dashboard)


def curl(service: ServiceProcess, *args: str, timeout: float = 60) -> str:
    command = ["curl", "-sS", "-f", "-H", f"Authorization: Bearer {TOKEN}", *args]
    return subprocess.run(command, capture_output=True, text=True, check=True, timeout=timeout).stdout


@pytest.fixture(scope="module")
def digits_job(service: ServiceProcess) -> dict[str, Any]:
    """A digits job submitted with curl and followed to its end (its log followed from the start):
    the submission's answer, the final job, and the followed log."""
    spec = spec_with(
        name="e2e-digits",
        **{
            "training.steps": 60,
            "training.checkpoint_every": 20,
            "training.eval_every": 30,
            "training.log_every": 5,
        },
    )
    job = json.loads(
        curl(service, "-X", "POST", f"{service.url}/v1/jobs", "-H", "Content-Type: application/json",
             "-d", json.dumps(spec))
    )  # fmt: skip
    follow_url = f"{service.url}/v1/jobs/{job['id']}/logs?follow=true"
    follower = subprocess.Popen(  # follows the log from the start; must end by itself with the job
        ["curl", "-sS", "-N", "-H", f"Authorization: Bearer {TOKEN}", follow_url],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip

    def state() -> str | None:
        current = json.loads(curl(service, f"{service.url}/v1/jobs/{job['id']}"))
        return current if current["state"] in ("SUCCEEDED", "FAILED", "CANCELLED") else None

    final = wait_for(state, 300, "the digits job to finish", interval=1)
    followed, _ = follower.communicate(timeout=60)  # returns only because the stream ended
    return {"submitted": job, "final": final, "followed": followed, "follower_rc": follower.returncode}


def test_digits_job_over_curl_to_success(service: ServiceProcess, digits_job: dict[str, Any]) -> None:
    job, final = digits_job["submitted"], digits_job["final"]
    job_id = job["id"]
    assert job["state"] == "QUEUED" and job["steps"] == 60
    assert final["state"] == "SUCCEEDED", final["failure_reason"]
    assert final["attempt"] == 1 and final["started_at"] and final["finished_at"]
    assert final["latest_metrics"]["step"] == 60 and final["latest_metrics"]["eval_accuracy"] > 0.8
    assert final["ray_dashboard_url"].endswith(f"/#/jobs/{final['ray_job_id']}")

    followed = digits_job["followed"]
    assert digits_job["follower_rc"] == 0
    assert "[hutch] step 60/60" in followed and f"job {job_id} succeeded" in followed

    records = json.loads(curl(service, f"{service.url}/v1/jobs/{job_id}/metrics"))["records"]
    assert [r["step"] for r in records] == list(range(5, 61, 5))
    first, last = records[0]["loss"], records[-1]["loss"]
    assert last < 0.5 * first, (first, last)
    later = json.loads(curl(service, f"{service.url}/v1/jobs/{job_id}/metrics?since=50"))["records"]
    assert [r["step"] for r in later] == [55, 60]

    head = json.loads((service.data_dir / "local-ray.json").read_text())
    port = head["gcs_address"].rsplit(":", 1)[1]
    assert re.search(rf"Connecting to existing Ray cluster at address: [\d.]+:{port}\b", followed)

    tail = curl(service, f"{service.url}/v1/jobs/{job_id}/logs?tail=3").splitlines()
    assert len(tail) == 3 and f"job {job_id} succeeded" in "\n".join(tail)
    checkpoints = json.loads(curl(service, f"{service.url}/v1/jobs/{job_id}/checkpoints"))["checkpoints"]
    assert [c["step"] for c in checkpoints] == [20, 40, 60]

    info = ray_jobs(service).get_job_info(final["ray_job_id"])
    assert str(info.status.value) == "SUCCEEDED" and info.metadata["hutch_job_id"] == job_id
    assert info.metadata["job_name"] == "e2e-digits"  # what the dashboard's Jobs page shows as its name


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it when it can)")
def test_the_ray_dashboard_jobs_page_shows_each_jobs_name(
    service: ServiceProcess, digits_job: dict[str, Any], tmp_path: Path
) -> None:
    """The Jobs page of the Ray dashboard, rendered in headless Chromium: the row of the job's Ray
    submission shows hutch's job name in the "Name" column (Ray reads metadata ``job_name``)."""
    ray_job_id = digits_job["final"]["ray_job_id"]
    dashboard = json.loads((service.data_dir / "local-ray.json").read_text())["dashboard_url"]
    columns, *rows = table_rows(rendered_dom(f"{dashboard}/#/jobs", tmp_path / "chromium"))
    row = next((r for r in rows if ray_job_id in r), None)
    assert row is not None, f"no row for {ray_job_id} on the Jobs page: {rows}"
    assert row[columns.index("Name")] == "e2e-digits", dict(zip(columns, row))


def table_rows(dom: str) -> list[list[str]]:
    """The text of every cell of every table row in a page, header cells included."""

    def text(cell: str) -> str:
        return html.unescape(re.sub(r"<[^>]+>", "", cell)).strip()

    rows = re.findall(r"<tr\b.*?</tr>", dom, re.S)
    return [[text(cell) for cell in re.findall(r"<t[hd]\b.*?</t[hd]>", row, re.S)] for row in rows]


OWN_DATA = """
import time

import inflection  # from the job's runtime_env pip: importable only inside the job
import torch
from sklearn.datasets import load_iris


class Iris:
    task = "classification"

    def __init__(self, holdout: int = 30):
        assert inflection.underscore("IrisData") == "iris_data"
        x, y = load_iris(return_X_y=True)
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
        x = torch.tensor(x, dtype=torch.float32)[order]
        x = (x - x.mean(0)) / x.std(0)
        y = torch.tensor(y)[order]
        self.train_x, self.train_y = x[holdout:], y[holdout:]
        self.eval_x, self.eval_y = x[:holdout], y[:holdout]

    def train_batch(self, step, seed, batch_size):
        time.sleep(0.01)  # paces the run, so the test's cancel lands well before the last step
        generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
        index = torch.randint(len(self.train_y), (batch_size,), generator=generator)
        return self.train_x[index], self.train_y[index]

    def eval_batches(self, batch_size):
        for start in range(0, len(self.eval_y), batch_size):
            yield self.eval_x[start:start + batch_size], self.eval_y[start:start + batch_size]

    def model_args(self):
        return {"num_classes": 3, "in_features": 4}
"""

OWN_MODEL = """
from torch import nn


def build(num_classes, in_features, hidden=16):
    return nn.Sequential(nn.Linear(in_features, hidden), nn.Tanh(), nn.Linear(hidden, num_classes))
"""


def submit_with_working_dir(
    service: ServiceProcess, spec: dict[str, Any], spec_file: Path, code: Path
) -> str:
    """``hutch submit SPEC --working-dir CODE`` against the service; the new job's id."""
    spec_file.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "HUTCH_URL": service.url, "HUTCH_TOKEN": TOKEN}
    submitted = subprocess.run(
        [str(HUTCH), "submit", str(spec_file), "--working-dir", str(code)],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    return submitted.stdout.strip()


def test_own_code_shipped_with_working_dir_trains_and_resumes_with_the_same_package(
    service: ServiceProcess, client: Client, tmp_path: Path
) -> None:
    """A data set and a model of the user's, in a directory the Ray head has never seen, with a
    pip dependency: submitted with `hutch submit --working-dir`, cancelled while it runs, retried
    (attempt 2's followed log says where it resumed), finished with each step's record once."""
    code = tmp_path / "own"
    (code / "tabular").mkdir(parents=True)
    (code / "tabular" / "__init__.py").write_text("")
    (code / "tabular" / "data.py").write_text(OWN_DATA)
    (code / "tabular" / "model.py").write_text(OWN_MODEL)
    (code / "checkpoints-from-my-laptop").mkdir()
    (code / "checkpoints-from-my-laptop" / "huge.pt").write_bytes(b"0" * 100_000)
    (code / ".gitignore").write_text("checkpoints-from-my-laptop/\n")
    spec = spec_with(
        name="e2e-own-code",
        model={"name": "tabular.model:build", "args": {"hidden": 32}},
        data={"name": "tabular.data:Iris", "args": {}},
        runtime_env={"pip": ["inflection==0.5.1"]},
        **{"training.steps": 600, "training.checkpoint_every": 100, "training.eval_every": 300,
           "training.log_every": 50, "training.global_batch_size": 32, "scaling.num_workers": 1,
           "optimizer.lr": 0.1, "optimizer.warmup_steps": 10},
    )  # fmt: skip
    job_id = submit_with_working_dir(service, spec, tmp_path / "job.yaml", code)
    package = client.get(job_id).spec["runtime_env"]["working_dir"]
    assert package.startswith("hutch://packages/")

    wait_for(lambda: client.checkpoints(job_id).checkpoints, 300, "a first checkpoint", interval=0.5)
    running = client.get(job_id)
    assert running.state == "RUNNING"
    cancelled = client.cancel(job_id)
    assert cancelled.cancel_requested or cancelled.state == "CANCELLED"
    stopped = client.wait(job_id, timeout=120, poll_interval=0.5)
    assert stopped.state == "CANCELLED" and stopped.failure_reason is None
    assert str(ray_jobs(service).get_job_info(running.ray_job_id).status.value) == "STOPPED"
    saved = [c.step for c in client.checkpoints(job_id).checkpoints]
    assert saved and all(step % 100 == 0 for step in saved)

    retried = client.retry(job_id)
    assert retried.state == "QUEUED" and retried.attempt == 2
    resumed_at = None
    for line in client.logs(job_id, follow=True):  # attempt 2's log, followed from its start
        if match := re.search(r"resumed from the checkpoint at step (\d+)", line):
            resumed_at = int(match.group(1))
            break
    assert resumed_at == max(saved)
    final = client.wait(job_id, timeout=300, poll_interval=0.5)
    assert final.state == "SUCCEEDED", final.failure_reason
    assert final.attempt == 2 and final.latest_metrics["step"] == 600
    assert final.latest_metrics["eval_accuracy"] >= 0.9, final.latest_metrics
    steps = [r["step"] for r in client.metrics(job_id).records]
    assert steps == list(range(50, 601, 50)), "records of a step missing or twice after the resume"
    assert [(e.attempt, e.state) for e in client.events(job_id)] == [
        (1, "QUEUED"), (1, "STARTING"), (1, "RUNNING"), (1, "CANCELLED"),
        (2, "QUEUED"), (2, "STARTING"), (2, "RUNNING"), (2, "SUCCEEDED"),
    ]  # fmt: skip
    first_attempt_log = list(client.logs(job_id, attempt=1, tail=200))
    assert not any("resumed from the checkpoint" in line for line in first_attempt_log)
    ray = ray_jobs(service)
    first, second = ray.get_job_info(running.ray_job_id), ray.get_job_info(final.ray_job_id)
    # Both attempts ran the same package: Ray names an uploaded package by its content.
    assert first.runtime_env["working_dir"] == second.runtime_env["working_dir"]
    assert first.runtime_env["working_dir"].startswith("gcs://_ray_pkg_")
    assert second.runtime_env["pip"]["packages"] == ["inflection==0.5.1"]


HF_GPT2 = """
from transformers import GPT2Config, GPT2LMHeadModel


def build(vocab_size, block_size):
    # default attention (sdpa), dropout on: as a user would write it
    return GPT2LMHeadModel(
        GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=vocab_size, n_positions=block_size)
    )


def loss(model, batch):
    inputs, next_tokens = batch  # already shifted: the model's own loss shifts nothing
    return model(input_ids=inputs, labels=next_tokens, shift_labels=next_tokens.contiguous()).loss
"""


def test_hugging_face_transformers_train_with_adahessian_on_two_workers(
    service: ServiceProcess, client: Client, tmp_path: Path
) -> None:
    """A Hugging Face GPT-2 of the user's (default sdpa attention, its own .loss) shipped with
    `hutch submit --working-dir`, and a Llama-style config through the built-in `hf` model: both
    train to SUCCEEDED with AdaHessian on 2 workers (Hessian steps through fused attention)."""
    pytest.importorskip("transformers", reason="the hf extra is not installed")
    # lr 0.02: at 0.05 GPT-2's loss jumps to 7.8 at step 4 and ends above where it began.
    common = {"data": {"name": "text_chars", "args": {"block_size": 32}},
              "optimizer": {"name": "adahessian", "lr": 0.02, "hessian_update_freq": 2, "warmup_steps": 2},
              "scaling.num_workers": 2, "training.steps": 12, "training.global_batch_size": 8,
              "training.log_every": 2, "training.eval_every": 12,
              "training.checkpoint_every": 12}  # fmt: skip
    code = tmp_path / "own"
    (code / "gpt").mkdir(parents=True)
    (code / "gpt" / "__init__.py").write_text("")
    (code / "gpt" / "model.py").write_text(HF_GPT2)
    gpt2 = spec_with(name="e2e-hf-gpt2", model={"name": "gpt.model:build"}, **common,
                     **{"training.loss": "gpt.model:loss"})  # fmt: skip
    gpt2_id = submit_with_working_dir(service, gpt2, tmp_path / "gpt2.yaml", code)
    llama_config = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 32,
                    "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2}  # fmt: skip
    built_in = {"name": "hf", "args": {"config": llama_config}}
    llama = client.submit(spec_with(name="e2e-hf-llama", model=built_in, **common))
    for job_id in (gpt2_id, llama.id):
        final = client.wait(job_id, timeout=400, poll_interval=1)
        assert final.state == "SUCCEEDED", (final.name, final.failure_reason)
        records = client.metrics(job_id).records
        assert records[-1]["step"] == 12 and records[-1]["hessian_steps"] == 6  # steps 1, 3, …, 11
        assert all(math.isfinite(r["hessian_trace"]) for r in records)
        assert records[-1]["loss"] < records[0]["loss"], records
        assert math.isfinite(final.latest_metrics["eval_loss"])


def test_digits_and_a_transformer_lm_train_on_fsdp(service: ServiceProcess, client: Client) -> None:
    """Parameters sharded (FSDP2) through the service: the digits CNN in fp32 and the built-in
    transformer LM in bf16 (bf16 gathers, Hessian steps in bf16 too) run to SUCCEEDED."""
    fsdp = {"name": "fsdp"}
    digits = client.submit(spec_with(name="e2e-fsdp-digits", backend=fsdp, **{
        "training.steps": 40, "training.eval_every": 40, "training.checkpoint_every": 20}))  # fmt: skip
    lm = spec_with(
        name="e2e-fsdp-lm",
        model={"name": "transformer_lm", "args": {"n_layer": 2, "n_head": 2, "n_embd": 32}},
        data={"name": "text_chars", "args": {"block_size": 32}},
        optimizer={"name": "adahessian", "lr": 0.05, "hessian_update_freq": 2, "warmup_steps": 2,
                   "spatial_average_block_size": 16},
        backend={"name": "fsdp", "precision": "bf16", "hessian_precision": "bf16"},
        **{"training.steps": 12, "training.global_batch_size": 8, "training.log_every": 2,
           "training.eval_every": 12, "training.checkpoint_every": 12},
    )  # fmt: skip
    lm_job = client.submit(lm)
    final = client.wait(digits.id, timeout=300, poll_interval=1)
    assert final.state == "SUCCEEDED", final.failure_reason
    assert final.latest_metrics["step"] == 40 and final.latest_metrics["eval_accuracy"] > 0.8
    assert [c.step for c in client.checkpoints(digits.id).checkpoints] == [20, 40]
    final = client.wait(lm_job.id, timeout=300, poll_interval=1)
    assert final.state == "SUCCEEDED", final.failure_reason
    records = client.metrics(lm_job.id).records
    assert records[-1]["step"] == 12 and records[-1]["hessian_steps"] == 6
    assert all(math.isfinite(r["hessian_trace"]) for r in records)
    assert records[-1]["loss"] < records[0]["loss"], records


def test_sigkill_of_the_service_loses_nothing(service: ServiceProcess, client: Client) -> None:
    spec = spec_with(
        name="e2e-sigkill",
        **{"training.steps": 600, "training.checkpoint_every": 300, "training.eval_every": 600,
           "training.log_every": 10, "scaling.num_workers": 1, "training.global_batch_size": 32},
    )  # fmt: skip
    job = client.submit(spec)
    wait_for(lambda: client.get(job.id).latest_metrics, 300, "the job's first metric record", interval=0.5)
    ray_job_id = client.get(job.id).ray_job_id
    service.kill()
    assert str(ray_jobs(service).get_job_info(ray_job_id).status.value) == "RUNNING"  # the job kept running
    service.start()
    final = client.wait(job.id, timeout=300, poll_interval=0.5)
    assert final.state == "SUCCEEDED", final.failure_reason
    assert final.latest_metrics and final.latest_metrics["step"] == 600
    states = [e.state for e in client.events(job.id)]
    assert states == ["QUEUED", "STARTING", "RUNNING", "SUCCEEDED"]
    mine = [j for j in ray_jobs(service).list_jobs() if (j.metadata or {}).get("hutch_job_id") == job.id]
    assert [j.submission_id for j in mine] == [ray_job_id], "the job was submitted to Ray more than once"
    assert len([j for j in client.iter_jobs() if j.id == job.id]) == 1


def test_a_held_queue_starts_no_job_until_released(service: ServiceProcess, client: Client) -> None:
    """HUTCH_HOLD_QUEUE (the maintenance procedure of deploy/README.md): with Ray up and room to
    spare, a submitted job stays QUEUED pass after pass while the service stays ready and says the
    queue is held; restarted without the hold, as a changed setting restarts the control plane,
    the service starts the job, which succeeds."""
    from prometheus_client.parser import text_string_to_metric_families

    def gauges() -> dict[str, float]:
        text = service.client().get("/metrics").text
        return {
            s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels
        }

    service.kill()  # the local Ray head stays up, as in the SIGKILL test above
    service.env["HUTCH_HOLD_QUEUE"] = "true"
    try:
        service.start()
        tiny = {
            "training.steps": 10,
            "training.log_every": 5,
            "training.eval_every": 10,
            "scaling.num_workers": 1,
        }
        job = client.submit(spec_with(name="e2e-held", **tiny))
        passes = "hutch_reconciler_passes_total"
        first = gauges()
        later = wait_for(lambda: (now := gauges())[passes] >= first[passes] + 3 and now, 60, "three passes")
        assert later["hutch_ray_up"] == 1 and later["hutch_queue_held"] == 1, later
        held = client.get(job.id)
        assert held.state == "QUEUED" and held.ray_job_id is None and held.queue_position == 1
        ready = service.client().get("/readyz")
        assert ready.status_code == 200 and ready.json()["queue"] == "held", ready.text
    finally:
        service.kill()
        del service.env["HUTCH_HOLD_QUEUE"]
        service.start()
    assert service.client().get("/readyz").json()["queue"] == "open"
    final = client.wait(job.id, timeout=300, poll_interval=0.5)
    assert final.state == "SUCCEEDED", final.failure_reason
    assert [e.state for e in client.events(job.id)] == ["QUEUED", "STARTING", "RUNNING", "SUCCEEDED"]


def test_jobs_that_can_never_fit_are_refused(service: ServiceProcess, client: Client) -> None:
    from api.client import InvalidRequest

    too_many = spec_with(name="e2e-huge", **{"scaling.num_workers": 4, "training.global_batch_size": 64})
    with pytest.raises(InvalidRequest) as refused:
        client.submit(too_many)
    assert refused.value.code == "unschedulable" and "needs 4 CPUs" in refused.value.message
    assert "the cluster has 2" in refused.value.message
    gpus = spec_with(name="e2e-gpu", **{"scaling.use_gpu": True, "scaling.gpus_per_worker": 1})
    with pytest.raises(InvalidRequest) as refused:
        client.submit(gpus)
    assert refused.value.code == "unschedulable" and "no GPUs" in refused.value.message
    assert not [j for j in client.iter_jobs() if j.name in ("e2e-huge", "e2e-gpu")]


def test_a_clean_stop_takes_the_local_ray_head_down(service: ServiceProcess) -> None:
    head = json.loads((service.data_dir / "local-ray.json").read_text())
    # uvicorn shuts down gracefully, then re-raises the signal so the exit status reports it
    assert service.stop() in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in service.log_tail()

    def head_gone() -> bool:
        try:
            os.killpg(head["pid"], 0)
        except ProcessLookupError:
            return True
        return False

    wait_for(head_gone, 60, "the local Ray head to exit")
    assert not (service.data_dir / "local-ray.json").exists()
    # Ray's record of "the current cluster" no longer names it, or a later ray.init() would try to join it
    current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    port = head["gcs_address"].rsplit(":", 1)[1]
    assert not (current.exists() and current.read_text().strip().endswith(f":{port}"))
