"""Bounded requests (issue 15): a body limit with a clear 413, a body
deadline, OpenAI's field limits and strict types, and connections that idle
or slow clients cannot exhaust."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any, cast

import httpx2
import openai
import pytest
import uvicorn
from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from app.api import limits, write_coalescing
from app.main import create_app
from app.settings import Settings
from tests.conftest import error_of

pytestmark = pytest.mark.timeout(60)

BETA = {"OpenAI-Beta": "assistants=v2"}
JSON = {**BETA, "content-type": "application/json"}
LIMIT = 1024 * 1024


@pytest.fixture
async def small_app(settings: Settings) -> AsyncIterator[FastAPI]:
    limited = settings.model_copy(update={"max_json_body_bytes": LIMIT, "http_body_timeout_seconds": 0.5})
    application = create_app(limited)
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
async def small(small_app: FastAPI) -> AsyncIterator[httpx2.AsyncClient]:
    transport = httpx2.ASGITransport(app=small_app)
    async with httpx2.AsyncClient(transport=transport, base_url="http://testserver") as http:
        yield http


@pytest.fixture
async def sdk(small: httpx2.AsyncClient) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url="http://testserver/v1", api_key="sk-test", http_client=small, max_retries=0)


def _too_large() -> dict[str, Any]:
    return {
        "error": {
            "message": f"Request body too large: the limit is {LIMIT} bytes.",
            "type": "invalid_request_error",
            "param": None,
            "code": "request_too_large",
        }
    }


async def test_a_body_over_the_limit_is_a_413_in_openais_envelope(sdk: openai.AsyncOpenAI) -> None:
    messages: Any = [{"role": "user", "content": "x" * 200_000} for _ in range(6)]  # 1.2 MB
    with pytest.raises(openai.APIStatusError) as refused:
        await sdk.beta.threads.create(messages=messages)
    assert refused.value.status_code == 413
    assert error_of(refused) == _too_large()["error"]  # the SDK unwraps the envelope
    thread = await sdk.beta.threads.create(messages=messages[:4])  # 0.8 MB: under the limit
    assert thread.id.startswith("thread_")


async def test_a_chunked_body_is_cut_off_at_the_limit(small: httpx2.AsyncClient) -> None:
    sent = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal sent
        yield b'{"metadata": {"k": "'
        while True:  # the server must stop reading, not the client stop sending
            sent += 64 * 1024
            yield b"x" * 64 * 1024

    response = await small.post("/v1/threads", content=endless(), headers=JSON)
    assert response.status_code == 413 and response.json() == _too_large()
    assert sent <= LIMIT + 2 * 64 * 1024


async def test_a_body_that_stops_arriving_is_a_408(small: httpx2.AsyncClient) -> None:
    never = asyncio.Event()

    async def stalled() -> AsyncIterator[bytes]:
        yield b'{"metadata": '
        await never.wait()  # a client that went quiet mid-body

    response = await small.post("/v1/threads", content=stalled(), headers=JSON)
    assert response.status_code == 408
    assert response.json()["error"]["message"] == "The request body did not arrive within 0.5 seconds."


async def test_any_method_with_a_declared_body_is_held_to_the_limit(small: httpx2.AsyncClient) -> None:
    """api/front.py skips the body's read only for a request that declares
    none; a GET or DELETE that declares one is bounded like a POST."""
    for method in ("GET", "DELETE", "POST"):
        response = await small.request(method, "/v1/threads/thread_x", content=b"x" * (LIMIT + 1), headers=JSON)
        assert response.status_code == 413 and response.json() == _too_large(), method
    answered = await small.get("/v1/threads/thread_x", headers={"content-length": "0"})
    assert answered.status_code == 404


async def test_multipart_uploads_are_not_held_to_the_json_limit(sdk: openai.AsyncOpenAI) -> None:
    uploaded = await sdk.files.create(file=("big.txt", b"a" * (2 * LIMIT)), purpose="assistants")
    assert uploaded.bytes == 2 * LIMIT


async def test_a_body_labelled_multipart_is_held_to_the_limit_on_every_other_route(small: httpx2.AsyncClient) -> None:
    """Only POST /files takes a multipart body (with its own limit): sent
    to a JSON route, one is bounded like any other body, not read whole."""
    multipart = {**BETA, "content-type": "multipart/form-data; boundary=zz"}
    for path in ("/v1/threads/runs", "/v1/threads", "/v1/assistants", "/v1/threads/thread_x/runs"):
        response = await small.post(path, content=b"x" * (LIMIT + 1), headers=multipart)
        assert response.status_code == 413 and response.json() == _too_large(), path


async def test_the_body_limit_layer_passes_the_same_uploads_as_the_server() -> None:
    """``BodyLimit`` (the limits as a layer of their own) takes the server's
    rule (``limits.is_upload``): only POST /files takes a multipart body unread."""
    multipart = {"content-type": "multipart/form-data; boundary=zz"}
    app = limits.BodyLimit(_hello, max_bytes=LIMIT, timeout_seconds=30)
    async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://testserver") as http:
        uploaded = await http.post("/v1/files", content=b"x" * (LIMIT + 1), headers=multipart)
        assert uploaded.status_code == 200 and uploaded.text == "hello"
        for method, path in (("POST", "/v1/threads"), ("PUT", "/v1/files"), ("POST", "/v1/files/file-x")):
            response = await http.request(method, path, content=b"x" * (LIMIT + 1), headers=multipart)
            assert response.status_code == 413 and response.json() == _too_large(), (method, path)


@pytest.mark.parametrize(
    ("path", "body", "param", "message"),
    [
        (
            "/v1/assistants",
            {"model": ""},
            "model",
            "Invalid 'model': string too short. Expected a string with minimum length 1, "
            "but got a string with length 0 instead.",
        ),
        (
            "/v1/assistants",
            {"model": "m" * 1000},
            "model",
            "Invalid 'model': string too long. Expected a string with maximum length 256, "
            "but got a string with length 1000 instead.",
        ),
        (
            "/v1/assistants",
            {"model": "gpt-4o", "tools": [{"type": "function", "function": {"name": "f", "strict": 0}}]},
            "tools[0].function.strict",
            "Invalid type for 'tools[0].function.strict': expected a boolean, but got an integer instead.",
        ),
        (
            "/v1/assistants",
            {"model": "gpt-4o", "temperature": True},
            "temperature",
            "Invalid type for 'temperature': expected a decimal, but got a boolean instead.",
        ),
        (
            "/v1/assistants",
            {"model": "gpt-4o", "tools": [{"type": "file_search", "file_search": {"max_num_results": "5"}}]},
            "tools[0].file_search.max_num_results",
            "Invalid type for 'tools[0].file_search.max_num_results': expected an integer, but got a string instead.",
        ),
        (
            "/v1/threads",
            {"messages": [{"role": "user", "content": "x" * 256_001}]},
            "messages[0].content",
            "Invalid 'messages[0].content': string too long. Expected a string with maximum length 256000, "
            "but got a string with length 256001 instead.",
        ),
    ],
)
async def test_field_limits_and_strict_types_as_openai_has_them(
    small: httpx2.AsyncClient, path: str, body: dict[str, Any], param: str, message: str
) -> None:
    response = await small.post(path, json=body, headers=BETA)
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["param"], error["message"]) == (param, message)


async def test_integers_are_still_numbers_and_limits_are_inclusive(small: httpx2.AsyncClient) -> None:
    response = await small.post("/v1/assistants", json={"model": "m" * 256, "temperature": 1}, headers=BETA)
    assert response.status_code == 200 and response.json()["temperature"] == 1
    thread = (await small.post("/v1/threads", json={}, headers=BETA)).json()["id"]
    response = await small.post(
        f"/v1/threads/{thread}/messages", json={"role": "user", "content": "x" * 256_000}, headers=BETA
    )
    assert response.status_code == 200


# --- connections: a real uvicorn server on a loopback port ---------------------------


async def _hello(scope: Scope, receive: Receive, send: Send) -> None:
    assert scope["type"] == "http"
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"hello"})


@pytest.fixture(params=["httptools", "h11"])
def parser(request: pytest.FixtureRequest) -> limits.HttpParser:
    """Each connection test runs on both of uvicorn's HTTP parsers."""
    return request.param  # type: ignore[no-any-return]


@contextlib.asynccontextmanager
async def _server(
    max_connections: int,
    header_timeout: float,
    parser: limits.HttpParser,
    max_header_bytes: int = 64 * 1024,
    inner: ASGIApp = _hello,
) -> AsyncIterator[int]:
    protocol = limits.guarded_protocol(
        max_connections, header_timeout, max_header_bytes=max_header_bytes, parser=parser
    )
    app = limits.BodyLimit(inner, max_bytes=LIMIT, timeout_seconds=30)
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=0,
        http=protocol,
        log_config=None,
        lifespan="off",
        h11_max_incomplete_event_size=max_header_bytes,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(10):
            while True:  # polled with a deadline: uvicorn offers no start-up event
                if server.started:
                    break
                await asyncio.sleep(0.01)
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        await task


async def _closed_by_server(reader: asyncio.StreamReader, seconds: float) -> bool:
    try:
        async with asyncio.timeout(seconds):
            return await reader.read(1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


async def _get(port: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    try:
        return await reader.read()
    except ConnectionResetError:  # refused by the cap
        return b""
    finally:
        writer.close()


async def test_idle_connections_beyond_the_cap_are_closed_and_logged_once(
    caplog: pytest.LogCaptureFixture, parser: limits.HttpParser
) -> None:
    caplog.set_level(logging.WARNING, logger="app.api")
    async with _server(max_connections=4, header_timeout=30, parser=parser) as port:
        opened = [await asyncio.open_connection("127.0.0.1", port) for _ in range(12)]
        closed = [await _closed_by_server(reader, 2) for reader, _ in opened[4:]]
        assert all(closed)
        assert not await _closed_by_server(opened[0][0], 0.2)  # the first four are kept
        for _, writer in opened:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        # Once those went away, a client gets through again.
        async with asyncio.timeout(10):
            while True:  # the server notices the closed connections on its own time
                if b"hello" in await _get(port):
                    break
                await asyncio.sleep(0.05)
    refusals = [record for record in caplog.records if "refused" in record.getMessage()]
    assert len(refusals) == 1


async def test_headers_that_never_complete_are_cut_off(parser: limits.HttpParser) -> None:
    async with _server(max_connections=100, header_timeout=0.5, parser=parser) as port:
        silent_reader, silent = await asyncio.open_connection("127.0.0.1", port)
        slow_reader, slow = await asyncio.open_connection("127.0.0.1", port)
        slow.write(b"GET / HTTP/1.1\r\nHost: x\r\n")  # ... and the rest never comes
        assert await _closed_by_server(silent_reader, 5)
        assert await _closed_by_server(slow_reader, 5)
        for writer in (silent, slow):
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        assert b"hello" in await _get(port)


async def test_a_keep_alive_connection_gets_a_header_deadline_for_its_next_request(
    parser: limits.HttpParser,
) -> None:
    async with _server(max_connections=100, header_timeout=0.5, parser=parser) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        async with asyncio.timeout(5):
            # The whole (chunked) response, up to its last chunk.
            assert b"hello" in await reader.readuntil(b"\r\n0\r\n\r\n")
        writer.write(b"GET / HTTP/1.1\r\n")  # trickles in, never finished
        assert await _closed_by_server(reader, 5)
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_a_declared_oversized_body_is_refused_before_it_is_sent(parser: limits.HttpParser) -> None:
    async with _server(max_connections=100, header_timeout=5, parser=parser) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 52428800\r\n\r\n"
        )
        async with asyncio.timeout(5):  # not one byte of the 50 MB was sent
            head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 413 ")
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_a_request_head_past_the_limit_is_refused(parser: limits.HttpParser) -> None:
    """http_max_header_bytes holds for both parsers: headers past it that have
    not ended are answered 400 and the connection closed."""
    async with _server(max_connections=100, header_timeout=5, parser=parser, max_header_bytes=4096) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n" + (b"X-Big: " + b"a" * 1000 + b"\r\n") * 5)
        async with asyncio.timeout(5):
            answer = await reader.read()
        assert answer.startswith(b"HTTP/1.1 400 "), answer[:60]
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
        assert b"hello" in await _get(port)  # a request within the limit is served


@pytest.mark.parametrize("parser", ["httptools"])  # h11 stops reading until the response ends
async def test_a_request_head_arriving_behind_a_running_response_is_bounded(parser: limits.HttpParser) -> None:
    """httptools reads on while a response runs: the next request's head is
    counted then too, and past the limit answered 400."""
    released = asyncio.Event()

    async def held(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"5")]})
        await released.wait()  # the response runs until the test ends
        await send({"type": "http.response.body", "body": b"hello"})

    async with _server(
        max_connections=100, header_timeout=30, parser=parser, max_header_bytes=4096, inner=held
    ) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            async with asyncio.timeout(5):  # well inside the 30 s header deadline
                assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200 ")
                writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")
                writer.write((b"X-Big: " + b"a" * 1000 + b"\r\n") * 8)  # never ends
                answer = await reader.read()
            assert b"HTTP/1.1 400 " in answer, answer[-200:]
        finally:
            released.set()
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


async def test_a_body_sent_after_its_413_is_not_taken_for_a_request_head(parser: limits.HttpParser) -> None:
    async with _server(max_connections=100, header_timeout=30, parser=parser, max_header_bytes=4096) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        size = LIMIT + 8192
        writer.write(f"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n".encode())
        async with asyncio.timeout(5):
            head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 413 ")
        # The client sends its body anyway, then another request.
        writer.write(b"x" * size + b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        received = b""
        with contextlib.suppress(ConnectionError):
            async with asyncio.timeout(5):
                received = await reader.read()  # the rest: the 413's body, then "hello" or a close
        assert b"HTTP/1.1 400 " not in received, received[-200:]
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


# --- writes: one send per event-loop turn (app/api/write_coalescing.py) -------------


class _RecordingTransport:
    """What reaches the socket's transport."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bytes]] = []

    def write(self, data: bytes) -> None:
        self.calls.append(("write", data))

    def close(self) -> None:
        self.calls.append(("close", b""))

    def abort(self) -> None:
        self.calls.append(("abort", b""))

    def write_eof(self) -> None:
        self.calls.append(("eof", b""))

    def get_extra_info(self, name: str) -> str:
        return f"info:{name}"


def _coalescing(recording: _RecordingTransport) -> write_coalescing.CoalescingTransport:
    transport = cast(asyncio.Transport, recording)  # duck-typed: only what the wrapper calls
    return write_coalescing.CoalescingTransport(transport, asyncio.get_running_loop())


async def test_the_writes_of_one_loop_turn_leave_in_one_send_in_order() -> None:
    recording = _RecordingTransport()
    transport = _coalescing(recording)
    transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
    transport.write(b"")  # nothing to send: no send of its own
    transport.write(bytearray(b"body"))
    assert recording.calls == []
    await asyncio.sleep(0)  # one turn of the loop: the flush scheduled by the first write runs
    assert recording.calls == [("write", b"HTTP/1.1 200 OK\r\n\r\nbody")]
    transport.write(b"next")
    await asyncio.sleep(0)
    assert recording.calls[1:] == [("write", b"next")]
    assert transport.get_extra_info("peername") == "info:peername"  # the rest goes through


async def test_close_sends_what_is_held_first_and_abort_drops_it() -> None:
    recording = _RecordingTransport()
    transport = _coalescing(recording)
    transport.write(b"last words")
    transport.close()
    assert recording.calls == [("write", b"last words"), ("close", b"")]
    aborted = _RecordingTransport()
    transport = _coalescing(aborted)
    transport.write(b"never sent")
    transport.abort()
    await asyncio.sleep(0)  # the scheduled flush finds nothing held
    assert aborted.calls == [("abort", b"")]


async def test_a_turns_writes_past_the_hold_limit_go_at_once_and_eof_sends_what_is_held() -> None:
    """A turn writing much (a large answer, a backlog of events) reaches the
    socket's transport at once, where flow control can see it and pause the
    response for a slow reader; write_eof sends what is held first."""
    recording = _RecordingTransport()
    transport = _coalescing(recording)
    big = b"x" * (write_coalescing.HOLD_AT_MOST_BYTES + 1)
    transport.write(b"head")
    transport.write(big)
    assert recording.calls == [("write", b"head" + big)]
    transport.write(b"tail")
    transport.write_eof()
    assert recording.calls[1:] == [("write", b"tail"), ("eof", b"")]
    await asyncio.sleep(0)  # the scheduled flushes find nothing held
    assert len(recording.calls) == 3


async def test_a_responses_end_sends_what_is_held_at_once() -> None:
    """The cycle's event set at a response's end (ResponseEndFlush) sends
    the held writes then, not at the flush the first write scheduled."""
    recording = _RecordingTransport()
    transport = _coalescing(recording)
    transport.write(b"head")
    transport.write(b"body")
    write_coalescing.ResponseEndFlush(transport).set()
    assert recording.calls == [("write", b"headbody")]
    await asyncio.sleep(0)  # the scheduled flush finds nothing held
    assert len(recording.calls) == 1


async def test_a_responses_last_bytes_go_before_what_the_loop_queued_earlier(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """httptools' protocol: a response's last write reaches the socket in
    the turn it is made, ahead of callbacks the loop queued before it (on
    the run path: a run task's steps after its end, a stream's client
    watcher), which the turn's scheduled flush would have waited behind."""
    order: list[str] = []
    flush = write_coalescing.CoalescingTransport.flush

    def noted_flush(self: write_coalescing.CoalescingTransport) -> None:
        if self._held:
            order.append("the response sent")
        flush(self)

    monkeypatch.setattr(write_coalescing.CoalescingTransport, "flush", noted_flush)

    async def answer(scope: Scope, receive: Receive, send: Send) -> None:
        asyncio.get_running_loop().call_soon(order.append, "a callback queued before")
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"5")]})
        await send({"type": "http.response.body", "body": b"hello"})

    async with _server(max_connections=8, header_timeout=30, parser="httptools", inner=answer) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:  # kept alive: a connection's close would send what is held too
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            async with asyncio.timeout(10):
                await reader.readuntil(b"hello")
        finally:
            writer.close()
    assert order[:2] == ["the response sent", "a callback queued before"]


async def test_a_streams_headers_are_not_held_until_its_first_event(parser: limits.HttpParser) -> None:
    """The head goes out in the turn it is written, even when the body's first
    bytes come much later (a stream waiting for a slow model)."""
    first_event = asyncio.Event()

    async def slow_stream(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        await first_event.wait()
        await send({"type": "http.response.body", "body": b"data: 1\n\n"})

    async with _server(max_connections=8, header_timeout=30, parser=parser, inner=slow_stream) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            async with asyncio.timeout(10):
                head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 OK\r\n")
            first_event.set()
            async with asyncio.timeout(10):
                rest = await reader.read()
            assert b"data: 1\n\n" in rest
        finally:
            writer.close()


def test_the_connection_cap_keeps_the_databases_descriptors_free(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under a soft limit of 1024 descriptors: 256 stay free on PostgreSQL,
    256 more on SQLite, two for each connection its pools may open (writers
    32 + 32, readers 32 + 32, polls 16 + 16)."""
    monkeypatch.setattr(limits.resource, "getrlimit", lambda _which: (1024, 4096))
    assert limits.connection_cap(1000) == 1024 - 256
    assert limits.connection_cap(1000, limits.SQLITE_RESERVED_FDS) == 1024 - 256 - 2 * (64 + 64 + 32)
    assert limits.connection_cap(100, limits.SQLITE_RESERVED_FDS) == 100
