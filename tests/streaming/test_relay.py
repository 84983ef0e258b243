"""api/sse.py on its own: framing, the relay loop, keep-alives, errors,
shutdown, and the subscription's lifetime (no server, no database)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
from starlette.types import Message

from app.api import sse
from app.bus import EventBus
from app.wire.events import Event
from tests.streaming import rules

pytestmark = pytest.mark.timeout(30)

CREATED = Event("thread.run.created", {"id": "run_1", "status": "queued"})
QUEUED = Event("thread.run.queued", {"id": "run_1", "status": "queued"})
STARTED = Event("thread.run.in_progress", {"id": "run_1", "status": "in_progress"})
COMPLETED = Event("thread.run.completed", {"id": "run_1", "status": "completed"})
DONE = b"event: done\ndata: [DONE]\n\n"


def test_a_frame_is_one_event_line_and_one_data_line() -> None:
    event = Event("thread.message.delta", {"text": "two\nlines\r\n", "emoji": "\u3053\u3093"})
    encoded = sse.frame(event)
    lines = encoded.split(b"\n")
    assert lines[0] == b"event: thread.message.delta" and lines[1].startswith(b"data: ")
    assert lines[2:] == [b"", b""]
    assert json.loads(lines[1][len(b"data: ") :]) == event.data
    assert sse.frame(sse.DONE_EVENT) == DONE


async def _chunks(stream: AsyncIterator[bytes]) -> list[bytes]:
    return [chunk async for chunk in stream]


async def test_relay_sends_the_opening_then_the_run_and_stops_at_its_end() -> None:
    queue: asyncio.Queue[Event] = asyncio.Queue()
    for event in (CREATED, QUEUED, STARTED, COMPLETED, Event("thread.run.step.created", {"id": "late"})):
        queue.put_nowait(event)  # the bus's copies of the opening come first
    chunks = await _chunks(sse.relay(queue, [CREATED, QUEUED], keepalive=5))
    assert chunks[0] == sse.frame(CREATED) + sse.frame(QUEUED)
    # What arrived together leaves together; nothing after the run stopped.
    assert chunks[1:] == [sse.frame(STARTED) + sse.frame(COMPLETED) + DONE]


async def test_every_stopping_event_ends_the_stream() -> None:
    for name in rules.TERMINAL_RUN:
        queue: asyncio.Queue[Event] = asyncio.Queue()
        queue.put_nowait(Event(name, {"id": "run_1"}))
        chunks = await _chunks(sse.relay(queue, [], keepalive=5))
        assert b"".join(chunks).endswith(sse.frame(Event(name, {"id": "run_1"})) + DONE)


async def test_keepalive_comments_while_idle() -> None:
    queue: asyncio.Queue[Event] = asyncio.Queue()
    stream = sse.relay(queue, [CREATED], keepalive=0.01)
    assert await anext(stream) == sse.frame(CREATED)
    assert await anext(stream) == b": ping\n\n"
    assert await anext(stream) == b": ping\n\n"
    queue.put_nowait(COMPLETED)
    rest = await _chunks(stream)
    assert rest[-1].endswith(sse.frame(COMPLETED) + DONE)
    parsed = list(rules.frames([sse.frame(CREATED), b": ping\n\n", *rest]))
    assert parsed[1] is rules.KEEPALIVE


async def test_a_failure_while_streaming_becomes_an_error_event(caplog: pytest.LogCaptureFixture) -> None:
    queue: asyncio.Queue[Event] = asyncio.Queue()
    queue.put_nowait(Event("thread.message.delta", {"not json": object()}))
    chunks = await _chunks(sse.relay(queue, [CREATED], keepalive=5))
    assert chunks[-1] == sse.frame(sse.STREAM_FAILED) + DONE
    error = sse.STREAM_FAILED.data
    assert isinstance(error, dict) and set(error) == {"error"}  # the wrapped form (wire notes 3.6)
    assert error["error"]["type"] == "server_error" and error["error"]["code"] == "server_error"
    assert "streaming a run failed" in caplog.text


async def test_shutdown_ends_the_stream_with_an_error_after_a_grace() -> None:
    queue: asyncio.Queue[Event] = asyncio.Queue()
    shutdown = anyio.Event()
    stream = sse.relay(queue, [CREATED], keepalive=60, shutdown=shutdown)
    assert await anext(stream) == sse.frame(CREATED)
    shutdown.set()
    assert await anext(stream) == sse.frame(sse.SHUTTING_DOWN) + DONE


async def test_a_run_that_ends_during_the_shutdown_grace_ends_normally() -> None:
    queue: asyncio.Queue[Event] = asyncio.Queue()
    shutdown = anyio.Event()
    stream = sse.relay(queue, [CREATED], keepalive=60, shutdown=shutdown)
    assert await anext(stream) == sse.frame(CREATED)
    shutdown.set()
    queue.put_nowait(COMPLETED)
    assert await _chunks(stream) == [sse.frame(COMPLETED) + DONE]


async def _call(response: Any, send: Any) -> None:
    scope = {"type": "http", "method": "POST", "headers": [], "path": "/"}

    async def receive() -> Message:
        await asyncio.Event().wait()  # the client never leaves on its own
        raise AssertionError

    await response(scope, receive, send)


async def test_the_response_closes_the_subscription_when_done() -> None:
    bus = EventBus()
    events = sse.RunEvents(bus)
    await events.follow("run_1")
    response = events.response([CREATED])
    bus.publish("run_1", [CREATED, COMPLETED])
    sent: list[bytes] = []

    async def send(message: Message) -> None:
        sent.append(message.get("body", b""))

    await _call(response, send)
    assert b"".join(sent) == sse.frame(CREATED) + sse.frame(COMPLETED) + DONE
    assert events.queue is not None
    bus.publish("run_1", [STARTED])
    assert events.queue.empty()


async def test_the_subscription_is_closed_even_if_the_body_never_starts() -> None:
    bus = EventBus()
    events = sse.RunEvents(bus)
    await events.follow("run_1")
    response = events.response([CREATED])

    async def send(message: Message) -> None:
        raise OSError("the client is gone")

    with pytest.raises(OSError):
        await _call(response, send)
    assert events.queue is not None
    bus.publish("run_1", [STARTED])
    assert events.queue.empty()
