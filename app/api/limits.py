"""Bounds on what one client can make the server hold.

- ``read_limited_body`` (applied by api/front.py; ``BodyLimit`` is the same
  as an ASGI layer of its own): a request body other than a file upload
  (``is_upload``: it has its own limit) may be at most
  ``max_bytes``, and must arrive within ``timeout_seconds``. A declared
  Content-Length above the limit is refused before a byte of the body is
  read; a chunked body as soon as it passes the limit. So a 50 MB JSON body
  costs neither memory nor event-loop time to refuse.
- ``guarded_protocol`` (uvicorn's HTTP protocol, httptools' or h11's, subclassed): at most
  ``max_connections`` open connections (more are closed as soon as they are
  accepted, so idle clients cannot exhaust the file descriptors), and a
  deadline for a request's headers, also for a connection that never sends
  any (uvicorn's own keep-alive timeout starts only after a first response).
  Refusals are logged at most once a minute, never once per connection.
  Its writes go out one send per event-loop turn (app/api/write_coalescing.py).
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from typing import TYPE_CHECKING, Literal, cast

from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

if TYPE_CHECKING:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app import db, errors
from app.api import API_PREFIXES
from app.api.asgi_body import replaying
from app.api.handlers import error_response
from app.api.write_coalescing import CoalescingTransport, ResponseEndFlush

log = logging.getLogger("app.api")

# How often at most a refusal is logged (with the count since the last line).
LOG_EVERY_SECONDS = 60.0
# File descriptors kept free for the database, stored files and sandboxes;
# on SQLite two more per connection its pools may open (the file, its WAL).
RESERVED_FDS = 256
SQLITE_RESERVED_FDS = RESERVED_FDS + 2 * db.SQLITE_MOST_CONNECTIONS
# The one route that takes a multipart body (POST /files, streamed to disk
# with its own size limit): any other body, whatever its declared type, is
# held to the JSON limit (a 1 GB body labelled multipart sent to a JSON
# route would otherwise be read whole into memory).
_UPLOAD_PATHS = frozenset(f"{prefix}/files" for prefix in API_PREFIXES)


def too_large(limit: int) -> errors.APIError:
    return errors.APIError(
        413,
        f"Request body too large: the limit is {limit} bytes.",
        code="request_too_large",
    )


def too_slow(seconds: float) -> errors.APIError:
    return errors.APIError(408, f"The request body did not arrive within {seconds:g} seconds.", code="timeout")


class BodyLimit:
    """The body limits alone, as an ASGI layer (the server applies them in
    api/front.py, with the rest of what every request passes)."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_seconds: float) -> None:
        self.app, self.max_bytes, self.timeout_seconds = app, max_bytes, timeout_seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_upload(scope, _header(scope, b"content-type")):
            await self.app(scope, receive, send)
            return
        declared = parse_length(_header(scope, b"content-length"))
        replay = await read_limited_body(scope, receive, send, declared, self.max_bytes, self.timeout_seconds)
        if replay is not None:
            await self.app(scope, replay, send)


async def read_limited_body(
    scope: Scope, receive: Receive, send: Send, declared: int | None, max_bytes: int, timeout_seconds: float
) -> Receive | None:
    """The request's body read whole within the limits, given back as a
    ``receive`` that replays it; None when the request was answered here
    (413, 408) or the client went away."""
    if declared is not None and declared > max_bytes:
        await error_response(too_large(max_bytes))(scope, receive, send)
        return None
    try:
        async with asyncio.timeout(timeout_seconds):
            body = await _read(receive, max_bytes)
    except TimeoutError:
        await error_response(too_slow(timeout_seconds))(scope, receive, send)
        return None
    if body is None:  # the client went away
        return None
    if len(body) > max_bytes:
        await error_response(too_large(max_bytes))(scope, receive, send)
        return None
    return replaying(body, receive)  # then the client's own messages: a disconnect during a stream


async def _read(receive: Receive, max_bytes: int) -> bytes | None:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        chunks.append(chunk)
        size += len(chunk)
        if size > max_bytes or not message.get("more_body", False):
            return b"".join(chunks)


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return bytes(value)
    return None


def is_upload(scope: Scope, content_type: bytes | None) -> bool:
    """Whether an HTTP request is a file upload, whose body is not held to
    the JSON limit (``content_type``: its first Content-Type header)."""
    return (
        (content_type or b"").lower().startswith(b"multipart/")
        and scope["method"] == "POST"
        and scope.get("path", "").rstrip("/") in _UPLOAD_PATHS
    )


def parse_length(value: bytes | None) -> int | None:
    """A Content-Length header's value; None when absent or not a number."""
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


class _RateLimitedLog:
    def __init__(self, message: str) -> None:
        self.message, self.count, self.last = message, 0, float("-inf")

    def note(self) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self.last >= LOG_EVERY_SECONDS:
            log.warning(self.message, self.count)
            self.count, self.last = 0, now


def connection_cap(max_connections: int, reserved_fds: int = RESERVED_FDS) -> int:
    """The connection limit, kept ``reserved_fds`` below the process's file
    descriptor limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return max_connections
    return min(max_connections, max(16, soft - reserved_fds))


HttpParser = Literal["auto", "httptools", "h11"]


def parser_protocol(parser: HttpParser) -> type[H11Protocol | HttpToolsProtocol]:
    """uvicorn's protocol class for the parser: httptools (a C parser; what
    ``auto`` picks when it is installed, as uvicorn does) or h11 (pure Python)."""
    if parser == "h11":
        return H11Protocol
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        if parser == "httptools":
            raise
        return H11Protocol
    return HttpToolsProtocol


def guarded_protocol(
    max_connections: int,
    header_timeout_seconds: float,
    *,
    max_header_bytes: int = 64 * 1024,
    parser: HttpParser = "auto",
    reserved_fds: int = RESERVED_FDS,
) -> type[asyncio.Protocol]:
    """The parser's protocol with the bounds of this module. h11 bounds a
    request's head itself (uvicorn's h11_max_incomplete_event_size, which the
    caller sets); httptools has no bound, so the bytes received while a
    request's head is incomplete are counted here, and past
    ``max_header_bytes`` answered 400 and the connection closed, as h11 does."""
    base = parser_protocol(parser)
    counts_head = base is not H11Protocol
    cap = connection_cap(max_connections, reserved_fds)
    refused = _RateLimitedLog(f"refused %d connection(s): {cap} connections are open (http_max_connections)")
    timed_out = _RateLimitedLog("closed %d connection(s) that sent no complete request headers in time")

    class Guarded(base):  # type: ignore[valid-type,misc]
        header_timer: asyncio.TimerHandle | None = None
        waiting_after: object = None  # the cycle (request) before the headers awaited
        # httptools: bytes of the current request's head received so far;
        # counted only while a head is incomplete, whatever the cycle (a
        # pipelined request's head may arrive while a response still runs,
        # and a body left unread after an early 413 is not a head).
        head_bytes = 0
        in_head = True
        heads_completed = 0

        def connection_made(self, transport: asyncio.Transport) -> None:
            if len(self.connections) >= cap:
                refused.note()
                transport.abort()  # frees the descriptor at once; nothing is sent
                return
            # Every write, the protocol's own included, goes through the
            # coalescing transport, so their order is kept.
            super().connection_made(cast(asyncio.Transport, CoalescingTransport(transport, self.loop)))
            self._await_headers()

        def _await_headers(self) -> None:
            self._stop_header_timer()
            self.waiting_after = self.cycle
            self.header_timer = self.loop.call_later(header_timeout_seconds, self._headers_too_slow)

        def _stop_header_timer(self) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
                self.header_timer = None

        def _headers_too_slow(self) -> None:
            self.header_timer = None
            if self.cycle is self.waiting_after and not self.transport.is_closing():
                timed_out.note()
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            was_in_head, heads_before = self.in_head, self.heads_completed
            super().data_received(data)
            if self.cycle is not self.waiting_after:  # a request's headers are complete
                self._stop_header_timer()
            if counts_head and self.in_head and not self.transport.is_closing():
                if was_in_head and self.heads_completed == heads_before:
                    self.head_bytes += len(data)
                    if self.head_bytes > max_header_bytes:
                        self.send_400_response("Request headers too large.")
                else:  # a head began within this read: what it holds is bounded by the read's size
                    self.head_bytes = 0

        # httptools' callbacks (h11 never calls them): a request's head is
        # what arrives between the end of the previous message (or the
        # connection's start) and the end of its headers.
        def on_headers_complete(self) -> None:
            self.in_head, self.head_bytes = False, 0
            self.heads_completed += 1
            before = self.cycle
            super().on_headers_complete()
            if self.cycle is not before:  # a new request's cycle (not an upgrade's hand-over)
                # Before the request's task (started above) first runs.
                self.cycle.message_event = ResponseEndFlush(self.transport)

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self.in_head = True

        def on_response_complete(self) -> None:
            finished = self.cycle
            super().on_response_complete()
            # The next request on this connection gets a deadline too (unless
            # a pipelined one already started).
            if self.cycle is finished and not self.transport.is_closing():
                self._await_headers()

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_header_timer()
            if self.transport is not None:  # not for a connection refused by the cap
                super().connection_lost(exc)

    Guarded.__name__ = Guarded.__qualname__ = f"Guarded{base.__name__}"
    return Guarded
