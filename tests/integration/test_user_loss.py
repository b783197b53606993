"""The worker loop on real gloo process groups with the user's own code: the example's dict-batch
model and loss (examples/own-code) on 1 and 2 workers give the same run, each rank loads only
its share of every global batch, and unusable user code fails the job with a readable reason.

The loop is :func:`trainer.worker.run_worker`, the function Ray Train runs, here with a plain
``torch.distributed`` session instead of Ray's (tests/integration/test_ray_jobs.py covers Ray).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from tests.support import run_worker_jobs
from trainer.data import epoch_indices
from trainer.spec import validate_spec

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "own-code"
GLOBAL_BATCH, STEPS = 16, 6


def recording_reviews(log_dir: str, **args: Any) -> Any:
    """The example's data set, writing down every index each rank asks it for."""
    from reviews.data import Reviews

    class Recording(Reviews):
        def train_examples(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
            with (Path(log_dir) / f"rank-{dist.get_rank()}.jsonl").open("a") as log:
                log.write(json.dumps(indices.tolist()) + "\n")
            return super().train_examples(indices)

    return Recording(**args)


def sdpa_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """A loss through torch's fused attention, whose default kernel has no double backward (the
    worker switches Hessian steps to its math kernel)."""
    x = model.tokens(batch["input_ids"]).unsqueeze(1)
    pooled = F.scaled_dot_product_attention(x, x, x).squeeze(1).mean(dim=1)
    return F.cross_entropy(model.head(pooled), batch["labels"])


def direct_flash_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Attention through the fused kernel called as its op (as the flash-attn package is): out of
    the switch's reach, with no double backward."""
    x = model.tokens(batch["input_ids"]).unsqueeze(1)
    attended = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(x, x, x)[0]
    return F.cross_entropy(model.head(attended.squeeze(1).mean(dim=1)), batch["labels"])


def per_example_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])["logits"]
    return F.cross_entropy(logits, batch["labels"], reduction="none")  # forgot .mean()


def spec(name: str, workers: int, run_dir: Path, **training: Any) -> dict[str, Any]:
    data_args = {"num_train": 500, "num_test": 48, "log_dir": str(run_dir)}
    return validate_spec(
        {
            "name": name,
            "model": {"name": "reviews.model:encoder", "args": {"dim": 16}},
            "data": {"name": "tests.integration.test_user_loss:recording_reviews", "args": data_args},
            # lr 0.02 trains smoothly; at 0.05 the loss oscillates (0.59, 1.85, 0.73, 1.15, …) and
            # fp32 summation-order differences between 1 and 2 workers grow to 7e-5 in 3 steps.
            "optimizer": {"name": "adahessian", "lr": 0.02, "hessian_update_freq": 2},
            "training": {
                "steps": STEPS,
                "global_batch_size": GLOBAL_BATCH,
                "chunk_size": 4,
                "seed": 5,
                "loss": "reviews.objectives:loss",
                "metrics": "reviews.objectives:metrics",
                "eval_every": 3,
                "log_every": 1,
                "checkpoint_every": 100,
                **training,
            },
            "scaling": {"num_workers": workers},
        }
    ).model_dump(mode="json")


def run_jobs(world: int, jobs: list[dict[str, Any]]) -> None:
    run_worker_jobs(world, jobs, syspath=[str(EXAMPLE)])


def job(tmp_path: Path, name: str, workers: int, **training: Any) -> dict[str, Any]:
    run_dir = tmp_path / name
    return {"spec": spec(name, workers, run_dir, **training), "run_dir": str(run_dir), "job_id": name}


def outcome(tmp_path: Path, name: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    run_dir = tmp_path / name
    path = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    result = run_dir / ("result.json" if (run_dir / "result.json").exists() else "failure.json")
    return records, json.loads(result.read_text())


def loaded(tmp_path: Path, name: str, rank: int) -> list[list[int]]:
    path = tmp_path / name / f"rank-{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_dict_batch_user_loss_matches_across_world_sizes_and_ranks_load_only_their_share(tmp_path) -> None:
    run_jobs(2, [job(tmp_path, "two", 2)])
    run_jobs(
        1,
        [
            job(tmp_path, "one", 1),
            job(tmp_path, "fused", 1, loss="tests.integration.test_user_loss:sdpa_loss", steps=2),
            job(tmp_path, "direct", 1, loss="tests.integration.test_user_loss:direct_flash_loss", steps=1),
            job(tmp_path, "unreduced", 1, loss="tests.integration.test_user_loss:per_example_loss", steps=1),
        ],
    )
    one, one_result = outcome(tmp_path, "one")
    two, two_result = outcome(tmp_path, "two")
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=1e-5)
    for key in ("sum", "l2"):
        assert two_result["param_checksum"][key] == pytest.approx(one_result["param_checksum"][key], rel=1e-5)
    for record in (one[2], two[2], one[-1], two[-1]):  # evaluation steps: the user's loss and metrics
        assert {"eval_loss", "eval_accuracy", "eval_cross_entropy"} <= set(record)
    for a, b in zip((one[2], one[-1]), (two[2], two[-1])):
        for key in ("eval_loss", "eval_accuracy", "eval_cross_entropy"):
            assert b[key] == pytest.approx(a[key], rel=1e-5)
    assert two_result["metrics"]["eval_accuracy"] == one_result["metrics"]["eval_accuracy"]

    # Each rank asked for exactly its half of every global batch; together they are the batch.
    share = GLOBAL_BATCH // 2
    rank0, rank1 = loaded(tmp_path, "two", 0), loaded(tmp_path, "two", 1)
    single = loaded(tmp_path, "one", 0)
    assert len(rank0) == len(rank1) == len(single) == STEPS
    for step in range(STEPS):
        expected = epoch_indices(500, step, 5, GLOBAL_BATCH).tolist()
        assert single[step] == expected
        assert rank0[step] == expected[:share] and rank1[step] == expected[share:]

    # Fused attention, whose default CPU kernel has no double backward, trains: the Hessian step
    # (step 1) runs on its math kernel, the ordinary step (2) on the fused one.
    fused_records, fused = outcome(tmp_path, "fused")
    assert fused["status"] == "succeeded", fused
    assert [r["hessian_step"] for r in fused_records] == [True, False]
    assert fused_records[0]["hessian_trace"] is not None
    # Unusable user code: the job stops at its first step with a reason that names the field.
    _, direct = outcome(tmp_path, "direct")
    assert direct["step"] == 1
    assert direct["reason"].startswith(
        "training stopped: training.loss: the Hessian-vector product needs double backward"
    )
    assert "aten::_scaled_dot_product_flash_attention_for_cpu_backward does not support" in direct["reason"]
    _, unreduced = outcome(tmp_path, "unreduced")
    assert unreduced["reason"] == (
        "training stopped: training.loss: tests.integration.test_user_loss:per_example_loss returned a "
        "tensor of shape (4,); a loss must be a scalar (the mean over the batch's examples, e.g. .mean())"
    )
