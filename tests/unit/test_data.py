"""Built-in data sets and the model registry: determinism by (seed, step), shapes, splits, errors."""

from __future__ import annotations

import subprocess
import sys
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from trainer.batches import concat_batches
from trainer.data import Dataset, build_dataset, epoch_indices, is_indexed, mix_seed, rank_batch, step_indices
from trainer.data.text_chars import VOCAB_SIZE, corpus_text, decode, encode
from trainer.models.registry import build_model
from trainer.spec import SpecError

ROOT = Path(__file__).resolve().parents[2]

SMALL_ARGS = {
    "digits": {},
    "synthetic_images": {"num_train": 300, "num_test": 100, "num_classes": 5},
    "text_chars": {"block_size": 16},
}


@cache
def _dataset(name: str) -> Dataset:
    return build_dataset(name, SMALL_ARGS[name])


@pytest.mark.parametrize("name", list(SMALL_ARGS))
def test_train_batch_is_a_pure_function_of_seed_and_step(name: str) -> None:
    ds = _dataset(name)
    x, y = ds.train_batch(7, 3, 16)
    x2, y2 = build_dataset(name, SMALL_ARGS[name]).train_batch(7, 3, 16)  # a fresh instance
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(ds.train_batch(8, 3, 16)[0], x)
    assert not torch.equal(ds.train_batch(7, 4, 16)[0], x)


@pytest.mark.parametrize(
    ("name", "x_shape", "x_dtype"),
    [
        ("digits", (16, 1, 8, 8), torch.float32),
        ("synthetic_images", (16, 3, 32, 32), torch.float32),
        ("text_chars", (16, 16), torch.int64),
    ],
)
def test_shapes_dtypes_and_label_ranges(name: str, x_shape: tuple[int, ...], x_dtype: torch.dtype) -> None:
    ds = _dataset(name)
    x, y = ds.train_batch(0, 0, 16)
    assert x.shape == x_shape and x.dtype == x_dtype and y.dtype == torch.int64
    args = ds.model_args()
    if ds.task == "classification":
        assert y.shape == (16,)
        assert int(y.min()) >= 0 and int(y.max()) < args["num_classes"]
    else:
        assert y.shape == x.shape and torch.equal(x[:, 1:], y[:, :-1])  # targets are the next characters
        assert int(x.min()) >= 0 and int(x.max()) < args["vocab_size"] == VOCAB_SIZE
        assert args["block_size"] == 16
    batches = list(ds.eval_batches(64))
    assert all(len(bx) <= 64 for bx, _ in batches)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, ds.eval_batches(64)))  # fixed order


def test_model_args_build_matching_models() -> None:
    for data, model in (("digits", "cnn"), ("digits", "mlp"), ("synthetic_images", "resnet20")):
        ds = _dataset(data)
        net = build_model(model, {}, ds.model_args())
        x, _ = ds.train_batch(0, 0, 4)
        assert net(x).shape == (4, ds.model_args()["num_classes"])
    text = _dataset("text_chars")
    lm = build_model("transformer_lm", {"n_layer": 1, "n_embd": 32}, text.model_args())
    x, _ = text.train_batch(0, 0, 2)
    assert lm(x).shape == (2, 16, VOCAB_SIZE)


def test_epochs_visit_every_example_once() -> None:
    seen = torch.cat([epoch_indices(100, step, 0, 30) for step in range(10)])  # 3 epochs
    for epoch in range(3):
        assert sorted(seen[epoch * 100 : (epoch + 1) * 100].tolist()) == list(range(100))
    assert mix_seed(0, 1) != mix_seed(1, 0)


def test_digits_split_is_disjoint_and_covers_the_data() -> None:
    split = _dataset("digits").split
    train = {(*tuple(img.flatten().tolist()), int(lbl)) for img, lbl in zip(split.train_x, split.train_y)}
    test = [(*tuple(img.flatten().tolist()), int(lbl)) for img, lbl in zip(split.test_x, split.test_y)]
    assert len(split.train_y) + len(split.test_y) == 1797
    # Disjoint by index; the raw data has no exact duplicates across the split either.
    assert not train & set(test)
    assert sum(len(y) for _, y in _dataset("digits").eval_batches(100)) == 359


def test_synthetic_images_are_balanced_and_split_apart() -> None:
    ds = build_dataset("synthetic_images", {"num_train": 1000, "num_test": 200, "num_classes": 4})
    counts = ds.class_counts("train")
    assert counts.min() > 0.8 * 250 and counts.max() < 1.2 * 250
    train_x, _ = ds.train_batch(0, 0, 1000)
    test_x = torch.cat([x for x, _ in ds.eval_batches(200)])
    assert torch.cdist(test_x.flatten(1)[:50], train_x.flatten(1)).min() > 1.0
    # Example i does not depend on the split sizes: a bigger data set extends a smaller one.
    bigger = build_dataset("synthetic_images", {"num_train": 5000, "num_test": 200, "num_classes": 4})
    assert torch.equal(next(bigger.eval_batches(200))[1], next(ds.eval_batches(200))[1])


def test_text_corpus_is_large_and_the_vocabulary_fixed() -> None:
    text = corpus_text()
    assert len(text) > 100_000 and "def " in text
    ids = encode(text)
    assert VOCAB_SIZE == 97 and int(ids.max()) < VOCAB_SIZE
    assert decode(encode("def f(x):\n\treturn 'é'")) == "def f(x):\n\ufffdreturn '\ufffd'"
    ds = _dataset("text_chars")
    held_out = sum(y.numel() for _, y in ds.eval_batches(128))
    assert held_out > 0.09 * len(text) - 16 and len(ds.train_tokens) == int(len(text) * 0.9)


# -- a rank's share ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SMALL_ARGS))
def test_built_ins_load_only_a_ranks_share_and_the_shares_make_the_global_batch(name: str) -> None:
    ds = _dataset(name)
    assert is_indexed(ds)
    for step in (0, 5):
        whole = ds.train_batch(step, 3, 16)  # what every rank used to build and slice
        for world in (1, 2, 4):
            shares = [rank_batch(ds, step, 3, 16, rank, world) for rank in range(world)]
            joined = concat_batches(shares)
            assert all(torch.equal(a, b) for a, b in zip(joined, whole))


class Regression:
    """A user's data set in the original protocol: whole global batches, a dict per batch."""

    def __init__(self, task: str = "custom") -> None:
        self.task = task

    def train_batch(self, step: int, seed: int, batch_size: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed * 1000 + step)
        return {"x": torch.randn(batch_size, 3, generator=g), "y": torch.randn(batch_size, generator=g)}

    def eval_batches(self, batch_size: int):
        yield self.train_batch(10**6, 0, batch_size)


class SizelessDataset:
    def train_examples(self, indices: torch.Tensor) -> torch.Tensor:
        return indices.float()

    def eval_batches(self, batch_size: int):
        yield torch.zeros(batch_size)


class Shorted(Regression):
    def train_batch(self, step: int, seed: int, batch_size: int) -> dict[str, torch.Tensor]:
        return super().train_batch(step, seed, batch_size - 1)


def test_original_protocol_data_sets_keep_working_sliced_by_rank() -> None:
    ds = build_dataset("tests.unit.test_data:Regression")
    assert not is_indexed(ds)
    whole = ds.train_batch(2, 0, 8)
    shares = [rank_batch(ds, 2, 0, 8, rank, 2) for rank in range(2)]
    assert torch.equal(shares[1]["x"], whole["x"][4:]) and torch.equal(shares[0]["y"], whole["y"][:4])
    with pytest.raises(ValueError, match=r"Shorted.train_batch returned 7 examples for step 0, expected 8"):
        rank_batch(Shorted(), 0, 0, 8, 0, 2)


def test_own_index_sampling_is_validated() -> None:
    class Sampler(SizelessDataset):
        def train_indices(self, step: int, seed: int, batch_size: int) -> torch.Tensor:
            return torch.arange(batch_size + 1)

    with pytest.raises(ValueError, match=r"train_indices must return 4 integer indices, got .* shape \(5,\)"):
        step_indices(Sampler(), 0, 0, 4)


# -- building by name or import path ---------------------------------------------------------


def test_import_paths_build() -> None:
    model = build_model("trainer.models.small:mlp", {"hidden": 8}, {"num_classes": 3, "vocab_size": 5})
    assert isinstance(model, nn.Module) and model[-1].out_features == 3
    ds = build_dataset("trainer.data.digits:DigitsDataset", {"test_fraction": 0.5})
    assert len(ds.split.test_y) == 898


@pytest.mark.parametrize(
    ("name", "args", "message"),
    [
        ("mlp", {"widht": 3}, "model 'mlp': does not accept argument 'widht'; it takes: in_features, hidden"),
        ("alexnet", {}, "unknown model: use a built-in (mlp, cnn, resnet20, transformer_lm, hf)"),
        ("pkg..mod:", {}, "malformed import path"),
        ("no_such_pkg.nets:big", {}, "cannot import module 'no_such_pkg.nets'"),
        ("trainer.models.small:nope", {}, "module 'trainer.models.small' has no attribute 'nope'"),
        ("trainer:__version__", {}, "is a str, not a callable factory"),
        ("transformer_lm", {"n_head": 3}, "must be divisible by n_head=3"),
        ("trainer.data.text_chars:decode", {}, "missing a required argument: 'ids'"),
        ("trainer.spec:OptimizerSpec", {}, "returned a OptimizerSpec, not a torch.nn.Module"),
    ],
)
def test_build_model_errors(name: str, args: dict, message: str) -> None:
    with pytest.raises(SpecError) as caught:
        build_model(name, args, {"num_classes": 3})
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("name", "args", "message"),
    [
        (
            "digits",
            {"bogus": 1},
            "data set 'digits': does not accept argument 'bogus'; it takes: test_fraction",
        ),
        ("cifar10", {}, "unknown data set: use a built-in (digits, synthetic_images, text_chars)"),
        ("trainer.models.small:mlp", {}, "returned a Sequential, which is not a data set"),
        ("tests.unit.test_data:SizelessDataset", {}, "with train_examples needs train_size"),
        ("tests.unit.test_data:Regression", {"task": "regression"}, "its task must be one of"),
        ("synthetic_images", {"num_classes": 1}, "num_classes must be an integer >= 2"),
        ("text_chars", {"block_size": 0}, "block_size must be an integer >= 1"),
    ],
)
def test_build_dataset_errors(name: str, args: dict, message: str) -> None:
    with pytest.raises(SpecError) as caught:
        build_dataset(name, args)
    assert message in str(caught.value)


def test_digits_read_from_the_bundled_file_equal_load_digits_and_skip_importing_sklearn(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sklearn.datasets import load_digits

    from trainer.data import digits

    reference = load_digits()
    pixels, target = digits._digits_arrays()
    assert np.array_equal(pixels, reference.images) and np.array_equal(target, reference.target)
    # Where the file is not found, load_digits itself gives the same arrays.
    monkeypatch.setattr(digits.importlib.util, "find_spec", lambda name: None)
    pixels, target = digits._digits_arrays()
    assert np.array_equal(pixels, reference.images) and np.array_equal(target, reference.target)
    # What the read saves every worker at start-up: scikit-learn is not imported at all.
    probe = (
        "import sys; from trainer.data.digits import DigitsDataset; DigitsDataset(); "
        "print('sklearn' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"
