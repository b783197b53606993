"""A backend the worker loop has never seen: the :class:`TrainingBackend` protocol is the whole
contract between them.

The third backend here is the replicated first-order path (every rank keeps the whole AdamW
state, gradients are all-reduced) made a backend of its own, with a checkpoint format of its own
(one file from rank 0). It is registered in :data:`trainer.backends.BACKENDS` under the name the
job's spec gives (the spec knows only the built-in names), and :func:`trainer.worker.run_worker`,
unchanged, trains with it on 2 gloo ranks, evaluates, checkpoints and resumes.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

from benchmarks.harness import free_port
from tests.support import spawn_ranks
from trainer.backends import BACKENDS, StepStats
from trainer.backends.base import LossFn, average_buffers, evaluation_mode
from trainer.batches import Batch, batch_size, split_batch
from trainer.optim.replicated import ReplicatedOptimizer
from trainer.spec import JobSpec, validate_spec

STEPS, CHECKPOINT_EVERY = 6, 3
CHECKPOINT_FILE = "replicated.pt"


class ReplicatedBackend:
    """Whole optimizer state on every rank; one checkpoint file, written by rank 0."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, spec: JobSpec) -> None:
        self.model, self.loss_fn = model, loss_fn
        with torch.no_grad():
            for tensor in [*model.parameters(), *model.buffers()]:
                dist.broadcast(tensor, src=0)
        self.optimizer = ReplicatedOptimizer(model.named_parameters(), spec.optimizer)

    @classmethod
    def from_spec(cls, spec: JobSpec, model: nn.Module, loss_fn: LossFn) -> ReplicatedBackend:
        return cls(model, loss_fn, spec)

    @property
    def hessian_due(self) -> bool:
        return False

    def train_step(self, batch: Batch, chunk_size: int | None = None) -> StepStats:
        self.model.train()
        self.optimizer.zero_grad()
        size = batch_size(batch)
        for chunk in split_batch(batch, chunk_size):
            weight = batch_size(chunk) / size
            loss = self.loss_fn(self.model, chunk)
            self.optimizer.backward(loss if weight == 1.0 else loss * weight)
        self.optimizer.step()
        loss, norm = float(self.optimizer.loss), float(self.optimizer.grad_norm)
        return StepStats(self.optimizer.steps_done, loss, norm, hessian_step=False, hessian_trace=None)

    def average_buffers(self) -> None:
        average_buffers(self.model)

    def evaluation(self) -> AbstractContextManager[nn.Module]:
        return evaluation_mode(self.model)

    def save_checkpoint(self, directory: Path, step: int) -> bool:
        if dist.get_rank() != 0:
            return False
        state = {"step": step, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}
        torch.save(state, directory / CHECKPOINT_FILE)
        return True

    def load_checkpoint(self, directory: Path) -> int:
        state = torch.load(directory / CHECKPOINT_FILE, weights_only=False)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict([state["optimizer"]])
        return int(state["step"])


class KeepingSession:
    """A plain gloo rank that keeps every reported checkpoint (the ranks' directories merged into
    ``kept/step-<n>``, as Ray merges them) and resumes from ``resume_from`` if given."""

    export_metrics = False

    def __init__(self, kept: Path, resume_from: Path | None) -> None:
        self.rank, self.world, self.device = dist.get_rank(), dist.get_world_size(), torch.device("cpu")
        self.kept, self.resume_from = kept, resume_from

    @contextlib.contextmanager
    def restored(self) -> Iterator[Path | None]:
        yield self.resume_from

    def report(self, metrics: dict[str, Any], directory: Path | None) -> None:
        if directory is not None:
            shutil.copytree(directory, self.kept / f"step-{metrics['step']}", dirs_exist_ok=True)

    def wait_until_registered(self) -> None:
        pass

    def drain_notice(self) -> None:
        return None


def _worker(rank: int, world: int, port: int, jobs: list[dict[str, Any]]) -> None:
    from trainer.worker import run_worker

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        builtin = BACKENDS["ddp"]
        for job in jobs:
            BACKENDS["ddp"] = ReplicatedBackend if job["own_backend"] else builtin
            resume = job["resume_from"]
            run_worker(job["config"], KeepingSession(Path(job["kept"]), resume and Path(resume)))
            dist.barrier()
        BACKENDS["ddp"] = builtin
    finally:
        dist.destroy_process_group()


def _job(tmp_path: Path, name: str, own_backend: bool, resume_from: Path | None = None) -> dict[str, Any]:
    spec = validate_spec(
        {
            "name": name,
            "model": {"name": "mlp", "args": {"hidden": 32}},
            "data": {"name": "digits"},
            "optimizer": {"name": "adamw", "lr": 0.01, "weight_decay": 0.01},
            "training": {
                "steps": STEPS,
                "global_batch_size": 16,
                "chunk_size": 4,
                "seed": 3,
                "eval_every": CHECKPOINT_EVERY,
                "checkpoint_every": CHECKPOINT_EVERY,
                "log_every": 1,
            },
            "scaling": {"num_workers": 2},
        }
    )
    run_dir = tmp_path / name
    run_dir.mkdir()
    return {
        "config": {"spec": spec.model_dump(mode="json"), "run_dir": str(run_dir), "job_id": name},
        "kept": str(tmp_path / f"{name}-checkpoints"),
        "own_backend": own_backend,
        "resume_from": resume_from and str(resume_from),
    }


def _outcome(tmp_path: Path, name: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    run_dir = tmp_path / name
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return records, json.loads((run_dir / "result.json").read_text())


@pytest.mark.slow
def test_a_third_backend_trains_checkpoints_and_resumes_through_the_unchanged_worker(tmp_path: Path) -> None:
    middle = f"step-{CHECKPOINT_EVERY}"
    jobs = [
        _job(tmp_path, "builtin", own_backend=False),
        _job(
            tmp_path,
            "builtin-resumed",
            own_backend=False,
            resume_from=tmp_path / "builtin-checkpoints" / middle,
        ),
        _job(tmp_path, "own", own_backend=True),
        _job(tmp_path, "resumed", own_backend=True, resume_from=tmp_path / "own-checkpoints" / middle),
    ]
    spawn_ranks(_worker, (2, free_port(), jobs), 2)

    builtin, builtin_result = _outcome(tmp_path, "builtin")
    own, own_result = _outcome(tmp_path, "own")
    # The same optimizer and reductions as the ddp backend's replicated AdamW: the same run.
    assert [r["step"] for r in own] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in own] == [r["loss"] for r in builtin]
    assert own_result["param_checksum"] == builtin_result["param_checksum"]
    for step in (CHECKPOINT_EVERY, STEPS):  # evaluated through the backend's evaluation()
        assert own[step - 1]["eval_accuracy"] == builtin[step - 1]["eval_accuracy"]
    assert not any(r["hessian_step"] for r in own)

    # Each backend's checkpoints in its own format, which the worker neither writes nor reads
    # itself; each resumes from its own and continues the run exactly.
    for step in (CHECKPOINT_EVERY, STEPS):
        files = sorted(p.name for p in (tmp_path / "own-checkpoints" / f"step-{step}").iterdir())
        assert files == [CHECKPOINT_FILE]
    assert (tmp_path / "builtin-checkpoints" / middle / "model.pt").exists()
    for name, run, result in (("resumed", own, own_result), ("builtin-resumed", builtin, builtin_result)):
        resumed, resumed_result = _outcome(tmp_path, name)
        assert [r["step"] for r in resumed] == list(range(CHECKPOINT_EVERY + 1, STEPS + 1))
        assert [r["loss"] for r in resumed] == [r["loss"] for r in run[CHECKPOINT_EVERY:]]
        assert resumed_result["param_checksum"] == result["param_checksum"]
