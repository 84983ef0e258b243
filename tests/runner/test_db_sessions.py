"""app/db.py's _WriteLock, the process's SQLite write lock: taken without
awaiting when free, first come first served otherwise, and never lost to a
waiter cancelled (a transaction's timeout) as the lock reached it; and
app/db.py's Session, closed at once after its transaction."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import text

from app import orm
from app.db import _WriteLock
from app.runtime import Runtime

pytestmark = pytest.mark.timeout(10)


async def test_a_free_lock_is_taken_without_waiting_and_a_held_one_is_not() -> None:
    lock = _WriteLock()
    assert lock.try_acquire()
    assert not lock.try_acquire()
    lock.release()
    assert lock.try_acquire()
    lock.release()


async def test_waiters_get_the_lock_in_order_before_any_newcomer() -> None:
    lock = _WriteLock()
    assert lock.try_acquire()
    order: list[int] = []

    async def writer(number: int) -> None:
        await lock.acquire()
        order.append(number)
        lock.release()

    tasks = [asyncio.create_task(writer(number)) for number in range(3)]
    await asyncio.sleep(0)  # all three queued
    lock.release()  # handed to writer 0, which has not run yet
    assert not lock.try_acquire()  # a newcomer does not overtake the queue
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2]
    assert lock.try_acquire()  # free again once the queue is empty


async def test_a_waiter_cancelled_as_the_lock_reached_it_passes_it_on() -> None:
    lock = _WriteLock()
    assert lock.try_acquire()
    first = asyncio.create_task(lock.acquire())
    second = asyncio.create_task(lock.acquire())
    await asyncio.sleep(0)
    lock.release()  # handed to ``first``...
    first.cancel()  # ... which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await first
    async with asyncio.timeout(5):
        await second  # got it from ``first``
    lock.release()
    assert lock.try_acquire()


async def test_a_waiter_cancelled_in_the_queue_leaves_it() -> None:
    lock = _WriteLock()
    assert lock.try_acquire()
    waiting = asyncio.create_task(lock.acquire())
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    lock.release()
    assert lock.try_acquire()  # no cancelled waiter stands in the way


# app/db.py's Session, the sessions of Runtime.transaction, on both engines.


def _checked_out(runtime: Runtime) -> int:
    return int(runtime.engine.sync_engine.pool.checkedout())  # type: ignore[attr-defined]


async def test_a_session_closed_after_its_transaction_forgets_its_objects(runtime: Runtime) -> None:
    idle = _checked_out(runtime)  # PostgreSQL: the run log's listener holds one
    async with runtime.transaction() as session:
        assistant = await session.get(orm.Assistant, "asst_none")  # a read: the session's identity map
        assert assistant is None
        session.add(orm.Project(id="proj_sessiontest", name="session test", created_at=1))
        await session.flush()
        project = await session.get(orm.Project, "proj_sessiontest")
        assert project is not None and project in session
        started = _count_tasks_started()
    asyncio.get_running_loop().set_task_factory(None)
    assert started == []  # closed at once: the stock close runs in a task of its own
    assert project not in session  # closed: forgotten
    assert _checked_out(runtime) == idle


def _count_tasks_started() -> list[object]:
    """From now on, the coroutines of the tasks the loop starts."""
    started: list[object] = []

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        started.append(coro)
        return asyncio.Task(coro, loop=loop, **kwargs)

    asyncio.get_running_loop().set_task_factory(factory)
    return started


async def test_a_session_left_inside_a_transaction_is_rolled_back_and_returned(runtime: Runtime) -> None:
    idle = _checked_out(runtime)
    async with runtime.sessionmaker() as session:  # autobegun by the read, never committed
        await session.execute(text("SELECT 1"))
        session.add(orm.Project(id="proj_abandoned", name="abandoned", created_at=1))
        await session.flush()
        assert session.in_transaction()
    assert _checked_out(runtime) == idle
    async with asyncio.timeout(5), runtime.transaction() as session:  # the write lock (SQLite) was handed back
        assert await session.get(orm.Project, "proj_abandoned") is None  # rolled back
