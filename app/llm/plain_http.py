"""A small HTTP/1.1 keep-alive client for ``http://`` provider bases (vLLM,
Ollama, a local gateway, the test stubs), used by the direct path (direct.py).

Why not httpx for these: reading one streamed completion through httpx cost
0.76-0.86 ms of CPU against 0.11 ms for a bare asyncio client reading the same
stream (bench/README.md, branch ``provpath``), most of it httpx's request
machinery, header checks and pool bookkeeping; about 0.65 ms of every provider
run. This client is an ``asyncio.Protocol`` with its own buffer, so a read
that finds its bytes already received costs no await and no timer.

What it does, as httpx does it:

- one pool of connections per (host, port), kept alive between requests,
  with httpx's limits: at most ``max_connections`` open (None: no cap; a
  request past the cap waits up to the pool timeout), at most
  ``max_keepalive_connections`` idle, each idle one closed after
  ``keepalive_expiry`` seconds;
- an idle connection is checked before it is reused: one the server closed
  or sent bytes on while it sat idle (seen by the event loop, or still
  waiting in the kernel's buffer, as httpcore polls its socket) is closed
  and a fresh one opened, which is safe since nothing was sent on it. Once a
  request is written it is never sent again here: the server may have
  acted on it. A connection that then ends without an answer is a
  RemoteProtocolError, which direct.py retries within ``max_retries`` like
  any transport error (so ``max_retries: 0`` never sends a call twice);
- Content-Length and chunked bodies (chunk extensions ignored, trailers
  read and dropped), else the body read to EOF; a Transfer-Encoding other
  than exactly ``chunked`` is refused, as h11 refuses it; HTTP/1.0 answers
  and ``Connection: close`` close the connection after the body; 1xx interim
  answers are skipped, a ``101 Switching Protocols`` (never asked for) is a
  RemoteProtocolError; gzip or deflate bodies are decoded (we ask for
  ``identity``, but a server may compress anyway);
- timeouts as httpx's: connect, each read, each write (when the kernel
  buffer is full) and waiting for a pool slot;
- a malformed status line, header, Content-Length or chunk size, or a head
  past ``MAX_HEAD_BYTES``, is a RemoteProtocolError at once, never a hang
  (nor a bare ValueError).

A response closed before its body was read to the end (a cancelled run, the
idle limit) closes its connection: the rest of that body would otherwise be
read as the next request's answer. A body read to its end returns the
connection to the pool at once. ``Pool.close`` during a read fails that read
(a body read to EOF would otherwise look complete).

What it does not do, so direct.py keeps httpx for it: TLS (``https://``),
proxies (``HTTP_PROXY``/``ALL_PROXY`` not excepted by ``NO_PROXY``),
credentials in the URL, URLs that need percent-encoding or IDNA, HTTP/2.
It keeps no cookies (httpx's client would send a provider's Set-Cookie
back): OpenAI-compatible APIs are stateless; a gateway that pins sessions by
cookie is reached over https in practice.
"""

from __future__ import annotations

import asyncio
import re
import select
import urllib.request
import zlib
from collections import deque
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Literal, cast

MAX_HEAD_BYTES = 64 * 1024  # status line and headers (h11, under httpx, allows 16 KiB)
MAX_HEADERS = 256
MAX_LINE_BYTES = 64 * 1024  # a chunk-size line with its extensions, a trailer
_READ_PIECE = 64 * 1024  # the most one body read hands back
_PAUSE_READING = 1024 * 1024  # buffered bytes past which the socket is not read until the caller catches up
_USER_AGENT = "assistants-server"

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: .*)?")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")  # a chunk size (64 bits at most)
_CR = ord("\r")
_DECIMAL = re.compile(r"[0-9]{1,19}")  # a Content-Length (ASCII digits only: str.isdigit takes "²")
_PORT = re.compile(r"[0-9]{1,5}")
_IPV4 = re.compile(r"[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+")
# What a request target may hold without percent-encoding (RFC 3986): anything
# else (spaces, non-ASCII) goes through httpx, which encodes it.
_PLAIN_TARGET = re.compile(r"[A-Za-z0-9\-._~:/?\[\]@!$&'()*+,;=%]*")
_PLAIN_HOST = re.compile(r"[A-Za-z0-9\-._]+|\[[0-9A-Fa-f:.]+\]")


# ------------------------------------------------------------------ errors
# The same family as httpx's, so direct.py maps both to one set of texts.


class HTTPError(Exception):
    """Any failure of this client."""


class TransportError(HTTPError):
    """The exchange failed on the connection (no usable answer)."""


class TimeoutException(TransportError):
    pass


class ConnectTimeout(TimeoutException):
    pass


class ReadTimeout(TimeoutException):
    pass


class WriteTimeout(TimeoutException):
    pass


class PoolTimeout(TimeoutException):
    pass


class NetworkError(TransportError):
    pass


class ConnectError(NetworkError):
    pass


class ReadError(NetworkError):
    pass


class WriteError(NetworkError):
    pass


class ProtocolError(TransportError):
    pass


class RemoteProtocolError(ProtocolError):
    """The server's answer is not HTTP/1.1 we can read (or it ended early)."""


class LocalProtocolError(ProtocolError):
    """The request cannot be sent as given (a header with a line break, say)."""


class DecodingError(HTTPError):
    """A body its Content-Encoding does not decode."""


# ------------------------------------------------------------------ settings


@dataclass(frozen=True)
class Limits:
    """httpx's pool limits, with its defaults but no cap on open connections
    (the worker's concurrency already bounds the streams)."""

    max_connections: int | None = None
    max_keepalive_connections: int | None = 100
    keepalive_expiry: float | None = 5.0


@dataclass(frozen=True)
class Timeouts:
    """Seconds for each phase, None for no limit (httpx.Timeout's four)."""

    connect: float | None
    read: float | None
    write: float | None
    pool: float | None

    @classmethod
    def uniform(cls, seconds: float | None) -> Timeouts:
        return cls(seconds, seconds, seconds, seconds)


@dataclass(frozen=True)
class Target:
    """Where a request goes, parsed once per URL."""

    host: str  # as the socket wants it (no brackets)
    port: int
    host_header: str  # as the Host header wants it
    path: str  # the request target: path and query


def plain_target(url: str) -> Target | None:
    """The target of ``url`` if this client can send to it as written: an
    ``http://`` URL with a plain host, no credentials and nothing to
    percent-encode. None: let httpx take it (it knows how)."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() != "http":
        return None
    authority, slash, tail = rest.partition("/")
    path = slash + tail
    authority, query_mark, query = authority.partition("?")  # "http://host?x" has no slash
    if query_mark:
        path = "/?" + query + path
    if "@" in authority or "#" in path or not _PLAIN_TARGET.fullmatch(path):
        return None
    host, port = authority, 80
    if authority.startswith("["):  # an IPv6 literal, "[::1]:8000"
        end = authority.find("]")
        host, after = authority[: end + 1], authority[end + 1 :]
        if after:
            if not after.startswith(":") or not _PORT.fullmatch(after[1:]):
                return None
            port = int(after[1:])
    elif ":" in authority:
        host, _, digits = authority.partition(":")
        if not _PORT.fullmatch(digits):
            return None
        port = int(digits)
    if not host or not _PLAIN_HOST.fullmatch(host) or not 0 < port < 65536:
        return None
    host = host.lower()
    host_header = host if port == 80 else f"{host}:{port}"
    return Target(host.strip("[]"), port, host_header, path or "/")


@dataclass(frozen=True)
class ProxyEnvironment:
    """The proxy variables as httpx reads them when its client is made
    (``trust_env``: HTTP_PROXY, ALL_PROXY, NO_PROXY, any case), to tell when
    no proxy applies to an ``http://`` URL. The test is conservative: a
    NO_PROXY entry it does not fully understand (a port, a CIDR range, a
    scheme) exempts nothing, so such URLs stay with httpx, which reads it."""

    proxied: bool  # an http:// or all:// proxy is set
    exempt: tuple[str, ...]  # NO_PROXY entries, lower case

    @classmethod
    def read(cls) -> ProxyEnvironment:
        found = urllib.request.getproxies()
        exempt = tuple(entry.strip().lower() for entry in found.get("no", "").split(",") if entry.strip())
        if "*" in exempt:  # httpx: NO_PROXY=* turns every proxy off
            return cls(False, ())
        return cls(bool(found.get("http") or found.get("all")), exempt)

    def applies_to(self, host: str) -> bool:
        """True if httpx might send a request for ``host`` through a proxy."""
        return self.proxied and not any(_exempts(entry, host.lower()) for entry in self.exempt)


def _exempts(entry: str, host: str) -> bool:
    """httpx's reading of one NO_PROXY entry (an IP or ``localhost`` exactly,
    ``example.com`` that domain and its subdomains, ``.example.com`` its
    subdomains only), for entries without a port, path or scheme."""
    if any(mark in entry for mark in "/[]") or (":" in entry and ":" not in host):
        return False
    if entry == host:
        return True
    if ":" in entry or entry == "localhost" or _IPV4.fullmatch(entry):
        return False  # addresses and localhost match only exactly
    if entry.startswith("."):
        return host.endswith(entry) and len(host) > len(entry)
    return host.endswith("." + entry)


# ------------------------------------------------------------------ one connection


class _Connection(asyncio.Protocol):
    """One TCP connection: the bytes received so far, and awaiting more.

    Reads take from ``buffer`` synchronously when it already holds what they
    need; only an empty-handed read waits (with its timeout's timer)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, key: tuple[str, int]) -> None:
        self.loop = loop
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.eof = False
        self.lost = False
        self.error: Exception | None = None  # why it was lost, if not a clean close
        self.answered = False  # a byte arrived since the last request went out
        self.expiry: asyncio.TimerHandle | None = None  # while idle in the pool
        self._waiter: asyncio.Future[bool] | None = None
        self._drained: asyncio.Future[None] | None = None
        self._reading_paused = False
        self.aborted = False  # by abort(): what is still to send or read fails

    # asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport, though not always an asyncio.Transport subclass:
        # uvloop's TCPTransport (the server's loop when installed) is not.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self.answered = True
        if len(self.buffer) > _PAUSE_READING and not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return False  # the server is done sending: close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.error is None:  # (an error set by abort() stays the reason)
            self.error = exc
        self._wake()
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def pause_writing(self) -> None:
        if self._drained is None or self._drained.done():
            self._drained = self.loop.create_future()

    def resume_writing(self) -> None:
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(True)

    # state
    @property
    def ended(self) -> bool:
        return self.eof or self.lost

    def reusable_idle(self) -> bool:
        """Still open, and the server sent nothing while it sat idle (an idle
        connection that received bytes or EOF is out of step or closing)."""
        return not self.ended and not self.buffer and self.transport is not None and not self.transport.is_closing()

    def quiet_in_kernel(self) -> bool:
        """Nothing waits in the socket's receive buffer: no EOF, reset or
        byte the event loop has not handed us yet (httpcore's check of an
        idle connection before reuse, one poll() that does not block)."""
        socket = self.transport.get_extra_info("socket") if self.transport is not None else None
        if socket is None or not hasattr(select, "poll"):
            return True
        poller = select.poll()
        poller.register(socket.fileno(), select.POLLIN)
        return not poller.poll(0)

    def close(self, *, unsent: Literal["flush", "drop"] = "flush") -> None:
        if self.expiry is not None:
            self.expiry.cancel()
            self.expiry = None
        if self.transport is not None:
            if unsent == "drop":
                self.transport.abort()
            else:
                self.transport.close()

    def abort(self, reason: str) -> None:
        """Closed by us mid-exchange: a read still to come fails with ``reason``
        rather than taking the close for the server's end of the body, and
        so does a send waiting for the kernel's buffer to drain. The unsent
        part of the request is dropped, not flushed first (a close would
        wait for a server that stopped reading, and the send with it, for
        its whole write timeout)."""
        if self.error is None:
            self.error = ConnectionAbortedError(reason)
        self.aborted = True
        self.close(unsent="drop")
        self._wake()
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    # writing and reading
    async def send(self, data: bytes, seconds: float | None) -> None:
        transport = self.transport
        if self.aborted:  # Pool.close() while this connected: nothing is sent after it
            raise WriteError("the connection pool was closed")
        if transport is None or transport.is_closing() or self.lost:
            raise WriteError("the connection is closed")
        self.answered = False
        transport.write(data)
        drained = self._drained
        if drained is not None and not drained.done():  # the kernel's buffer is full: wait, within the write timeout
            try:
                async with asyncio.timeout(seconds):
                    await drained
            except TimeoutError:
                raise WriteTimeout("timed out sending the request") from None
        if self._dropped_unanswered():  # (a server that answered early, a 413 say, is read as httpx reads it)
            raise WriteError(str(self.error or "the connection closed while sending"))

    def _dropped_unanswered(self) -> bool:
        return (self.lost or self.aborted) and not self.answered

    async def _more(self, seconds: float | None) -> None:
        """Wait for more bytes, EOF or the connection's end; ReadTimeout after ``seconds``."""
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()
        waiter: asyncio.Future[bool] = self.loop.create_future()
        self._waiter = waiter
        timer = None if seconds is None else self.loop.call_later(seconds, _expire, waiter)
        try:
            if not await waiter:
                raise ReadTimeout("timed out reading the response")
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    def _taken(self, count: int) -> bytes:
        data = bytes(self.buffer[:count])
        self.discard(count)
        return data

    def discard(self, count: int) -> None:
        """Drop the first ``count`` bytes (read), reading the socket again once the buffer is drained enough."""
        del self.buffer[:count]
        if self._reading_paused and len(self.buffer) < _PAUSE_READING // 2 and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()

    def _ended_early(self, what: str) -> TransportError:
        if self.error is not None:
            return ReadError(f"{what}: {self.error}")
        return RemoteProtocolError(f"the server closed the connection {what}")

    async def read_line(self, seconds: float | None, limit: int, what: str) -> bytes:
        """One line without its CRLF (or bare LF)."""
        start = 0
        while True:
            end = self.buffer.find(b"\n", start)
            if end >= 0:
                if end > limit:
                    raise RemoteProtocolError(f"{what} is longer than {limit} bytes")
                line = self._taken(end + 1)
                return line[:-2] if line.endswith(b"\r\n") else line[:-1]
            if len(self.buffer) > limit:
                raise RemoteProtocolError(f"{what} is longer than {limit} bytes")
            if self.ended:  # (nothing at all before a status line: the server dropped the request unanswered)
                raise self._ended_early(f"in the middle of the {what}" if self.buffer else f"before the {what}")
            start = len(self.buffer)
            await self._more(seconds)

    async def read_some(self, most: int, seconds: float | None) -> bytes:
        """Up to ``most`` bytes, as soon as there are any; b"" at a clean EOF."""
        while not self.buffer:
            if self.error is not None:
                raise ReadError(str(self.error))
            if self.ended:
                return b""
            await self._more(seconds)
        return self._taken(min(most, len(self.buffer)))


def _expire(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(False)


# ------------------------------------------------------------------ the response

_BodyKind = Literal["none", "length", "chunked", "eof"]


class Response:
    """A response whose body is read as the caller asks for it (the subset of
    httpx.Response that direct.py uses). Header names are lower case."""

    def __init__(
        self,
        pool: Pool,
        connection: _Connection,
        status_code: int,
        headers: dict[str, str],
        *,
        kind: _BodyKind,
        length: int,
        keep_alive: bool,
        read_timeout: float | None,
    ) -> None:
        self.status_code = status_code
        self.headers = headers
        self._pool = pool
        self._connection: _Connection | None = connection
        self._kind = kind
        self._left = length  # of the body ("length"), of the current chunk ("chunked")
        self._keep_alive = keep_alive
        self._timeout = read_timeout
        self._decoder: zlib._Decompress | None = None
        self._undecodable: DecodingError | None = None  # raised when the body is read, as httpx does
        try:
            self._decoder = _decoder(headers.get("content-encoding", ""))
        except DecodingError as exc:
            self._undecodable = exc
        if kind == "none" or (kind == "length" and length == 0):
            self._complete()

    @property
    def is_success(self) -> bool:
        return 200 <= self.status_code < 300

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        """The body's bytes as they arrive (decoded if the server compressed them)."""
        if self._undecodable is not None:
            self.close()
            raise self._undecodable
        while (piece := await self._read_piece()) is not None:
            if self._decoder is not None:
                piece = self._decode(piece)
            if piece:
                yield piece
        if self._decoder is not None and (rest := self._decode_end()):
            yield rest

    async def aiter_lines(self) -> AsyncIterator[str]:
        """The body's lines, split at CRLF, LF or CR (as Server-Sent Events
        are), each decoded as UTF-8 once whole, so a character split across
        two reads is never mangled."""
        pending = b""
        skip_lf = False  # the last piece ended in CR: a LF starting the next one is its pair
        async for piece in self.aiter_raw():
            if skip_lf and piece.startswith(b"\n"):
                piece = piece[1:]
            skip_lf = piece.endswith(b"\r")
            data = pending + piece
            if b"\r" in data:
                data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
            lines = data.split(b"\n")
            pending = lines.pop()
            for line in lines:
                yield line.decode("utf-8", "replace")
        if pending:
            yield pending.decode("utf-8", "replace")

    async def aread(self) -> bytes:
        return b"".join([piece async for piece in self.aiter_raw()])

    async def aclose(self) -> None:
        self.close()

    def close(self) -> None:
        """Done with it: a body not read to its end closes the connection."""
        connection, self._connection = self._connection, None
        if connection is not None:
            self._pool._discard(connection)

    # the body
    def _complete(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            self._pool._release(connection, reusable=self._keep_alive)

    async def _read_piece(self) -> bytes | None:
        """The next piece of the body, None at its end (the connection then
        released). Raises if the body ends early or breaks its framing."""
        connection = self._connection
        if connection is None:
            return None
        try:
            if self._kind == "length":
                data = await connection.read_some(min(self._left, _READ_PIECE), self._timeout)
                if not data:
                    raise RemoteProtocolError(f"the body ended {self._left} bytes short of its Content-Length")
                self._left -= len(data)
                if self._left == 0:
                    self._complete()
                return data
            if self._kind == "chunked":
                return await self._read_chunked(connection)
            data = await connection.read_some(_READ_PIECE, self._timeout)  # "eof"
            if not data:
                self._complete()
                return None
            return data
        except BaseException:
            self.close()  # a failed or cancelled read leaves the connection mid-body
            raise

    async def _read_chunked(self, connection: _Connection) -> bytes | None:
        if self._left == 0 and (whole := _whole_chunks(connection)):
            return whole
        if self._left == 0:
            line = await connection.read_line(self._timeout, MAX_LINE_BYTES, "chunk size line")
            size = line.partition(b";")[0].strip()  # chunk extensions carry nothing we use
            if not _HEX.fullmatch(size):
                raise RemoteProtocolError(f"malformed chunk size line: {line[:100]!r}")
            self._left = int(size, 16)
            if self._left == 0:
                await self._read_trailers(connection)
                self._complete()
                return None
        data = await connection.read_some(min(self._left, _READ_PIECE), self._timeout)
        if not data:
            raise RemoteProtocolError("the server closed the connection in the middle of a chunk")
        self._left -= len(data)
        if self._left == 0:
            if await connection.read_line(self._timeout, 2, "end of a chunk"):
                raise RemoteProtocolError("a chunk is longer than its size line says")
            data += _whole_chunks(connection, _READ_PIECE - len(data))
        return data

    async def _read_trailers(self, connection: _Connection) -> None:
        total = 0
        while line := await connection.read_line(self._timeout, MAX_LINE_BYTES, "trailer"):
            total += len(line)
            if total > MAX_HEAD_BYTES:
                raise RemoteProtocolError(f"the trailers are longer than {MAX_HEAD_BYTES} bytes")

    def _decode(self, piece: bytes) -> bytes:
        assert self._decoder is not None
        try:
            return self._decoder.decompress(piece)
        except zlib.error as exc:
            self.close()
            raise DecodingError(f"the body does not decode as {self.headers.get('content-encoding')}: {exc}") from exc

    def _decode_end(self) -> bytes:
        assert self._decoder is not None
        try:
            return self._decoder.flush()
        except zlib.error as exc:
            raise DecodingError(f"the body does not decode as {self.headers.get('content-encoding')}: {exc}") from exc


def _whole_chunks(connection: _Connection, room: int = _READ_PIECE) -> bytes:
    """The data of the whole chunks (size line, data, line end) that the
    buffer already holds, taken at once: a streamed completion's events
    usually arrive together, a chunk each, and taking them one read at a
    time cost three reads and three copies of the buffer per chunk (issue 17).
    Stops before the last chunk, anything incomplete, or anything not well
    formed: the chunk-by-chunk reading meets those (and words their errors).
    At most ``room`` bytes, so that a read hands back at most _READ_PIECE."""
    buffer = connection.buffer
    position, total = 0, 0
    pieces: list[bytearray] = []
    while True:
        end = buffer.find(b"\n", position, position + MAX_LINE_BYTES + 1)
        if end < 0:
            break
        line_end = end - 1 if end > position and buffer[end - 1] == _CR else end
        size = buffer[position:line_end].partition(b";")[0].strip()
        if not _HEX.fullmatch(size) or (length := int(size, 16)) == 0 or total + length > room:
            break  # the last chunk, or one this piece has no room for: read apart
        start = end + 1
        stop = start + length
        if buffer[stop : stop + 1] == b"\n":
            after = stop + 1
        elif buffer[stop : stop + 2] == b"\r\n":
            after = stop + 2
        else:
            break
        pieces.append(buffer[start:stop])
        total += length
        position = after
    if not position:
        return b""
    data = b"".join(pieces)
    connection.discard(position)
    return data


def _decoder(encoding: str) -> zlib._Decompress | None:
    codings = [coding.strip().lower() for coding in encoding.split(",") if coding.strip()]
    codings = [coding for coding in codings if coding != "identity"]
    if not codings:
        return None
    if codings == ["gzip"] or codings == ["x-gzip"]:
        return zlib.decompressobj(16 + zlib.MAX_WBITS)
    if codings == ["deflate"]:
        return zlib.decompressobj(zlib.MAX_WBITS)
    raise DecodingError(f"unsupported Content-Encoding: {encoding}")


# ------------------------------------------------------------------ the pool


class Pool:
    """Keep-alive connections per (host, port), for one event loop."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self._loop = asyncio.get_running_loop()
        self._idle: dict[tuple[str, int], list[_Connection]] = {}  # most recently used last
        self._idle_count = 0
        self._active: set[_Connection] = set()
        self._slot_waiters: deque[asyncio.Future[None]] = deque()
        self.connections_made = 0  # for tests and benchmarks: how often a request had to connect
        self.closed = False

    @property
    def open_connections(self) -> int:
        return self._idle_count + len(self._active)

    async def request(self, target: Target, headers: Mapping[str, str], body: bytes, timeouts: Timeouts) -> Response:
        """POST the body and read the answer's head; the body is read from the Response.

        POST only: a completion is all direct.py sends, and the reading of
        answers assumes it (a HEAD's answer, with no body after a
        Content-Length, would be waited for)."""
        if self.closed:
            raise LocalProtocolError("the connection pool is closed")
        payload = _request_head(target, headers, len(body)) + body
        connection = await self._acquire(target, timeouts)
        # Never sent twice from here, even on a reused connection the server
        # closed without a byte of answer: it may have read the request and
        # acted on it (httpx: "Server disconnected without sending a
        # response"). A retry is the caller's, counted in its max_retries.
        try:
            await connection.send(payload, timeouts.write)
            return await self._read_head(connection, timeouts.read)
        except BaseException:
            self._discard(connection)
            raise

    async def _read_head(self, connection: _Connection, seconds: float | None) -> Response:
        while True:
            status_line = await connection.read_line(seconds, MAX_HEAD_BYTES, "status line")
            matched = _STATUS_LINE.fullmatch(status_line)
            if matched is None:
                raise RemoteProtocolError(f"malformed status line: {status_line[:100]!r}")
            http10, status = matched.group(1) == b"0", int(matched.group(2))
            headers = await _read_headers(connection, seconds, MAX_HEAD_BYTES - len(status_line))
            if status == 101:  # we never ask to upgrade: what follows is not HTTP/1.1 (h11 refuses it too)
                raise RemoteProtocolError("the server switched protocols unasked (101)")
            if 100 <= status < 200:
                continue  # an interim answer (103 Early Hints); the real one follows
            break
        keep_alive = not http10 and "close" not in _tokens(headers.get("connection", ""))
        encoding = headers.get("transfer-encoding")
        kind: _BodyKind
        length = 0
        if status < 200 or status in (204, 304):
            kind = "none"
        elif encoding is not None:
            # Exactly "chunked", as h11 (under httpx) accepts: "gzip, chunked"
            # would hand back compressed bytes as the text, and a coding we
            # cannot undo leaves no way to find the body's end.
            if encoding.strip().lower() != "chunked":
                raise RemoteProtocolError(f"unsupported Transfer-Encoding: {encoding[:100]!r}")
            kind = "chunked"
            if "content-length" in headers:  # both framings: a smuggling risk, not reused (RFC 9112 6.3)
                keep_alive = False
        elif "content-length" in headers:
            values = {value.strip() for value in headers["content-length"].split(",")}
            if len(values) != 1 or not _DECIMAL.fullmatch(value := values.pop()):
                raise RemoteProtocolError(f"malformed Content-Length: {headers['content-length'][:100]!r}")
            kind, length = "length", int(value)
        else:
            kind, keep_alive = "eof", False
        return Response(
            self, connection, status, headers, kind=kind, length=length, keep_alive=keep_alive, read_timeout=seconds
        )

    async def _acquire(self, target: Target, timeouts: Timeouts) -> _Connection:
        """An idle connection to the target, else a new one once the pool has
        room for it (waiting up to the pool timeout)."""
        key = (target.host, target.port)
        limit = self.limits.max_connections
        deadline = None if timeouts.pool is None else self._loop.time() + timeouts.pool
        while True:
            if (connection := self._take_idle(key)) is not None:
                return connection
            if limit is None or self.open_connections < limit:
                return await self._connect(target, timeouts.connect)
            if self._idle_count:  # make room: close the idle connection (another host's) that waited longest
                self._close_oldest_idle()
                continue
            waiter: asyncio.Future[None] = self._loop.create_future()
            self._slot_waiters.append(waiter)
            try:
                async with asyncio.timeout_at(deadline):
                    await waiter
            except BaseException as exc:
                if waiter in self._slot_waiters:
                    self._slot_waiters.remove(waiter)
                elif waiter.done() and not waiter.cancelled():
                    # Woken for a free slot but leaving (cancelled, or timed
                    # out, in the same turn): the slot is the next waiter's.
                    self._wake_slot_waiter()
                if isinstance(exc, TimeoutError):
                    raise PoolTimeout("timed out waiting for a connection from the pool") from None
                raise

    def _take_idle(self, key: tuple[str, int]) -> _Connection | None:
        idle = self._idle.get(key)
        while idle:
            connection = idle.pop()  # the most recently used: the likeliest still open
            self._idle_count -= 1
            if connection.expiry is not None:
                connection.expiry.cancel()
                connection.expiry = None
            if connection.reusable_idle() and connection.quiet_in_kernel():
                self._active.add(connection)
                return connection
            connection.close()  # closed by the server while idle (or out of step with it): nothing was sent on it
            self._wake_slot_waiter()
        return None

    def _close_oldest_idle(self) -> None:
        oldest = min(
            (connections[0] for connections in self._idle.values() if connections),
            key=lambda connection: connection.expiry.when() if connection.expiry is not None else 0.0,
        )
        self._idle[oldest.key].remove(oldest)
        self._idle_count -= 1
        oldest.close()

    async def _connect(self, target: Target, seconds: float | None) -> _Connection:
        key = (target.host, target.port)
        connection = _Connection(self._loop, key)
        self._active.add(connection)  # holds its slot while connecting
        try:
            async with asyncio.timeout(seconds):
                await self._loop.create_connection(lambda: connection, target.host, target.port)
        except TimeoutError:
            self._discard(connection)
            raise ConnectTimeout(f"timed out connecting to {target.host_header}") from None
        except (OSError, UnicodeError) as exc:  # UnicodeError: a host name IDNA refuses (httpx: ConnectError too)
            self._discard(connection)
            raise ConnectError(str(exc) or type(exc).__name__) from exc
        except BaseException:
            self._discard(connection)
            raise
        self.connections_made += 1
        return connection

    def _release(self, connection: _Connection, *, reusable: bool) -> None:
        """A response read to its end: its connection back to the pool, or closed."""
        self._active.discard(connection)
        keep = self.limits.max_keepalive_connections
        if (
            not reusable
            or self.closed
            or not connection.reusable_idle()
            or (keep is not None and self._idle_count >= keep)
        ):
            connection.close()
        else:
            self._idle.setdefault(connection.key, []).append(connection)
            self._idle_count += 1
            expiry = self.limits.keepalive_expiry
            if expiry is not None:
                connection.expiry = self._loop.call_later(expiry, self._expire_idle, connection)
        self._wake_slot_waiter()

    def _discard(self, connection: _Connection) -> None:
        """A connection that cannot serve another request: closed, its slot freed."""
        self._active.discard(connection)
        connection.close()
        self._wake_slot_waiter()

    def _expire_idle(self, connection: _Connection) -> None:
        connection.expiry = None
        idle = self._idle.get(connection.key)
        if idle is not None and connection in idle:
            idle.remove(connection)
            self._idle_count -= 1
            connection.close()
            self._wake_slot_waiter()

    def _wake_slot_waiter(self) -> None:
        while self._slot_waiters:
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def close(self) -> None:
        """Close every connection, idle or in use (the server's shutdown)."""
        self.closed = True
        for connections in self._idle.values():
            for connection in connections:
                connection.close()
        self._idle.clear()
        self._idle_count = 0
        for connection in list(self._active):
            connection.abort("the connection pool was closed")
        self._active.clear()
        while self._slot_waiters:
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)


# ------------------------------------------------------------------ wire format helpers


def _check_header(name: str, value: str) -> None:
    if not _TOKEN.fullmatch(name.encode("latin-1", "replace")) or any(c in value for c in "\r\n\0"):
        raise LocalProtocolError(f"header {name!r} cannot be sent as given")


_OWN_HEADERS: tuple[tuple[str, str], ...] = (
    ("accept", "*/*"),
    ("accept-encoding", "identity"),
    ("user-agent", _USER_AGENT),
)


def _request_head(target: Target, headers: Mapping[str, str], length: int) -> bytes:
    """The request line and headers; the caller's headers win over our
    defaults, as httpx's do: a ``Host`` given (a virtual host behind a
    gateway, via ``extra_headers``) is sent as given, else the URL's.
    Content-Length is always ours (the body is)."""
    given = {name.lower() for name in headers}
    lines = [f"POST {target.path} HTTP/1.1"]
    if "host" not in given:
        lines.append(f"Host: {target.host_header}")
    for name, value in headers.items():
        _check_header(name, value)
        if name.lower() not in ("content-length", "transfer-encoding", "connection"):
            lines.append(f"{name}: {value}")
    lines.extend(f"{name}: {value}" for name, value in _OWN_HEADERS if name not in given)
    lines.append(f"Content-Length: {length}")
    lines.append("\r\n")
    return "\r\n".join(lines).encode("ascii")  # as httpx: a value outside ASCII is refused, not mangled


async def _read_headers(connection: _Connection, seconds: float | None, budget: int) -> dict[str, str]:
    """Header lines up to the empty one; names lower case, repeated ones joined by ", "."""
    headers: dict[str, str] = {}
    count = 0
    while line := await connection.read_line(seconds, budget, "response head"):
        budget -= len(line) + 2
        count += 1
        if budget < 0 or count > MAX_HEADERS:
            raise RemoteProtocolError(f"the response head is longer than {MAX_HEAD_BYTES} bytes or {MAX_HEADERS} lines")
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):
            raise RemoteProtocolError(f"malformed header line: {line[:100]!r}")
        key = name.decode("ascii").lower()
        text = value.strip(b" \t").decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return headers


def _tokens(value: str) -> list[str]:
    return [token.strip().lower() for token in value.split(",") if token.strip()]
