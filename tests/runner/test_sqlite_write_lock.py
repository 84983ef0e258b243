"""app/db.py's _WriteLock, the process's SQLite write lock: taken without
awaiting when free, first come first served otherwise, and never lost to a
waiter cancelled (a transaction's timeout) as the lock reached it."""

from __future__ import annotations

import asyncio

import pytest

from app.db import _WriteLock

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
