"""Service configuration: one pydantic-settings object read from `ITRD_*` environment variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DeviceKind = Literal["cpu", "cuda"]
Environment = Literal["development", "production"]

FILESYSTEM_BROKER = "filesystem://"


class Settings(BaseSettings):
    """Everything the API, the worker and the records read from the environment (prefix `ITRD_`).

    Fields left empty are derived from `state_dir`, so one variable relocates the whole embedded
    deployment (SQLite file, broker folders, artifacts, data).
    """

    model_config = SettingsConfigDict(env_prefix="ITRD_", extra="ignore")

    environment: Environment = "development"
    state_dir: Path = Path("./state")
    # Empty means "derive from state_dir"; see _derive_defaults.
    database_url: str = ""
    broker_url: str = ""
    artifact_store: str = Field(default="", description="file://<dir> or s3://<bucket>/<prefix>")
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    data_dirs: list[Path] = Field(default_factory=list)
    secret_key: SecretStr | None = None

    lease_seconds: float = Field(default=60.0, gt=0)
    heartbeat_seconds: float = Field(default=10.0, gt=0)
    max_attempts: int = Field(default=3, ge=1)
    upload_max_bytes: int = Field(default=512 * 1024 * 1024, gt=0)
    submit_rate_per_minute: int = Field(default=60, gt=0, description="job submits and teacher uploads per key")

    cpu_queue: str = "cpu"
    cuda_queue: str = "cuda"
    default_device: DeviceKind = Field(default="cpu", description="where jobs with device 'auto' are queued")
    reap_seconds: float = Field(default=5.0, gt=0, description="how often expired leases and unsent jobs are swept")
    broker_timeout_seconds: float = Field(default=3.0, gt=0, description="give up sending to a broker that is down")
    reaper_in_api: bool = Field(default=True, description="run the reaper thread inside the API process")

    @model_validator(mode="after")
    def _derive_defaults(self) -> Settings:
        """Fill unset locations from state_dir and refuse embedded defaults in production."""
        # Absolute, so the API and a worker started from another directory agree on every path.
        self.state_dir = self.state_dir.expanduser().resolve()
        unset = [
            name
            for name in ("database_url", "broker_url", "artifact_store")
            if not getattr(self, name)
        ]
        if self.environment == "production":
            problems = [f"ITRD_{name.upper()} must be set" for name in unset]
            if self.secret_key is None or not self.secret_key.get_secret_value():
                problems.append("ITRD_SECRET_KEY must be set")
            if problems:
                raise ValueError("refusing to start in production: " + "; ".join(problems))
        if not self.database_url:
            self.database_url = f"sqlite:///{self.state_dir / 'itrd.db'}"
        if not self.broker_url:
            self.broker_url = FILESYSTEM_BROKER
        if not self.artifact_store:
            self.artifact_store = f"file://{self.state_dir / 'artifacts'}"
        if not self.data_dirs:
            self.data_dirs = [self.state_dir / "data"]
        if self.heartbeat_seconds >= self.lease_seconds:
            raise ValueError("heartbeat_seconds must be shorter than lease_seconds, or every lease lapses")
        return self

    @property
    def broker_dir(self) -> Path:
        """Folder of the embedded (kombu filesystem) broker."""
        return self.state_dir / "broker"

    def uses_filesystem_broker(self) -> bool:
        """Whether the broker is kombu's filesystem transport (the embedded mode)."""
        return self.broker_url.startswith("filesystem:")

    def broker_transport_options(self) -> dict[str, Any]:
        """Celery `broker_transport_options` for the broker in use (folders for the filesystem one)."""
        if not self.uses_filesystem_broker():
            return {}
        # Producers write to data_folder_out and consumers read data_folder_in: one shared folder
        # makes API and worker talk through the same queue.
        queue = str(self.broker_dir / "queue")
        return {
            "data_folder_in": queue,
            "data_folder_out": queue,
            "data_folder_processed": str(self.broker_dir / "processed"),
        }

    def queue_for(self, device: DeviceKind) -> str:
        """Name of the Celery queue that workers of this device kind consume."""
        return self.cuda_queue if device == "cuda" else self.cpu_queue

    def queue_for_device(self, device: str) -> str:
        """The queue of a spec's `device` field ('cpu', 'cuda', 'cuda:N' or 'auto')."""
        kind: DeviceKind = "cuda" if device.startswith("cuda") else "cpu" if device == "cpu" else self.default_device
        return self.queue_for(kind)

    def ensure_state_dirs(self) -> None:
        """Create the local folders the embedded mode writes into (idempotent)."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if self.uses_filesystem_broker():
            for folder in self.broker_transport_options().values():
                Path(folder).mkdir(parents=True, exist_ok=True)
        if self.artifact_store.startswith("file://"):
            Path(self.artifact_store.removeprefix("file://")).mkdir(parents=True, exist_ok=True)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once (tests call `get_settings.cache_clear()`)."""
    return Settings()
