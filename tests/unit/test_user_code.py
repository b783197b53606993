"""The user's own loss, metrics and batch structures: generic batches, checks that name the
field, and the own-code example taking a Hessian step (double backward: test_double_backward.py)."""

from __future__ import annotations

import itertools
from collections import namedtuple

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from trainer.batches import (
    BatchError,
    batch_size,
    concat_batches,
    curvature_count,
    curvature_rows,
    rank_slice,
    split_batch,
    step_chunks,
    to_device,
)
from trainer.losses import (
    CheckedMetrics,
    UserCodeError,
    build_loss,
    build_metrics,
    reduce_weighted,
)
from trainer.optim import AdaHessian
from trainer.spec import SpecError, validate_spec

Pair = namedtuple("Pair", ["inputs", "labels"])


def nested_batch(n: int = 6) -> dict:
    return {
        "input_ids": torch.arange(n * 3).view(n, 3),
        "extra": (torch.ones(n, 2), [torch.zeros(n, dtype=torch.bool)]),
        "pair": Pair(torch.randn(n, 4, dtype=torch.float64), torch.arange(n)),
        "temperature": torch.tensor(2.0),  # 0-dim: a constant of the batch
        "note": "constant",
    }


def test_nested_batches_split_join_and_move_generically() -> None:
    batch = nested_batch()
    assert batch_size(batch) == 6
    chunks = split_batch(batch, 4)
    assert [batch_size(c) for c in chunks] == [4, 2]
    assert isinstance(chunks[0]["pair"], Pair) and isinstance(chunks[0]["extra"], tuple)
    assert chunks[1]["note"] == "constant" and chunks[1]["temperature"].item() == 2.0
    joined = concat_batches(chunks)
    assert torch.equal(joined["input_ids"], batch["input_ids"])
    assert torch.equal(joined["extra"][1][0], batch["extra"][1][0])
    share = rank_slice(batch, 1, 3)
    assert share["input_ids"].tolist() == [[6, 7, 8], [9, 10, 11]]
    moved = to_device(batch, "cpu", torch.bfloat16)
    assert moved["extra"][0].dtype == torch.bfloat16 and moved["pair"].inputs.dtype == torch.bfloat16
    assert moved["input_ids"].dtype == torch.int64 and moved["extra"][1][0].dtype == torch.bool
    assert split_batch(batch, None) == [batch] and split_batch(batch, 6) == [batch]


def test_batches_that_cannot_be_split_say_where() -> None:
    with pytest.raises(BatchError, match=r"batch\['input_ids'\] has 4, batch\['labels'\] has 3"):
        batch_size({"input_ids": torch.zeros(4, 2), "labels": torch.zeros(3)})
    with pytest.raises(BatchError, match="at least one tensor with a batch dimension"):
        batch_size({"a": 1})
    with pytest.raises(BatchError, match="does not split evenly over 4 ranks"):
        rank_slice(torch.zeros(6), 0, 4)


# -- the user's loss and metrics --------------------------------------------------------------

# Losses a user might write by mistake (imported by path, as a spec names them).


def per_example(model: nn.Module, batch: tuple) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


def logits(model: nn.Module, batch: tuple) -> torch.Tensor:
    return model(batch[0])


def number(model: nn.Module, batch: tuple) -> float:
    return F.cross_entropy(model(batch[0]), batch[1]).item()


def integer(model: nn.Module, batch: tuple) -> torch.Tensor:
    return (model(batch[0]).argmax(dim=1) != batch[1]).sum()


def detached(model: nn.Module, batch: tuple) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1]).detach()


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("per_example", "returned a tensor of shape (8,); a loss must be a scalar"),
        ("logits", "returned a tensor of shape (8, 10); a loss must be a scalar"),
        ("number", "returned a float, not a tensor"),
        ("integer", "returned a torch.int64 tensor; a loss must be a floating-point scalar"),
        ("detached", "does not depend on the model's parameters"),
    ],
)
def test_a_loss_that_is_not_a_differentiable_scalar_is_an_error_naming_the_field(name, message) -> None:
    path = f"tests.unit.test_user_code:{name}"
    loss = build_loss(path, "custom")
    batch = (torch.randn(8, 5), torch.randint(0, 10, (8,)))
    with pytest.raises(UserCodeError) as caught:
        loss(nn.Linear(5, 10), batch)
    assert str(caught.value).startswith(f"training.loss: {path} ")
    assert message in str(caught.value)
    assert isinstance(caught.value, SpecError)


def test_loss_paths_are_checked_in_the_spec_and_imported_with_the_field_named() -> None:
    base = {"name": "j", "model": "mlp", "data": "digits"}
    with pytest.raises(
        SpecError, match=r"training.loss: malformed import path, expected 'package.module:function'"
    ):
        validate_spec({**base, "training": {"loss": "losses.py"}})
    with pytest.raises(SpecError, match=r"training.metrics: malformed import path"):
        validate_spec({**base, "training": {"metrics": "a:b:c"}})
    assert (
        validate_spec({**base, "training": {"loss": "pkg.losses:smooth"}}).training.loss
        == "pkg.losses:smooth"
    )
    with pytest.raises(SpecError, match=r"training.loss 'no_such_pkg.losses:smooth': cannot import module"):
        build_loss("no_such_pkg.losses:smooth", "classification")
    with pytest.raises(
        SpecError, match=r"training.loss 'trainer.losses:nope': module 'trainer.losses' has no"
    ):
        build_loss("trainer.losses:nope", "classification")
    with pytest.raises(SpecError, match=r"training.metrics 'no_such_pkg.m:f': cannot import module"):
        build_metrics("no_such_pkg.m:f")
    with pytest.raises(
        SpecError, match=r"training.loss: the data set's task is 'custom', which has no built-in"
    ):
        build_loss(None, "custom")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ([0.5], "returned a list; metrics must be a dict of names to numbers"),
        ({"acc": "high"}, "returned acc='high'; each metric must be a number"),
        ({"acc": torch.ones(3)}, "returned acc=a tensor of shape (3,); each metric must be a number"),
        ({"top-1": 0.5}, "returned the name 'top-1'; names must be letters, digits and '_'"),
        ({"loss": 0.5}, "'loss', which is reserved"),
    ],
)
def test_metrics_must_be_named_numbers(values, message) -> None:
    metrics = CheckedMetrics(lambda m, b: values, "pkg.m:metrics")
    with pytest.raises(UserCodeError) as caught:
        metrics(nn.Linear(1, 1), torch.zeros(1))
    assert str(caught.value).startswith("training.metrics: pkg.m:metrics returned ") and message in str(
        caught.value
    )
    ok = CheckedMetrics(lambda m, b: {"acc": torch.tensor(0.75), "n": 3}, "pkg.m:metrics")
    assert ok(nn.Linear(1, 1), torch.zeros(1)) == {"acc": 0.75, "n": 3.0}


def test_metrics_are_means_over_examples_across_ranks() -> None:
    # rank 0 saw batches of 4 (acc 1.0) and 2 (acc 0.5); rank 1 one batch of 4 (acc 0.0).
    per_rank = [{"acc": (1.0 * 4 + 0.5 * 2, 6.0)}, {"acc": (0.0, 4.0), "only_here": (3.0, 4.0)}, {}]
    assert reduce_weighted(per_rank) == {"acc": pytest.approx(5 / 10), "only_here": 0.75}


def test_the_own_code_example_builds_and_takes_a_hessian_step(monkeypatch: pytest.MonkeyPatch) -> None:
    from pathlib import Path

    from trainer.data import build_dataset, dataset_model_args, dataset_task, is_indexed, rank_batch
    from trainer.models.registry import build_model
    from trainer.spec import load_spec

    example = Path(__file__).resolve().parents[2] / "examples" / "own-code"
    monkeypatch.syspath_prepend(str(example))  # what --working-dir gives the job
    spec = load_spec(example / "job.yaml")
    dataset = build_dataset(spec.data.name, {**spec.data.args, "num_train": 100, "num_test": 10})
    assert is_indexed(dataset) and dataset_task(dataset) == "custom"
    model = build_model(spec.model.name, spec.model.args, dataset_model_args(dataset))
    loss_fn, metrics_fn = build_loss(spec.training.loss, "custom"), build_metrics(spec.training.metrics)
    batch = rank_batch(dataset, 0, 0, 8, 1, 2)
    assert set(batch) == {"input_ids", "attention_mask", "labels"} and batch_size(batch) == 4
    opt = AdaHessian(model.parameters(), seed=0)
    opt.backward(loss_fn(model, batch))
    opt.step()
    assert opt.hessian_trace is not None
    with torch.no_grad():
        assert set(metrics_fn(model.eval(), next(dataset.eval_batches(10)))) == {"accuracy", "cross_entropy"}


@pytest.mark.parametrize("fraction", [0.25, 0.3, 0.5, 1.0])
def test_the_curvature_examples_are_spread_evenly_and_the_same_however_the_batch_is_split(fraction) -> None:
    size = 24
    chosen = curvature_rows(0, size, size, fraction).tolist()
    assert len(chosen) == curvature_count(size, fraction) == int(size * fraction)
    gaps = {b - a for a, b in itertools.pairwise(chosen)}
    assert max(gaps, default=1) - min(gaps, default=1) <= 1  # evenly spread
    batch = {"x": torch.arange(size), "y": torch.arange(size) * 10}
    for world, chunk in ((1, None), (2, 4), (4, 3), (8, 1)):
        share = size // world
        seen, weight = [], 0.0
        for rank in range(world):
            mine = rank_slice(batch, rank, world)
            for piece in step_chunks(mine, chunk, rank, world, fraction):
                if piece.curvature is not None:
                    assert torch.equal(piece.curvature["y"], piece.curvature["x"] * 10)  # every tensor
                    seen += piece.curvature["x"].tolist()
                weight += piece.curvature_weight / world  # what the group average weighs
            assert batch_size(mine) == share
        assert seen == chosen, (world, chunk)
        assert weight == pytest.approx(1.0)  # the chosen examples' mean, at any split


def test_curvature_of_a_subset_gives_its_hessian_and_every_examples_gradient() -> None:
    """Per-example quadratics L_i = ½·Σ a_i⊙(θ−c_i)², so the Hessian diagonal of a mean over
    examples is the mean of their a: exact for any probe. The first step's v is (1−β2)·D² with D
    from the chosen examples; the gradient is that of every example."""
    torch.manual_seed(0)
    a, c = torch.rand(8, 5, dtype=torch.float64) + 0.5, torch.randn(8, 5, dtype=torch.float64)
    theta = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    opt = AdaHessian([theta], lr=0.1)

    def loss(rows: list[int]) -> torch.Tensor:
        return (0.5 * a[rows] * (theta - c[rows]) ** 2).sum(dim=1).mean()

    everyone, chosen = list(range(8)), [3, 7]
    opt.backward(loss(everyone), loss(chosen))
    gradient = (a * (theta.detach() - c)).mean(dim=0)
    assert torch.allclose(theta.grad, gradient)
    opt.step()
    v = opt.state[theta]["exp_hessian_diag_sq"]
    assert torch.allclose(v, (1 - 0.999) * a[chosen].mean(dim=0) ** 2)
    assert not torch.allclose(v, (1 - 0.999) * a.mean(dim=0) ** 2)
