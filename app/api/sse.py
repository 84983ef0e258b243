"""Server-Sent Events for streamed runs: the only SSE code (wire notes section 3).

Every stream is served from the run's event log (issue 11, app/run_log.py),
whichever process executes the run: a streamed request follows its run from
the events its own transaction logged (subscribed before that transaction
commits, so nothing slips past), and ``GET .../runs/{run_id}/events``
(api/run_events.py) from any sequence number. The response relays the
run's events until the run stops for the stream (requires_action or a final
state) and ends with ``event: done`` / ``data: [DONE]``. Each logged event's
frame carries ``id: <seq>``, its place in the log, so a client can come back
with ``Last-Event-ID``; the SDKs ignore the line (PY) or keep it (Node).

sse-starlette carries the frames: it notices a client that goes away (only
the subscription ends, never the run) and a server that shuts down.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import aclosing, suppress
from typing import Protocol

import anyio
from sse_starlette import EventSourceResponse
from starlette.types import Receive, Scope, Send

from app.bus import Entry
from app.run_follow import Follower, Interrupted
from app.wire.events import DONE, TERMINAL_RUN_EVENTS, Event

log = logging.getLogger("app.api.sse")

# A comment line every this many idle seconds keeps proxies and load
# balancers from closing a stream while the model or a tool is slow.
KEEPALIVE_SECONDS = 15.0
# After SIGTERM, runs get this long to finish inside their open streams
# (uvicorn waits 5 s for open connections, see app.__main__) before the
# stream is closed with an error event.
SHUTDOWN_DRAIN_SECONDS = 2.0

# A comment line with no blank line after it: once a stream has sent an
# ``id:``, the Python SDK turns any blank line into an event (its decoder
# keeps the last id, as the SSE spec says) and fails to parse its empty data.
KEEPALIVE = b": ping\n"
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


def frame(event: Event, seq: int | None = None) -> bytes:
    """One SSE frame: an ``id:`` line for a logged event, an ``event:`` line,
    one ``data:`` line of one-line JSON (JSON escapes every newline inside
    strings), a blank line."""
    data = event.data if isinstance(event.data, str) else _ENCODE(event.data)
    head = f"id: {seq}\n" if seq is not None else ""
    return f"{head}event: {event.name}\ndata: {data}\n\n".encode()


def stops_stream(event: Event) -> bool:
    """The run stopped for this stream (or an error came): done follows."""
    return event.name in TERMINAL_RUN_EVENTS or event.name == "error"


class EntrySource(Protocol):
    """Where a stream's entries come from: a Follower (tests give their own)."""

    async def next_batch(self, idle: float) -> list[Entry]: ...

    def interrupt(self) -> None: ...


class RunStream(EventSourceResponse):
    """A run's stream from a follower that outlives the request handler:
    opened inside the request, closed by this response when it ends (also
    when the body never started because the client left first)."""

    def __init__(
        self, follower: Follower, opening: Sequence[Entry] = (), *, keepalive: float = KEEPALIVE_SECONDS
    ) -> None:
        self._follower = follower
        shutdown = anyio.Event()
        super().__init__(
            relay(follower, opening, keepalive=keepalive, shutdown=shutdown),
            ping=0,  # relay() sends its own keep-alives, only when idle
            sep="\n",
            shutdown_event=shutdown,
            shutdown_grace_period=SHUTDOWN_DRAIN_SECONDS + 1,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._follower.close()


async def relay(
    source: EntrySource,
    opening: Sequence[Entry] = (),
    *,
    keepalive: float = KEEPALIVE_SECONDS,
    shutdown: anyio.Event | None = None,
) -> AsyncIterator[bytes]:
    """The stream's bytes: ``opening``, then the run's entries from
    ``source`` up to the one that stops the run for this stream, then done.
    Entries that arrived together leave in one write."""
    watcher = asyncio.ensure_future(_interrupt_on_shutdown(source, shutdown)) if shutdown is not None else None
    try:
        async for chunk in _frames(source, opening, keepalive):
            yield chunk
    finally:
        if watcher is not None:
            watcher.cancel()
            with suppress(asyncio.CancelledError):
                await watcher


async def _frames(source: EntrySource, opening: Sequence[Entry], keepalive: float) -> AsyncIterator[bytes]:
    batch = list(opening)
    try:
        while True:
            chunk, finished = _encode(batch)
            if finished:
                yield chunk + frame(DONE_EVENT)
                return
            if chunk:
                yield chunk
            batch = await source.next_batch(keepalive)
            if not batch:
                yield KEEPALIVE
    except Interrupted:
        yield frame(SHUTTING_DOWN) + frame(DONE_EVENT)
    except Exception:
        log.exception("streaming a run failed")
        yield frame(STREAM_FAILED) + frame(DONE_EVENT)


def _encode(entries: Sequence[Entry]) -> tuple[bytes, bool]:
    """The frames of ``entries`` up to and including the first that ends the
    stream, and whether one did."""
    frames = []
    for entry in entries:
        frames.append(frame(entry.event, entry.seq))
        if stops_stream(entry.event):
            return b"".join(frames), True
    return b"".join(frames), False


async def _interrupt_on_shutdown(source: EntrySource, shutdown: anyio.Event) -> None:
    await shutdown.wait()
    await asyncio.sleep(SHUTDOWN_DRAIN_SECONDS)
    source.interrupt()


def nothing_more() -> EventSourceResponse:
    """The stream of a run that has ended and has nothing after the point asked for."""

    async def frames() -> AsyncIterator[bytes]:
        yield frame(DONE_EVENT)

    return EventSourceResponse(frames(), ping=0, sep="\n")


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
