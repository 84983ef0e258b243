"""Server-Sent Events for streamed runs: the only SSE code (wire notes section 3).

A streamed request subscribes to its run's topic on the bus *before* the
transaction that queues the run commits, so not one event can slip past it
(``RunEvents.follow``). The response then sends the events the service
returned (``thread.created``, ``thread.run.created``, ``thread.run.queued``,
or the continuation's ``step.completed`` + ``queued``), relays what the
executor publishes until the run stops for this stream (requires_action or
a final state), and ends with ``event: done`` / ``data: [DONE]``.

sse-starlette carries the frames: it notices a client that goes away (only
the subscription ends, never the run) and a server that shuts down.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import AsyncExitStack, aclosing, suppress

import anyio
from sse_starlette import EventSourceResponse
from starlette.types import Receive, Scope, Send

from app.bus import EventBus
from app.wire.events import DONE, TERMINAL_RUN_EVENTS, Event

log = logging.getLogger("app.api.sse")

# A comment line every this many idle seconds keeps proxies and load
# balancers from closing a stream while the model or a tool is slow.
KEEPALIVE_SECONDS = 15.0
# After SIGTERM, runs get this long to finish inside their open streams
# (uvicorn waits 5 s for open connections, see app.__main__) before the
# stream is closed with an error event.
SHUTDOWN_DRAIN_SECONDS = 2.0

KEEPALIVE = b": ping\n\n"
DONE_EVENT = Event(DONE, "[DONE]")


def error_event(message: str) -> Event:
    """The wrapped ``{"error": {...}}`` form: the bare OAS form makes the
    Python helpers yield a garbage event silently (wire notes 3.6)."""
    error = {"message": message, "type": "server_error", "param": None, "code": "server_error"}
    return Event("error", {"error": error})


STREAM_FAILED = error_event("The server had an error while streaming the run. Retrieve the run to see its outcome.")
SHUTTING_DOWN = error_event(
    "The server is shutting down and closed this stream before the run finished. Retrieve the run to see its outcome."
)


_ENCODE = json.JSONEncoder(separators=(",", ":")).encode


def frame(event: Event) -> bytes:
    """One SSE frame: an ``event:`` line, one ``data:`` line of one-line JSON
    (JSON escapes every newline inside strings), a blank line."""
    data = event.data if isinstance(event.data, str) else _ENCODE(event.data)
    return f"event: {event.name}\ndata: {data}\n\n".encode()


class RunEvents:
    """A subscription to one run's events that outlives the request handler:
    opened inside the transaction, handed to the response, closed by it."""

    def __init__(self, bus: EventBus) -> None:
        self._bus = bus
        self._stack = AsyncExitStack()
        self.queue: asyncio.Queue[Event] | None = None

    async def follow(self, run_id: str) -> None:
        """Subscribe; call it before the transaction that queues the run commits."""
        self.queue = await self._stack.enter_async_context(self._bus.subscribe(run_id))

    async def close(self) -> None:
        await self._stack.aclose()

    def response(self, opening: list[Event], *, keepalive: float = KEEPALIVE_SECONDS) -> EventSourceResponse:
        assert self.queue is not None, "follow() the run first"
        return _RunStreamResponse(self, opening, keepalive)


class _RunStreamResponse(EventSourceResponse):
    def __init__(self, events: RunEvents, opening: list[Event], keepalive: float) -> None:
        assert events.queue is not None
        self._events = events
        shutdown = anyio.Event()
        super().__init__(
            relay(events.queue, opening, keepalive=keepalive, shutdown=shutdown),
            ping=0,  # relay() sends its own keep-alives, only when idle
            sep="\n",
            shutdown_event=shutdown,
            shutdown_grace_period=SHUTDOWN_DRAIN_SECONDS + 1,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # Also when the body never started (the client left first).
            await self._events.close()


async def relay(
    queue: asyncio.Queue[Event],
    opening: list[Event],
    *,
    keepalive: float = KEEPALIVE_SECONDS,
    shutdown: anyio.Event | None = None,
) -> AsyncIterator[bytes]:
    """The stream's bytes: ``opening``, then the run's events from ``queue``
    up to the one that stops the run for this stream, then done.

    ``opening`` was also published to the bus when its transaction committed;
    those copies are skipped. Events that arrived together leave in one write.
    """
    watcher = asyncio.ensure_future(_interrupt_on_shutdown(queue, shutdown)) if shutdown is not None else None
    try:
        async for chunk in _frames(queue, opening, keepalive):
            yield chunk
    finally:
        if watcher is not None:
            watcher.cancel()
            with suppress(asyncio.CancelledError):
                await watcher


async def _frames(queue: asyncio.Queue[Event], opening: list[Event], keepalive: float) -> AsyncIterator[bytes]:
    unseen = list(opening)
    batch = opening
    try:
        while True:
            chunk, finished = _encode(batch)
            if finished:
                yield chunk + frame(DONE_EVENT)
                return
            if chunk:
                yield chunk
            batch = await _next_batch(queue, keepalive)
            if not batch:
                yield KEEPALIVE
            batch = _without(batch, unseen)
    except Exception:
        log.exception("streaming a run failed")
        yield frame(STREAM_FAILED) + frame(DONE_EVENT)


def _encode(events: list[Event]) -> tuple[bytes, bool]:
    """The frames of ``events`` up to and including the first that ends the
    stream (an error, or the run stopping), and whether one did."""
    frames = []
    for event in events:
        frames.append(frame(event))
        if event.name in TERMINAL_RUN_EVENTS or event.name == "error":
            return b"".join(frames), True
    return b"".join(frames), False


async def _next_batch(queue: asyncio.Queue[Event], keepalive: float) -> list[Event]:
    """Everything queued once something is; [] if ``keepalive`` passed first."""
    batch: list[Event] = []
    if queue.empty():  # only then the timer: most wake-ups under load find events waiting
        try:
            async with asyncio.timeout(keepalive):
                batch.append(await queue.get())
        except TimeoutError:
            return []
    while not queue.empty():
        batch.append(queue.get_nowait())
    return batch


def _without(batch: list[Event], unseen: list[Event]) -> list[Event]:
    """``batch`` less the bus's copies of the opening events (each once)."""
    if not unseen:
        return batch
    kept = []
    for event in batch:
        if event in unseen:
            unseen.remove(event)
        else:
            kept.append(event)
    return kept


async def _interrupt_on_shutdown(queue: asyncio.Queue[Event], shutdown: anyio.Event) -> None:
    await shutdown.wait()
    await asyncio.sleep(SHUTDOWN_DRAIN_SECONDS)
    queue.put_nowait(SHUTTING_DOWN)


def data_stream(chunks: AsyncGenerator[object, None]) -> EventSourceResponse:
    """The chat-completions form of SSE: ``data: {json}`` frames with no
    ``event:`` line, ended by ``data: [DONE]`` (wire notes 3.1 covers runs;
    chat completions are framed as OpenAI's /chat/completions)."""

    async def frames() -> AsyncIterator[bytes]:
        async with aclosing(chunks):  # a client that leaves ends the model call at once
            async for chunk in chunks:
                yield b"data: " + _ENCODE(chunk).encode() + b"\n\n"
        yield b"data: [DONE]\n\n"

    return EventSourceResponse(frames(), ping=0, sep="\n")
