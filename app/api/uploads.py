"""Streaming multipart/form-data reader for uploads.

The body is parsed as it arrives with python_multipart's push parser: the one
file part goes straight to a path on disk, text fields (small, capped) are kept
in memory. Neither the body nor the file is ever held whole in memory.

On any rejection the rest of the body is still read and thrown away: a client
still sending when the server answers and closes would see a broken pipe
instead of the 400, and the SDKs retry connection errors (re-sending the whole
upload twice).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import anyio
import anyio.to_thread
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from app import errors
from app.wire.common import text_problem

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

# Text fields are a purpose or a number: anything longer is not a real client.
MAX_FIELD_BYTES = 64 * 1024
# How much of one received chunk is parsed (and queued for the disk) at a time:
# bounds memory even when a server hands over a large chunk at once.
PARSE_STEP = 256 * 1024
# Name used when a file part carries no filename (the SDKs send "upload" for raw bytes).
DEFAULT_FILENAME = "upload"

FieldCheck = Callable[[str, str], None]


@dataclass
class FilePart:
    filename: str
    content_type: str | None
    path: Path
    size: int = 0


@dataclass
class Form:
    fields: dict[str, str] = field(default_factory=dict)
    file: FilePart | None = None


def malformed(detail: str) -> errors.APIError:
    return errors.invalid(f"Could not parse the multipart form body: {detail}")


def too_large(param: str, limit: int) -> errors.APIError:
    # "File is too large." is OpenAI's own text; the limit is added to make it actionable.
    return errors.invalid(f"File is too large. The maximum file size is {limit} bytes.", param=param)


def _text(raw: bytes) -> str:
    # RFC 7578 and every current client send UTF-8; latin-1 keeps odd bytes readable.
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


class _Reader:
    """The parser's callbacks: collect text fields, queue file bytes for the disk.

    Callbacks run synchronously inside ``parser.write``; raising an APIError
    from one stops the parse. File bytes are queued in ``pending`` and written
    by ``flush()`` off the event loop after each parsed step.
    """

    def __init__(self, dest: Path, file_field: str, max_file_bytes: int, check_field: FieldCheck) -> None:
        self.form = Form()
        self.finished = False
        self.pending: list[bytes] = []
        self._dest = dest
        self._file_field = file_field
        self._max_file_bytes = max_file_bytes
        self._check_field = check_field
        self._handle: BinaryIO | None = None
        self._headers: dict[bytes, bytes] = {}
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._field: str | None = None  # the text field being read
        self._in_file = False
        self._value = bytearray()

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda data, start, end: self._header_name.extend(data[start:end]),
            "on_header_value": lambda data, start, end: self._header_value.extend(data[start:end]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }

    def _part_begin(self) -> None:
        self._headers = {}
        self._field, self._in_file = None, False
        self._value = bytearray()

    def _header_end(self) -> None:
        self._headers[bytes(self._header_name).strip().lower()] = bytes(self._header_value).strip()
        self._header_name, self._header_value = bytearray(), bytearray()

    def _headers_finished(self) -> None:
        disposition, options = parse_options_header(self._headers.get(b"content-disposition"))
        if disposition != b"form-data" or b"name" not in options:
            raise malformed("a part has no 'Content-Disposition: form-data; name=...' header.")
        name = _text(options[b"name"])
        if name == self._file_field:
            self._start_file(options.get(b"filename"))
            return
        if name in self.form.fields:
            raise errors.invalid(f"Duplicate parameter: '{name}'.", param=name)
        self._field = name

    def _start_file(self, filename: bytes | None) -> None:
        if self.form.file is not None:
            raise errors.invalid(
                f"Duplicate parameter: '{self._file_field}'. Upload one file per request.",
                param=self._file_field,
            )
        name = _text(filename) if filename else DEFAULT_FILENAME
        problem = text_problem(name)
        if problem is not None:
            # A NUL in a raw filename (the SDKs percent-encode one): stored
            # on SQLite, refused by PostgreSQL's text (a 500); refused here
            # on both, in the words of a JSON body's string (RequestModel).
            message = problem.replace("string", "filename", 1)
            raise errors.invalid(f"Invalid '{self._file_field}': {message}", param=self._file_field)
        content_type = self._headers.get(b"content-type")
        self.form.file = FilePart(
            filename=name,
            content_type=_text(content_type) if content_type else None,
            path=self._dest,
        )
        # One open() call on the loop; the data writes go to a thread (flush).
        self._handle = self._dest.open("wb")
        self._in_file = True

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._in_file:
            assert self.form.file is not None
            self.form.file.size += end - start
            if self.form.file.size > self._max_file_bytes:
                raise too_large(self._file_field, self._max_file_bytes)
            self.pending.append(data[start:end])
        elif self._field is not None:
            if len(self._value) + end - start > MAX_FIELD_BYTES:
                raise errors.invalid(
                    f"Invalid '{self._field}': string too long. Expected a string with maximum "
                    f"length {MAX_FIELD_BYTES}.",
                    param=self._field,
                    code="string_above_max_length",
                )
            self._value.extend(data[start:end])

    def _part_end(self) -> None:
        if self._field is not None:
            value = _text(bytes(self._value))
            self._check_field(self._field, value)
            self.form.fields[self._field] = value
        self._field, self._in_file = None, False

    def _end(self) -> None:
        self.finished = True

    async def flush(self) -> None:
        if self.pending and self._handle is not None:
            pending, self.pending = self.pending, []
            await anyio.to_thread.run_sync(self._handle.writelines, pending)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()


def _boundary(request: Request) -> bytes:
    header = request.headers.get("content-type", "")
    content_type, options = parse_options_header(header)
    if content_type != b"multipart/form-data":
        raise errors.invalid(f"Invalid Content-Type header ({header or 'none'}), expected multipart/form-data.")
    boundary = options.get(b"boundary")
    if not boundary:
        raise malformed("the Content-Type header has no boundary.")
    return boundary


def _steps(chunk: bytes) -> Iterator[bytes]:
    if len(chunk) <= PARSE_STEP:
        yield chunk
        return
    for offset in range(0, len(chunk), PARSE_STEP):
        yield chunk[offset : offset + PARSE_STEP]


async def _drain(chunks: AsyncIterator[bytes]) -> None:
    try:
        async for _ in chunks:
            pass
    except ClientDisconnect:
        pass


async def _read(request: Request, reader: _Reader) -> Form:
    chunks = request.stream()
    try:
        parser = MultipartParser(_boundary(request), reader.callbacks())
        async for chunk in chunks:
            for step in _steps(chunk):
                parser.write(step)
                await reader.flush()
        parser.finalize()
        if not reader.finished:
            raise malformed("the body ended before the closing boundary.")
        return reader.form
    except FormParserError as exc:
        await _drain(chunks)
        raise malformed(str(exc).rstrip(".") + ".") from None
    except errors.APIError:
        await _drain(chunks)
        raise
    except ClientDisconnect:
        raise errors.invalid("The client disconnected before the upload was complete.") from None
    finally:
        reader.close()


@asynccontextmanager
async def receive_form(
    request: Request,
    dest: Path,
    *,
    file_field: str,
    max_file_bytes: int,
    check_field: FieldCheck,
) -> AsyncIterator[Form]:
    """Read the whole multipart body, streaming the ``file_field`` part into ``dest``.

    ``check_field(name, value)`` judges each text field as soon as it is
    complete. ``dest`` is removed when the block exits, so the caller keeps the
    bytes only by moving them away inside it (Storage.commit).
    """
    try:
        yield await _read(request, _Reader(dest, file_field, max_file_bytes, check_field))
    finally:
        # Shielded: a cancelled request must still not leave its temp file behind.
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(partial(dest.unlink, missing_ok=True))
