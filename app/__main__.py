"""Command line: ``python -m app serve | migrate | worker | keys | sandbox-setup | embeddings-setup``
(also ``assistants-server``).

Flags override the ``ASSISTANTS_*`` environment variables, which override the
defaults in ``app.settings.Settings``: only flags actually given are passed to
Settings, so an unset flag never masks an environment variable.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import pydantic

import app
from app import cli_keys, preflight, sandbox_setup, supervisor
from app.observability import logs
from app.settings import Settings

if TYPE_CHECKING:
    import uvicorn

# What the supervisor of ``serve --workers N`` runs is imported here; the
# server itself (FastAPI, SQLAlchemy, uvicorn, the run engine) only in the
# functions that serve, so that the supervisor stays small (issue 17).

# uvicorn's log levels (uvicorn.config.LOG_LEVELS), without importing uvicorn.
LOG_LEVELS = {"critical": 50, "error": 40, "warning": 30, "info": 20, "debug": 10, "trace": 5}

log = logging.getLogger("app")

# How long open connections (SSE streams above all) may take to finish after
# SIGTERM before uvicorn closes them; below Docker's default 10 s stop timeout
# so the lifespan shutdown still runs before a SIGKILL.
GRACEFUL_SHUTDOWN_SECONDS = 5

# Flag destination -> Settings field, for the options every subcommand shares.
_SETTINGS_FLAGS = {
    "host": "host",
    "port": "port",
    "data_dir": "data_dir",
    "database_url": "database_url",
    "config": "llm_config",
    "log_level": "log_level",
    "log_format": "log_format",
    "metrics_port": "metrics_port",
    "workers": "workers",
}


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--host", help="interface to listen on (env ASSISTANTS_HOST, default 127.0.0.1)")
    common.add_argument("--port", type=int, help="TCP port (env ASSISTANTS_PORT, default 8000)")
    common.add_argument(
        "--data-dir", help="SQLite database and uploaded files (env ASSISTANTS_DATA_DIR, default ./data)"
    )
    common.add_argument(
        "--database-url",
        help="SQLAlchemy URL, e.g. postgresql+asyncpg://user:pw@host/db "
        "(env ASSISTANTS_DATABASE_URL, default a SQLite file in the data dir)",
    )
    common.add_argument(
        "--config",
        metavar="PATH",
        help="LiteLLM-style model routing file (env ASSISTANTS_LLM_CONFIG, default the built-in offline model)",
    )
    common.add_argument(
        "--log-level", choices=list(LOG_LEVELS), help="log verbosity (env ASSISTANTS_LOG_LEVEL, default info)"
    )
    common.add_argument(
        "--log-format", choices=logs.LOG_FORMATS, help="text or json lines (env ASSISTANTS_LOG_FORMAT, default text)"
    )

    parser = argparse.ArgumentParser(
        prog="assistants-server",
        description="Self-hosted server compatible with the OpenAI Assistants API v2.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {app.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser("serve", parents=[common], help="run the HTTP API (migrates the database first)")
    serve.add_argument(
        "--ephemeral",
        action="store_true",
        help="for tests: a free port, a temporary data dir, the admin API; prints the URL as one JSON line",
    )
    serve.add_argument("--ready-file", metavar="PATH", help="with --ephemeral: also write that JSON line here")
    serve.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="serving processes (API and run executor each) sharing the port, to use N cores "
        "(env ASSISTANTS_WORKERS, default 1)",
    )
    commands.add_parser("migrate", parents=[common], help="bring the database schema up to date and exit")
    worker = commands.add_parser("worker", parents=[common], help="run the background run executor on its own")
    worker.add_argument(
        "--metrics-port",
        type=int,
        help="serve /metrics, /healthz and /readyz on this port (env ASSISTANTS_METRICS_PORT)",
    )
    cli_keys.add_parser(commands, common)
    commands.add_parser(
        "embeddings-setup",
        help="distil the default embedder's static token table (minilm-static) and exit",
        description="Distil minilm-static's token table from the installed all-MiniLM-L6-v2 weights "
        "(2-5 minutes on two cores) and cache it beside the installation; otherwise the first "
        "ingestion does it. Idempotent.",
    )
    setup = commands.add_parser(
        "sandbox-setup",
        help="build the code interpreter's Python (numpy, pandas, matplotlib) and exit",
        description="Build the code interpreter's Python: a virtualenv made from a system Python under /usr, "
        "with numpy, pandas and matplotlib. Idempotent.",
    )
    setup.add_argument(
        "--path",
        type=Path,
        help="where to build it (env ASSISTANTS_SANDBOX_PYTHON, default <prefix>/share/assistants-server/sandbox-venv "
        "of the Python running the server)",
    )
    setup.add_argument(
        "--base-python",
        type=Path,
        help="the system Python to build it from, under /usr (default /usr/bin/python3, else /usr/local/bin/python3)",
    )
    return parser


def load_settings(args: argparse.Namespace) -> Settings:
    """Settings from the environment, with the flags that were given on top."""
    overrides: dict[str, Any] = {
        field: getattr(args, flag) for flag, field in _SETTINGS_FLAGS.items() if getattr(args, flag, None) is not None
    }
    try:
        settings = Settings(**overrides)
    except pydantic.ValidationError as exc:
        raise SystemExit(f"invalid configuration: {_describe(exc)}") from None
    if settings.log_level.lower() not in LOG_LEVELS:
        raise SystemExit(f"invalid log level {settings.log_level!r}: choose one of {', '.join(LOG_LEVELS)}")
    if settings.llm_config is not None and not settings.llm_config.is_file():
        raise SystemExit(f"model routing file not found: {settings.llm_config}")
    return settings


def _describe(error: pydantic.ValidationError) -> str:
    """Settings errors on one line, each named by its environment variable."""
    return "; ".join(
        f"{'.'.join(map(str, item['loc']))} (ASSISTANTS_{str(item['loc'][0]).upper()}): {item['msg']}"
        for item in error.errors()
    )


def configure_logging(settings: Settings) -> None:
    # One handler and format for ours, uvicorn's (started with log_config=None),
    # SQLAlchemy's, alembic's and litellm's lines.
    logs.configure(LOG_LEVELS[settings.log_level.lower()], settings.log_format, settings.api_keys)


def display_database(settings: Settings) -> str:
    """The database URL without its password, for logs."""
    from sqlalchemy.engine import make_url

    return make_url(settings.resolved_database_url()).render_as_string(hide_password=True)


def loop_factory(settings: Settings) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop ``worker`` runs on when uvicorn does not make it (None: asyncio's)."""
    if settings.resolved_event_loop() == "asyncio":
        return None
    import uvloop

    return uvloop.new_event_loop


def _exit_on_sigterm(_signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(0)


# Tracked objects allocated (net of those freed) between two collections of
# the youngest generation; Python 3.11's default is 700. A server's requests keep
# a few thousand objects alive at any moment, so at 700 it collected every
# few requests, each time scanning those in flight; 7,000 is seldom reached
# but by garbage that only a collection frees (cycles), which still starts
# one (issue 17, bench/README.md, branch ``sqlpath``). The price: garbage in
# cycles lives up to ten times longer, with what it holds. A run or request
# here leaves about 150 such objects, a few KiB (review of ``sqlpath``); a
# cycle holding a large buffer (an exception kept in a local of its own
# frame) would show in the RSS.
YOUNGEST_GENERATION_THRESHOLD = 7000


def freeze_start_up_objects() -> None:
    """Keep what start-up made (modules, classes, the ORM's mappers, the
    routes: about 145,000 objects) out of every later garbage collection,
    and collect the youngest generation less often.

    Start-up's objects live as long as the process, but each full
    collection scanned them all again: 50-100 ms of CPU with the event loop
    stopped, every few hundred runs. What is garbage now is collected
    first, so that none of it is kept for good."""
    gc.collect()
    gc.freeze()
    _young, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNGEST_GENERATION_THRESHOLD, middle, old)


def _announcing_server(config: uvicorn.Config, announcement: str, on_started: Callable[[], None]) -> uvicorn.Server:
    """uvicorn's server, announcing itself only once start-up succeeded
    (its start-up objects then frozen: freeze_start_up_objects)."""
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if self.started and not self.should_exit:
                freeze_start_up_objects()
                log.info("%s", announcement)
                on_started()

    return Server(config)


def _bounded_http(settings: Settings) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol with the server's connection bounds (app/api/limits.py):
    idle and slow clients cannot hold its connections. The API's and the
    worker's /metrics server take the same."""
    from app import db
    from app.api import limits

    return limits.guarded_protocol(
        settings.http_max_connections,
        settings.http_header_timeout_seconds,
        max_header_bytes=settings.http_max_header_bytes,
        parser=settings.http_parser,
        reserved_fds=limits.SQLITE_RESERVED_FDS
        if db.is_sqlite(settings.resolved_database_url())
        else limits.RESERVED_FDS,
    )


def serve_ephemeral(settings: Settings, args: argparse.Namespace) -> int:
    """``serve --ephemeral``: see app/testing/ephemeral.py."""
    from app.testing import ephemeral

    if settings.workers > 1:
        raise preflight.StartupError("--ephemeral serves from one process: leave out --workers")
    with contextlib.ExitStack() as stack:
        settings, listener = ephemeral.prepare(settings, stack, explicit_data_dir=args.data_dir is not None)
        ready_file = Path(args.ready_file) if args.ready_file else None
        # Its database is always new, and it lives for a test session, where
        # start-up time counts and idle memory does not: migrated here, not by
        # the child process prepare_alone() would start (about 1.2 s more).
        preflight_checks(settings)
        return serve(
            settings, listener=listener, prepared=True, on_started=lambda: ephemeral.announce(settings, ready_file)
        )


def serve(
    settings: Settings,
    *,
    listener: socket.socket | None = None,
    on_started: Callable[[], None] | None = None,
    prepared: bool = False,
    name: str | None = None,
) -> int:
    """Serve until a signal. ``prepared``: a process of ``--workers N``, whose
    supervisor bound the socket, checked the models and migrated the database."""
    # uvicorn takes SIGTERM over while it runs, shuts down gracefully, then
    # re-raises the signal. Handling it here turns that (and a SIGTERM during
    # start-up) into a clean exit 0 instead of death by signal (143).
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    if not prepared:
        # In this order: the port first, so a second server started by mistake on
        # the same data touches nothing; then the models; then the database.
        listener = listener or preflight.bind(settings.host, settings.port)
        if settings.workers > 1:
            sockets = supervisor.listeners(listener, settings.workers)  # one per process, at once
            # Checked in a process of its own, so that the supervisor never
            # holds what they import (litellm: 150 MiB; alembic to migrate).
            supervisor.prepare(settings)
            return supervisor.Supervisor(settings, sockets).run()
        prepare_alone(settings)
    assert listener is not None
    import uvicorn

    from app.main import create_app

    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        log_config=None,  # keep the handler configure_logging() installed
        access_log=False,  # app/observability/http.py logs requests (redacted)
        lifespan="on",
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        http=_bounded_http(settings),
        loop=settings.resolved_event_loop(),
        timeout_keep_alive=settings.http_keep_alive_seconds,
        h11_max_incomplete_event_size=settings.http_max_header_bytes,
    )
    server = _announcing_server(
        config,
        f"serving the Assistants API at http://{settings.host}:{settings.port}/v1 "
        f"(database {display_database(settings)}, data {settings.data_dir.resolve()}" + (f"; {name})" if name else ")"),
        on_started or (lambda: None),
    )
    # Ctrl-C: uvicorn shuts down gracefully, then re-raises SIGINT.
    with contextlib.suppress(KeyboardInterrupt):
        server.run(sockets=[listener])
    if not server.started:
        log.error("the server did not start (see the errors above)")
        return 1
    return 0


def preflight_checks(settings: Settings) -> None:
    """The routing file and its models, then the database (reached and migrated)."""
    preflight.check_models(settings)
    preflight.prepare_database(settings)


def prepare_alone(settings: Settings) -> None:
    """preflight_checks() for a single serving process: a database whose
    schema is behind is migrated by a spawned process, so that this one
    never imports alembic (issue 17: it stayed resident, about 9 MiB)."""
    preflight.check_models(settings)
    if not preflight.database_is_current(settings):
        supervisor.migrate(settings)


def migrate(settings: Settings) -> int:
    preflight.prepare_database(settings)
    log.info("database schema is up to date: %s", display_database(settings))
    return 0


async def _work(settings: Settings) -> None:
    from app.runtime import Runtime
    from app.worker import Worker

    runtime = await Runtime.start(settings)
    worker = Worker(runtime)
    freeze_start_up_objects()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        # The first signal drains in-flight runs and releases the rest for
        # another worker to resume; a second one skips the drain.
        loop.add_signal_handler(signum, worker.request_stop)
    log.info("worker %s executing runs from %s", worker.owner, display_database(settings))
    try:
        await worker.run_forever()
    finally:
        await runtime.close()


def run_worker(settings: Settings) -> int:
    """Execute runs without serving the API: scale workers apart from API replicas
    (which then run with ASSISTANTS_EMBEDDED_WORKER=false) on one PostgreSQL.
    With a metrics port, uvicorn serves /metrics and the probes beside it."""
    import uvicorn

    from app.main import create_worker_app

    preflight.check_models(settings)
    preflight.prepare_database(settings)
    if settings.metrics_port is None:
        with asyncio.Runner(loop_factory=loop_factory(settings)) as runner:
            runner.run(_work(settings))
        return 0
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    config = uvicorn.Config(
        create_worker_app(settings),
        host=settings.host,
        port=settings.metrics_port,
        log_level=settings.log_level.lower(),
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        loop=settings.resolved_event_loop(),
        http=_bounded_http(settings),  # httptools bounds no head itself: the API's bounds here too
        h11_max_incomplete_event_size=settings.http_max_header_bytes,
    )
    announcement = (
        f"worker serving /metrics at http://{settings.host}:{settings.metrics_port} "
        f"(database {display_database(settings)})"
    )
    server = _announcing_server(config, announcement, lambda: None)  # start-up's objects frozen there too
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    return 0 if server.started else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = load_settings(args)
    if args.command == "sandbox-setup":
        return sandbox_setup.main(args.path or settings.sandbox_python, args.base_python)
    if args.command == "embeddings-setup":
        from app.retrieval import static_minilm  # numpy and the model only for this command

        return static_minilm.setup()
    configure_logging(settings)
    try:
        if args.command == "serve":
            return serve_ephemeral(settings, args) if args.ephemeral else serve(settings)
        if args.command == "migrate":
            return migrate(settings)
        if args.command == "keys":
            return cli_keys.main(settings, args)
        return run_worker(settings)
    except preflight.StartupError as exc:
        # One line, no traceback: what is wrong and, where we know, what to do.
        print(f"assistants-server: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
