"""Server configuration: one pydantic-settings class, read from flags and ASSISTANTS_* env vars.

There is deliberately no module-level instance: the CLI builds one and hands it
to create_app(), and tests build their own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ASSISTANTS_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: Path = Path("data")
    # Default: a SQLite file inside data_dir (see resolved_database_url).
    database_url: str | None = None
    # Comma-separated in the environment; empty means the server is open.
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    max_upload_bytes: int = 512 * 1024 * 1024
    # LiteLLM-proxy-style routing file (model_list); unset = built-in offline model.
    llm_config: Path | None = None
    run_expires_seconds: int = 600
    # The worker: in-process with `serve` unless turned off (then run `worker`).
    embedded_worker: bool = True
    worker_concurrency: int = 32
    worker_poll_seconds: float = 1.0
    run_lease_seconds: float = 30.0
    # Sent as openai-poll-after-ms on run retrieves; the SDK's pollers obey it.
    poll_after_ms: int = 100
    log_level: str = "info"

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        return value

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'assistants.db').resolve()}"

    @property
    def files_dir(self) -> Path:
        return self.data_dir / "files"
