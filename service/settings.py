"""The control plane's settings, all from ``HUTCH_*`` environment variables, in one place.

With nothing set, ``hutch serve`` keeps a SQLite file and a generated API token under
``~/.hutch`` and starts a local Ray head of its own; pointed at a database URL and a Ray
address, it runs against them unchanged.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Annotated

from pydantic import AliasChoices, Field, PositiveFloat, PositiveInt, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


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
        description="Comma-separated bearer tokens accepted on /v1. Unset: one is generated into "
        "DATA_DIR/api-token (mode 600), where the CLI finds it.",
    )

    @field_validator("api_tokens", mode="before")
    @classmethod
    def _split_tokens(cls, value: object) -> object:
        if isinstance(value, str):
            return [token.strip() for token in value.split(",") if token.strip()]
        return value

    @property
    def token_file(self) -> Path:
        return self.data_dir.expanduser().absolute() / "api-token"

    def accepted_tokens(self) -> list[str]:
        """The configured tokens, or the generated one (created on first use)."""
        if self.api_tokens:
            return self.api_tokens
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
        return [self.token_file.read_text().strip()]


class Settings(TokenSettings):
    """Every knob of the control plane; ``hutch serve --help`` prints this table."""

    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL of the job store, e.g. postgresql+psycopg://user:pw@host/hutch "
        "[sqlite:///DATA_DIR/hutch.db].",
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
        "to RAY_AUTH_TOKEN). Never logged or shown.",
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

    @cached_property
    def resolved_data_dir(self) -> Path:
        path = self.data_dir.expanduser().absolute()
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.resolved_data_dir / 'hutch.db'}"

    @property
    def resolved_storage_path(self) -> Path:
        return (self.storage_path or self.resolved_data_dir / "storage").expanduser().absolute()


def settings_table() -> list[tuple[str, str, str]]:
    """(variable, default, description) for every setting, for ``hutch serve --help``."""
    rows = []
    for name, field in Settings.model_fields.items():
        default = "" if field.default_factory is not None or field.default is None else str(field.default)
        if name == "data_dir":
            default = "~/.hutch"
        rows.append((f"HUTCH_{name.upper()}", default, field.description or ""))
    return rows
