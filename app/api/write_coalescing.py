"""One send for the writes a response makes in one turn of the event loop (issue 17).

uvicorn writes a response's status line and headers as soon as the app sends
``http.response.start``, then each body message as it comes: a JSON answer
costs two ``send`` calls, a streamed run's first frames and its last frame
and chunked terminator two more. With TCP_NODELAY each is a segment of its
own; on loopback each send also does the receiving side's TCP work and wakes
the client, in the server's CPU time (about a tenth of a request's).

``CoalescingTransport`` sits between uvicorn's protocol and the socket's
transport: the first write of a turn is held and a flush is scheduled with
``call_soon``; writes made before it runs (the body right after the head,
frames that were ready together) join it. Nothing waits longer than the
current turn of the loop, so a stream whose first event is slow still gets
its headers at once, and the bytes and their order are unchanged. A
response's end sends what is held at once (``ResponseEndFlush``, httptools'
protocol): nothing more of it can join. Once a turn's writes pass
HOLD_AT_MOST_BYTES they go at once, so the socket's transport sees them and
pauses the response for a slow reader (flow control) as it would have.
"""

from __future__ import annotations

import asyncio
from typing import Any

# Held writes past this size are sent at once (well under the transport's
# default high-water mark, 64 KiB).
HOLD_AT_MOST_BYTES = 16 * 1024


class CoalescingTransport:
    """A write transport that gathers the writes of one event-loop turn.

    Everything else (reading, flow control, extra info) goes to the socket's
    transport; ``close`` sends what is held first, ``abort`` drops it as an
    abort drops the transport's own buffer."""

    __slots__ = ("_held", "_held_bytes", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: list[bytes] | None = None
        self._held_bytes = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        if self._held is None:
            self._held = [bytes(data)]
            self._held_bytes = len(data)
            self._loop.call_soon(self.flush)
        else:
            self._held.append(bytes(data))
            self._held_bytes += len(data)
        if self._held_bytes > HOLD_AT_MOST_BYTES:
            self.flush()  # the call_soon then finds nothing held

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:
            self.write(chunk)

    def flush(self) -> None:
        held, self._held = self._held, None
        if held:
            self._transport.write(held[0] if len(held) == 1 else b"".join(held))

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def abort(self) -> None:
        self._held = None
        self._transport.abort()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(len(chunk) for chunk in self._held or ())

    def __getattr__(self, name: str) -> Any:
        # pause_reading, resume_reading, get_extra_info, set_protocol, ...
        return getattr(self._transport, name)


class ResponseEndFlush(asyncio.Event):
    """A request-response cycle's ``message_event`` that, when set, first
    sends what ``transport`` holds. uvicorn sets it right after writing a
    response's last bytes (and when the request's body or the client's
    disconnect arrives), so those bytes go at the response's end, not after
    the callbacks the loop had queued before the turn's flush (a run task's
    steps after its end, the stream's client watcher). A flush with nothing
    held, or early, changes neither the bytes nor their order."""

    def __init__(self, transport: object) -> None:
        super().__init__()
        # (The protocol's transport: a CoalescingTransport under its
        # asyncio.Transport type, or the socket's for a refused connection.)
        self._coalescing = transport if isinstance(transport, CoalescingTransport) else None

    def set(self) -> None:
        if self._coalescing is not None:
            self._coalescing.flush()
        super().set()
