"""api/sse.py on its own: framing, the relay loop, keep-alives, errors,
shutdown, and the follower's lifetime (no server, no database)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
from starlette.types import Message

from app.api import sse
from app.bus import Entry, EventBus
from app.run_follow import Follower, Interrupted
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
    assert sse.frame(event, 7).startswith(b"id: 7\nevent: thread.message.delta\n")


class QueueSource:
    """A stand-in for the follower: entries put in a queue, in order."""

    def __init__(self, *events: Event) -> None:
        self.queue: asyncio.Queue[Entry | None] = asyncio.Queue()
        self.seq = 0
        self.put(*events)

    def put(self, *events: Event) -> list[Entry]:
        entries = []
        for event in events:
            self.seq += 1
            entries.append(Entry(self.seq, event))
            self.queue.put_nowait(entries[-1])
        return entries

    async def next_batch(self, idle: float) -> list[Entry]:
        try:
            async with asyncio.timeout(idle):
                first = await self.queue.get()
        except TimeoutError:
            return []
        batch = [first]
        while not self.queue.empty():
            batch.append(self.queue.get_nowait())
        if None in batch:
            raise Interrupted
        return [entry for entry in batch if entry is not None]

    def interrupt(self) -> None:
        self.queue.put_nowait(None)


def _frames(*entries: Entry) -> bytes:
    return b"".join(sse.frame(entry.event, entry.seq) for entry in entries)


async def _chunks(stream: AsyncIterator[bytes]) -> list[bytes]:
    return [chunk async for chunk in stream]


async def test_relay_sends_the_opening_then_the_run_and_stops_at_its_end() -> None:
    opening = [Entry(1, CREATED), Entry(2, QUEUED)]
    source = QueueSource()
    source.seq = 2
    started, completed, _late = source.put(STARTED, COMPLETED, Event("thread.run.step.created", {"id": "late"}))
    chunks = await _chunks(sse.relay(source, opening, keepalive=5))
    assert chunks[0] == _frames(*opening)
    # What arrived together leaves together; nothing after the run stopped.
    assert chunks[1:] == [_frames(started, completed) + DONE]


async def test_every_stopping_event_ends_the_stream() -> None:
    for name in rules.TERMINAL_RUN:
        source = QueueSource(Event(name, {"id": "run_1"}))
        chunks = await _chunks(sse.relay(source, keepalive=5))
        assert b"".join(chunks).endswith(sse.frame(Event(name, {"id": "run_1"}), 1) + DONE)


async def test_keepalive_comments_while_idle() -> None:
    source = QueueSource()
    stream = sse.relay(source, [Entry(1, CREATED)], keepalive=0.01)
    assert await anext(stream) == sse.frame(CREATED, 1)
    assert await anext(stream) == sse.KEEPALIVE
    assert await anext(stream) == sse.KEEPALIVE
    source.seq = 1
    (completed,) = source.put(COMPLETED)
    rest = await _chunks(stream)
    assert rest[-1].endswith(_frames(completed) + DONE)
    parsed = list(rules.frames([sse.frame(CREATED, 1), sse.KEEPALIVE, *rest]))
    assert parsed[1] is rules.KEEPALIVE


async def test_a_failure_while_streaming_becomes_an_error_event(caplog: pytest.LogCaptureFixture) -> None:
    source = QueueSource(Event("thread.message.delta", {"not json": object()}))
    chunks = await _chunks(sse.relay(source, [Entry(1, CREATED)], keepalive=5))
    assert chunks[-1] == sse.frame(sse.STREAM_FAILED) + DONE
    error = sse.STREAM_FAILED.data
    assert isinstance(error, dict) and set(error) == {"error"}  # the wrapped form (wire notes 3.6)
    assert error["error"]["type"] == "server_error" and error["error"]["code"] == "server_error"
    assert "streaming a run failed" in caplog.text


async def test_shutdown_ends_the_stream_with_an_error_after_a_grace() -> None:
    shutdown = anyio.Event()
    stream = sse.relay(QueueSource(), [Entry(1, CREATED)], keepalive=60, shutdown=shutdown)
    assert await anext(stream) == sse.frame(CREATED, 1)
    shutdown.set()
    assert await anext(stream) == sse.frame(sse.SHUTTING_DOWN) + DONE


async def test_a_run_that_ends_during_the_shutdown_grace_ends_normally() -> None:
    source = QueueSource()
    shutdown = anyio.Event()
    stream = sse.relay(source, [Entry(1, CREATED)], keepalive=60, shutdown=shutdown)
    assert await anext(stream) == sse.frame(CREATED, 1)
    shutdown.set()
    source.seq = 1
    (completed,) = source.put(COMPLETED)
    assert await _chunks(stream) == [_frames(completed) + DONE]


async def _call(response: Any, send: Any) -> None:
    scope = {"type": "http", "method": "POST", "headers": [], "path": "/"}

    async def receive() -> Message:
        await asyncio.Event().wait()  # the client never leaves on its own
        raise AssertionError

    await response(scope, receive, send)


def _unused_transaction() -> Any:
    raise AssertionError("the follower was handed everything: it never reads the log")


async def test_the_response_closes_the_follower_when_done() -> None:
    bus = EventBus()
    follower = Follower(bus, _unused_transaction, "run_1", 1, read_first=False)
    await follower.open()
    response = sse.RunStream(follower, [Entry(1, CREATED)])
    bus.deliver("run_1", [Entry(2, STARTED), Entry(3, COMPLETED)])
    sent: list[bytes] = []

    async def send(message: Message) -> None:
        sent.append(message.get("body", b""))

    await _call(response, send)
    assert b"".join(sent) == _frames(Entry(1, CREATED), Entry(2, STARTED), Entry(3, COMPLETED)) + DONE
    assert not bus.following("run_1")


async def test_the_follower_is_closed_even_if_the_body_never_starts() -> None:
    bus = EventBus()
    follower = Follower(bus, _unused_transaction, "run_1", 1, read_first=False)
    await follower.open()
    response = sse.RunStream(follower, [Entry(1, CREATED)])

    async def send(message: Message) -> None:
        raise OSError("the client is gone")

    with pytest.raises(OSError):
        await _call(response, send)
    assert not bus.following("run_1")


async def test_a_follower_hands_out_entries_in_sequence_whatever_order_they_arrive_in() -> None:
    bus = EventBus()
    follower = Follower(bus, _unused_transaction, "run_1", 0, read_first=False)
    await follower.open()
    bus.deliver("run_1", [Entry(2, QUEUED)])
    bus.deliver("run_1", [Entry(1, CREATED), Entry(2, QUEUED), Entry(3, STARTED)])
    assert [entry.seq for entry in await follower.next_batch(5)] == [1, 2, 3]
    await follower.close()


class _CountingTransaction:
    """A transaction factory whose sessions only count the log's reads (none finds anything)."""

    def __init__(self) -> None:
        self.reads = 0

    @contextlib.asynccontextmanager
    async def __call__(self) -> AsyncIterator[Any]:
        self.reads += 1
        yield _EmptyLog()


class _EmptyLog:
    async def execute(self, *_args: Any, **_kwargs: Any) -> Any:
        return self

    def all(self) -> list[Any]:
        return []


@pytest.mark.parametrize("announced", [False, True])
async def test_a_follower_reads_the_log_while_waiting_only_when_news_is_not_announced(announced: bool) -> None:
    """Waiting 0.4 s for entries that never come: without announcements the
    follower reads the log at 0.05, 0.15 and 0.35 s (its safety net, and how a
    SQLite process sees runs another process executes) and at the end; with
    every append handed over or nudged about (Runtime.log_news_announced)
    only at the end, its next read being ANNOUNCED_POLL_SECONDS away."""
    transaction = _CountingTransaction()
    follower = Follower(EventBus(), transaction, "run_1", 1, read_first=False, announced=lambda: announced)
    await follower.open()
    assert await follower.next_batch(0.4) == []
    await follower.close()
    if announced:
        assert transaction.reads == 1
    else:  # 4 on time; a starved event loop may fire the timers late
        assert transaction.reads >= 2
