"""Nothing of a Runtime's own keeps a pooled PostgreSQL connection past its
close (what is left running then is taken back by a disposed pool for good,
unclosed: a ResourceWarning at some later garbage collection), whether a
wake comes after it or the close is cancelled, and a listener stopped
returns no connection that still LISTENs."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from sqlalchemy import event, text
from sqlalchemy.pool import QueuePool

from app import db
from app.runtime import Runtime
from app.settings import Settings
from tests.runner.helpers import until

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


async def test_a_wake_after_close_opens_no_connection_on_the_disposed_engine(settings: Settings) -> None:
    runtime = await Runtime.start(settings.model_copy(update={"embedded_worker": False}))
    await runtime.close()
    opened: list[object] = []
    event.listen(runtime.engine.sync_engine, "connect", lambda connection, _record: opened.append(connection))
    try:
        runtime.wake()  # a request finishing as the server shuts down
        await asyncio.wait_for(asyncio.gather(*runtime._signals), 30)
        assert opened == []  # the disposed engine's new pool would keep it open for good
    finally:
        await runtime.engine.dispose()  # what a wake let through


async def test_a_close_cancelled_while_a_notify_waits_leaves_it_not_running(settings: Settings) -> None:
    runtime = await Runtime.start(settings.model_copy(update={"embedded_worker": False, "database_pool_size": 4}))
    try:
        await until(lambda: runtime.run_log.listening, "the run log's listener to hold its connection")
        async with contextlib.AsyncExitStack() as held:
            pool = runtime.engine.sync_engine.pool
            assert isinstance(pool, QueuePool)
            for _ in range(pool.size() - pool.checkedout()):  # the NOTIFY then waits for a connection
                await held.enter_async_context(runtime.engine.connect())
            # First in line for the listener's connection, which close() frees before its wait.
            next_free = runtime.engine.connect()
            taking = asyncio.create_task(next_free.start())
            held.push_async_callback(next_free.close)
            held.push_async_callback(asyncio.wait_for, taking, 30)
            runtime.wake()
            signals = set(runtime._signals)
            listener = runtime._listener
            assert signals and listener is not None
            closing = asyncio.create_task(runtime.close())
            await until(listener.done, "close() to stop the listener and wait for the NOTIFY")
            closing.cancel()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(closing, 30)
            assert all(task.done() for task in signals)  # not left to run on alone
    finally:
        await runtime.close()  # the rest, as the caller may still do after a cancel


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


async def test_a_close_cancelled_while_it_stops_the_listener_is_cancelled(settings: Settings) -> None:
    """The cancel of close() is its caller's: it goes on up, not swallowed
    with the listener's own (close() would then run on to its end)."""
    runtime = await Runtime.start(settings.model_copy(update={"embedded_worker": False}))
    try:
        await until(lambda: runtime.run_log.listening, "the run log's listener to hold its connection")
        listener = runtime._listener
        assert listener is not None
        closing = asyncio.create_task(runtime.close())
        await asyncio.sleep(0)  # close() has cancelled the listener and waits for it
        assert not listener.done()
        closing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(closing, 30)
    finally:
        await runtime.close()  # a cancelled close() may be called again
