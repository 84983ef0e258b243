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

Run streams are written by ``RunStream``, a plain ASGI response (issue 17:
sse-starlette's per-stream task group, ping task, send lock and per-send
timeout scope cost more than the frames themselves): the frames go out from
the request's own task, one watcher task notices a client that goes away
(only the subscription ends, never the run), and one process-wide watcher
(``_Shutdown``, one per event loop) notices a server that shuts down. The chat-completions form
(``data_stream``) stays on sse-starlette, whose disconnect handling cancels
the model call at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Sequence
from contextlib import aclosing, contextmanager, suppress
from typing import Protocol

import anyio
from sse_starlette import EventSourceResponse
from sse_starlette.sse import AppStatus
from starlette.background import BackgroundTask
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

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
    head = f"id: {seq}\n" if seq is not None else ""
    return f"{head}event: {event.name}\ndata: {event.json}\n\n".encode()


def stops_stream(event: Event) -> bool:
    """The run stopped for this stream (or an error came): done follows."""
    return event.name in TERMINAL_RUN_EVENTS or event.name == "error"


class EntrySource(Protocol):
    """Where a stream's entries come from: a Follower (tests give their own)."""

    async def next_batch(self, idle: float) -> list[Entry]: ...

    def interrupt(self) -> None: ...


# What every event stream answers with: sse-starlette's headers (no caching,
# no proxy buffering), so clients and proxies see the same response as before.
STREAM_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-store"),
    (b"connection", b"keep-alive"),
    (b"x-accel-buffering", b"no"),
]
_END: Message = {"type": "http.response.body", "body": b"", "more_body": False}


class _EventStream(Response):
    """A Starlette response in name only (so FastAPI passes it through
    unserialized): subclasses write the body themselves."""

    media_type = "text/event-stream"

    def __init__(self) -> None:
        self.status_code = 200
        self.background: BackgroundTask | None = None
        self.raw_headers = list(STREAM_HEADERS)

    async def _after(self) -> None:
        if self.background is not None:
            await self.background()


class RunStream(_EventStream):
    """A run's stream from a follower that outlives the request handler:
    opened inside the request, closed by this response when it ends (also
    when the body never started because the client left first).

    The frames are sent from the calling task; a client that goes away is
    noticed by one small task waiting on ``receive`` (it stops the relay at
    its next wait); a server shutdown by ``_Shutdown`` (the relay is
    interrupted after ``SHUTDOWN_DRAIN_SECONDS``)."""

    def __init__(
        self, follower: Follower, opening: Sequence[Entry] = (), *, keepalive: float = KEEPALIVE_SECONDS
    ) -> None:
        super().__init__()
        self._follower = follower
        self._opening = opening
        self._keepalive = keepalive
        self._gone = False  # the client went away

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        watcher: asyncio.Future[None] | None = None
        try:
            await send({"type": "http.response.start", "status": 200, "headers": STREAM_HEADERS})
            if scope.get("method") == "HEAD":  # headers only: the stream never starts
                await send(_END)
                return
            watcher = asyncio.ensure_future(self._watch_client(receive))
            with _watching_shutdown(self._follower):
                async with aclosing(relay(self._follower, self._opening, keepalive=self._keepalive)) as chunks:
                    async for chunk in chunks:
                        if self._gone:
                            return
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send(_END)
        finally:
            if watcher is not None:
                watcher.cancel()
            await self._follower.close()
        await self._after()

    async def _watch_client(self, receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self._gone = True
                self._follower.interrupt()  # wakes the relay, which then stops
                return


class _Shutdown:
    """Ends the open streams of one event loop when the server shuts down:
    one watcher task (only while a stream is open) looks every
    ``POLL_SECONDS`` whether uvicorn is exiting, then interrupts each stream
    after ``SHUTDOWN_DRAIN_SECONDS``, so runs about to finish end normally.
    Nothing is remembered past one shutdown (tests start many servers)."""

    POLL_SECONDS = 0.5

    def __init__(self) -> None:
        self._open: set[EntrySource] = set()
        self._watcher: asyncio.Task[None] | None = None

    def add(self, source: EntrySource) -> None:
        self._open.add(source)
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.get_running_loop().create_task(self._watch(), name="sse-shutdown-watch")

    def discard(self, source: EntrySource) -> None:
        self._open.discard(source)

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        interrupted: set[EntrySource] = set()
        while self._open:
            if server_is_exiting():
                for source in self._open - interrupted:
                    interrupted.add(source)
                    loop.call_later(SHUTDOWN_DRAIN_SECONDS, source.interrupt)
            await asyncio.sleep(self.POLL_SECONDS)


_SHUTDOWNS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Shutdown] = weakref.WeakKeyDictionary()


@contextmanager
def _watching_shutdown(source: EntrySource) -> Iterator[None]:
    loop = asyncio.get_running_loop()
    shutdown = _SHUTDOWNS.get(loop)
    if shutdown is None:
        shutdown = _SHUTDOWNS[loop] = _Shutdown()
    shutdown.add(source)
    try:
        yield
    finally:
        shutdown.discard(source)


def server_is_exiting() -> bool:
    """Whether the uvicorn serving this process was told to exit: sse-starlette
    records its signal in ``AppStatus``; uvicorn's own flag is reached through
    the SIGTERM handler it installs while serving (a bound method)."""
    if AppStatus.should_exit:
        return True
    server = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)
    return bool(getattr(server, "should_exit", False))


async def relay(
    source: EntrySource,
    opening: Sequence[Entry] = (),
    *,
    keepalive: float = KEEPALIVE_SECONDS,
    shutdown: anyio.Event | None = None,
) -> AsyncGenerator[bytes, None]:
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


class _Fixed(_EventStream):
    """An event stream whose frames are known when it starts."""

    def __init__(self, body: bytes) -> None:
        super().__init__()
        self._body = body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": STREAM_HEADERS})
        await send({"type": "http.response.body", "body": self._body if scope.get("method") != "HEAD" else b""})
        await self._after()


def nothing_more() -> _Fixed:
    """The stream of a run that has ended and has nothing after the point asked for."""
    return _Fixed(frame(DONE_EVENT))


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
