"""Engine and sessionmaker for SQLite (aiosqlite, WAL) and PostgreSQL (asyncpg),
and migrating the schema with Alembic on start."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import event, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.pool import NullPool

# Shipped inside the package, so an installed server migrates without the repository.
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

log = logging.getLogger("app.db")

# PostgreSQL LISTEN/NOTIFY channel: "there is work" (a queued run, a file to
# ingest), from API replicas to standalone workers in other processes.
WORK_CHANNEL = "assistants_work"


class DatabaseURLError(ValueError):
    """A database URL the server cannot use; the message says what to write."""


# The async drivers the server is built on, per backend.
DRIVERS = {"sqlite": "aiosqlite", "postgresql": "asyncpg"}


def validate_url(url: str) -> None:
    """Refuse, with the URL to write instead, what create_engine would fail
    on later (and less clearly): a missing async driver above all."""
    try:
        parsed = make_url(url)
    except Exception:  # SQLAlchemy's ArgumentError, or ValueError for a bad port
        raise DatabaseURLError(
            "cannot parse the database URL: write sqlite+aiosqlite:///PATH "
            "or postgresql+asyncpg://USER:PASSWORD@HOST:PORT/DATABASE"
        ) from None
    backend = "postgresql" if parsed.get_backend_name() in ("postgres", "postgresql") else parsed.get_backend_name()
    if backend not in DRIVERS:
        raise DatabaseURLError(
            f"unsupported database {parsed.drivername!r}: use sqlite+aiosqlite:///PATH "
            "or postgresql+asyncpg://USER:PASSWORD@HOST:PORT/DATABASE"
        )
    driver = DRIVERS[backend]
    if parsed.drivername != f"{backend}+{driver}":
        fixed = parsed.set(drivername=f"{backend}+{driver}").render_as_string(hide_password=True)
        raise DatabaseURLError(
            f"the database URL must name the async driver {driver}: "
            f"write {backend}+{driver}:// instead of {parsed.drivername}:// (e.g. {fixed})"
        )


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets readers run while the worker writes; foreign keys make the
    # thread -> messages/runs cascade real; the busy timeout turns a brief
    # writer collision into a short wait instead of "database is locked".
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def create_engine(url: str) -> AsyncEngine:
    if is_sqlite(url):
        database = make_url(url).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url, poolclass=NullPool if database == ":memory:" else None)
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    # No pool_pre_ping: it costs a round trip per transaction; recycling
    # connections bounds how long a dead one can linger instead.
    return create_async_engine(url, pool_size=10, max_overflow=20, pool_recycle=300)


def create_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


def _alembic_config(connection: Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    return config


async def migrate(engine: AsyncEngine) -> None:
    """Bring the schema to the newest revision (idempotent)."""
    async with engine.begin() as connection:
        await connection.run_sync(lambda sync: command.upgrade(_alembic_config(sync), "head"))


async def notify_work(engine: AsyncEngine) -> None:
    """Wake the workers of other processes (PostgreSQL only; best effort:
    they also poll, so a lost signal only costs latency)."""
    try:
        async with engine.connect() as connection:
            await connection.execute(text("SELECT pg_notify(:channel, '')"), {"channel": WORK_CHANNEL})
            await connection.commit()
    except Exception:
        log.warning("could not signal the workers; they will find the work by polling", exc_info=True)


async def listen_for_work(engine: AsyncEngine, on_work: Callable[[], None], retry_seconds: float = 1.0) -> None:
    """Call ``on_work`` on every signal from notify_work(), until cancelled;
    the listening connection is re-opened after a failure."""
    while True:
        try:
            async with engine.connect() as connection:
                raw = await connection.get_raw_connection()
                listener = raw.driver_connection  # the asyncpg connection
                assert listener is not None
                await listener.add_listener(WORK_CHANNEL, lambda *_args: on_work())
                closed = asyncio.Event()
                listener.add_termination_listener(lambda *_args, done=closed: done.set())
                await closed.wait()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.warning("listening for work failed; retrying", exc_info=True)
        await asyncio.sleep(retry_seconds)
