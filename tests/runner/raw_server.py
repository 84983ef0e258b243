"""A raw TCP server on loopback, for plain_http tests that need a server
behaving in ways no HTTP server would (answering in pieces, never reading,
recording what arrives), with a pool aimed at it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from app.llm import plain_http

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def serving(handle: Handler) -> AsyncIterator[tuple[plain_http.Pool, plain_http.Target]]:
    """A pool, and the chat completions target of a server whose connections
    ``handle`` serves; both closed after."""
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    pool = plain_http.Pool()
    try:
        port = server.sockets[0].getsockname()[1]
        target = plain_http.plain_target(f"http://127.0.0.1:{port}/v1/chat/completions")
        assert target is not None
        yield pool, target
    finally:
        pool.close()
        server.close()
        await server.wait_closed()
