"""plain_http reads the whole chunks a chunked body already has in its
buffer at once (issue 17): the body, and a malformed body's error, are the
same whether the chunks come together in one write or a byte at a time."""

from __future__ import annotations

import asyncio

import pytest

from app.llm import plain_http
from app.llm.plain_http import Timeouts
from tests.runner.raw_server import serving

pytestmark = pytest.mark.timeout(30)

_HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


async def _read(framed: bytes, *, bytewise: bool) -> tuple[bytes, str | None]:
    """The body a server answering ``_HEAD + framed`` gives (in one write, or
    a byte per write), and the error reading it raised, if any."""
    pieces, error = await _pieces(framed, bytewise=bytewise)
    return b"".join(pieces), error


async def _pieces(framed: bytes, *, bytewise: bool) -> tuple[list[bytes], str | None]:
    """The body's pieces as ``Response.aiter_raw`` hands them on, and the error, if any."""

    answered = asyncio.Event()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            if bytewise:
                writer.write(_HEAD)
                for index in range(len(framed)):
                    writer.write(framed[index : index + 1])
                    await writer.drain()
                    await asyncio.sleep(0)
            else:
                writer.write(_HEAD + framed)
            await writer.drain()
        except ConnectionError:
            pass  # the client gave up at a malformed chunk
        finally:
            writer.close()
            answered.set()

    pieces: list[bytes] = []
    error = None
    async with serving(answer) as (pool, target):
        response = await pool.request(target, {"Content-Type": "application/json"}, b"{}", Timeouts.uniform(5.0))
        try:
            async for piece in response.aiter_raw():
                pieces.append(piece)  # kept as they come: a failing read keeps what came before
        except plain_http.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"
        await response.aclose()
        await answered.wait()
    return pieces, error


@pytest.mark.parametrize(
    "framed",
    [
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        b"5;name=v\r\nhello\r\n6 \r\n world\r\n0\r\nTrailer: x\r\n\r\n",  # extensions, trailers
        b"5\nhello\n6\n world\n0\n\n",  # bare line feeds
        b"A\r\n0123456789\r\n" * 40 + b"0\r\n\r\n",
    ],
)
async def test_chunks_read_together_or_apart_give_the_same_body(framed: bytes) -> None:
    together = await _read(framed, bytewise=False)
    apart = await _read(framed, bytewise=True)
    assert together == apart
    assert together[1] is None and together[0].startswith(b"hello" if framed[:1] == b"5" else b"0123")


@pytest.mark.parametrize(
    "framed",
    [
        b"5\r\nhello\r\n3\r\nworld\r\n0\r\n\r\n",  # a chunk longer than its size line
        b"5\r\nhello\r\nzz\r\nworld\r\n0\r\n\r\n",  # not a size
        b"5\r\nhello\r\n" + b"f" * 17 + b"\r\n",  # more than 64 bits
        b"5\r\nhello\r\n6\r\n wor",  # the server closed mid-chunk
    ],
)
async def test_a_malformed_chunk_after_whole_ones_fails_as_read_apart(framed: bytes) -> None:
    together = await _read(framed, bytewise=False)
    apart = await _read(framed, bytewise=True)
    assert together[1] is not None
    assert together[1] == apart[1]
    # The whole chunks before the bad one are handed on first (how many of
    # them a byte-at-a-time read has handed on when it fails is timing).
    assert together[0].startswith(b"hello")


async def test_whole_chunks_are_handed_on_at_most_a_read_piece_at_a_time() -> None:
    """More whole chunks buffered than one read hands back (64 KiB): each
    piece stays within it, and the body is whole."""
    chunk = b"x" * 5000
    framed = (b"%x\r\n" % len(chunk) + chunk + b"\r\n") * 40 + b"0\r\n\r\n"
    pieces, error = await _pieces(framed, bytewise=False)
    assert error is None and b"".join(pieces) == chunk * 40
    assert max(len(piece) for piece in pieces) <= plain_http._READ_PIECE
