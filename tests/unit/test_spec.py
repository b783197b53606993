"""The job spec: strict validation with one readable line per problem, defaults, schedule, files."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from trainer.spec import (
    BUILTIN_DATASETS,
    BUILTIN_MODELS,
    JobSpec,
    OptimizerSpec,
    SpecError,
    format_validation_error,
    load_spec,
    validate_spec,
)

EXAMPLES = sorted((Path(__file__).parents[2] / "examples").glob("*.yaml"))
MINIMAL: dict[str, Any] = {"name": "job", "model": {"name": "cnn"}, "data": {"name": "digits"}}


def _merge(base: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in change.items():
        out[key] = (
            _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


BAD_SPECS = [
    ({"foo": 1}, "foo: unknown field"),
    ({"optimizer": {"hesian_update_freq": 2}}, "optimizer.hesian_update_freq: unknown field, did you mean"),
    ({"model": {"name": "cnn", "arg": {}}}, "model.arg: unknown field, did you mean 'args'?"),
    ({"optimizer": {"lr": -1}}, "optimizer.lr: must be greater than 0 (got -1)"),
    ({"optimizer": {"lr": 0}}, "optimizer.lr: must be greater than 0 (got 0)"),
    (
        {"optimizer": {"hessian_update_freq": 0}},
        "optimizer.hessian_update_freq: must be greater than or equal to 1",
    ),
    ({"optimizer": {"betas": [0.9, 1.0]}}, "optimizer.betas[1]: must be less than 1 (got 1.0)"),
    ({"optimizer": {"hessian_power": 1.5}}, "optimizer.hessian_power: must be less than or equal to 1"),
    (
        {"optimizer": {"spatial_average_block_size": 0}},
        "optimizer.spatial_average_block_size: must be greater",
    ),
    ({"optimizer": {"name": "lamb"}}, "optimizer.name: must be 'adahessian', 'adamw', 'adam' or 'sgd'"),
    ({"optimizer": {"schedule": "step"}}, "optimizer.schedule: must be 'constant', 'cosine' or 'linear'"),
    ({"scaling": {"gpus_per_worker": 1}}, "scaling.gpus_per_worker: more GPUs than use_gpu allows"),
    (
        {"model": {"name": "alexnet"}},
        "model.name: unknown model: use a built-in (mlp, cnn, resnet20, transformer_lm, hf)",
    ),
    ({"data": {"name": "cifar10"}}, "data.name: unknown data set: use a built-in (digits, synthetic_images"),
    ({"model": {"name": "pkg..mod:"}}, "model.name: malformed import path"),
    ({"model": {"name": "pkg.mod"}}, "model.name: malformed import path"),
    ({"data": {"name": "pkg.mod:a:b"}}, "data.name: malformed import path"),
    (
        {"training": {"global_batch_size": 100}, "scaling": {"num_workers": 3}},
        "training.global_batch_size: must be divisible by scaling.num_workers (3)",
    ),
    (
        {"training": {"global_batch_size": 64}, "optimizer": {"hessian_batch_fraction": 0.01}},
        "optimizer.hessian_batch_fraction: leaves no example of a global batch of 64 for the Hessian",
    ),
    ({"optimizer": {"hessian_batch_fraction": 1.5}}, "optimizer.hessian_batch_fraction: must be less"),
    ({"optimizer": {"update_clip": 0}}, "optimizer.update_clip: must be greater than 0"),
    ({"backend": {"precision": "fp16"}}, "backend.precision: must be 'fp32' or 'bf16' (got 'fp16')"),
    ({"backend": {"hessian_precision": "int8"}}, "backend.hessian_precision: must be 'fp32' or 'bf16'"),
    ({"backend": {"zero_stage": 3, "name": "deepspeed"}}, "backend.zero_stage: must be 1 or 2 (got 3)"),
    ({"training": {"steps": "ten"}}, "training.steps: must be a valid integer (got 'ten')"),
    ({"training": {"steps": 2.5}}, "training.steps: must be a valid integer (got 2.5)"),
    ({"training": {"steps": True}}, "training.steps: must be a valid integer (got True)"),
    ({"optimizer": {"lr": "fast"}}, "optimizer.lr: must be a valid number (got 'fast')"),
    ({"optimizer": {"lr": math.inf}}, "optimizer.lr: must be a finite number"),
    ({"scaling": {"use_gpu": "yes"}}, "scaling.use_gpu: must be a valid boolean"),
    ({"scaling": {"num_workers": 0}}, "scaling.num_workers: must be greater than or equal to 1 (got 0)"),
    (
        {"scaling": {"num_workers": {"min": 2, "max": 1}}},
        "scaling.num_workers.max: must be at least scaling.num_workers.min (2) (got 1)",
    ),
    ({"scaling": {"num_workers": {"min": 1}}}, "scaling.num_workers.max: required field is missing"),
    (
        {"scaling": {"num_workers": {"min": 0, "max": 2}}},
        "scaling.num_workers.min: must be greater than or equal",
    ),
    (
        {"scaling": {"num_workers": {"min": 2, "max": 4}}, "training": {"global_batch_size": 64}},
        "training.global_batch_size: must be divisible by every worker count from scaling.num_workers.min "
        "to max (2..4; not by 3) so every worker gets an equal micro-batch at any size: a multiple of 12 "
        "(got 64)",
    ),
    (
        {
            "scaling": {"num_workers": {"min": 1, "max": 2}},
            "training": {"global_batch_size": 64, "chunk_size": 64},
        },
        "training.chunk_size: must divide each worker's share of the batch (32 examples) (got 64)",
    ),
    ({"name": "My_Job"}, "name: must be a DNS label"),
    ({"name": "x" * 64}, "name: must be a DNS label"),
    ({"name": "-job"}, "name: must be a DNS label"),
    ({"labels": {"team": 7}}, "labels.team: must be a valid string (got 7)"),
    ({"max_failures": -2}, "max_failures: must be greater than or equal to -1 (got -2)"),
    ({"model": 5}, "model: must be a mapping (got 5)"),
    ({"training": []}, "training: must be a mapping"),
]


@pytest.mark.parametrize(("change", "message"), BAD_SPECS, ids=[m.split(":")[0] for _, m in BAD_SPECS])
def test_bad_spec_gives_one_line_naming_the_field(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        JobSpec.model_validate(_merge(MINIMAL, change))
    lines = format_validation_error(caught.value).splitlines()
    assert len(lines) == 1, lines
    assert message in lines[0], lines[0]


def test_missing_required_fields_are_named() -> None:
    with pytest.raises(SpecError) as caught:
        validate_spec({"name": "job"})
    assert "model: required field is missing" in str(caught.value)
    assert "data: required field is missing" in str(caught.value)
    assert "2 problems" in str(caught.value)


def test_defaults() -> None:
    spec = JobSpec.model_validate(MINIMAL)
    assert spec.labels == {} and spec.model.args == {} and spec.max_failures == 0
    o = spec.optimizer
    assert (o.name, o.lr, o.betas, o.eps, o.weight_decay) == ("adahessian", 0.15, (0.9, 0.98), 1e-4, 0.0)
    assert (o.hessian_power, o.hessian_update_freq, o.n_samples, o.spatial_average_block_size) == (
        1.0,
        2,
        1,
        None,
    )
    assert (o.hessian_scope, o.warmup_steps, o.schedule, o.min_lr_ratio, o.momentum) == (
        "global",
        10,
        "cosine",
        0.0,
        0.9,
    )
    t = spec.training
    assert (t.steps, t.global_batch_size, t.seed, t.eval_every, t.checkpoint_every, t.log_every) == (
        200,
        64,
        0,
        50,
        50,
        10,
    )
    s = spec.scaling
    assert (s.num_workers, s.use_gpu, s.cpus_per_worker, s.gpus_per_worker) == (1, False, 1.0, 0.0)
    assert (spec.backend.name, spec.backend.zero_stage, spec.backend.precision) == ("ddp", 1, "fp32")
    assert (s.min_workers, s.max_workers) == (1, 1)


def test_an_elastic_worker_range_and_its_counts() -> None:
    ranged = _merge(
        MINIMAL, {"scaling": {"num_workers": {"min": 2, "max": 4}}, "training": {"global_batch_size": 48}}
    )
    scaling = JobSpec.model_validate(ranged).scaling
    assert (scaling.min_workers, scaling.max_workers, list(scaling.worker_counts)) == (2, 4, [2, 3, 4])
    assert scaling.num_workers.resize_interval_s == 60.0  # type: ignore[union-attr]
    dumped = JobSpec.model_validate(ranged).model_dump(mode="json")["scaling"]["num_workers"]
    assert dumped == {"min": 2, "max": 4, "resize_interval_s": 60.0}
    assert JobSpec.model_validate(_merge(MINIMAL, {"scaling": {"num_workers": 4.0}})).scaling.num_workers == 4


def test_use_gpu_defaults_to_one_gpu_per_worker() -> None:
    assert (
        JobSpec.model_validate(_merge(MINIMAL, {"scaling": {"use_gpu": True}})).scaling.gpus_per_worker == 1
    )
    half = _merge(MINIMAL, {"scaling": {"use_gpu": True, "gpus_per_worker": 0.5}})
    assert JobSpec.model_validate(half).scaling.gpus_per_worker == 0.5


def test_settings_for_other_choices_are_accepted_and_ignored() -> None:
    """Hessian settings with adamw, zero_stage with ddp: accepted (documented as ignored)."""
    spec = JobSpec.model_validate(
        _merge(
            MINIMAL, {"optimizer": {"name": "adamw", "hessian_update_freq": 3}, "backend": {"zero_stage": 2}}
        )
    )
    assert spec.optimizer.hessian_update_freq == 3 and spec.backend.zero_stage == 2


def test_lr_and_eps_defaults_follow_the_optimizer() -> None:
    adamw = OptimizerSpec.model_validate({"name": "adamw"})
    assert (adamw.lr, adamw.eps) == (1e-3, 1e-8)
    assert OptimizerSpec.model_validate({"name": "sgd"}).lr == 0.1
    # An optimizer section alone warms AdaHessian up for 10 steps (a job spec: 5 % of its steps, at
    # least 10) unless told otherwise (benchmarks/study.py); the others do not warm up.
    assert OptimizerSpec.model_validate({"name": "adahessian", "hessian_update_freq": 2}).warmup_steps == 10
    assert OptimizerSpec.model_validate({"name": "adahessian", "warmup_steps": 0}).warmup_steps == 0
    others = ("adam", "adamw", "sgd")
    assert [OptimizerSpec.model_validate({"name": n}).warmup_steps for n in others] == [0, 0, 0]
    assert OptimizerSpec.model_validate({"name": "sgd", "warmup_steps": 5}).warmup_steps == 5
    assert OptimizerSpec.model_validate({"name": "adam", "lr": 0.01}).lr == 0.01


@pytest.mark.parametrize(
    ("optimizer", "steps", "warmup", "betas"),
    [
        ({}, None, 10, (0.9, 0.98)),  # 200 steps by default: 5 % is 10
        ({}, 100, 10, (0.9, 0.98)),  # never under the 10 steps of before
        ({"name": "adahessian"}, 2000, 100, (0.9, 0.98)),
        ({"name": "adahessian"}, 2010, 100, (0.9, 0.98)),  # round(100.5): to the even 100
        ({"name": "adahessian", "warmup_steps": 3}, 2000, 3, (0.9, 0.98)),  # given: kept
        ({"name": "adahessian", "betas": [0.9, 0.999]}, 2000, 100, (0.9, 0.999)),
        ({"name": "adamw"}, 2000, 0, (0.9, 0.999)),
        ({"name": "sgd"}, 2000, 0, (0.9, 0.999)),
    ],
)
def test_a_job_specs_adahessian_defaults_come_from_the_study(
    optimizer: dict, steps: int | None, warmup: int, betas: tuple[float, float]
) -> None:
    """A job's AdaHessian warms up for 5 % of its steps (at least 10) with β2 0.98 and a Hessian
    every 2 steps, unless its spec says otherwise (docs/study/study.md has the evidence)."""
    training = {} if steps is None else {"training": {"steps": steps}}
    spec = JobSpec.model_validate({**MINIMAL, "optimizer": optimizer, **training})
    assert (spec.optimizer.warmup_steps, spec.optimizer.betas) == (warmup, betas)
    assert spec.optimizer.hessian_update_freq == 2
    assert JobSpec.model_validate(spec.model_dump(mode="json")) == spec  # as stored, as resumed


def test_builtin_names_match_the_registries() -> None:
    from trainer.data import _FACTORIES
    from trainer.models.registry import MODELS

    assert tuple(MODELS) == BUILTIN_MODELS and tuple(_FACTORIES) == BUILTIN_DATASETS


def test_shorthand_and_import_paths_are_accepted() -> None:
    spec = JobSpec.model_validate({**MINIMAL, "model": "mypkg.nets:big_net", "data": "digits"})
    assert spec.model.name == "mypkg.nets:big_net" and spec.data.name == "digits"


def test_spec_round_trips_through_json() -> None:
    spec = JobSpec.model_validate(_merge(MINIMAL, {"scaling": {"use_gpu": True}}))
    assert JobSpec.model_validate(json.loads(spec.model_dump_json())) == spec


# -- learning-rate schedule ----------------------------------------------------------------


def test_warmup_ramps_linearly_then_cosine_reaches_the_minimum() -> None:
    o = OptimizerSpec(lr=0.1, warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
    assert [o.lr_at(s, 104) for s in range(4)] == pytest.approx([0.025, 0.05, 0.075, 0.1])
    assert o.lr_at(4, 104) == pytest.approx(0.1)
    assert o.lr_at(54, 104) == pytest.approx(0.01 + 0.09 * 0.5)  # half way: cos(pi/2) = 0
    assert o.lr_at(104, 104) == pytest.approx(0.01)
    assert o.lr_at(500, 104) == pytest.approx(0.01)
    values = [o.lr_at(s, 104) for s in range(4, 105)]
    assert all(a >= b for a, b in itertools.pairwise(values))


def test_linear_and_constant_schedules() -> None:
    linear = OptimizerSpec(lr=1.0, schedule="linear", warmup_steps=0)
    assert [linear.lr_at(s, 10) for s in (0, 5, 10)] == pytest.approx([1.0, 0.5, 0.0])
    constant = OptimizerSpec(lr=0.3, schedule="constant", warmup_steps=2)
    assert [constant.lr_at(s, 10) for s in (0, 1, 2, 9)] == pytest.approx([0.15, 0.3, 0.3, 0.3])


def test_adahessian_kwargs_construct_the_optimizer() -> None:
    import torch

    from trainer.optim import AdaHessian

    o = OptimizerSpec(hessian_update_freq=2, spatial_average_block_size=32)
    opt = AdaHessian([torch.nn.Parameter(torch.zeros(3))], **o.adahessian_kwargs())
    assert opt.hessian_update_freq == 2 and opt.defaults["spatial_average_block_size"] == 32


# -- files ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_examples_load(path: Path) -> None:
    spec = load_spec(path)
    assert spec.name == path.stem
    assert path.read_text().startswith("# ")


def test_examples_exist() -> None:
    names = {p.name for p in EXAMPLES}
    assert {
        "digits-adahessian.yaml",
        "resnet20-synthetic.yaml",
        "transformer-text-chars.yaml",
        "digits-deepspeed.yaml",
    } <= names


def test_load_spec_json_and_yaml_scientific_notation(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps({**MINIMAL, "optimizer": {"eps": 1e-6}}))
    assert load_spec(tmp_path / "a.json").optimizer.eps == 1e-6
    (tmp_path / "b.yml").write_text("name: job\nmodel: cnn\ndata: digits\noptimizer:\n  eps: 1e-6\n")
    assert JobSpec.from_file(tmp_path / "b.yml").optimizer.eps == 1e-6


@pytest.mark.parametrize(
    ("filename", "text", "message"),
    [
        ("broken.yaml", "name: job\nmodel: {name: cnn\ndata: digits\n", "invalid YAML at line"),
        ("broken.json", '{"name": "job",}', "invalid JSON at line 1"),
        ("list.yaml", "- a\n- b\n", "the top level must be a mapping"),
        ("empty.yaml", "", "got an empty document"),
        ("dup.yaml", "name: a\nname: b\n", "duplicate key 'name'"),
        ("spec.txt", "name: job", "must end in .yaml, .yml or .json"),
        (
            "bad.yaml",
            "name: job\nmodel: cnn\ndata: digits\noptimizer: {lr: -1}\n",
            "optimizer.lr: must be greater",
        ),
    ],
)
def test_load_spec_errors(tmp_path: Path, filename: str, text: str, message: str) -> None:
    path = tmp_path / filename
    path.write_text(text)
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    assert message in str(caught.value) and str(path) in str(caught.value)


def test_load_spec_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="no such file"):
        load_spec(tmp_path / "nope.yaml")
    assert issubclass(SpecError, ValueError)
