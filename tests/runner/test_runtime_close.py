"""Nothing of a Runtime's own keeps a pooled PostgreSQL connection past its
close (what is left running then is taken back by a disposed pool for good,
unclosed: a ResourceWarning at some later garbage collection), and a
listener stopped returns no connection that still LISTENs."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import text

from app import db
from app.runtime import Runtime
from app.settings import Settings

pytestmark = [pytest.mark.timeout(60), pytest.mark.parametrize("database_url", ["postgres"], indirect=True)]


async def test_close_lets_a_wakes_notify_in_flight_finish_first(settings: Settings) -> None:
    runtime = await Runtime.start(settings.model_copy(update={"embedded_worker": False}))
    try:
        async with runtime.transaction():
            pass  # a pooled connection to check out
        runtime.wake()  # an API replica's NOTIFY to the workers elsewhere, in a task
        signals = set(runtime._signals)
        assert signals
    finally:
        await runtime.close()
    assert all(task.done() for task in signals)
    assert runtime.engine.sync_engine.pool.checkedout() == 0


async def test_a_cancelled_listener_leaves_no_listening_connection_in_the_pool(settings: Settings) -> None:
    engine = db.create_engine(settings.database_url)
    heard: list[str] = []
    listening = asyncio.Event()
    try:
        task = asyncio.create_task(
            db.listen(engine, "closing_test", heard.append, on_listening=lambda on: on and listening.set())
        )
        await asyncio.wait_for(listening.wait(), 30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        async with engine.connect() as connection:
            channels = (await connection.execute(text("SELECT pg_listening_channels()"))).scalars().all()
            await connection.execute(text("SELECT pg_notify('closing_test', 'for nobody')"))
            await connection.commit()
        assert channels == []
        assert heard == []
    finally:
        await engine.dispose()
