"""Server configuration: one pydantic-settings class, read from flags and ASSISTANTS_* env vars.

There is deliberately no module-level instance: the CLI builds one and hands it
to create_app(), and tests build their own.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def default_sandbox_python() -> Path:
    """``<prefix>/share/assistants-server/sandbox-venv`` of the Python running
    the server (its virtualenv, or /usr/local in the Docker image): an absolute
    path that lives and goes with the installation, and sits beside the
    package's own files (the sandbox's kernel script), so sessions running as
    other users can reach both or neither."""
    return Path(sys.prefix) / "share" / "assistants-server" / "sandbox-venv"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ASSISTANTS_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: Path = Path("data")
    # Default: a SQLite file inside data_dir (see resolved_database_url).
    database_url: str | None = None
    # PostgreSQL: the connections a process keeps open (all of them once a
    # burst opened them; issue 17). Two of them are held for good by the
    # LISTEN connections (run events, the worker's wake-ups). PostgreSQL's
    # max_connections must cover every process's pool: serving processes,
    # workers, replicas.
    database_pool_size: int = Field(default=30, ge=4)
    # Comma-separated in the environment; empty means the server is open.
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # A key made with `keys create` is looked up once and remembered this long:
    # a revoked key stops working at most this many seconds later (app/services/api_keys.py).
    key_cache_seconds: float = 10.0
    max_upload_bytes: int = 512 * 1024 * 1024
    # LiteLLM-proxy-style routing file (model_list); unset = built-in offline model.
    llm_config: Path | None = None
    run_expires_seconds: int = 600
    # `serve`: this many serving processes (API and executor each) on one
    # listening socket, started and restarted by a supervisor (app/supervisor.py).
    workers: int = Field(default=1, ge=1)
    # The worker: in-process with `serve` unless turned off (then run `worker`).
    embedded_worker: bool = True
    worker_concurrency: int = 32
    worker_poll_seconds: float = 1.0
    # A run created through this process's API waits this long for this
    # process's worker before other processes may claim it (0: no preference).
    run_claim_affinity_seconds: float = Field(default=0.2, ge=0)
    run_lease_seconds: float = 30.0
    # After a failed loop iteration (e.g. the database is unreachable) the
    # worker retries with exponential backoff up to this pause.
    worker_max_backoff_seconds: float = 5.0
    # On SIGTERM/SIGINT in-flight runs get this long to finish; the rest are
    # released (not failed) for another worker or the next start to resume.
    worker_drain_seconds: float = 5.0
    # A model stream that sends nothing for this long fails its run.
    model_idle_timeout_seconds: float = 300.0
    # Sent as openai-poll-after-ms on run retrieves; the SDK's pollers obey it.
    poll_after_ms: int = 100
    # An SDK poller's GET of a run this process is executing (queued, in
    # progress or cancelling) waits up to this long for the run to stop, so
    # that create_and_poll needs one poll; 0 answers at once (issue 17).
    poll_hold_ms: int = 1000
    # A ": ping" comment line on a run's event stream after this long without events.
    stream_keepalive_seconds: float = 15.0
    # The run event log (issue 11, app/run_log.py): deltas between state
    # changes are written at most this often, one INSERT for all runs; a
    # finished run's log is kept this long (then pruned by the worker).
    run_events_flush_seconds: float = 0.02
    run_events_retention_seconds: float = 24 * 3600.0
    log_level: str = "info"
    # Keep every completion a run asks for (request and answer) in the
    # model-request log (admin API, pytest plugin, console).
    record_model_requests: bool = True
    # The test-support API under /admin (reset, scripted offline answers, the
    # model-request log); on for `serve --ephemeral`. Never on a shared server.
    admin_api: bool = False
    # Record provider answers into this directory / answer from it, offline
    # (app/cassettes.py). Replay wins if both are set.
    llm_record: Path | None = None
    llm_replay: Path | None = None

    # --- bounds on requests and connections (app/api/limits.py) ---
    max_json_body_bytes: int = 32 * 1024**2  # any body but a file upload (multipart POST …/files); 413 beyond
    http_body_timeout_seconds: float = 60.0  # a body must arrive within this (408)
    http_header_timeout_seconds: float = 10.0  # request headers must arrive within this
    http_keep_alive_seconds: int = 5  # an idle connection between requests is closed after this
    http_max_connections: int = 1000  # more are closed when accepted (kept below the fd limit)
    http_max_header_bytes: int = 64 * 1024
    # uvicorn's HTTP parser and event loop: "auto" takes httptools and uvloop
    # (C; both core dependencies) and falls back to h11 and asyncio when they
    # are not installed (issue 17); see resolved_event_loop.
    http_parser: Literal["auto", "httptools", "h11"] = "auto"
    event_loop: Literal["auto", "uvloop", "asyncio"] = "auto"
    # "text" for people, "json" (one object per line) for log collectors; see docs/operations.md.
    log_format: Literal["text", "json"] = "text"
    # `worker` only: serve /metrics, /healthz and /readyz on this port (none by default).
    metrics_port: int | None = None

    # --- code_interpreter sandbox (app/sandbox) ---
    # "bwrap": bubblewrap (no network, read-only system, private /mnt/data and
    # /tmp, no server files or environment). "none" runs model code WITHOUT
    # isolation as the server's user: only for development, and only when set
    # explicitly (the server logs a loud warning at start-up).
    sandbox: Literal["bwrap", "none"] = "bwrap"
    # The sandbox's Python (numpy, pandas, matplotlib), made by
    # `assistants-server sandbox-setup`; by default inside this installation
    # (see default_sandbox_python), wherever the server is started from.
    sandbox_python: Path = Field(default_factory=default_sandbox_python)
    # Per-session /mnt/data folders; default <system temp>/assistants-sandbox-<uid>.
    # Must not be inside data_dir (the database and files live there).
    sandbox_dir: Path | None = None
    sandbox_idle_seconds: float = 3600.0  # a thread's session is reclaimed after this
    sandbox_max_sessions: int = 32
    sandbox_call_timeout_seconds: int = 60  # wall clock per call
    sandbox_cpu_seconds: int = 60  # CPU per call
    sandbox_session_cpu_seconds: int = 3600  # CPU over a session's life
    sandbox_memory_bytes: int = 2 * 1024**3  # address space per process
    sandbox_max_processes: int = 64
    sandbox_max_open_files: int = 256
    sandbox_max_file_bytes: int = 256 * 1024**2  # largest file the code may write
    sandbox_max_data_bytes: int = 1024**3  # size of a session's /mnt/data (a tmpfs: RAM or swap)
    sandbox_session_memory_bytes: int = 2 * 1024**3  # all of a session's processes together
    sandbox_max_output_bytes: int = 64 * 1024  # stdout+stderr kept per call
    sandbox_tmp_bytes: int = 256 * 1024**2  # size of the private /tmp
    # When the server runs as root, sessions run as uids from here upward:
    # each server process on the machine takes a range of sandbox_max_sessions
    # of them, the first that no other process holds (a lock on that range
    # in sandbox_uid_lock_file; app/sandbox/uid_ranges.py), among this many.
    sandbox_uid_base: int = 200_000
    sandbox_uid_ranges: int = Field(default=64, ge=1)
    sandbox_uid_lock_file: Path = Path("/run/assistants-server/sandbox-uids.lock")
    # SQLite: memory for the stores' embedding matrices kept between searches
    # (float32: 1.5 KiB per 384-d chunk, ~150 MiB per 100k chunks).
    vector_cache_mib: int = 512

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

    def resolved_event_loop(self) -> Literal["uvloop", "asyncio"]:
        """uvloop, unless set otherwise or not installed. As root too:
        code_interpreter sessions switch to their own users with setpriv
        (app/sandbox/launch.py as_user), which any loop can start."""
        if self.event_loop != "auto":
            return self.event_loop
        return "asyncio" if importlib.util.find_spec("uvloop") is None else "uvloop"

    @property
    def files_dir(self) -> Path:
        return self.data_dir / "files"
