"""The control plane's settings, all from ``HUTCH_*`` environment variables, in one place.

With nothing set, ``hutch serve`` keeps a SQLite file and a generated API token under
``~/.hutch`` and starts a local Ray head of its own; pointed at a database URL and a Ray
address, it runs against them unchanged.
"""

from __future__ import annotations

import json
import math
import os
from functools import cached_property
from pathlib import Path
from typing import Annotated

from pydantic import (
    AliasChoices,
    Field,
    PositiveFloat,
    PositiveInt,
    SecretStr,
    ValidationInfo,
    field_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.identity import Caller, parse_tokens, token_of


class TokenSettings(BaseSettings):
    """The settings a client on the service's machine needs to find the API token, and no more
    (so an unrelated bad variable, e.g. ``RAY_ADDRESS=ray://…``, does not stop a client)."""

    model_config = SettingsConfigDict(env_prefix="HUTCH_", extra="ignore", populate_by_name=True)

    data_dir: Path = Field(
        default=Path.home() / ".hutch",
        description="Where the SQLite file, the generated API token and the local Ray head's record live.",
    )
    api_tokens: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated bearer tokens accepted on /v1, each `name:token` (may change its "
        "own jobs), `name:token:admin` (any job) or a plain `token` (an admin named token-<hash>). "
        "Unset: one admin token is generated into DATA_DIR/api-token (mode 600), where the CLI finds it.",
    )

    @field_validator("api_tokens", mode="before")
    @classmethod
    def _split_tokens(cls, value: object) -> object:
        if isinstance(value, str):
            return [token.strip() for token in value.split(",") if token.strip()]
        return value

    @field_validator("api_tokens")
    @classmethod
    def _named_tokens(cls, value: list[str]) -> list[str]:
        parse_tokens(value)  # a malformed entry stops the start, named by its place, never shown
        return value

    @property
    def token_file(self) -> Path:
        return self.data_dir.expanduser().absolute() / "api-token"

    def client_token(self) -> str | None:
        """The token a client on this machine sends: the first configured one's, else the
        generated file's (None if there is none yet)."""
        if self.api_tokens:
            return token_of(self.api_tokens[0])
        try:
            return self.token_file.read_text().strip() or None
        except FileNotFoundError:
            return None

    def callers(self) -> dict[str, Caller]:
        """Token → who holds it: the configured tokens, or the generated one (created on first
        use, an admin)."""
        return parse_tokens(self.api_tokens or [self._generated_token()])

    def _generated_token(self) -> str:
        if not self.token_file.exists():
            import secrets

            self.token_file.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(self.token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:  # another process created it first
                pass
            else:
                with os.fdopen(fd, "w") as out:
                    out.write(secrets.token_urlsafe(32) + "\n")
        return self.token_file.read_text().strip()


class Settings(TokenSettings):
    """Every knob of the control plane; ``hutch serve --help`` prints this table."""

    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL of the job store, e.g. postgresql+psycopg://user:pw@host/hutch "
        "[sqlite:///DATA_DIR/hutch.db].",
    )
    database_auto_upgrade: bool | None = Field(
        default=None,
        description="Upgrade the job store's schema at start when this release needs a newer one (what "
        "`hutch db upgrade` does), as the database role the service runs as. Unset: only the default "
        "SQLite file is; a configured database at an earlier revision is refused, naming the command to "
        "run, so its operator decides when and the service's role needs no right to change the schema.",
    )
    ray_address: str | None = Field(
        default=None,
        validation_alias=AliasChoices("HUTCH_RAY_ADDRESS", "RAY_ADDRESS", "ray_address"),
        description="HTTP address of the Ray dashboard (job submission API), e.g. "
        "http://raycluster-head-svc:8265 (falls back to RAY_ADDRESS). Unset: a local Ray head is "
        "started and stopped with the service.",
    )
    ray_auth_token: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("HUTCH_RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN", "ray_auth_token"),
        description="Token of a Ray cluster with token authentication (RAY_AUTH_MODE=token; KubeRay keeps "
        "it in the Secret named after the cluster, key auth_token), sent on every call to Ray (falls back "
        "to RAY_AUTH_TOKEN). Never logged or shown. Fixed for the life of the process; for a token that "
        "rotates, use HUTCH_RAY_AUTH_TOKEN_FILE instead.",
    )
    ray_auth_token_file: Path | None = Field(
        default=None,
        description="A file holding the Ray token, instead of HUTCH_RAY_AUTH_TOKEN (not both): e.g. the "
        "KubeRay Secret mounted as a volume (not with subPath, which Kubernetes never updates). Read at "
        "start-up (it must exist and hold a token) and read again whenever Ray rejects the token: a "
        "rotated token is picked up, and the rejected call retried, with no restart.",
    )
    ray_dashboard_url: str | None = Field(
        default=None,
        description="Dashboard URL shown to users in job links, when it differs from the address the "
        "service uses [the Ray address].",
    )
    storage_path: Path | None = Field(
        default=None,
        description="Shared storage for run directories (metrics, logs) and checkpoints, visible to the "
        "service and every Ray node [DATA_DIR/storage].",
    )
    max_request_bytes: PositiveInt = Field(
        default=1_048_576, description="Largest request body accepted; larger ones get 413."
    )
    max_package_bytes: PositiveInt = Field(
        default=100 * 1024 * 1024,
        description="Largest working-directory package POST /v1/packages accepts (zip bytes); larger ones "
        "get 413. Ray's job API takes packages up to 100 MiB.",
    )
    max_page_size: PositiveInt = Field(default=200, description="Largest page GET /v1/jobs returns.")
    api_threads: PositiveInt = Field(
        default=4,
        description="Requests the API works on at once (threads of the server's pool); more wait their "
        "turn in order. A few keep each request short where many would share the CPUs and all be slow.",
    )
    max_cluster_cpus: PositiveFloat | None = Field(
        default=None,
        description="CPUs the cluster can autoscale to; jobs up to this are admitted even if the cluster "
        "is smaller now, and queued jobs are handed to Ray while the started ones use less "
        "[the cluster's current total].",
    )
    max_cluster_gpus: float | None = Field(
        default=None,
        ge=0,
        description="GPUs the cluster can autoscale to, for admission and the queue alike "
        "[the cluster's current total].",
    )
    reconcile_interval_s: PositiveFloat = Field(
        default=1.0, description="How often the reconciler follows Ray jobs into the store."
    )
    replica_name: str | None = Field(
        default=None,
        min_length=1,
        max_length=100,
        description="This replica's name in /readyz and the reconciler's lease (several replicas may "
        "serve one database; one of them reconciles) [the host name: in Kubernetes, the pod's].",
    )
    leader_lease_s: Annotated[float, Field(ge=2, le=300)] = Field(
        default=10.0,
        description="How long the reconciler's lease lasts unrenewed: when the leading replica dies, "
        "another takes over within this many seconds (plus one renewal, a fifth of it).",
    )
    hold_queue: bool = Field(
        default=False,
        description="Start no queued job (new, retried or resumed) while true: submissions queue, "
        "cancels apply, running jobs are followed. For work on the Ray cluster without losing a "
        "step (deploy/README.md, Upgrade); /readyz says the queue is held.",
    )
    webhook_max_attempts: PositiveInt = Field(
        default=12,
        description="Sendings of one webhook delivery before it is given up (failed): the receiver "
        "answered no 2xx to any of them.",
    )
    webhook_retry_s: PositiveFloat = Field(
        default=5.0,
        description="The wait before a webhook delivery's second sending, doubled before each next "
        "one, up to 10 minutes (12 sendings with the defaults span about 50 minutes).",
    )
    webhook_timeout_s: PositiveFloat = Field(
        default=10.0, description="How long one webhook sending may take before it counts as failed."
    )
    driver_resources: Annotated[dict[str, float], NoDecode] = Field(
        default_factory=dict,
        description="Custom Ray resources every job's driver (python -m trainer) asks for, as a JSON object "
        'of name -> amount, e.g. {"hutch-driver": 1}: Ray then runs the driver only on a node that offers '
        "them (ray start --resources; a KubeRay worker group's resources), e.g. to keep job code off the "
        "head. Unset: the driver runs where Ray puts it, by default on the head. CPU, GPU and memory are "
        "not custom resources and are refused here.",
    )
    local_ray_num_cpus: PositiveInt | None = Field(
        default=None, description="CPUs of the local Ray head [this machine's count]."
    )
    local_ray_dashboard_port: PositiveInt = Field(
        default=8265, description="Dashboard port of the local Ray head (a free one if taken)."
    )
    local_ray_metrics_port: PositiveInt = Field(
        default=8080,
        description="Prometheus metrics port of the local Ray head, the training jobs' metrics "
        "among them (a free one if taken; the service's log and local-ray.json say which).",
    )

    @field_validator("ray_auth_token")
    @classmethod
    def _non_empty_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value().strip():
            return None
        return SecretStr(value.get_secret_value().strip())

    @field_validator("ray_auth_token_file", mode="before")
    @classmethod
    def _unset_if_blank(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("ray_auth_token_file")
    @classmethod
    def _one_token_source(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is not None and info.data.get("ray_auth_token") is not None:
            raise ValueError(
                "HUTCH_RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN) and HUTCH_RAY_AUTH_TOKEN_FILE are both set; "
                "set only one: the file for a token that rotates, the variable for a fixed one"
            )
        return value

    @field_validator("driver_resources", mode="before")
    @classmethod
    def _custom_resources(cls, value: object) -> object:
        return parse_driver_resources(value)

    @field_validator("ray_address")
    @classmethod
    def _http_address(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        value = value.strip().rstrip("/")
        if value.startswith(("ray://", "auto")):
            raise ValueError(
                "must be the HTTP address of the Ray dashboard (job submission API), e.g. http://head:8265"
            )
        return value if "://" in value else f"http://{value}"

    def ray_token(self) -> str | None:
        """The Ray token as configured now: HUTCH_RAY_AUTH_TOKEN's, or the file's (read now)."""
        if self.ray_auth_token_file is not None:
            return read_token_file(self.ray_auth_token_file)
        return self.ray_auth_token.get_secret_value() if self.ray_auth_token else None

    @cached_property
    def resolved_data_dir(self) -> Path:
        path = self.data_dir.expanduser().absolute()
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.resolved_data_dir / 'hutch.db'}"

    @property
    def upgrades_database(self) -> bool:
        """Whether the store's schema is upgraded at start: as HUTCH_DATABASE_AUTO_UPGRADE says, or else
        for the embedded default alone, which has no operator to run ``hutch db upgrade``."""
        if self.database_auto_upgrade is None:
            return self.database_url is None
        return self.database_auto_upgrade

    @property
    def resolved_storage_path(self) -> Path:
        return (self.storage_path or self.resolved_data_dir / "storage").expanduser().absolute()


class SettingError(ValueError):
    """A setting whose value parses but cannot be used (a token file that cannot be read, …);
    ``variable`` names it."""

    def __init__(self, variable: str, message: str) -> None:
        super().__init__(f"{variable}: {message}")
        self.variable = variable


def read_token_file(path: Path) -> str:
    """The token in ``path`` (HUTCH_RAY_AUTH_TOKEN_FILE), surrounding whitespace stripped; a
    :class:`SettingError` naming the setting and the path if it cannot be read or is empty."""
    try:
        token = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise SettingError(
            "HUTCH_RAY_AUTH_TOKEN_FILE", f"cannot read the Ray token file {path}: {reason}"
        ) from None
    if not token:
        raise SettingError("HUTCH_RAY_AUTH_TOKEN_FILE", f"the Ray token file {path} is empty")
    return token


RESERVED_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


def parse_driver_resources(value: object) -> dict[str, float]:
    """HUTCH_DRIVER_RESOURCES as a dict: a JSON object (or a mapping) of custom resource name ->
    positive amount; a ``ValueError`` saying what is wrong otherwise."""
    example = 'e.g. {"hutch-driver": 1}'
    if value is None or (isinstance(value, str) and not value.strip()):
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as error:
            raise ValueError(
                f"must be a JSON object of resource name -> amount, {example}: {error}"
            ) from None
    if not isinstance(value, dict):
        raise ValueError(f"must be a JSON object of resource name -> amount, {example}; got {value!r}")
    resources = {}
    for name, amount in value.items():
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"resource names must be non-empty strings, {example}; got {name!r}")
        if name.lower() in {reserved.lower() for reserved in RESERVED_RESOURCES}:
            raise ValueError(
                f"{name!r} is not a custom resource: CPU, GPU and memory have their own parameters in Ray "
                "(entrypoint_num_cpus, entrypoint_num_gpus, entrypoint_memory) and are not taken here; "
                f"name a custom resource that the driver's nodes offer, {example}"
            )
        number = isinstance(amount, int | float) and not isinstance(amount, bool)
        if not number or not math.isfinite(amount) or amount < 1e-4:
            raise ValueError(
                f"the amount of {name!r} must be a positive number (at least 0.0001), got {amount!r}"
            )
        resources[name] = float(amount)
    return resources


def settings_table() -> list[tuple[str, str, str]]:
    """(variable, default, description) for every setting, for ``hutch serve --help``."""
    rows = []
    for name, field in Settings.model_fields.items():
        default = "" if field.default_factory is not None or field.default is None else str(field.default)
        if name == "data_dir":
            default = "~/.hutch"
        rows.append((f"HUTCH_{name.upper()}", default, field.description or ""))
    return rows
