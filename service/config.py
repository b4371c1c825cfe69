"""The service's settings: flags, ``LIPTUNE_*`` environment variables, a config file, defaults.

Precedence, highest first: keyword arguments (what ``liptune serve`` flags set), environment
variables (``LIPTUNE_`` + the field name in capitals, e.g. ``LIPTUNE_STORAGE_URL``; lists as
JSON, e.g. ``LIPTUNE_CORS_ORIGINS='["http://localhost:3000"]'``), the config file
(``config_file`` / ``LIPTUNE_CONFIG_FILE``, YAML or JSON with the same field names), the defaults
below.

API keys are stored only as SHA-256 hashes: ``api_key_hashes`` holds ``sha256:<hex>`` entries,
e.g. from ``printf %s "$KEY" | sha256sum``; :func:`hash_api_key` computes the same.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from worker.common import (
    default_data_roots,
    default_storage_url,
    default_tracking_uri,
    liptune_home,
    resolve_url,
)

HASH_PREFIX = "sha256:"


def hash_api_key(key: str) -> str:
    """The at-rest form of an API key: ``sha256:`` + the hex SHA-256 of its UTF-8 bytes."""
    return HASH_PREFIX + hashlib.sha256(key.encode("utf-8")).hexdigest()


class Settings(BaseSettings):
    """Every setting of ``liptune serve`` and the API."""

    model_config = SettingsConfigDict(env_prefix="LIPTUNE_", extra="forbid")

    config_file: Path | None = Field(
        default=None, description="YAML or JSON file with any of these settings."
    )
    home: Path | None = Field(
        default=None,
        description="Data directory (`--data-dir`, `LIPTUNE_HOME`); default `~/.liptune`. The "
        "SQLite storage, the MLflow store and the `datasets` data root live under it.",
    )
    storage_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL of the service tables and the Optuna storage "
        "(`--storage`); default `sqlite:///HOME/liptune.db`.",
    )
    mlflow_uri: str | None = Field(
        default=None,
        description="MLflow tracking URI (`--mlflow`); default `sqlite:///HOME/mlflow.db`.",
    )
    data_roots: list[Path] | None = Field(
        default=None,
        description="Directories a spec may read data sets from; default `HOME/datasets` and "
        "`/usr/share/datasets`.",
    )
    host: str = Field(default="127.0.0.1", description="Address the API listens on.")
    port: int = Field(default=8000, ge=0, le=65535, description="Port the API listens on.")
    workers: int = Field(
        default=1,
        ge=0,
        le=256,
        description="Embedded `liptune worker` processes started with the server (0: API only).",
    )
    trials_per_device: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Concurrent trials of each embedded worker on its device (`--trials-per-"
        "device`): each worker fans out to that many processes, each with an even share of the "
        "device's memory.",
    )
    heartbeat_interval: int | None = Field(
        default=None, ge=1, description="Embedded workers' `--heartbeat-interval` (seconds)."
    )
    grace_period: int | None = Field(
        default=None, ge=2, description="Embedded workers' `--grace-period` (seconds)."
    )
    api_key_hashes: list[str] = Field(
        default_factory=list,
        description="Accepted API keys as `sha256:<hex>`; when any is set, state-changing "
        "requests need `X-API-Key: KEY` or `Authorization: Bearer KEY`.",
    )
    protect_reads: bool = Field(
        default=False,
        description="Also require an API key for reads (only when keys are configured).",
    )
    cors_origins: list[str] = Field(
        default_factory=list, description="Origins allowed by CORS; empty: CORS off."
    )
    max_trials: int = Field(default=1000, ge=1, description="Largest `n_trials` a study may ask.")
    max_epochs: int = Field(default=500, ge=1, description="Largest `training.epochs`.")
    max_parameters: int = Field(
        default=50_000_000,
        ge=1,
        description="Largest model a study may train, in free parameters "
        "(see worker/trial/_costs.py).",
    )
    max_activation_bytes: int = Field(
        default=4 * 2**30,
        ge=1,
        description="Largest training-step memory a study may need beyond its weights: the "
        "activations autograd keeps at the batch size plus the constrained weights' copies.",
    )
    max_dataset_bytes: int = Field(
        default=8 * 2**30,
        ge=1,
        description="Largest decoded user data set (an image folder, an .npz, a plugin's "
        "arrays) a worker may hold in memory for a study's trials.",
    )
    devices: list[str] | None = Field(
        default=None,
        description="Training devices a spec may name besides `auto` and `cpu` (e.g. "
        '`["cuda", "cuda:0"]` where the workers have GPUs); default: this machine\'s.',
    )
    max_body_bytes: int = Field(
        default=256 * 1024, ge=1024, description="Largest request body; larger gets 413."
    )
    cache_ttl_s: float = Field(
        default=1.0,
        ge=0.0,
        le=60.0,
        description="How stale a study's cached status and unfinished trials may get before a "
        "read refreshes them (finished trials never change and stay cached).",
    )
    page_size: int = Field(default=50, ge=1, le=1000, description="Default page size.")

    @field_validator("api_key_hashes")
    @classmethod
    def _hashes_only(cls, hashes: list[str]) -> list[str]:
        for entry in hashes:
            digest = entry.removeprefix(HASH_PREFIX)
            if not entry.startswith(HASH_PREFIX) or len(digest) != 64:
                raise ValueError(
                    "api_key_hashes holds `sha256:<64 hex digits>` entries, never plain keys; "
                    "hash a key with `printf %s KEY | sha256sum`"
                )
            int(digest, 16)
        return [entry.lower() for entry in hashes]

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        config_file = None
        if isinstance(init_settings, InitSettingsSource):
            config_file = init_settings.init_kwargs.get("config_file")
        config_file = config_file or os.environ.get("LIPTUNE_CONFIG_FILE")
        sources: tuple[PydanticBaseSettingsSource, ...] = (init_settings, env_settings)
        if config_file:
            path = Path(config_file).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"config file {path} does not exist")
            sources += (YamlConfigSettingsSource(settings_cls, yaml_file=path),)
        return sources

    # ------------------------------------------------------------------ resolved values

    def resolved_home(self) -> Path:
        """The data directory, created if needed."""
        return liptune_home(self.home)

    def resolved_storage_url(self) -> str:
        return self.storage_url or default_storage_url(self.resolved_home())

    def resolved_mlflow_uri(self) -> str:
        return resolve_url(self.mlflow_uri or default_tracking_uri(self.resolved_home()))

    def resolved_data_roots(self) -> list[Path]:
        return self.data_roots or default_data_roots(self.resolved_home())
