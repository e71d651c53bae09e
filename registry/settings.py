"""Where the registry lives and its limits, from the environment (``ADAPTERDECK_*``) or arguments."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class RegistrySettings(BaseSettings):
    """``ADAPTERDECK_HOME`` holds the SQLite file and the blobs unless URLs say otherwise."""

    model_config = SettingsConfigDict(env_prefix="ADAPTERDECK_", extra="ignore")

    home: Path = Field(default_factory=lambda: Path.home() / ".adapterdeck")
    #: SQLAlchemy URL of the metadata database; default: a SQLite file in ``home``.
    database_url: str | None = None
    #: fsspec URL of the blob storage (a directory, ``s3://bucket/prefix``...); default: ``home``.
    storage_url: str | None = None
    #: JSON of fsspec storage options, e.g. ``{"endpoint_url": "http://127.0.0.1:9000"}``.
    storage_options: dict = Field(default_factory=dict)
    #: Where adapters are copied out of the blob store to be loaded (vLLM's resolver, the PEFT
    #: engine); default: ``home/cache/adapters``.
    cache_dir: Path | None = None
    #: The adapter cache's bound in bytes: least recently used adapters beyond it are removed (and
    #: copied again on their next use).
    cache_max_bytes: int = Field(default=10 * 1024**3, ge=0)
    #: An adapter used within this many seconds is never removed from the cache (an engine may be
    #: loading it), even above the bound.
    cache_min_idle_seconds: float = Field(default=60.0, ge=0)
    #: Largest rank of a LoRA adapter served by vLLM (its ``--max-lora-rank`` must be at least this).
    max_lora_rank: int = 64
    #: Largest adapter accepted, in bytes.
    max_adapter_bytes: int = 2 * 1024**3

    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home.expanduser() / 'registry.db'}"

    def resolved_storage_url(self) -> str:
        return self.storage_url or str(self.home.expanduser())

    def resolved_cache_dir(self) -> Path:
        return (self.cache_dir or self.home / "cache" / "adapters").expanduser()

    def child_env(self) -> dict[str, str]:
        """The environment that gives a child process (vLLM, a fine-tuning worker) this registry."""
        env = {
            "ADAPTERDECK_HOME": str(self.home),
            "ADAPTERDECK_DATABASE_URL": self.resolved_database_url(),
            "ADAPTERDECK_STORAGE_URL": self.resolved_storage_url(),
            "ADAPTERDECK_CACHE_DIR": str(self.resolved_cache_dir()),
            "ADAPTERDECK_CACHE_MAX_BYTES": str(self.cache_max_bytes),
            "ADAPTERDECK_CACHE_MIN_IDLE_SECONDS": str(self.cache_min_idle_seconds),
        }
        if self.storage_options:
            env["ADAPTERDECK_STORAGE_OPTIONS"] = json.dumps(self.storage_options)
        return env
