"""app/eager.py: a coroutine's first step run in its caller's turn, the rest
by a task, as an ordinary task would run it: its result, its exception, its
context, a cancellation passed on to it."""

from __future__ import annotations

import asyncio
import contextvars

import pytest

from app import eager

pytestmark = pytest.mark.timeout(10)

_NAME: contextvars.ContextVar[str] = contextvars.ContextVar("name", default="caller's")


def _context(name: str) -> contextvars.Context:
    context = contextvars.copy_context()
    context.run(_NAME.set, name)
    return context


async def test_the_first_step_runs_before_start_returns_ahead_of_what_the_loop_queued() -> None:
    order: list[str] = []
    asyncio.get_running_loop().call_soon(order.append, "queued before")
    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def work() -> str:
        order.append(f"first step, in the {_NAME.get()} context")
        await gate
        order.append(f"after its wait, in the {_NAME.get()} context")
        return "done"

    started = eager.start(work(), _context("work's"))
    order.append("start returned")
    asyncio.get_running_loop().call_soon(gate.set_result, None)
    assert await asyncio.wait_for(started, 5) == "done"
    assert order == [
        "first step, in the work's context",
        "start returned",
        "queued before",
        "after its wait, in the work's context",
    ]
    assert _NAME.get() == "caller's"  # (the work's own context, not the caller's)


async def test_work_that_ends_or_fails_in_its_first_step_is_a_done_future() -> None:
    async def ends() -> int:
        return 7

    async def fails() -> int:
        raise ValueError("refused")

    async def cancels_itself() -> int:
        raise asyncio.CancelledError

    ended = eager.start(ends(), _context("work's"))
    assert ended.done() and ended.result() == 7
    failed = eager.start(fails(), _context("work's"))
    assert failed.done()
    with pytest.raises(ValueError, match="refused"):
        await failed
    cancelled = eager.start(cancels_itself(), _context("work's"))
    assert cancelled.cancelled()


async def test_a_failure_after_the_first_wait_is_the_tasks() -> None:
    async def fails_later() -> None:
        await asyncio.sleep(0)
        raise ValueError("later")

    started = eager.start(fails_later(), _context("work's"))
    assert not started.done()
    with pytest.raises(ValueError, match="later"):
        await asyncio.wait_for(started, 5)


async def test_a_cancellation_of_its_task_reaches_the_work_which_may_handle_it() -> None:
    order: list[str] = []
    forever: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def cleans_up() -> str:
        try:
            await forever
        except asyncio.CancelledError:
            order.append("cancelled at its wait")
            await asyncio.sleep(0)  # (may wait again while it unwinds)
            order.append("cleaned up")
            raise
        return "never"

    async def swallows() -> str:
        try:
            await asyncio.get_running_loop().create_future()
        except asyncio.CancelledError:
            return "answered all the same"
        return "never"

    started = eager.start(cleans_up(), _context("work's"))
    started.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(started, 5)
    assert order == ["cancelled at its wait", "cleaned up"] and started.cancelled()
    assert forever.cancelled()  # (cancelled before its first step: what it waited on too, as a task's wait)
    swallowing = eager.start(swallows(), _context("work's"))
    swallowing.cancel()
    assert await asyncio.wait_for(swallowing, 5) == "answered all the same"
