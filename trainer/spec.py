"""The job spec: what a user submits to train one model, as strict pydantic models.

One spec, written as YAML or JSON, says which model and data to build, how to optimise, how long
to train, on how many workers and with which backend. It is validated once, in the control plane
(``api`` and ``service`` reuse these models), and again on the cluster by the trainer.

Strictness is the point: an unknown or misspelt field, a wrong type or a value out of range is an
error with one readable line that names the field path, never a silently ignored setting::

    optimizer.lr: must be greater than 0 (got -1)
    optimizer.hesian_update_freq: unknown field, did you mean 'hessian_update_freq'? (allowed: ...)

Numbers are checked by type without coercion (``steps: "10"`` or ``steps: 2.5`` are errors;
``steps: 10.0`` is 10, as in JSON);
``1e-4`` in YAML is read as a float, which plain PyYAML does not do.

Settings that do not apply to a choice are accepted and ignored rather than rejected, so that
switching ``optimizer.name`` or ``backend.name`` never requires deleting lines:

- the Hessian settings (``hessian_power``, ``hessian_update_freq``, ``n_samples``,
  ``spatial_average_block_size``, ``spatial_average_1d``, ``update_clip``,
  ``hessian_batch_fraction``, ``hessian_scope``) are used by ``adahessian`` only;
- ``betas`` by ``adahessian``, ``adam`` and ``adamw``; ``momentum`` by ``sgd`` only;
- ``backend.zero_stage`` by ``deepspeed`` only (``ddp`` always shards like ZeRO stage 1).

This module imports neither torch nor the model and data code: the control plane validates
specs without them. Import paths (``"package.module:factory"``) are checked for syntax here and
imported only on the workers (:mod:`trainer.user_code`).
"""

from __future__ import annotations

import difflib
import json
import math
import re
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    Tag,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from trainer.lr_schedule import ScheduleName, scheduled_lr

BUILTIN_MODELS: tuple[str, ...] = ("mlp", "cnn", "resnet20", "transformer_lm", "hf")
"""Model names that need no import path (factories in :mod:`trainer.models`)."""

BUILTIN_DATASETS: tuple[str, ...] = ("digits", "synthetic_images", "text_chars")
"""Data set names that need no import path (modules in :mod:`trainer.data`)."""

IMPORT_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*")
"""``package.module:factory``: dotted identifiers, one colon, one identifier."""

MAX_WORKER_RANGE = 4096
"""The most workers an elastic range names (its counts are checked one by one)."""

_DNS_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


def _matching(regex: re.Pattern[str]) -> str:
    """A JSON Schema ``pattern`` for the strings ``regex.fullmatch`` takes, so that the published
    schema states what a validator below checks (the validator keeps its own error message)."""
    return f"^(?:{regex.pattern})$"


def _string_matching(regex: re.Pattern[str], **more: Any) -> WithJsonSchema:
    """The JSON schema of a string that a validator checks with ``regex.fullmatch``."""
    return WithJsonSchema({"type": "string", "pattern": _matching(regex), **more})


# Finite floats without coercion from strings or booleans (ints are accepted: `lr: 1`).
Float = Annotated[StrictFloat, Field(allow_inf_nan=False)]
PositiveFloat = Annotated[StrictFloat, Field(gt=0, allow_inf_nan=False)]
NonNegativeFloat = Annotated[StrictFloat, Field(ge=0, allow_inf_nan=False)]
UnitFloat = Annotated[StrictFloat, Field(ge=0, le=1)]
Beta = Annotated[StrictFloat, Field(ge=0, lt=1)]


def _integral(value: Any) -> Any:
    """``2.0`` is the integer 2, as JSON (and so the API's JSON Schema) has it; ``2.5`` stays refused."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


Integer = Annotated[StrictInt, BeforeValidator(_integral)]
PositiveInt = Annotated[StrictInt, Field(ge=1), BeforeValidator(_integral)]
NonNegativeInt = Annotated[StrictInt, Field(ge=0), BeforeValidator(_integral)]


def _without_nul(text: str) -> str:
    if "\x00" in text:
        raise ValueError("must not contain a NUL character")
    return text


# A label's key or value, as the job store (on Postgres too) can keep and look it up.
LabelText = Annotated[str, Field(max_length=200), AfterValidator(_without_nul)]
_LABEL_TEXT = {"type": "string", "maxLength": 200, "pattern": "^[^\\x00]*$"}
Labels = Annotated[
    dict[LabelText, LabelText],
    WithJsonSchema({"type": "object", "propertyNames": _LABEL_TEXT, "additionalProperties": _LABEL_TEXT}),
]

OptimizerName = Literal["adahessian", "adamw", "adam", "sgd"]

# lr, eps, betas and warm-up defaults when the spec does not give them: AdaHessian's, or the usual
# ones. AdaHessian's come from benchmarks/study.py (docs/study/study.md), 3 seeds each, on its two
# tasks with the power to tell: beta2 0.98 beat 0.999 on the char LM (held-out loss 1.713 +- 0.000
# against 1.719 +- 0.001) and was no worse on ResNet-20 (0.709 +- 0.003 against 0.706 +- 0.005).
# The warm-up is ADAHESSIAN_WARMUP_FRACTION of training.steps, at least 10 steps (JobSpec fills
# it): 10 steps were enough for ResNet-20 (0.672 against 0.673 at 5 %) but not for the LM (1.94 +-
# 0.22 against 1.73 +- 0.01), and none at all lost both (0.588; 2.23, one seed of 3 diverged).
_OPTIMIZER_DEFAULTS: dict[str, dict[str, Any]] = {
    "adahessian": {"lr": 0.15, "eps": 1e-4, "betas": (0.9, 0.98), "warmup_steps": 10},
    "adam": {"lr": 1e-3, "eps": 1e-8, "warmup_steps": 0},
    "adamw": {"lr": 1e-3, "eps": 1e-8, "warmup_steps": 0},
    "sgd": {"lr": 0.1, "warmup_steps": 0},
}
ADAHESSIAN_WARMUP_FRACTION = 0.05
"""AdaHessian's default warm-up, as a fraction of ``training.steps`` (at least 10 steps)."""


def adahessian_warmup(steps: int) -> int:
    """The warm-up an ``adahessian`` spec gets when it gives none, for ``steps`` of training."""
    return max(10, round(ADAHESSIAN_WARMUP_FRACTION * steps))


class SpecError(ValueError):
    """A job spec (or something it names) cannot be used; the message is meant for the user."""


class _Strict(BaseModel):
    """Base of every spec section: unknown fields are errors, not silently dropped."""

    model_config = ConfigDict(extra="forbid")


def check_component_name(name: str, kind: str, builtins: tuple[str, ...]) -> str:
    """Return ``name`` if it is a built-in or a well-formed import path, else raise ``ValueError``."""
    if name in builtins:
        return name
    if IMPORT_PATH.fullmatch(name):
        return name
    if ":" in name or "." in name:
        raise ValueError(
            "malformed import path, expected 'package.module:factory': "
            "dotted identifiers, one colon, then the factory's name"
        )
    raise ValueError(f"unknown {kind}: use a built-in ({', '.join(builtins)}) or 'package.module:factory'")


def check_function_path(path: str) -> str:
    """Return ``path`` if it is a well-formed ``"package.module:function"``, else raise ``ValueError``."""
    if not IMPORT_PATH.fullmatch(path):
        raise ValueError(
            "malformed import path, expected 'package.module:function': "
            "dotted identifiers, one colon, then the function's name"
        )
    return path


def _component_json_schema(schema: dict[str, Any], cls: type[Any]) -> None:
    """The schema of a component as its validators read it: the name of a built-in or an import
    path, as the mapping's ``name`` or alone (the shorthand)."""
    name = {"anyOf": [{"type": "string", "enum": list(cls.builtins)},
                      {"type": "string", "pattern": _matching(IMPORT_PATH)}]}  # fmt: skip
    schema["properties"]["name"] = {**name, "title": "Name"}
    mapping = {key: schema.pop(key) for key in ("type", "properties", "required", "additionalProperties")}
    mapping.update(cls.schema_extra)
    alone = [b for b in cls.builtins if b not in cls.needs_args]  # the shorthand carries no args
    shorthand = {"anyOf": [{"type": "string", "enum": alone},
                           {"type": "string", "pattern": _matching(IMPORT_PATH)}]}  # fmt: skip
    schema["anyOf"] = [mapping, shorthand]


class _ComponentSpec(_Strict):
    """A built-in by name, or a factory by import path, with the keyword arguments to call it with."""

    model_config = ConfigDict(json_schema_extra=_component_json_schema)

    kind: ClassVar[str]
    builtins: ClassVar[tuple[str, ...]]
    needs_args: ClassVar[tuple[str, ...]] = ()
    """Built-ins that cannot be named alone (the shorthand): their ``args`` are required."""
    schema_extra: ClassVar[dict[str, Any]] = {}
    """More of the mapping form's JSON schema: what the validators check of ``args``."""

    name: str
    args: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _name_shorthand(cls, data: Any) -> Any:
        """``model: cnn`` is short for ``model: {name: cnn}``."""
        return {"name": data} if isinstance(data, str) else data

    @field_validator("name")
    @classmethod
    def _known_or_import_path(cls, name: str) -> str:
        return check_component_name(name, cls.kind, cls.builtins)


class ModelSpec(_ComponentSpec):
    """The network: ``mlp``, ``cnn``, ``resnet20``, ``transformer_lm``, ``hf`` (a Hugging Face causal
    LM: ``args.config`` or ``args.pretrained``, :mod:`trainer.models.hf`) or ``package.module:factory``.

    ``args`` go to the factory on top of the defaults the data set supplies (classes, channels,
    vocabulary size, context length); see :func:`trainer.models.registry.build_model`.
    """

    kind: ClassVar[str] = "model"
    builtins: ClassVar[tuple[str, ...]] = BUILTIN_MODELS
    needs_args: ClassVar[tuple[str, ...]] = ("hf",)
    # hf: args with exactly one of config (a mapping with a model_type) and pretrained (a path).
    schema_extra: ClassVar[dict[str, Any]] = {"allOf": [{
        "if": {"required": ["name"], "properties": {"name": {"const": "hf"}}},
        "then": {"required": ["args"], "properties": {"args": {
            "oneOf": [{"required": ["config"], "not": {"required": ["pretrained"]}},
                      {"required": ["pretrained"], "not": {"required": ["config"]}}],
            "properties": {
                "config": {"type": "object", "required": ["model_type"],
                           "properties": {"model_type": {"type": "string"}}},
                "pretrained": {"type": "string", "minLength": 1},
            },
        }}},
    }]}  # fmt: skip

    @model_validator(mode="after")
    def _hf_config_or_pretrained(self) -> ModelSpec:
        """``hf`` takes exactly one of ``config`` (with a ``model_type``) and ``pretrained`` (a path);
        whether the directory is there is the preflight's question (where the storage is)."""
        if self.name != "hf":
            return self
        config, pretrained = self.args.get("config"), self.args.get("pretrained")
        if ("config" in self.args) == ("pretrained" in self.args):
            raise ValueError("hf takes exactly one of args.config (a Hugging Face config with its "
                             "model_type) and args.pretrained (a save_pretrained directory)")  # fmt: skip
        if "config" in self.args and not (
            isinstance(config, Mapping) and isinstance(config.get("model_type"), str)
        ):
            raise ValueError("hf's args.config must be a mapping with a model_type (gpt2, llama, …)")
        if "pretrained" in self.args and not (isinstance(pretrained, str) and pretrained):
            raise ValueError("hf's args.pretrained must be the path of a save_pretrained directory")
        return self


class DataSpec(_ComponentSpec):
    """The data: ``digits``, ``synthetic_images``, ``text_chars`` or ``package.module:factory``."""

    kind: ClassVar[str] = "data set"
    builtins: ClassVar[tuple[str, ...]] = BUILTIN_DATASETS


class OptimizerSpec(_Strict):
    """Optimizer and learning-rate schedule.

    For ``adahessian``, ``lr`` defaults to 0.15, ``eps`` to 1e-4, ``betas`` to (0.9, 0.98),
    ``hessian_update_freq`` to 2 and ``warmup_steps`` (in a job spec) to 5 % of
    ``training.steps``, at least 10 (:func:`adahessian_warmup`; 10 for this section alone). When
    not given they default to 1e-3, 1e-8, (0.9, 0.999) and 0 for ``adam``/``adamw``, and ``lr``
    to 0.1 and ``warmup_steps`` to 0 for ``sgd``. Fields that do not apply to the chosen
    optimizer are ignored (see the module docstring).
    """

    name: OptimizerName = "adahessian"
    lr: PositiveFloat = 0.15
    betas: tuple[Beta, Beta] = (0.9, 0.999)
    eps: PositiveFloat = 1e-4
    weight_decay: NonNegativeFloat = 0.0
    hessian_power: UnitFloat = 1.0
    # 2, not 1: half the cost, and no worse on the study's char LM (held-out loss 1.727 +- 0.013
    # against 1.738 +- 0.005) or ResNet-20 (accuracy 0.692 +- 0.006 against 0.692 +- 0.007).
    hessian_update_freq: PositiveInt = 2
    n_samples: PositiveInt = 1
    spatial_average_block_size: PositiveInt | None = None
    spatial_average_1d: StrictBool = Field(
        default=True,
        description="With spatial_average_block_size: whether 1-D tensors (biases, norm gains) are "
        "averaged over blocks too (true), or only tensors of 2 or more dimensions (false, as the "
        "AdaHessian authors' code does).",
    )
    update_clip: PositiveFloat | None = Field(
        default=None,
        description="With adahessian: bound each coordinate of the preconditioned step "
        "m̂/(√v̂ + eps) to [-update_clip, update_clip] before lr scales it (as Sophia clips), so a "
        "tiny or meaningless early curvature estimate cannot blow one coordinate up; none: no bound.",
    )
    hessian_batch_fraction: Annotated[StrictFloat, Field(gt=0, le=1)] = Field(
        default=1.0,
        description="With adahessian: the fraction f of each step's global batch the Hutchinson "
        "products use (the gradient always uses every example): ⌊global_batch_size·f⌋ examples "
        "spread evenly over the batch, the same at any number of workers, so a Hessian step costs "
        "a plain step plus f of a double backward. 1: every example.",
    )
    hessian_scope: Literal["global", "local"] = "global"
    warmup_steps: NonNegativeInt = 10
    schedule: ScheduleName = "cosine"
    min_lr_ratio: UnitFloat = 0.0
    momentum: Beta = 0.9
    max_grad_norm: PositiveFloat | None = Field(
        default=None,
        description="Clip gradients to this global L2 norm (over the whole model and all workers, "
        "as torch.nn.utils.clip_grad_norm_ does) before the optimizer uses them; none: no clipping. "
        "Every optimizer and backend.",
    )

    @model_validator(mode="before")
    @classmethod
    def _defaults_for_optimizer(cls, data: Any) -> Any:
        """Fill ``lr``, ``eps`` and ``warmup_steps`` the user left out with the optimizer's usual values."""
        if isinstance(data, Mapping):
            name = data.get("name", "adahessian")
            defaults = _OPTIMIZER_DEFAULTS.get(name) if isinstance(name, str) else None
            if defaults:
                data = {**{k: v for k, v in defaults.items() if k not in data}, **data}
        return data

    def lr_at(self, step: int, total_steps: int) -> float:
        """Learning rate of the update made after ``step`` completed steps, by this section's
        schedule (:func:`trainer.lr_schedule.scheduled_lr` says how)."""
        return scheduled_lr(
            step,
            total_steps,
            lr=self.lr,
            warmup_steps=self.warmup_steps,
            schedule=self.schedule,
            min_lr_ratio=self.min_lr_ratio,
        )

    def adahessian_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :class:`trainer.optim.AdaHessian` (add ``hessian_scope`` for sharding)."""
        return {
            "lr": self.lr,
            "betas": tuple(self.betas),
            "eps": self.eps,
            "weight_decay": self.weight_decay,
            "hessian_power": self.hessian_power,
            "hessian_update_freq": self.hessian_update_freq,
            "n_samples": self.n_samples,
            "spatial_average_block_size": self.spatial_average_block_size,
            "spatial_average_1d": self.spatial_average_1d,
            "update_clip": self.update_clip,
        }


class TrainingSpec(_Strict):
    """How long to train and how often to evaluate, checkpoint and log (all in optimizer steps).

    ``global_batch_size`` is the batch of one step over all workers together; each worker takes
    ``global_batch_size / scaling.num_workers`` examples of it. ``chunk_size``, if set, is the
    most examples one forward/backward pass takes: a worker's share is processed in chunks of
    that size with gradient accumulation (less memory; and with the same ``chunk_size`` a run on
    1 worker does bitwise the same sums as one on 2 when the share is split in two).

    ``loss`` and ``metrics`` name the user's own functions, ``"package.module:function"``
    (imported on the workers):

    - ``loss(model, batch) -> scalar tensor``: the mean loss over the batch's examples, for
      any batch structure the data set returns (a tensor, tuples, lists or dicts of tensors).
      AdaHessian differentiates it twice (Hessian-vector products), so every operation in it
      and in the model must support double backward. Left out, the data set's ``task`` picks
      the built-in cross-entropy (``custom`` data sets must name one). Evaluation then reports
      ``eval_loss`` (this loss on the held-out split) and the metrics below, not the built-in
      accuracy.
    - ``metrics(model, batch) -> dict[str, float]``: run on every held-out batch, in
      ``torch.no_grad()`` and eval mode; each name is reported as ``eval_<name>``, the mean over
      all held-out examples (each batch's value weighted by its number of examples, over all
      ranks).
    """

    steps: PositiveInt = 200
    global_batch_size: PositiveInt = 64
    chunk_size: PositiveInt | None = None
    seed: NonNegativeInt = 0
    eval_every: PositiveInt = 50
    checkpoint_every: PositiveInt = 50
    log_every: PositiveInt = 10
    loss: Annotated[str, _string_matching(IMPORT_PATH)] | None = None
    metrics: Annotated[str, _string_matching(IMPORT_PATH)] | None = None

    @field_validator("loss", "metrics")
    @classmethod
    def _function_path(cls, path: str | None) -> str | None:
        return None if path is None else check_function_path(path)


_COUNT, _RANGE = "count", "range"
"""The two forms of ``scaling.num_workers`` (tags that :func:`validation_problem` leaves out of paths)."""


class WorkerRange(_Strict):
    """An elastic job's worker count: it starts when ``min`` workers fit, grows (up to ``max``)
    when the cluster has room, and goes on with fewer when a node is lost (Ray Train's elastic
    ``ScalingConfig((min, max))``); each change restarts the group from the latest checkpoint.

    The global batch stays the spec's, split over the workers of the moment, so the run follows
    the trajectory of a fixed-size one: ``training.global_batch_size`` must be divisible by
    every count from ``min`` to ``max``.
    """

    min: Annotated[StrictInt, Field(ge=1, le=MAX_WORKER_RANGE)]
    max: Annotated[StrictInt, Field(ge=1, le=MAX_WORKER_RANGE)]
    resize_interval_s: Annotated[StrictFloat, Field(gt=0, le=3600)] = Field(
        default=60.0,
        description="How often a running job looks for room to grow (Ray Train's "
        "elastic_resize_monitor_interval_s); a lost node is noticed at once.",
    )

    @model_validator(mode="after")
    def _ordered(self) -> WorkerRange:
        if self.max < self.min:
            raise PydanticCustomError(
                "hutch_field",
                "must be at least scaling.num_workers.min ({min})",
                {"field": "scaling.num_workers.max", "got": self.max, "min": self.min},
            )
        return self


class ScalingSpec(_Strict):
    """Ray Train's ScalingConfig: how many workers and what each one reserves.

    ``num_workers`` is a count, or ``{min, max}`` for an elastic job (:class:`WorkerRange`).
    ``use_gpu: true`` with ``gpus_per_worker`` left at 0 reserves one GPU per worker.
    """

    # GPUs only with use_gpu: true (what _gpus_match_use_gpu checks), stated in the schema.
    model_config = ConfigDict(json_schema_extra={"anyOf": [
        {"required": ["use_gpu"], "properties": {"use_gpu": {"const": True}}},
        {"properties": {"use_gpu": {"const": False}, "gpus_per_worker": {"maximum": 0}}},
    ]})  # fmt: skip

    num_workers: Annotated[
        Annotated[PositiveInt, Tag(_COUNT)] | Annotated[WorkerRange, Tag(_RANGE)],
        Discriminator(lambda value: _RANGE if isinstance(value, Mapping | WorkerRange) else _COUNT),
    ] = 1
    use_gpu: StrictBool = False
    cpus_per_worker: PositiveFloat = 1.0
    gpus_per_worker: NonNegativeFloat = Field(default=0.0, validate_default=True)

    @field_validator("gpus_per_worker")
    @classmethod
    def _gpus_match_use_gpu(cls, gpus: float, info: ValidationInfo) -> float:
        use_gpu = info.data.get("use_gpu")
        if use_gpu is None:  # use_gpu itself is invalid and already reported
            return gpus
        if not use_gpu and gpus > 0:
            raise ValueError("more GPUs than use_gpu allows: set scaling.use_gpu to true, or this to 0")
        return 1.0 if use_gpu and gpus == 0 else gpus

    @property
    def min_workers(self) -> int:
        """The fewest workers the job runs on (all of them for a fixed count)."""
        return self.num_workers.min if isinstance(self.num_workers, WorkerRange) else self.num_workers

    @property
    def max_workers(self) -> int:
        """The most workers the job runs on."""
        return self.num_workers.max if isinstance(self.num_workers, WorkerRange) else self.num_workers

    @property
    def worker_counts(self) -> range:
        """Every number of workers the job may run on."""
        return range(self.min_workers, self.max_workers + 1)


class BackendSpec(_Strict):
    """How workers share the work: ``ddp`` (sharded AdaHessian over torch.distributed),
    ``deepspeed`` (ZeRO 1/2) or ``fsdp`` (FSDP2: parameters sharded too).

    ``zero_stage`` (1 or 2) is used by ``deepspeed`` only. ``precision`` ``bf16`` on ``ddp`` is
    mixed precision: autocast forward passes, fp32 parameters, gradients and optimizer state; on
    ``deepspeed``, the engine's bf16 (bf16 model and gradients, fp32 master weights and state);
    on ``fsdp``, autocast over fp32 gathers, or FSDP2's bf16 gathers with ``hessian_precision``
    bf16. ``hessian_precision`` is used with ``bf16`` by ``ddp`` and ``fsdp``. ``shard_modules``
    is used by ``fsdp`` only.
    """

    name: Literal["ddp", "deepspeed", "fsdp"] = "ddp"
    zero_stage: Annotated[Integer, Field(json_schema_extra={"enum": [1, 2]})] = 1
    precision: Literal["fp32", "bf16"] = Field(
        default="fp32",
        description="fp32, or bf16: ddp autocasts forward passes to bf16 over fp32 parameters, "
        "gradients and optimizer state; deepspeed trains a bf16 model with fp32 master weights; "
        "fsdp autocasts over fp32 gathers, or gathers bf16 parameters (FSDP2's "
        "MixedPrecisionPolicy, fp32 reductions and state) with hessian_precision bf16.",
    )
    hessian_precision: Literal["fp32", "bf16"] = Field(
        default="fp32",
        description="With ddp or fsdp and precision bf16: whether Hessian steps (forward, gradient and "
        "Hessian-vector product) run in fp32, so training follows fp32's path, or under bf16 "
        "autocast too (cheaper; near-zero curvature estimates then pick up rounding and training "
        "takes another path). README, 'bf16'.",
    )
    shard_modules: list[Annotated[str, Field(min_length=1)]] | None = Field(
        default=None,
        description="With fsdp: the class names of the modules each sharded as one unit (e.g. "
        "[GPT2Block]); by default every child of an nn.ModuleList or nn.Sequential (transformer "
        "layers, residual stages). README, 'FSDP'.",
    )

    @field_validator("zero_stage")
    @classmethod
    def _stage_one_or_two(cls, stage: int) -> int:
        if stage not in (1, 2):
            raise ValueError("must be 1 or 2")
        return stage


PACKAGE_URI = re.compile(r"hutch://packages/(?P<sha256>[0-9a-f]{64})\.zip")
"""A working directory uploaded to the control plane (``POST /v1/packages``), by content hash."""

REMOTE_URI_SCHEMES: tuple[str, ...] = ("https", "http", "s3", "gs", "gcs", "azure", "abfss", "file")
"""Ray's remote package protocols: such URIs go to Ray untouched, and Ray fetches them."""

RESERVED_ENV_VARS: frozenset[str] = frozenset(
    {"RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_JOB_ID"}
)
"""Variables Ray and hutch set for a job themselves; a job that overrode them would lose its cluster."""

_CREDENTIAL_NAME = re.compile(
    r"TOKEN|SECRET|PASSW(OR)?D|CREDENTIAL|API_?KEY|ACCESS_?KEY|PRIVATE_?KEY|AUTH", re.IGNORECASE
)
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
REDACTED = "***"

RAY_ONLY_FIELDS: dict[str, str] = {
    **dict.fromkeys(
        ("conda", "uv", "container", "image_uri"),
        "jobs run in the cluster image's Python environment, which the trainer needs; use pip",
    ),
    "excludes": "a package is packed by the client (hutch submit --working-dir honours .hutchignore "
    "and .gitignore)",
}
"""Ray ``runtime_env`` fields hutch refuses, and why (the answer names the reason)."""


def looks_like_credential(name: str) -> bool:
    """Whether an environment variable's name says it holds a secret (its value is never shown)."""
    return bool(_CREDENTIAL_NAME.search(name))


def _remote_uri(value: str, suffixes: tuple[str, ...]) -> str:
    scheme, sep, rest = value.partition("://")
    if not sep or scheme not in REMOTE_URI_SCHEMES or not rest:
        raise ValueError(
            f"must be a remote URI ({', '.join(s + '://' for s in REMOTE_URI_SCHEMES)}) "
            "or an uploaded package (hutch submit --working-dir)"
        )
    if not rest.split("?", 1)[0].endswith(suffixes):
        raise ValueError(f"a remote package must be a {' or '.join(suffixes)} file")
    return value


def _remote_uri_pattern(suffixes: tuple[str, ...]) -> str:
    """What :func:`_remote_uri` takes, as a regex: a known scheme, ``://``, a path ending in a suffix."""
    schemes = "|".join(REMOTE_URI_SCHEMES)
    ends = "|".join(re.escape(suffix) for suffix in suffixes)
    return f"(?:{schemes})://[^?]*(?:{ends})(?:\\?[\\s\\S]*)?"


_WORKING_DIR = re.compile(f"{PACKAGE_URI.pattern}|{_remote_uri_pattern(('.zip',))}")
_PY_MODULE = re.compile(_remote_uri_pattern((".zip", ".whl")))
_REQUIREMENT = re.compile(r"[^\n\r-][^\n\r]*")  # what _requirements_only lets through


class RuntimeEnvSpec(_Strict):
    """Code and dependencies shipped with the job: Ray's ``runtime_env``, with Ray's field names
    and meanings, for the four fields a training job needs.

    - ``working_dir``: the job's code, the current directory of its driver and workers and on
      their ``sys.path``; an uploaded package (``hutch://packages/<sha256>.zip``, what
      ``hutch submit --working-dir DIR`` makes) or a remote ``.zip`` URI (``https://``,
      ``s3://``, ``gs://``, …) passed to Ray untouched.
    - ``py_modules``: remote ``.zip``/``.whl`` URIs of more importable packages.
    - ``pip``: requirement strings installed into the job's environment on top of the image's.
    - ``env_vars``: environment variables of the driver and workers; values whose names look
      like credentials (``*TOKEN*``, ``*SECRET*``, ``*PASSWORD*``, ``*KEY*``, …) are shown as
      ``***`` in every answer of the API.

    Ray's other fields (``conda``, ``uv``, ``container``/``image_uri``, ``excludes``, …) are
    refused: jobs run in the cluster image's Python, which the trainer needs, and a local path
    means nothing on the control plane.
    """

    working_dir: Annotated[str, _string_matching(_WORKING_DIR)] | None = None
    py_modules: Annotated[list[Annotated[str, _string_matching(_PY_MODULE)]], Field(max_length=32)] = Field(
        default_factory=list
    )
    pip: Annotated[
        list[
            Annotated[
                str,
                Field(min_length=1, max_length=200),
                _string_matching(_REQUIREMENT, minLength=1, maxLength=200),
            ]
        ],
        Field(max_length=64),
    ] = Field(default_factory=list)
    env_vars: Annotated[
        dict[str, Annotated[str, Field(max_length=4096)]],
        Field(max_length=64, json_schema_extra={"propertyNames": {
            "pattern": _matching(_ENV_NAME), "not": {"enum": sorted(RESERVED_ENV_VARS)}
        }}),
    ] = Field(default_factory=dict)  # fmt: skip

    @field_validator("working_dir")
    @classmethod
    def _package_or_remote_zip(cls, value: str | None) -> str | None:
        if value is None or PACKAGE_URI.fullmatch(value):
            return value
        return _remote_uri(value, (".zip",))

    @field_validator("py_modules")
    @classmethod
    def _remote_modules(cls, values: list[str]) -> list[str]:
        return [_remote_uri(value, (".zip", ".whl")) for value in values]

    @field_validator("pip")
    @classmethod
    def _requirements_only(cls, values: list[str]) -> list[str]:
        for value in values:
            if value.startswith("-") or any(c in value for c in "\n\r"):
                raise ValueError(f"{value!r}: only requirement strings (e.g. 'humanize==4.9.0'), no options")
        return values

    @field_validator("env_vars")
    @classmethod
    def _names(cls, values: dict[str, str]) -> dict[str, str]:
        for name in values:
            if not _ENV_NAME.fullmatch(name):
                raise ValueError(f"{name!r} is not an environment variable name (letters, digits, '_')")
            if name in RESERVED_ENV_VARS:
                raise ValueError(f"{name} is set by Ray and hutch for every job and cannot be overridden")
        return values


def displayed_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """A spec (as stored, a mapping) as API answers show it: credential-like ``env_vars`` as ``***``."""
    runtime_env = spec.get("runtime_env")
    if not isinstance(runtime_env, Mapping) or not runtime_env.get("env_vars"):
        return dict(spec)
    env_vars = {k: REDACTED if looks_like_credential(k) else v for k, v in runtime_env["env_vars"].items()}
    return {**spec, "runtime_env": {**runtime_env, "env_vars": env_vars}}


class RetrySpec(_Strict):
    """How the service retries an attempt that failed for an infrastructure cause (the Ray head
    lost, the driver killed, the storage unwritable, …) from its latest checkpoint. A job's own
    errors (its code, a non-finite loss, a spec Ray refuses) are never retried."""

    max_attempts: Annotated[StrictInt, Field(ge=1, le=100), BeforeValidator(_integral)] = Field(
        default=3, description="Attempts in all, the first included; 1: never retry automatically."
    )
    backoff_s: Annotated[StrictFloat, Field(ge=0, le=3600)] = Field(
        default=10.0,
        description="Seconds before the first automatic retry starts; doubled for each next one.",
    )


class JobSpec(_Strict):
    """One training job: everything the trainer needs, with defaults for all but name, model and data."""

    name: Annotated[str, _string_matching(_DNS_LABEL)]
    labels: Labels = Field(default_factory=dict)
    model: ModelSpec
    data: DataSpec
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    scaling: ScalingSpec = Field(default_factory=ScalingSpec)
    backend: BackendSpec = Field(default_factory=BackendSpec)
    runtime_env: RuntimeEnvSpec | None = None
    max_failures: Annotated[StrictInt, Field(ge=-1), BeforeValidator(_integral)] = 0
    """Worker-group restarts Ray Train may make after a failure; -1 means unlimited (FailureConfig)."""
    retry: RetrySpec = Field(default_factory=RetrySpec)
    """The service's own retries of attempts that failed for an infrastructure cause."""
    priority: Annotated[StrictInt, Field(ge=-1000, le=1000), BeforeValidator(_integral)] = 0
    """Queue order in the service: jobs that wait for the cluster start highest priority first,
    then oldest first. The trainer ignores it."""

    @model_validator(mode="before")
    @classmethod
    def _adahessian_warmup_from_steps(cls, data: Any) -> Any:
        """Fill an ``adahessian`` spec's missing ``optimizer.warmup_steps`` from ``training.steps``
        (:func:`adahessian_warmup`). Values of the wrong type are left for validation to name."""
        if not isinstance(data, Mapping):
            return data
        optimizer = data.get("optimizer", {})
        training = data.get("training", {})
        if not isinstance(optimizer, Mapping) or not isinstance(training, Mapping):
            return data
        steps = training.get("steps", TrainingSpec.model_fields["steps"].default)
        if optimizer.get("name", "adahessian") != "adahessian" or "warmup_steps" in optimizer:
            return data
        if isinstance(steps, bool) or not isinstance(steps, int | float) or steps < 1 or steps % 1:
            return data
        return {**data, "optimizer": {**optimizer, "warmup_steps": adahessian_warmup(int(steps))}}

    @field_validator("name")
    @classmethod
    def _dns_label(cls, name: str) -> str:
        if not _DNS_LABEL.fullmatch(name):
            raise ValueError(
                "must be a DNS label: 1-63 lowercase letters, digits or '-', "
                "starting and ending with a letter or digit"
            )
        return name

    @model_validator(mode="after")
    def _batch_splits_evenly(self) -> JobSpec:
        """Equal micro-batches are what make runs on 1, 2 or 4 workers identical."""
        batch, counts = self.training.global_batch_size, self.scaling.worker_counts
        uneven = [n for n in counts if batch % n]
        if uneven and isinstance(self.scaling.num_workers, int):
            raise PydanticCustomError(
                "hutch_field",
                "must be divisible by scaling.num_workers ({workers}) so every worker gets an "
                "equal micro-batch",
                {"field": "training.global_batch_size", "got": batch, "workers": counts[0]},
            )
        if uneven:
            every = math.lcm(*counts)
            raise PydanticCustomError(
                "hutch_field",
                "must be divisible by every worker count from scaling.num_workers.min to max "
                "({low}..{high}; not by {uneven}) so every worker gets an equal micro-batch at any "
                "size: a multiple of {every}",
                {"field": "training.global_batch_size", "got": batch, "low": counts[0],
                 "high": counts[-1], "uneven": ", ".join(map(str, uneven)), "every": every},
            )  # fmt: skip
        chunk = self.training.chunk_size
        for share in sorted({batch // n for n in counts}):
            if chunk is not None and share % chunk:
                raise PydanticCustomError(
                    "hutch_field",
                    "must divide each worker's share of the batch ({share} examples)",
                    {"field": "training.chunk_size", "got": chunk, "share": share},
                )
        fraction = self.optimizer.hessian_batch_fraction
        if self.optimizer.name == "adahessian" and math.floor(batch * fraction) < 1:
            raise PydanticCustomError(
                "hutch_field",
                "leaves no example of a global batch of {batch} for the Hessian (at least 1/{batch})",
                {"field": "optimizer.hessian_batch_fraction", "got": fraction, "batch": batch},
            )
        return self

    @classmethod
    def from_file(cls, path: str | Path) -> JobSpec:
        """Load and validate a ``.yaml``/``.yml``/``.json`` spec; raises :class:`SpecError`."""
        return load_spec(path)


# -- readable errors -----------------------------------------------------------------------------


def _path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _section(loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The spec model class at ``loc`` (to list its fields), or None if ``loc`` is not a section."""
    cls: type[BaseModel] = JobSpec
    for part in loc:
        field = cls.model_fields.get(part) if isinstance(part, str) else None
        annotation = field.annotation if field else None
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(members) == 1:  # an optional section, e.g. runtime_env
            annotation = members[0]
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        cls = annotation
    return cls


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def validation_problem(error: Mapping[str, Any]) -> tuple[str, str]:
    """``(field path, reason)`` for one pydantic error of a spec, e.g. ``("optimizer.lr",
    "must be greater than 0 (got -1)")``; the API's 422 details and the CLI's lines use it."""
    loc = tuple(part for part in error["loc"] if part not in (_COUNT, _RANGE))  # union tags
    kind = error["type"]
    ctx = error.get("ctx") or {}
    got: Any = error.get("input")
    show_got = True
    if kind == "hutch_field":
        loc = tuple(ctx["field"].split("."))
        got = ctx.get("got")
        reason = error["msg"]
    elif kind == "extra_forbidden" and loc[:-1] == ("runtime_env",) and loc[-1] in RAY_ONLY_FIELDS:
        reason, show_got = f"not supported by hutch: {RAY_ONLY_FIELDS[str(loc[-1])]}", False
    elif kind == "extra_forbidden":
        section = _section(loc[:-1])
        allowed = list(section.model_fields) if section else []
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        reason = "unknown field" + (f", did you mean {close[0]!r}?" if close else "")
        reason += f" (allowed: {', '.join(allowed)})" if allowed else ""
        show_got = False
    elif kind == "missing":
        reason, show_got = "required field is missing", False
    elif kind in ("model_type", "model_attributes_type", "dict_type"):
        reason = "must be a mapping"
    else:
        reason = error["msg"].removeprefix("Value error, ")
        if reason.startswith("Input should be "):
            reason = "must be " + reason.removeprefix("Input should be ")
    if loc[:2] == ("runtime_env", "env_vars"):
        show_got = False  # values may be credentials: never echoed
    return _path(loc), reason + (f" (got {_shown(got)})" if show_got else "")


def format_validation_error(exc: ValidationError) -> str:
    """One line per problem, ``field.path: reason (got value)``, e.g. ``optimizer.lr: must be ...``."""
    return "\n".join("{}: {}".format(*validation_problem(error)) for error in exc.errors())


# -- loading from files ------------------------------------------------------------------------


class _SpecLoader(yaml.SafeLoader):
    """Safe YAML that reads ``1e-4`` as a float (YAML 1.1 needs a dot) and rejects duplicate keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_spec_text(text: str, suffix: str = ".yaml", source: str = "spec") -> dict[str, Any]:
    """Parse YAML or JSON text (by ``suffix``) into a mapping; raises :class:`SpecError`."""
    try:
        # _SpecLoader is a SafeLoader: no arbitrary Python objects.
        data = json.loads(text) if suffix == ".json" else yaml.load(text, Loader=_SpecLoader)
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno}, column {exc.colno}"
        raise SpecError(f"{source}: invalid JSON at {where}: {exc.msg}") from None
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError(f"{source}: invalid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        what = "an empty document" if data is None else f"a {type(data).__name__}"
        raise SpecError(f"{source}: the top level must be a mapping of spec fields, got {what}")
    return data


def validate_spec(data: Mapping[str, Any], source: str = "spec") -> JobSpec:
    """Validate a mapping; raises :class:`SpecError` with one readable line per problem."""
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        problems = format_validation_error(exc)
        count = len(exc.errors())
        raise SpecError(f"{source}: {count} problem{'s' if count > 1 else ''}:\n{problems}") from None


def load_spec(path: str | Path) -> JobSpec:
    """Read, parse and validate a spec file (``.yaml``, ``.yml`` or ``.json``); raises :class:`SpecError`."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".json"):
        raise SpecError(f"{path}: a spec file must end in .yaml, .yml or .json")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"{path}: cannot read: {exc}") from None
    return validate_spec(parse_spec_text(text, suffix, str(path)), str(path))
