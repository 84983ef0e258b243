"""The Runtime: everything a request or the worker needs, built once per app.

Created by create_app()'s lifespan; reached from routes through
``request.app.state.runtime``. Later issues add the bus, llm, sandbox and
embedder here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from app import db
from app.settings import Settings
from app.storage import Storage


@dataclass
class Runtime:
    settings: Settings
    engine: AsyncEngine
    sessionmaker: async_sessionmaker[AsyncSession]
    storage: Storage

    @classmethod
    async def start(cls, settings: Settings) -> Runtime:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        engine = db.create_engine(settings.resolved_database_url())
        await db.migrate(engine)
        return cls(
            settings=settings,
            engine=engine,
            sessionmaker=db.create_sessionmaker(engine),
            storage=Storage(settings.files_dir),
        )

    async def close(self) -> None:
        await self.engine.dispose()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        """One short unit of work: commits on success, rolls back on error."""
        async with self.sessionmaker() as session, session.begin():
            yield session
