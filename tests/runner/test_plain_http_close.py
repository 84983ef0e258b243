"""plain_http's Pool.close() (the server's shutdown) while a request is
still being sent to a server that stopped reading: the send fails at once
with the pool's reason, instead of waiting out its write timeout (a close
of the transport waited for the unsent bytes to be flushed first)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from app.llm import plain_http
from app.llm.plain_http import Timeouts
from tests.runner.raw_server import serving
from tests.runner.test_plain_http import _until

pytestmark = pytest.mark.timeout(30)


async def test_closing_the_pool_fails_a_send_blocked_on_a_full_buffer() -> None:
    accepted = asyncio.Event()
    held: list[asyncio.StreamWriter] = []

    async def never_read(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # reads nothing: the client's send fills the kernel's buffers
        accepted.set()

    async with serving(never_read) as (pool, target):
        try:
            body = b"x" * (16 * 1024 * 1024)  # more than the loopback's buffers hold
            sending = asyncio.ensure_future(pool.request(target, {}, body, Timeouts.uniform(20.0)))
            await accepted.wait()
            connection = next(iter(pool._active))
            # until the send waits for the kernel's buffer to drain
            await _until(lambda: connection._drained is not None and not connection._drained.done(), 10.0)
            pool.close()
            with pytest.raises(plain_http.WriteError, match="the connection pool was closed"):
                await asyncio.wait_for(sending, 5)
        finally:
            for writer in held:
                writer.close()


async def test_closing_the_pool_while_a_connection_is_made_sends_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """A request whose connection was still being made when the pool closed
    is not sent once it connects (the provider would get, and bill, a call
    made after shutdown began)."""
    received = bytearray()
    closed = asyncio.Event()

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while chunk := await reader.read(65536):
                received.extend(chunk)
        finally:
            writer.close()
            closed.set()

    loop = asyncio.get_running_loop()
    connect, gate = loop.create_connection, asyncio.Event()

    async def held_connect(*args: Any, **kwargs: Any) -> Any:
        await gate.wait()  # the connection is still being made when the pool closes
        return await connect(*args, **kwargs)

    async with serving(record) as (pool, target):
        monkeypatch.setattr(loop, "create_connection", held_connect)
        sending = asyncio.ensure_future(pool.request(target, {}, b'{"model": "m"}', Timeouts.uniform(5.0)))
        await _until(lambda: bool(pool._active), 10.0)
        pool.close()
        gate.set()
        with pytest.raises(plain_http.WriteError, match="the connection pool was closed"):
            await asyncio.wait_for(sending, 5)
        await asyncio.wait_for(closed.wait(), 5)
        assert bytes(received) == b""
