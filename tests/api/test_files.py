"""Files through the official SDK (and raw multipart where the SDK cannot go
wrong on purpose), on both databases."""

from __future__ import annotations

import asyncio
import gc
import os
import tracemalloc
from collections.abc import AsyncIterator, MutableMapping
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
from fastapi import FastAPI
from sqlalchemy import func, select, update

from app import ids, orm
from app.settings import Settings
from tests.conftest import error_of

BOUNDARY = "test-boundary-7MA4YWxkTrZu0gW"
MULTIPART = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}


@pytest.fixture
def upload_limit() -> int | None:
    """Overridden with ``@pytest.mark.parametrize("upload_limit", [...])``."""
    return None


@pytest.fixture
def settings(settings: Settings, upload_limit: int | None) -> Settings:
    if upload_limit is not None:
        settings.max_upload_bytes = upload_limit
    return settings


def multipart(*parts: tuple[str, bytes, str | None]) -> bytes:
    """A form body built by hand: (name, value, filename or None) per part, in order."""
    body = b""
    for name, value, filename in parts:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        body += f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n".encode()
        if filename is not None:
            body += b"Content-Type: application/octet-stream\r\n"
        body += b"\r\n" + value + b"\r\n"
    return body + f"--{BOUNDARY}--\r\n".encode()


async def stored(app: FastAPI) -> tuple[int, list[str]]:
    """How many file rows exist, and every entry in the storage directory."""
    runtime = app.state.runtime
    async with runtime.transaction() as session:
        rows = await session.scalar(select(func.count()).select_from(orm.File))
    return int(rows or 0), sorted(entry.name for entry in runtime.storage.root.iterdir())


async def test_upload_retrieve_list_content_delete(client: openai.AsyncOpenAI, app: FastAPI) -> None:
    created = await client.files.create(file=("notes.txt", b"hello world", "text/plain"), purpose="assistants")
    assert created.id.startswith("file-")
    assert (created.object, created.bytes, created.filename) == ("file", 11, "notes.txt")
    assert (created.purpose, created.status, created.expires_at) == ("assistants", "processed", None)
    assert created.created_at == pytest.approx(ids.now(), abs=5)

    fetched = await client.files.retrieve(created.id)
    assert fetched.model_dump() == created.model_dump()
    assert [f.id for f in (await client.files.list()).data] == [created.id]
    assert (await client.files.content(created.id)).content == b"hello world"
    assert await stored(app) == (1, [created.id])

    deleted = await client.files.delete(created.id)
    assert (deleted.id, deleted.object, deleted.deleted) == (created.id, "file", True)
    assert await stored(app) == (0, [])
    for call in (client.files.retrieve, client.files.content, client.files.delete):
        with pytest.raises(openai.NotFoundError) as exc:
            await call(created.id)
        assert error_of(exc)["message"] == f"No such File object: {created.id}"
        assert error_of(exc)["param"] == "id"


async def test_raw_bytes_are_named_upload(client: openai.AsyncOpenAI) -> None:
    created = await client.files.create(file=b"\x00\x01binary\xff", purpose="user_data")
    assert (created.filename, created.bytes, created.purpose) == ("upload", 9, "user_data")
    assert (await client.files.content(created.id)).content == b"\x00\x01binary\xff"


@pytest.mark.parametrize(
    "filename",
    ["../../etc/passwd", "日本語のレポート 2024.pdf", "..", "a\\b\\..\\c.txt", "ファイル\u200b名.txt"],
)
async def test_filenames_are_metadata_never_paths(
    filename: str, client: openai.AsyncOpenAI, http: httpx2.AsyncClient, app: FastAPI, tmp_path: Path
) -> None:
    created = await client.files.create(file=(filename, b"data", "text/plain"), purpose="assistants")
    assert created.filename == filename
    assert (await client.files.retrieve(created.id)).filename == filename
    assert await stored(app) == (1, [created.id])
    assert not (tmp_path / "etc").exists()
    response = await http.get(f"/v1/files/{created.id}/content")
    assert response.content == b"data"
    assert response.headers["content-type"] == "application/octet-stream"
    assert response.headers["content-disposition"].startswith("attachment; filename*=utf-8''")


async def test_list_filters_by_purpose_and_pages_exactly(client: openai.AsyncOpenAI) -> None:
    made = []
    for i in range(5):
        purpose: Any = "batch" if i % 2 else "assistants"
        made.append((await client.files.create(file=(f"f{i}.txt", b"x"), purpose=purpose)).id)
    newest_first = made[::-1]
    assert [f.id for f in (await client.files.list()).data] == newest_first
    batch = await client.files.list(purpose="batch")
    assert [f.id for f in batch.data] == [made[3], made[1]]
    assert (await client.files.list(purpose="vision")).data == []

    first = await client.files.list(limit=2)
    assert [f.id for f in first.data] == newest_first[:2] and first.has_more is True
    assert [f.id async for f in client.files.list(limit=2)] == newest_first
    ascending = await client.files.list(order="asc", after=made[1], limit=3)
    assert [f.id for f in ascending.data] == made[2:] and ascending.has_more is False
    last = await client.files.list(limit=1, after=made[1])
    assert [f.id for f in last.data] == [made[0]] and last.has_more is False


@pytest.mark.parametrize(("limit", "code"), [(0, "integer_below_min_value"), (10001, "integer_above_max_value")])
async def test_list_limit_bounds(limit: int, code: str, client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        await client.files.list(limit=limit)
    assert (error_of(exc)["param"], error_of(exc)["code"]) == ("limit", code)


async def test_list_cursor_must_be_a_file_id(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        await client.files.list(after="asst_123")
    assert error_of(exc)["message"] == "Invalid 'after': 'asst_123'. Expected an ID that begins with 'file'."


@pytest.mark.parametrize("purpose_first", [True, False])
async def test_any_field_order_is_accepted(purpose_first: bool, http: httpx2.AsyncClient) -> None:
    # go-openai sends purpose before the file; other clients send the file first.
    file_part = ("file", b"line 1\nline 2\n", "lines.jsonl")
    fields = [("purpose", b"fine-tune", None), ("expires_after[seconds]", b"7200", None)]
    fields.append(("expires_after[anchor]", b"created_at", None))
    parts = [*fields, file_part] if purpose_first else [file_part, *fields]
    response = await http.post("/v1/files", content=multipart(*parts), headers=MULTIPART)
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["filename"], body["bytes"], body["purpose"]) == ("lines.jsonl", 14, "fine-tune")
    assert body["expires_at"] == body["created_at"] + 7200


async def test_expires_after_sets_expires_at(client: openai.AsyncOpenAI) -> None:
    created = await client.files.create(
        file=("a.txt", b"a"), purpose="assistants", expires_after={"anchor": "created_at", "seconds": 3600}
    )
    assert created.expires_at == created.created_at + 3600
    assert (await client.files.retrieve(created.id)).expires_at == created.expires_at


async def test_batch_files_expire_after_30_days_by_default(client: openai.AsyncOpenAI) -> None:
    created = await client.files.create(file=("b.jsonl", b"{}"), purpose="batch")
    assert created.expires_at == created.created_at + 30 * 24 * 3600


ANCHOR, SECONDS = "expires_after[anchor]", "expires_after[seconds]"


@pytest.mark.parametrize(
    ("fields", "param", "code"),
    [
        ([(ANCHOR, b"created_at"), (SECONDS, b"60")], "expires_after.seconds", "integer_below_min_value"),
        ([(ANCHOR, b"created_at"), (SECONDS, b"2592001")], "expires_after.seconds", "integer_above_max_value"),
        ([(ANCHOR, b"created_at"), (SECONDS, b"soon")], "expires_after.seconds", "invalid_type"),
        ([(ANCHOR, b"last_active_at"), (SECONDS, b"3600")], "expires_after.anchor", "invalid_value"),
        ([(SECONDS, b"3600")], "expires_after.anchor", "missing_required_parameter"),
        ([(ANCHOR, b"created_at")], "expires_after.seconds", "missing_required_parameter"),
    ],
)
async def test_bad_expires_after_is_rejected(
    fields: list[tuple[str, bytes]], param: str, code: str, http: httpx2.AsyncClient, app: FastAPI
) -> None:
    parts = [("purpose", b"assistants", None), *((name, value, None) for name, value in fields)]
    body = multipart(*parts, ("file", b"content", "a.txt"))
    response = await http.post("/v1/files", content=body, headers=MULTIPART)
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["param"], error["code"]) == (param, code)
    assert await stored(app) == (0, [])


async def test_expired_files_behave_as_deleted(client: openai.AsyncOpenAI, app: FastAPI) -> None:
    keep = await client.files.create(file=("keep.txt", b"k"), purpose="assistants")
    old = await client.files.create(
        file=("old.txt", b"o"), purpose="assistants", expires_after={"anchor": "created_at", "seconds": 3600}
    )
    # Move the expiry into the past instead of waiting an hour.
    async with app.state.runtime.transaction() as session:
        await session.execute(update(orm.File).where(orm.File.id == old.id).values(expires_at=ids.now() - 1))

    for call in (client.files.retrieve, client.files.content, client.files.delete):
        with pytest.raises(openai.NotFoundError) as exc:
            await call(old.id)
        assert error_of(exc)["message"] == f"No such File object: {old.id}"
    assert [f.id for f in (await client.files.list()).data] == [keep.id]
    assert await stored(app) == (1, [keep.id])


@pytest.mark.parametrize("upload_limit", [1000])
async def test_oversize_upload_is_refused_and_leaves_nothing(
    upload_limit: int, client: openai.AsyncOpenAI, app: FastAPI
) -> None:
    at_limit = await client.files.create(file=("ok.bin", b"x" * upload_limit), purpose="assistants")
    assert at_limit.bytes == upload_limit
    for size in (upload_limit + 1, 5 * 1024 * 1024):
        with pytest.raises(openai.BadRequestError) as exc:
            await client.files.create(file=("big.bin", b"x" * size), purpose="assistants")
        assert error_of(exc)["message"] == "File is too large. The maximum file size is 1000 bytes."
        assert error_of(exc)["param"] == "file"
    assert await stored(app) == (1, [at_limit.id])


@pytest.mark.parametrize("upload_limit", [1000])
async def test_refused_upload_body_is_still_read_to_the_end(
    upload_limit: int, http: httpx2.AsyncClient, app: FastAPI
) -> None:
    # A server that answers before reading the body makes real clients see a
    # broken pipe (and the SDKs retry). The transport pulls the body lazily, so
    # an exhausted generator shows the server drained it.
    sent: list[int] = []

    async def body() -> AsyncIterator[bytes]:
        yield multipart(("purpose", b"assistants", None)).rsplit(b"--" + BOUNDARY.encode() + b"--", 1)[0]
        yield f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\n'.encode()
        for _ in range(50):
            sent.append(1)
            yield b"y" * 65536
        yield f"\r\n--{BOUNDARY}--\r\n".encode()
        sent.append(0)

    response = await http.post("/v1/files", content=body(), headers=MULTIPART)
    assert response.status_code == 400
    assert response.json()["error"]["message"].startswith("File is too large.")
    assert sent[-1] == 0 and len(sent) == 51
    assert await stored(app) == (0, [])


@pytest.mark.parametrize(
    ("body", "headers", "message"),
    [
        (multipart(("purpose", b"assistants", None)), MULTIPART, "Missing required parameter: 'file'."),
        (multipart(("file", b"x", "a.txt")), MULTIPART, "Missing required parameter: 'purpose'."),
        (
            multipart(("purpose", b"assistant", None), ("file", b"x", "a.txt")),
            MULTIPART,
            "Invalid value: 'assistant'. Supported values are: 'assistants', 'batch', 'fine-tune', "
            "'vision', 'user_data', and 'evals'.",
        ),
        (
            multipart(("purpose", b"assistants", None), ("file", b"x", "a.txt"), ("model", b"gpt-4o", None)),
            MULTIPART,
            "Unknown parameter: 'model'.",
        ),
        (
            multipart(("purpose", b"assistants", None), ("file", b"x", "a.txt"), ("file", b"y", "b.txt")),
            MULTIPART,
            "Duplicate parameter: 'file'. Upload one file per request.",
        ),
        (
            multipart(("purpose", b"assistants", None), ("purpose", b"batch", None), ("file", b"x", "a.txt")),
            MULTIPART,
            "Duplicate parameter: 'purpose'.",
        ),
        (
            multipart(("purpose", b"assistants", None), ("file", b"x", "a\x00b.txt")),
            MULTIPART,
            "Invalid 'file': filename contains a null character (\\u0000), which is not supported.",
        ),
        (
            b'{"purpose": "assistants"}',
            {"content-type": "application/json"},
            "Invalid Content-Type header (application/json), expected multipart/form-data.",
        ),
        (b"purpose=assistants", {}, "Invalid Content-Type header (none), expected multipart/form-data."),
        (
            multipart(("purpose", b"assistants", None)),
            {"content-type": "multipart/form-data"},
            "Could not parse the multipart form body: the Content-Type header has no boundary.",
        ),
        (b"", MULTIPART, "Could not parse the multipart form body: the body ended before the closing boundary."),
        (
            multipart(("purpose", b"assistants", None), ("file", b"x" * 5000, "a.txt"))[:-40],
            MULTIPART,
            "Could not parse the multipart form body: the body ended before the closing boundary.",
        ),
    ],
    ids=[
        "missing-file",
        "missing-purpose",
        "bad-purpose",
        "unknown-field",
        "two-files",
        "two-purposes",
        "nul-in-filename",
        "json",
        "no-content-type",
        "no-boundary",
        "empty",
        "truncated",
    ],
)
async def test_bad_upload_requests_are_400_and_store_nothing(
    body: bytes, headers: dict[str, str], message: str, http: httpx2.AsyncClient, app: FastAPI
) -> None:
    response = await http.post("/v1/files", content=body, headers=headers)
    assert response.status_code == 400
    assert response.json()["error"]["message"] == message
    assert await stored(app) == (0, [])


async def test_client_disconnect_mid_upload_leaves_nothing(app: FastAPI) -> None:
    head = multipart(("purpose", b"assistants", None)).rsplit(f"--{BOUNDARY}--".encode(), 1)[0]
    head += f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\n'.encode()
    incoming: list[MutableMapping[str, Any]] = [
        {"type": "http.request", "body": head + b"z" * 100_000, "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent: list[dict[str, Any]] = []

    async def receive() -> MutableMapping[str, Any]:
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(dict(message))

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/files",
        "raw_path": b"/v1/files",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", MULTIPART["content-type"].encode())],
        "client": ("127.0.0.1", 5000),
        "server": ("testserver", 80),
    }
    await app(scope, receive, send)
    assert sent[0]["status"] == 400
    assert await stored(app) == (0, [])


async def test_concurrent_uploads(client: openai.AsyncOpenAI, app: FastAPI) -> None:
    # upload_and_poll uploads several files at once.
    made = await asyncio.gather(
        *(client.files.create(file=(f"c{i}.txt", bytes([i]) * (i + 1)), purpose="assistants") for i in range(8))
    )
    assert sorted(f.bytes for f in made) == list(range(1, 9))
    assert await stored(app) == (8, sorted(f.id for f in made))
    for created in made:
        assert (await client.files.content(created.id)).content == bytes([created.bytes - 1]) * created.bytes


@pytest.mark.parametrize(
    "body",
    [
        b"this is not multipart at all",
        f"--{BOUNDARY}\r\nContent-Type: text/plain\r\n\r\nno disposition\r\n--{BOUNDARY}--\r\n".encode(),
        f"--{BOUNDARY}\r\nContent-Disposition: form-data\r\n\r\nno name\r\n--{BOUNDARY}--\r\n".encode(),
        f"--{BOUNDARY}\r\nContent-Disposition form-data\r\n\r\nbad header\r\n--{BOUNDARY}--\r\n".encode(),
    ],
    ids=["garbage", "no-disposition", "no-name", "bad-header"],
)
async def test_malformed_multipart_is_400(body: bytes, http: httpx2.AsyncClient, app: FastAPI) -> None:
    response = await http.post("/v1/files", content=body, headers=MULTIPART)
    assert response.status_code == 400
    assert response.json()["error"]["message"].startswith("Could not parse the multipart form body: ")
    assert await stored(app) == (0, [])


async def test_oversized_text_field_is_refused(http: httpx2.AsyncClient, app: FastAPI) -> None:
    body = multipart(("purpose", b"a" * 70_000, None), ("file", b"x", "a.txt"))
    response = await http.post("/v1/files", content=body, headers=MULTIPART)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "string_above_max_length"
    assert await stored(app) == (0, [])


async def test_evals_purpose_is_accepted(app: FastAPI) -> None:
    # The spec's OpenAIFile enum (and the SDK's type) lag the upload enum and
    # lack "evals", so this response is checked here instead of by the spec hook.
    transport = httpx2.ASGITransport(app=app)
    async with httpx2.AsyncClient(transport=transport, base_url="http://testserver") as raw:
        body = multipart(("purpose", b"evals", None), ("file", b"{}", "e.jsonl"))
        response = await raw.post("/v1/files", content=body, headers=MULTIPART)
    assert response.status_code == 200
    assert response.json()["purpose"] == "evals"


@pytest.mark.parametrize("call", ["retrieve", "delete", "content"])
async def test_file_ids_are_checked(call: str, client: openai.AsyncOpenAI) -> None:
    method = getattr(client.files, call)
    with pytest.raises(openai.BadRequestError) as bad:
        await method("asst_abc")
    assert error_of(bad)["message"] == "Invalid 'file_id': 'asst_abc'. Expected an ID that begins with 'file'."
    with pytest.raises(openai.NotFoundError) as missing:
        await method("file-abc")
    assert error_of(missing)["message"] == "No such File object: file-abc"
    assert error_of(missing)["param"] == "id"


async def test_content_of_a_5_mb_file_matches_byte_for_byte(client: openai.AsyncOpenAI) -> None:
    data = os.urandom(5 * 1024 * 1024)
    created = await client.files.create(file=("blob.bin", data), purpose="assistants")
    assert created.bytes == len(data)
    assert (await client.files.content(created.id)).content == data


async def test_large_upload_is_streamed_not_buffered(client: openai.AsyncOpenAI, app: FastAPI, tmp_path: Path) -> None:
    size = 30 * 1024 * 1024
    source = tmp_path / "big.bin"
    with source.open("wb") as out:
        for _ in range(size // (1024 * 1024)):
            out.write(os.urandom(1024 * 1024))
    # Warm up first, so one-off caches (the spec the response hook loads,
    # mimetypes, lazy imports) are not counted against the upload.
    await client.files.create(file=("warm.txt", b"w"), purpose="assistants")
    gc.collect()
    tracemalloc.start()
    try:
        # An open file object: the SDK and httpx stream it in 64 KiB reads, so
        # any large allocation would be the server's.
        with source.open("rb") as handle:
            created = await client.files.create(file=handle, purpose="assistants")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert created.bytes == size and created.filename == "big.bin"
    assert peak < size // 6, f"peak traced memory {peak} bytes for a {size}-byte upload"
    stored_path = app.state.runtime.storage.path(created.id)
    assert stored_path.stat().st_size == size
    assert stored_path.read_bytes() == source.read_bytes()
