"""app.llm.plain_http, the direct path's own HTTP/1.1 client for http://
bases: keep-alive, framing, timeouts and failures, each against a real
asyncio server in the test that answers exactly the bytes the test scripts
(so framings and misbehaviours aiohttp would never send can be sent)."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import select
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvloop
from httpx._utils import URLPattern, get_environment_proxies  # what its client reads, to compare

from app.llm import LLM, ChatRequest, LLMError, TextDelta, direct, plain_http
from app.llm.plain_http import Limits, Pool, ProxyEnvironment, Target, Timeouts, plain_target
from tests.runner.helpers import until

pytestmark = pytest.mark.timeout(30)


def _sse(*texts: str) -> bytes:
    """A streamed completion's body: one chunk per text, a usage chunk, [DONE]."""
    events = [{"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]} for text in texts]
    events.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    events.append({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": len(texts)}})
    encoded = [json.dumps(event, ensure_ascii=False).encode() for event in events]  # UTF-8 split across reads
    return b"".join(b"data: " + event + b"\n\n" for event in encoded) + b"data: [DONE]\n\n"


def chunked(body: bytes, size: int = 40, extension: bytes = b"") -> bytes:
    pieces = [body[start : start + size] for start in range(0, len(body), size)]
    framed = b"".join(b"%x%s\r\n%s\r\n" % (len(piece), extension, piece) for piece in pieces)
    return framed + b"0\r\n\r\n"


@dataclass
class Exchange:
    """One request as the server read it, on its connection."""

    connection: int  # 1 for the first connection the server accepted
    number: int  # 1 for the first request on that connection
    head: bytes
    body: bytes


Answer = Callable[[Exchange, asyncio.StreamWriter], Awaitable[bool]]  # False: close the connection


@dataclass
class Server:
    """A loopback HTTP server whose ``answer`` writes each response's bytes."""

    answer: Answer
    exchanges: list[Exchange] = field(default_factory=list)
    connections: int = 0
    closed_by_client: int = 0  # connections that ended with the client's EOF
    release: asyncio.Event = field(default_factory=asyncio.Event)  # ends answers that stall
    _server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

    async def stop(self) -> None:
        self.release.set()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        connection, number = self.connections, 0
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    self.closed_by_client += 1
                    return
                length = next(
                    (
                        int(line.split(b":")[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length:")
                    ),
                    0,
                )
                number += 1
                exchange = Exchange(connection, number, head, await reader.readexactly(length))
                self.exchanges.append(exchange)
                if not await self.answer(exchange, writer):
                    return
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            return
        finally:
            writer.close()


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Answer], Awaitable[Server]]]:
    servers: list[Server] = []

    async def start(answer: Answer) -> Server:
        server = Server(answer)
        await server.start()
        servers.append(server)
        return server

    try:
        yield start
    finally:
        for server in servers:
            await server.stop()


@pytest.fixture
async def pool() -> AsyncIterator[Pool]:
    made = Pool(Limits())
    try:
        yield made
    finally:
        made.close()


def sse_answer(framing: str = "chunked", *, texts: tuple[str, ...] = ("Hello", " world"), extra: bytes = b"") -> Answer:
    async def answer(exchange: Exchange, writer: asyncio.StreamWriter) -> bool:
        body = _sse(*texts)
        head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n" + extra
        if framing == "chunked":
            writer.write(head + b"Transfer-Encoding: chunked\r\n\r\n" + chunked(body))
        elif framing == "length":
            writer.write(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        else:  # to EOF
            writer.write(head + b"\r\n" + body)
            return False
        return b"connection: close" not in extra.lower()

    return answer


TIMEOUTS = Timeouts.uniform(5.0)


def target(server: Server, path: str = "/v1/chat/completions") -> Target:
    found = plain_target(f"http://127.0.0.1:{server.port}{path}")
    assert found is not None
    return found


async def text_of(pool: Pool, server: Server) -> str:
    response = await pool.request(target(server), {"Content-Type": "application/json"}, b"{}", TIMEOUTS)
    try:
        lines = [line async for line in response.aiter_lines()]
    finally:
        await response.aclose()
    chunks = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    return "".join(choice["delta"].get("content") or "" for chunk in chunks for choice in chunk["choices"])


# ------------------------------------------------------------------ framing and keep-alive


@pytest.mark.parametrize("framing", ["chunked", "length"])
async def test_sequential_requests_share_one_connection(
    serve: Callable[[Answer], Awaitable[Server]], pool: Pool, framing: str
) -> None:
    server = await serve(sse_answer(framing))
    for _ in range(5):
        assert await text_of(pool, server) == "Hello world"
    assert server.connections == 1 and pool.connections_made == 1
    assert [exchange.number for exchange in server.exchanges] == [1, 2, 3, 4, 5]
    head = server.exchanges[0].head.decode()
    assert head.startswith("POST /v1/chat/completions HTTP/1.1\r\n")
    assert f"Host: 127.0.0.1:{server.port}\r\n" in head and "Content-Length: 2\r\n" in head


async def test_chunk_extensions_and_trailers_are_read_past(
    serve: Callable[[Answer], Awaitable[Server]], pool: Pool
) -> None:
    async def answer(exchange: Exchange, writer: asyncio.StreamWriter) -> bool:
        framed = chunked(_sse("Hello", " world"), size=7, extension=b';name="v";flag')
        framed = framed.removesuffix(b"0\r\n\r\n") + b"0;last\r\nX-Checksum: abc\r\nX-Other: 1\r\n\r\n"
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + framed)
        return True

    server = await serve(answer)
    assert await text_of(pool, server) == "Hello world"
    assert await text_of(pool, server) == "Hello world"  # the trailers did not reach the next answer
    assert server.connections == 1


async def test_a_body_without_length_is_read_to_eof_and_its_connection_not_reused(
    serve: Callable[[Answer], Awaitable[Server]], pool: Pool
) -> None:
    server = await serve(sse_answer("eof"))
    assert await text_of(pool, server) == "Hello world"
    assert await text_of(pool, server) == "Hello world"
    assert server.connections == 2 and pool.open_connections == 0


@pytest.mark.parametrize(
    ("status_line", "extra"),
    [(b"HTTP/1.1 200 OK", b"Connection: close\r\n"), (b"HTTP/1.0 200 OK", b"")],
)
async def test_connection_close_and_http_1_0_answers_are_not_reused(
    serve: Callable[[Answer], Awaitable[Server]], pool: Pool, status_line: bytes, extra: bytes
) -> None:
    async def answer(exchange: Exchange, writer: asyncio.StreamWriter) -> bool:
        body = _sse("Hi")
        writer.write(status_line + b"\r\n" + extra + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        return False

    server = await serve(answer)
    assert await text_of(pool, server) == "Hi"
    assert await text_of(pool, server) == "Hi"
    assert server.connections == 2 and pool.open_connections == 0


async def test_interim_answers_gzip_and_crlf_lines(serve: Callable[[Answer], Awaitable[Server]], pool: Pool) -> None:
    """A 103 before the answer is skipped; a gzip body (sent although we ask
    for identity) is decoded; CRLF and CR line ends split lines as LF does."""

    async def answer(exchange: Exchange, writer: asyncio.StreamWriter) -> bool:
        body = gzip.compress(_sse("Hé", "llo").replace(b"\n\n", b"\r\n\r"))
        writer.write(
            b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        )
        return True

    server = await serve(answer)
    assert await text_of(pool, server) == "Héllo"
    assert "accept-encoding: identity" in server.exchanges[0].head.decode().lower()
    assert pool.open_connections == 1  # read to its end: back in the pool


async def test_idle_connections_expire(serve: Callable[[Answer], Awaitable[Server]]) -> None:
    pool = Pool(Limits(keepalive_expiry=0.05))
    try:
        server = await serve(sse_answer())
        assert await text_of(pool, server) == "Hello world"
        assert pool.open_connections == 1
        await _until(lambda: server.closed_by_client == 1)  # the expiry closed it
        assert pool.open_connections == 0
        assert await text_of(pool, server) == "Hello world"
        assert server.connections == 2
    finally:
        pool.close()


async def test_the_pool_limit_makes_a_request_wait_for_a_slot(serve: Callable[[Answer], Awaitable[Server]]) -> None:
    pool = Pool(Limits(max_connections=1))
    try:
        server = await serve(sse_answer())
        first = await pool.request(target(server), {}, b"{}", TIMEOUTS)
        second = asyncio.ensure_future(text_of(pool, server))
        with pytest.raises(plain_http.PoolTimeout):
            await pool.request(target(server), {}, b"{}", Timeouts(5.0, 5.0, 5.0, pool=0.05))
        assert not second.done()
        await first.aread()  # read to its end: its connection serves the waiting request
        assert await second == "Hello world"
        assert server.connections == 1
    finally:
        pool.close()


# ------------------------------------------------------------------ reused connections closed by the server


def _dropping_the_second_request() -> Answer:
    """An SSE answer, except to the second request on the first connection:
    read, then the connection closed without a byte of answer."""
    respond = sse_answer()

    async def answer(exchange: Exchange, writer: asyncio.StreamWriter) -> bool:
        if (exchange.connection, exchange.number) == (1, 2):
            return False
        return await respond(exchange, writer)

    return answer


async def test_a_request_the_server_read_is_never_sent_again(
    serve: Callable[[Answer], Awaitable[Server]], pool: Pool
) -> None:
    """The server reads the second request on a reused connection and closes
    it without a byte of answer (it may have acted on it): an error, never a
    second send from the pool (as httpx); the next request opens a fresh
    connection."""
    server = await serve(_dropping_the_second_request())
    assert await text_of(pool, server) == "Hello world"
    with pytest.raises(plain_http.RemoteProtocolError, match="closed the connection before the status line"):
        await text_of(pool, server)
    assert [(exchange.connection, exchange.number) for exchange in server.exchanges] == [(1, 1), (1, 2)]
    assert pool.open_connections == 0
    assert await text_of(pool, server) == "Hello world"
    assert [(exchange.connection, exchange.number) for exchange in server.exchanges][2:] == [(2, 1)]


@pytest.mark.parametrize(("max_retries", "sent"), [(0, 2), (1, 3)])
async def test_the_direct_path_resends_a_dropped_request_only_within_max_retries(
    serve: Callable[[Answer], Awaitable[Server]],
    tmp_path: Path,
    llms: list[LLM],
    monkeypatch: pytest.MonkeyPatch,
    max_retries: int,
    sent: int,
) -> None:
    """``max_retries: 0`` never sends a call twice; with retries left, the
    call is sent again (on a fresh connection) as for any connection error."""
    monkeypatch.setattr(direct, "_backoff", lambda attempt, headers: 0.0)  # the wait is not what is tested
    server = await serve(_dropping_the_second_request())
    llm = LLM.from_config(_config(tmp_path, server.base, max_retries=max_retries))
    llms.append(llm)
    chat = ChatRequest("m", [{"role": "user", "content": "hi"}])
    assert [event.text async for event in llm.stream(chat) if isinstance(event, TextDelta)] == ["Hello", " world"]
    if max_retries == 0:
        failure = await _failure(llm)
        assert (failure.code, failure.message) == ("server_error", FAILED + "(HTTP 500): Connection error.")
    else:
        assert [event.text async for event in llm.stream(chat) if isinstance(event, TextDelta)] == ["Hello", " world"]
    assert len(server.exchanges) == sent


async def test_an_idle_connection_whose_close_is_still_in_the_kernel_is_not_reused(
    serve: Callable[[Answer], Awaitable[Server]], pool: Pool
) -> None:
    """The server closed the idle connection and its FIN has reached our
    socket, but the event loop has not read it yet: the pool's check before
    reuse sees it, and the request goes on a fresh connection (nothing was
    sent on the closed one, so this is safe)."""
    respond = sse_answer("length")

    async def answer(exchange: Exchange, writer: asyncio.StreamWriter) -> bool:
        await respond(exchange, writer)
        return False  # closes after answering, without saying so

    server = await serve(answer)
    assert await text_of(pool, server) == "Hello world"
    [idle] = [connection for connections in pool._idle.values() for connection in connections]
    assert idle.transport is not None
    # Wait (blocking the loop, so it cannot read the EOF) until the FIN is in the kernel.
    readable, _, _ = select.select([idle.transport.get_extra_info("socket").fileno()], [], [], 5.0)
    assert readable and not idle.ended  # the loop has not seen it: only the kernel check can
    assert await text_of(pool, server) == "Hello world"
    assert [(exchange.connection, exchange.number) for exchange in server.exchanges] == [(1, 1), (2, 1)]


async def test_a_fresh_connection_closed_without_an_answer_is_not_retried(
    serve: Callable[[Answer], Awaitable[Server]], pool: Pool
) -> None:
    async def answer(exchange: Exchange, writer: asyncio.StreamWriter) -> bool:
        return False

    server = await serve(answer)
    with pytest.raises(plain_http.RemoteProtocolError):
        await text_of(pool, server)
    assert len(server.exchanges) == 1


async def test_an_idle_connection_closed_by_the_server_is_not_reused(
    serve: Callable[[Answer], Awaitable[Server]], pool: Pool
) -> None:
    respond = sse_answer()

    async def answer(exchange: Exchange, writer: asyncio.StreamWriter) -> bool:
        await respond(exchange, writer)
        return False  # closes after answering, without saying so

    server = await serve(answer)
    assert await text_of(pool, server) == "Hello world"
    await _until(lambda: server.connections == 1 and not pool._active and _idle_ended(pool))
    assert await text_of(pool, server) == "Hello world"
    assert [(exchange.connection, exchange.number) for exchange in server.exchanges] == [(1, 1), (2, 1)]


def _idle_ended(pool: Pool) -> bool:
    return all(connection.ended for connections in pool._idle.values() for connection in connections)


# ------------------------------------------------------------------ through the direct path: pinned texts


def _config(tmp_path: Path, base: str, **params: Any) -> Path:
    path = tmp_path / "models.json"
    litellm_params = {"model": "openai/*", "api_base": base, "api_key": "k", "max_retries": 0, **params}
    path.write_text(json.dumps({"model_list": [{"model_name": "*", "litellm_params": litellm_params}]}))
    return path


async def _failure(llm: LLM) -> LLMError:
    with pytest.raises(LLMError) as failure:
        [event async for event in llm.stream(ChatRequest("m", [{"role": "user", "content": "hi"}]))]
    return failure.value


FAILED = "The provider failed for model 'm' (openai/m) "


@pytest.mark.parametrize(
    ("head", "message"),
    [
        (b"GARBAGE\r\n\r\n", FAILED + "(HTTP 500): Connection error."),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", FAILED + "(HTTP 500): Connection error."),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 12x\r\n\r\n", FAILED + "(HTTP 500): Connection error."),
        (b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n", FAILED + "(HTTP 500): Connection error."),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", FAILED + "(HTTP 500): Connection error."),
        # digits str.isdigit() takes but int() does not; more digits than int() reads
        (b"HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\n\r\n", FAILED + "(HTTP 500): Connection error."),
        (b"HTTP/1.1 200 OK\r\nContent-Length: " + b"1" * 5000 + b"\r\n\r\n", FAILED + "(HTTP 500): Connection error."),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"f" * 17 + b"\r\n", FAILED + "(HTTP 500): "
         "Connection error."),
        # a coding under the chunks would hand compressed bytes back as the text
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", FAILED + "(HTTP 500): Connection error."),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", FAILED + "(HTTP 500): Connection error."),
        (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n", FAILED + "(HTTP 500): Connection error."),
        (b"HTTP/1.1 200 OK\r\nContent-Encoding: br\r\nContent-Length: 1\r\n\r\nx", FAILED + "(HTTP 500): "
         "unsupported Content-Encoding: br"),
    ],
)  # fmt: skip
async def test_a_malformed_answer_is_a_provider_error_at_once(
    serve: Callable[[Answer], Awaitable[Server]], tmp_path: Path, llms: list[LLM], head: bytes, message: str
) -> None:
    """Garbage where a status line, header, length or chunk belongs fails the
    call at once (the server keeps its connection open: no hang until a timeout)."""

    async def answer(exchange: Exchange, writer: asyncio.StreamWriter) -> bool:
        writer.write(head)
        await writer.drain()
        await server.release.wait()
        return False

    server = await serve(answer)
    llm = LLM.from_config(_config(tmp_path, server.base, timeout=20))
    llms.append(llm)
    failure = await asyncio.wait_for(_failure(llm), 10)
    assert (failure.code, failure.message) == ("server_error", message)


async def test_sequential_completions_of_the_direct_path_share_one_connection(
    serve: Callable[[Answer], Awaitable[Server]], tmp_path: Path, llms: list[LLM]
) -> None:
    server = await serve(sse_answer())
    llm = LLM.from_config(_config(tmp_path, server.base))
    llms.append(llm)
    chat = ChatRequest("m", [{"role": "user", "content": "hi"}])
    for _ in range(4):
        events = [event async for event in llm.stream(chat)]
        assert [event.text for event in events if isinstance(event, TextDelta)] == ["Hello", " world"]
    assert server.connections == 1 and len(server.exchanges) == 4
    head = server.exchanges[0].head.decode().lower()
    assert "authorization: bearer k\r\n" in head and "accept: text/event-stream\r\n" in head


async def test_silent_headers_are_the_read_timeouts_error(
    serve: Callable[[Answer], Awaitable[Server]], tmp_path: Path, llms: list[LLM]
) -> None:
    async def answer(exchange: Exchange, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n")  # and then nothing
        await server.release.wait()
        return False

    server = await serve(answer)
    llm = LLM.from_config(_config(tmp_path, server.base, timeout=0.3))
    llms.append(llm)
    failure = await _failure(llm)
    assert (failure.code, failure.message) == ("server_error", FAILED + "(HTTP 408): Request timed out.")


async def test_a_stream_closed_early_closes_its_connection_and_the_next_call_is_answered(
    serve: Callable[[Answer], Awaitable[Server]], tmp_path: Path, llms: list[LLM]
) -> None:
    """A run cancelled mid-answer (or stopped by the idle limit): the rest of
    its body must not be read as the next call's answer."""

    async def answer(exchange: Exchange, writer: asyncio.StreamWriter) -> bool:
        body = _sse(f"First{exchange.connection}", " more")
        first, _, rest = body.partition(b"\n\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(first + b"\n\n")[:-5])
        if exchange.connection == 1:
            await writer.drain()
            await server.release.wait()  # the rest is never sent on the first connection
            return False
        writer.write(chunked(rest))
        return True

    server = await serve(answer)
    llm = LLM.from_config(_config(tmp_path, server.base))
    llms.append(llm)
    chat = ChatRequest("m", [{"role": "user", "content": "hi"}])
    stream = llm.stream(chat)
    assert await anext(stream) == TextDelta("First1")
    await stream.aclose()  # as RunExecution closes a cancelled run's stream
    events = [event async for event in llm.stream(chat)]
    assert [event.text for event in events if isinstance(event, TextDelta)] == ["First2", " more"]
    assert server.connections == 2


async def test_cancelling_a_read_in_flight_closes_its_connection(
    serve: Callable[[Answer], Awaitable[Server]], pool: Pool
) -> None:
    async def answer(exchange: Exchange, writer: asyncio.StreamWriter) -> bool:
        if exchange.connection == 1:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
            await writer.drain()
            await server.release.wait()
            return False
        return await sse_answer()(exchange, writer)

    server = await serve(answer)
    response = await pool.request(target(server), {}, b"{}", TIMEOUTS)
    pieces = response.aiter_raw()
    assert await anext(pieces) == b"partial"
    reading = asyncio.ensure_future(anext(pieces))
    connection = response._connection
    await _until(lambda: connection is not None and connection._waiter is not None)  # waiting for the rest
    reading.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reading
    await response.aclose()
    assert pool.open_connections == 0
    assert await text_of(pool, server) == "Hello world"
    assert server.connections == 2


# ------------------------------------------------------------------ which client serves a URL


async def test_a_proxy_from_the_environment_sends_the_call_through_httpx(
    serve: Callable[[Answer], Awaitable[Server]], tmp_path: Path, llms: list[LLM], monkeypatch: pytest.MonkeyPatch
) -> None:
    """HTTP_PROXY set: the request goes to the proxy (httpx's absolute-form
    request line); with the host in NO_PROXY it goes straight to the server."""
    proxy = await serve(sse_answer("length", texts=("via proxy",)))
    server = await serve(sse_answer("length", texts=("direct",)))
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.port}")
    chat = ChatRequest("m", [{"role": "user", "content": "hi"}])

    proxied = LLM.from_config(_config(tmp_path, server.base))
    llms.append(proxied)
    events = [event async for event in proxied.stream(chat)]
    assert [event.text for event in events if isinstance(event, TextDelta)] == ["via proxy"]
    assert proxy.exchanges[0].head.startswith(f"POST {server.base}/chat/completions HTTP/1.1".encode())

    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
    straight = LLM.from_config(_config(tmp_path, server.base))
    llms.append(straight)
    events = [event async for event in straight.stream(chat)]
    assert [event.text for event in events if isinstance(event, TextDelta)] == ["direct"]
    assert len(proxy.exchanges) == 1 and len(server.exchanges) == 1


async def test_the_first_calls_through_httpx_share_one_client_and_fail_as_litellm_reports(
    tmp_path: Path, llms: list[LLM], monkeypatch: pytest.MonkeyPatch
) -> None:
    """httpx's client is made for the first call plain_http does not take
    (a proxy here), in a thread: two such calls at once wait for the same
    one, and httpx's errors (a refused proxy: its ConnectError) are mapped
    as plain_http's are, to litellm's "Connection error."."""
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # nothing listens there
    made = _counting_httpx_clients(monkeypatch)
    llm = LLM.from_config(_config(tmp_path, "http://127.0.0.1:9/v1"))
    llms.append(llm)
    async with asyncio.timeout(30):
        failures = await asyncio.gather(_failure(llm), _failure(llm))
    assert [failure.message.rsplit(": ", 1)[-1] for failure in failures] == ["Connection error."] * 2
    clients = llm._direct_client().here()
    assert len(made) == 1 and clients._httpx is made[0]


def _counting_httpx_clients(monkeypatch: pytest.MonkeyPatch, *failures: BaseException) -> list[httpx.AsyncClient]:
    """The httpx clients direct makes from now on; its first attempts raise
    ``failures``, one each."""
    made: list[httpx.AsyncClient] = []
    real = direct._new_httpx_client
    pending = list(failures)

    def new_client() -> httpx.AsyncClient:
        if pending:
            raise pending.pop(0)
        made.append(real())
        return made[-1]

    monkeypatch.setattr(direct, "_new_httpx_client", new_client)
    return made


async def test_a_failed_making_of_the_httpx_client_is_tried_again_by_the_next_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A transient failure making the client (a CA bundle unreadable for a
    moment) fails the calls that waited for it, not every later one: the
    next call makes it again, as each call did when it was made at start."""
    made = _counting_httpx_clients(monkeypatch, OSError("Too many open files"))
    clients = direct._LoopClients()
    try:
        async with asyncio.timeout(30):
            with pytest.raises(OSError, match="Too many open files"):
                await clients.httpx_client()
            client = await clients.httpx_client()
        assert made == [client]
    finally:
        await clients.aclose()
    assert client.is_closed


async def test_an_httpx_client_made_after_close_is_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    """aclose() while the client is still being made (in its thread): the
    client, once made, is closed, not left open with nobody to close it."""
    release = asyncio.Event()
    loop = asyncio.get_running_loop()
    made = _counting_httpx_clients(monkeypatch)
    counting = direct._new_httpx_client

    def slow_client() -> httpx.AsyncClient:
        asyncio.run_coroutine_threadsafe(release.wait(), loop).result(timeout=30)
        return counting()

    monkeypatch.setattr(direct, "_new_httpx_client", slow_client)
    clients = direct._LoopClients()
    async with asyncio.timeout(30):
        call = asyncio.create_task(clients.httpx_client())
        await asyncio.sleep(0)
        await clients.aclose()
        release.set()
        await call
    await until(lambda: made and made[0].is_closed, "the client made after aclose() to be closed")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://127.0.0.1:8000/v1/chat", Target("127.0.0.1", 8000, "127.0.0.1:8000", "/v1/chat")),
        ("http://VLLM.local/v1/x?api-version=1", Target("vllm.local", 80, "vllm.local", "/v1/x?api-version=1")),
        ("http://[::1]:8080/x", Target("::1", 8080, "[::1]:8080", "/x")),
        ("https://api.example.com/v1/x", None),  # TLS: httpx
        ("http://user:pw@host/x", None),  # credentials in the URL: httpx
        ("http://host/a b", None),  # needs percent-encoding: httpx
        ("http://hôst/x", None),  # IDNA: httpx
        ("http://host:port/x", None),
        ("http://host:\u00b2/x", None),  # a digit to str.isdigit(), not to int()
        ("http://[::1]:\u00b2/x", None),
        ("http://host:" + "9" * 5000 + "/x", None),  # more digits than int() reads
    ],
)  # fmt: skip
def test_which_urls_plain_http_sends(url: str, expected: Target | None) -> None:
    assert plain_target(url) == expected


@pytest.mark.parametrize(
    ("no_proxy", "host", "proxied"),
    [
        ("", "127.0.0.1", True),
        ("127.0.0.1", "127.0.0.1", False),
        ("127.0.0.2", "127.0.0.1", True),
        ("localhost", "localhost", False),
        ("example.com", "example.com", False),
        ("example.com", "api.example.com", False),
        ("example.com", "myexample.com", True),
        (".example.com", "example.com", True),
        (".example.com", "api.example.com", False),
        ("example.com:8000", "example.com", True),  # a port: left to httpx
        ("10.0.0.0/8", "10.1.2.3", True),  # a range: left to httpx
        ("::1", "::1", False),
        ("*", "anything", False),
    ],
)
def test_no_proxy_as_httpx_reads_it(monkeypatch: pytest.MonkeyPatch, no_proxy: str, host: str, proxied: bool) -> None:
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy", "REQUEST_METHOD"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ALL_PROXY", "http://proxy:3128")
    monkeypatch.setenv("NO_PROXY", no_proxy)
    assert ProxyEnvironment.read().applies_to(host) is proxied


def test_an_https_proxy_alone_does_not_apply_to_http(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")
    assert not ProxyEnvironment.read().applies_to("127.0.0.1")


async def _until(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


# ------------------------------------------------------------------ what the review found (issue 17)


async def test_a_host_header_given_is_sent_as_given(
    serve: Callable[[Answer], Awaitable[Server]], tmp_path: Path, llms: list[LLM]
) -> None:
    """``extra_headers: {"Host": ...}`` (a virtual host behind a gateway)
    goes out as given, once, as httpx sends it."""
    server = await serve(sse_answer())
    llm = LLM.from_config(_config(tmp_path, server.base, extra_headers={"Host": "vhost.internal"}))
    llms.append(llm)
    events = [event async for event in llm.stream(ChatRequest("m", [{"role": "user", "content": "hi"}]))]
    assert [event.text for event in events if isinstance(event, TextDelta)] == ["Hello", " world"]
    hosts = [line for line in server.exchanges[0].head.split(b"\r\n") if line.lower().startswith(b"host:")]
    assert hosts == [b"Host: vhost.internal"]


async def test_a_port_int_cannot_read_is_an_unusable_routing_entry(tmp_path: Path, llms: list[LLM]) -> None:
    llm = LLM.from_config(_config(tmp_path, "http://127.0.0.1:\u00b2/v1"))
    llms.append(llm)
    failure = await _failure(llm)
    assert failure.code == "server_error"
    assert failure.message.startswith("The routing entry for model 'm' (openai/m) is not usable: ")


async def test_a_101_answer_is_an_error_and_its_connection_is_closed(
    serve: Callable[[Answer], Awaitable[Server]], pool: Pool
) -> None:
    async def answer(exchange: Exchange, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n")
        await writer.drain()
        await server.release.wait()
        return False

    server = await serve(answer)
    with pytest.raises(plain_http.RemoteProtocolError, match="101"):
        await pool.request(target(server), {}, b"{}", TIMEOUTS)
    assert pool.open_connections == 0  # what follows a 101 is not HTTP/1.1: never reused


async def test_closing_the_pool_during_a_body_read_to_eof_fails_the_read(
    serve: Callable[[Answer], Awaitable[Server]],
) -> None:
    """The server's shutdown closes a stream whose body ends at EOF: the
    reader gets an error, not a body that looks complete."""

    async def answer(exchange: Exchange, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\n\r\npart")
        await writer.drain()
        await server.release.wait()
        return False

    server = await serve(answer)
    pool = Pool(Limits())
    try:
        response = await pool.request(target(server), {}, b"{}", TIMEOUTS)
        pieces = response.aiter_raw()
        assert await anext(pieces) == b"part"
        reading = asyncio.ensure_future(anext(pieces))
        connection = response._connection
        await _until(lambda: connection is not None and connection._waiter is not None)  # waiting for the rest
        pool.close()
        with pytest.raises(plain_http.ReadError, match="the connection pool was closed"):
            await reading
    finally:
        pool.close()


_NO_PROXY_ENTRIES = [
    "example.com", ".example.com", "*.example.com", "a.example.com", "ample.com", "com", ".com", "EXAMPLE.COM",
    " example.com ", "example.com.", "xn--bcher-kva.example", "localhost", "LOCALHOST", "localhost:8000",
    "127.0.0.1", "127.0.0.1:8000", "1.2.3", "0.0.1", "::1", "[::1]", "10.0.0.0/8", "http://example.com", "*",
]  # fmt: skip
_HOSTS = [
    "example.com", "a.example.com", "a.b.example.com", "notexample.com", "example.com.", "localhost", "vllm",
    "127.0.0.1", "10.0.0.1", "10.0.0.0", "::1",
]  # fmt: skip


@pytest.mark.parametrize("variables", [("NO_PROXY", "HTTP_PROXY"), ("no_proxy", "all_proxy")])
@pytest.mark.parametrize("entry", _NO_PROXY_ENTRIES)
def test_no_proxy_never_sends_plain_what_httpx_would_proxy(
    monkeypatch: pytest.MonkeyPatch, entry: str, variables: tuple[str, str]
) -> None:
    """Against httpx's own reading of the environment: where the two differ,
    it is always that we hand the URL to httpx (which then goes direct), never
    that we send straight what httpx would send through the proxy."""
    for name in list(os.environ):
        if name.lower().endswith("_proxy") or name == "REQUEST_METHOD":
            monkeypatch.delenv(name)
    no_proxy, proxy = variables
    monkeypatch.setenv(proxy, "http://proxy:3128")
    monkeypatch.setenv(no_proxy, entry)
    ours = ProxyEnvironment.read()
    try:
        mounts = sorted((URLPattern(pattern), to) for pattern, to in get_environment_proxies().items())
    except httpx.InvalidURL:  # httpx refuses the variable (its client would not start): ours must hand it over
        assert all(ours.applies_to(host) for host in _HOSTS)
        return
    for host in _HOSTS:
        url = httpx.URL(f"http://[{host}]:8000/x" if ":" in host else f"http://{host}:8000/x")
        httpx_proxies = next((to for pattern, to in mounts if pattern.matches(url)), None) is not None
        assert ours.applies_to(host) or not httpx_proxies, f"{host} goes straight, httpx would proxy it"


def test_completions_on_uvloop_share_one_connection(tmp_path: Path) -> None:
    """The server's event loop is uvloop when installed
    (settings.event_loop): its transports are not asyncio.Transport
    subclasses and its sockets are pseudo-sockets, which the connection and
    the check before reuse must take as they are."""

    async def scenario() -> None:
        server = Server(sse_answer())
        await server.start()
        llm = LLM.from_config(_config(tmp_path, server.base))
        try:
            chat = ChatRequest("m", [{"role": "user", "content": "hi"}])
            for _ in range(3):
                events = [event async for event in llm.stream(chat)]
                assert [event.text for event in events if isinstance(event, TextDelta)] == ["Hello", " world"]
            assert [(exchange.connection, exchange.number) for exchange in server.exchanges] == [(1, 1), (1, 2), (1, 3)]
        finally:
            await llm.aclose()
            await server.stop()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())


async def test_a_waiter_cancelled_as_it_is_woken_passes_the_free_slot_on(
    serve: Callable[[Answer], Awaitable[Server]],
) -> None:
    """Pool limit 1, two requests waiting: the first is woken for the freed
    slot and cancelled in the same turn; the second must get the slot, not
    wait out the pool timeout."""
    pool = Pool(Limits(max_connections=1))
    try:
        server = await serve(sse_answer("length"))
        first = await pool.request(target(server), {}, b"{}", TIMEOUTS)
        patient = Timeouts(5.0, 5.0, 5.0, pool=5.0)
        woken = asyncio.ensure_future(pool.request(target(server), {}, b"{}", patient))
        waiting = asyncio.ensure_future(pool.request(target(server), {}, b"{}", patient))
        connection = first._connection
        await _until(
            lambda: len(pool._slot_waiters) == 2 and connection is not None and len(connection.buffer) == first._left
        )
        await first.aread()  # all buffered: no await suspends, the release wakes ``woken``...
        woken.cancel()  # ...which is cancelled before it runs
        with pytest.raises(asyncio.CancelledError):
            await woken
        response = await asyncio.wait_for(waiting, 2.0)
        assert b"Hello" in await response.aread()
    finally:
        pool.close()


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"api_key": "sk-\u2019quoted"}, "is not usable: the header {key_header} is not ASCII"),
        ({"extra_headers": {"X-Team": "caf\u00e9"}}, "is not usable: the header X-Team is not ASCII"),
        ({"timeout": float("nan")}, "is not usable: timeout nan is not a positive number of seconds"),
    ],
    ids=["key", "extra-header", "nan-timeout"],
)
@pytest.mark.parametrize("model", ["openai/*", "anthropic/*"])
async def test_a_routing_entry_the_client_cannot_send_is_named_not_raised(
    tmp_path: Path, llms: list[LLM], params: dict[str, Any], expected: str, model: str
) -> None:
    """A header value outside ASCII (a typographic quote pasted into a key)
    or a NaN timeout escaped llm.stream as a raw UnicodeEncodeError /
    ValueError on both clients (review): the entry is named as unusable,
    the key not shown; on the OpenAI-shaped and the Anthropic direct routes
    alike (both check through direct.call_limits)."""
    llm = LLM.from_config(_config(tmp_path, "http://127.0.0.1:9/v1", **{"model": model, **params}))
    assert llm.route("m").direct
    llms.append(llm)
    message = (await _failure(llm)).message
    key_header = "x-api-key" if model.startswith("anthropic/") else "Authorization"
    assert message.endswith(expected.format(key_header=key_header))
    assert "quoted" not in message and "caf" not in message


async def test_a_host_name_idna_refuses_is_a_connection_error(tmp_path: Path, llms: list[LLM]) -> None:
    """``http://a..b`` passed our URL check and the codec's UnicodeError
    escaped llm.stream (review); httpx calls it a connection error, as we now do."""
    llm = LLM.from_config(_config(tmp_path, "http://a..b:9/v1"))
    llms.append(llm)
    assert (await _failure(llm)).message == FAILED + "(HTTP 500): Connection error."
