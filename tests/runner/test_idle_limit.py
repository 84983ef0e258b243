"""The executor's limit on a silent model (execute._idle_limited): a wait
for the next event longer than the limit fails the call; the time between
events spent by the consumer, or a stream slower overall than the limit,
does not; a cancel from outside stays a cancel. One timer serves the whole
stream (issue 17: a timer per event cost more than the events' own reading)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from app import llm
from app.runner import execute

pytestmark = pytest.mark.timeout(30)


async def _events(gaps: list[float]) -> AsyncIterator[llm.Event]:
    """A text delta after each gap (seconds), then a Finish."""
    for gap in gaps:
        await asyncio.sleep(gap)
        yield llm.TextDelta("x")
    yield llm.Finish("stop", llm.Usage(1, len(gaps)))


async def _read(stream: AsyncIterator[llm.Event], pause: float = 0.0) -> list[llm.Event]:
    got = []
    async for event in stream:
        got.append(event)
        await asyncio.sleep(pause)  # the consumer's own work between events
    return got


async def test_a_wait_longer_than_the_limit_fails_the_call() -> None:
    with pytest.raises(llm.LLMError, match=r"The model sent nothing for 0.1 seconds; the run was stopped."):
        await _read(execute._idle_limited(_events([0.0, 0.0, 1.0]), 0.1))
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_waits_within_the_limit_pass_however_long_the_whole_stream() -> None:
    got = await _read(execute._idle_limited(_events([0.1] * 8), 0.5))
    assert len(got) == 9 and isinstance(got[-1], llm.Finish)


async def test_the_consumers_time_between_events_is_not_the_models() -> None:
    got = await _read(execute._idle_limited(_events([0.0, 0.0, 0.0]), 0.1), pause=0.2)
    assert len(got) == 4


async def test_a_cancel_from_outside_stays_a_cancel() -> None:
    waiting = asyncio.Event()

    async def events() -> AsyncIterator[llm.Event]:
        yield llm.TextDelta("x")
        waiting.set()
        await asyncio.sleep(5.0)
        yield llm.TextDelta("y")

    task = asyncio.ensure_future(_read(execute._idle_limited(events(), 2.0)))
    await asyncio.wait_for(waiting.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_no_timer_is_left_once_the_stream_ends() -> None:
    loop = asyncio.get_running_loop()
    before = len(loop._scheduled)  # type: ignore[attr-defined]
    await _read(execute._idle_limited(_events([0.0, 0.0]), 60.0))
    scheduled = [handle for handle in loop._scheduled if not handle.cancelled()]  # type: ignore[attr-defined]
    assert len(scheduled) <= before


@pytest.mark.parametrize("ending", ["returns", "raises"])
async def test_a_stream_that_ends_on_the_limits_cancel_leaves_no_cancel_behind(ending: str) -> None:
    """The limit's cancel is taken back however the wait ends, so that the
    task's later timeouts are not taken for a cancel from outside."""

    async def events() -> AsyncIterator[llm.Event]:
        yield llm.TextDelta("x")
        try:
            await asyncio.sleep(5.0)
        except asyncio.CancelledError:
            if ending == "raises":
                raise llm.LLMError("server_error", "the provider's stream broke") from None
            return
        yield llm.TextDelta("y")

    if ending == "raises":
        with pytest.raises(llm.LLMError, match="the provider's stream broke"):
            await _read(execute._idle_limited(events(), 0.1))
    else:
        assert len(await _read(execute._idle_limited(events(), 0.1))) == 1
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
