"""Checks the CLI runs before it serves, so that a mistake in the set-up ends
the process with one clear line and a non-zero exit, not a traceback after the
server said it was serving: the listening socket, the model routing file, the
database URL and whether the database answers (then the schema is migrated).
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from app.settings import Settings

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

# yaml, SQLAlchemy and app.db are imported in the checks that need them: the
# supervisor of ``serve --workers N`` uses bind() only and stays small (issue 17).

# How long to wait for the database to answer at start-up.
CONNECT_TIMEOUT_SECONDS = 10.0

# The keys the routing file may have, per level (anything else is a typo or a
# LiteLLM proxy setting this server does not apply: refused, not ignored).
ROUTING_KEYS = frozenset({"model_list", "embedding_model", "offline"})
ENTRY_KEYS = frozenset({"model_name", "litellm_params", "model_info", "direct"})
OFFLINE_KEYS = frozenset({"rules"})


_T = TypeVar("_T")


class StartupError(Exception):
    """The server cannot start; str() is the one line to print."""


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound now (uvicorn is handed it), so a port in
    use is found before anything touches the database."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on accepted sockets whose
    # proto says TCP, and without it (Nagle + delayed ACK) every response written
    # in two pieces waited about 40 ms (bench/README.md, issue 17).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise StartupError(
                f"port {port} on {host} is already in use (another server?): "
                "choose another with --port or ASSISTANTS_PORT"
            ) from None
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def _unknown(found: Any, known: frozenset[str], where: str, path: Path) -> None:
    if not isinstance(found, dict):
        return
    unknown = sorted(str(key) for key in found if key not in known)
    if unknown:
        raise StartupError(
            f"{path}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} {where} "
            f"(known: {', '.join(sorted(known))})"
        )


def check_routing_file(path: Path) -> None:
    """Malformed YAML and unknown keys; the shapes are LLM.from_config's to check."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise StartupError(f"cannot read the model routing file {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise StartupError(f"{path}: malformed YAML{where}: {problem}") from None
    if data is None:
        return
    if not isinstance(data, dict):
        raise StartupError(f"{path}: expected a mapping with a model_list")
    _unknown(data, ROUTING_KEYS, "at the top level", path)
    for position, entry in enumerate(data.get("model_list") or []):
        _unknown(entry, ENTRY_KEYS, f"in model_list[{position}]", path)
    _unknown(data.get("offline"), OFFLINE_KEYS, "in offline", path)


def check_models(settings: Settings) -> None:
    """The routing file as the server will read it, and its embedding model."""
    # Imported here: the CLI's other commands need neither.
    from app.llm import LLM, LLMConfigError
    from app.retrieval import embed

    if settings.llm_config is None:
        return
    check_routing_file(settings.llm_config)
    try:
        LLM.from_config(settings.llm_config)
    except LLMConfigError as exc:  # litellm missing too: the error names the routes that need it
        raise StartupError(_one_line(str(exc))) from None
    if not embed.names_a_model(settings.llm_config):
        return
    try:
        embed.embedder(settings)
    except ModuleNotFoundError as exc:
        if exc.name != "tokenizers":
            raise
        raise StartupError(
            f"{settings.llm_config}: the local embedding model needs its tokenizer: "
            'pip install "assistants-server[local-embeddings]"'
        ) from None
    except (ValueError, ImportError) as exc:
        raise StartupError(_one_line(str(exc))) from None


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _where(url: str) -> str:
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    return f"{parsed.host or 'localhost'}:{parsed.port or 5432}"


async def _on_database(url: str, work: Callable[[AsyncEngine], Awaitable[_T]]) -> _T:
    """``work`` done on the database once it answered (within the connect timeout)."""
    from app import db

    engine = db.create_engine(url)
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT_SECONDS):
            async with engine.connect():
                pass
        return await work(engine)
    finally:
        await engine.dispose()


def _database(settings: Settings, work: Callable[[AsyncEngine], Awaitable[_T]]) -> _T:
    """Validate the URL, reach the database and do ``work`` there; any failure a StartupError."""
    from app import db

    url = settings.resolved_database_url()
    try:
        db.validate_url(url)
    except db.DatabaseURLError as exc:
        raise StartupError(str(exc)) from None
    try:
        return asyncio.run(_on_database(url, work))
    except StartupError:
        raise
    except Exception as exc:
        raise StartupError(_database_failure(url, exc)) from None


def prepare_database(settings: Settings) -> None:
    """Validate the URL, reach the database and bring its schema up to date."""
    from app import db

    _database(settings, db.migrate)


def database_is_current(settings: Settings) -> bool:
    """Validate the URL, reach the database and say whether its schema is
    already the newest, without importing alembic (app/supervisor.py migrate())."""
    from app import db

    return _database(settings, db.schema_is_current)


def _database_failure(url: str, exc: BaseException) -> str:
    from sqlalchemy.engine import make_url

    from app import db

    reason = _one_line(str(exc)) or type(exc).__name__
    if isinstance(exc, TimeoutError):
        reason = f"no answer within {CONNECT_TIMEOUT_SECONDS:g} s"
    elif isinstance(exc, ConnectionRefusedError):
        reason = "connection refused (is PostgreSQL running and listening there?)"
    elif isinstance(exc, socket.gaierror):
        reason = f"unknown host ({exc.strerror})"
    if db.is_sqlite(url):
        return f"cannot open the SQLite database {make_url(url).database}: {reason}"
    if isinstance(exc, OSError | TimeoutError):
        return f"cannot reach PostgreSQL at {_where(url)}: {reason}"
    return f"PostgreSQL at {_where(url)} refused the server or its migration failed: {reason}"
