"""Vector stores through the official SDK, on both databases: files and
batches ingested by the in-process worker (polled with the SDK helpers),
exact file counts, search with filters, bad files, bad parameters, expiry."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest
from fastapi import FastAPI
from sqlalchemy import update

from app import orm
from app.settings import Settings
from tests.conftest import error_of
from tests.retrieval import documents

ZEBRA = "Zebras sleep standing up in the savanna and graze on tall grasses."
LLAMA = "Llamas carry loads across the Andes and hum to each other."
QUOKKA = "Quokkas live on Rottnest Island and are known as the happiest animals."


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    """Keyword search (``embedding_model: none``): these tests pin its score
    semantics (1 for the best match of a fully matched query, at most the
    share of the query's words found); the default hybrid search is tested in
    test_hybrid_search.py."""
    config = tmp_path / "models.yaml"
    config.write_text("embedding_model: none\n")
    return Settings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        poll_after_ms=10,
        worker_drain_seconds=0.2,
        llm_config=config,
    )


async def _upload(client: openai.AsyncOpenAI, name: str, data: bytes) -> str:
    return (await client.files.create(file=(name, data), purpose="assistants")).id


async def _mixed_batch(client: openai.AsyncOpenAI, store_id: str) -> Any:
    return await client.vector_stores.file_batches.upload_and_poll(
        store_id,
        files=[
            ("zebras.pdf", documents.pdf([ZEBRA])),
            ("llamas.docx", documents.docx([LLAMA])),
            ("quokkas.md", f"# Quokkas\n\n{QUOKKA}\n".encode()),
        ],
    )


async def test_upload_and_poll_mixed_batch_then_search(client: openai.AsyncOpenAI) -> None:
    store = await client.vector_stores.create(name="Animals")
    assert store.status == "completed" and store.file_counts.total == 0 and store.name == "Animals"
    batch = await _mixed_batch(client, store.id)
    assert batch.object == "vector_store.files_batch"
    assert batch.status == "completed"
    assert batch.file_counts.model_dump() == {"in_progress": 0, "completed": 3, "failed": 0, "cancelled": 0, "total": 3}
    store = await client.vector_stores.retrieve(store.id)
    assert store.file_counts.completed == 3 and store.status == "completed" and store.usage_bytes > 0
    files = await client.vector_stores.files.list(store.id)
    assert {f.status for f in files.data} == {"completed"} and len(files.data) == 3
    assert files.data[0].chunking_strategy is not None
    assert files.data[0].chunking_strategy.model_dump() == {
        "type": "static",
        "static": {"max_chunk_size_tokens": 800, "chunk_overlap_tokens": 400},
    }
    page = await client.vector_stores.search(store.id, query="where do zebras sleep?")
    assert page.data and page.search_query == ["where do zebras sleep?"]
    top = page.data[0]
    assert top.filename == "zebras.pdf" and 0 < top.score <= 1
    assert "Zebras sleep standing up" in top.content[0].text
    batch_files = await client.vector_stores.file_batches.list_files(batch.id, vector_store_id=store.id)
    assert len(batch_files.data) == 3


async def test_a_nul_in_a_files_text_is_indexed_as_a_replacement_character(client: openai.AsyncOpenAI) -> None:
    """A text file with a NUL character past the part read to tell text
    from binary is ingested on both databases, the NUL read as U+FFFD
    (PostgreSQL's text refused the chunk: the file failed there with a
    server_error, and was completed on SQLite)."""
    store = await client.vector_stores.create(name="nul")
    data = ZEBRA.encode() + b" " * 5000 + b"Quokkas\x00smile at dawn."
    done = await client.vector_stores.files.upload_and_poll(vector_store_id=store.id, file=("late.txt", data))
    assert done.status == "completed" and done.last_error is None
    page = await client.vector_stores.search(store.id, query="quokkas smile")
    assert page.data and any("Quokkas\ufffdsmile at dawn." in part.text for part in page.data[0].content)


async def test_bad_files_fail_alone(client: openai.AsyncOpenAI) -> None:
    store = await client.vector_stores.create(name="mixed")
    good = await _upload(client, "good.txt", ZEBRA.encode())
    exe = await _upload(client, "tool.exe", b"MZ\x90\x00binary")
    broken = await _upload(client, "broken.pdf", b"%PDF-1.4 this is not really a pdf")
    empty = await _upload(client, "empty.md", b"   \n")
    batch = await client.vector_stores.file_batches.create_and_poll(store.id, file_ids=[good, exe, broken, empty])
    assert batch.file_counts.model_dump() == {"in_progress": 0, "completed": 1, "failed": 3, "cancelled": 0, "total": 4}
    assert batch.status == "completed"
    errors = {
        f.id: f.last_error.code if f.last_error else None
        for f in (await client.vector_stores.files.list(store.id, filter="failed")).data
    }
    assert errors == {exe: "unsupported_file", broken: "invalid_file", empty: "invalid_file"}
    done = await client.vector_stores.files.retrieve(good, vector_store_id=store.id)
    assert done.status == "completed" and done.last_error is None and done.usage_bytes > 0
    assert [f.id for f in (await client.vector_stores.files.list(store.id, filter="completed")).data] == [good]


async def test_encodings(client: openai.AsyncOpenAI) -> None:
    store = await client.vector_stores.create()
    text = "Grüße aus München: Quokkas lächeln."
    ids = [
        await _upload(client, "utf8.txt", text.encode("utf-8")),
        await _upload(client, "utf16.txt", text.encode("utf-16")),
        await _upload(client, "utf16le.txt", text.encode("utf-16-le")),
        await _upload(client, "page.html", f"<html><body><script>x()</script><p>{text}</p></body></html>".encode()),
    ]
    batch = await client.vector_stores.file_batches.create_and_poll(store.id, file_ids=ids)
    assert batch.file_counts.completed == 4
    for file_id in ids:
        page = await client.vector_stores.files.content(file_id, vector_store_id=store.id)
        assert [part.text for part in page.data] == [text]


async def test_search_filters_threshold_and_queries(client: openai.AsyncOpenAI) -> None:
    store = await client.vector_stores.create()
    zebra = await _upload(client, "zebra.txt", ZEBRA.encode())
    llama = await _upload(client, "llama.txt", f"{LLAMA} Zebras are not llamas.".encode())
    await client.vector_stores.file_batches.create_and_poll(
        store.id,
        files=[
            {"file_id": zebra, "attributes": {"region": "africa", "year": 2020, "wild": True}},
            {"file_id": llama, "attributes": {"region": "america", "year": 2024, "wild": False}},
        ],
    )
    both = await client.vector_stores.search(store.id, query="zebras")
    assert {r.file_id for r in both.data} == {zebra, llama}
    # Engine-independent scores: the best match of a one-word query scores 1.
    assert both.data[0].score == 1 and 0 < both.data[1].score <= 1
    assert both.data[0].file_id == zebra and both.data[0].attributes == {"region": "africa", "year": 2020, "wild": True}

    async def ids(**kwargs: Any) -> list[str]:
        return [r.file_id for r in (await client.vector_stores.search(store.id, query="zebras", **kwargs)).data]

    assert await ids(filters={"type": "eq", "key": "region", "value": "america"}) == [llama]
    assert await ids(filters={"type": "gte", "key": "year", "value": 2021}) == [llama]
    assert await ids(filters={"type": "eq", "key": "wild", "value": True}) == [zebra]
    assert await ids(filters={"type": "in", "key": "region", "value": ["europe", "africa"]}) == [zebra]
    compound = {
        "type": "or",
        "filters": [
            {"type": "lt", "key": "year", "value": 2000},
            {
                "type": "and",
                "filters": [
                    {"type": "ne", "key": "region", "value": "africa"},
                    {"type": "nin", "key": "year", "value": [1]},
                ],
            },
        ],
    }
    assert await ids(filters=compound) == [llama]
    assert await ids(max_num_results=1) == [zebra]
    half = await client.vector_stores.search(
        store.id, query="zebras kangaroos", ranking_options={"score_threshold": 0.6}
    )
    assert half.data == []  # no chunk has both words: every score is at most 0.5
    multi = await client.vector_stores.search(store.id, query=["andes", "savanna"])
    assert multi.search_query == ["andes", "savanna"] and {r.file_id for r in multi.data} == {zebra, llama}
    assert (await client.vector_stores.search(store.id, query="nothing-matches-this")).data == []


@pytest.mark.usefixtures("sqlite_default_parameter_limit")
async def test_a_filter_listing_more_values_than_the_databases_bind(client: openai.AsyncOpenAI) -> None:
    """``in`` / ``nin`` lists of 40,000 values (past asyncpg's 32,767
    parameters and SQLite's 32,766: they were bound one parameter each and
    the search answered 500) keep their semantics: strings, numbers,
    booleans."""
    store = await client.vector_stores.create()
    zebra = await _upload(client, "zebra.txt", ZEBRA.encode())
    llama = await _upload(client, "llama.txt", f"{LLAMA} Zebras are not llamas.".encode())
    await client.vector_stores.file_batches.create_and_poll(
        store.id,
        files=[
            {"file_id": zebra, "attributes": {"region": "africa", "year": 2020, "wild": True}},
            {"file_id": llama, "attributes": {"region": "america", "year": 2024, "wild": False}},
        ],
    )
    many = 40_000
    strings: list[Any] = [f"region-{n}" for n in range(many)]
    numbers: list[Any] = [n + 0.5 for n in range(many)]

    async def ids(condition: dict[str, Any]) -> list[str]:
        # As extra_body: the SDK's typed transform of filters= costs about a
        # second per 100k values (the first search goes through filters=).
        found = await client.vector_stores.search(store.id, query="zebras", extra_body={"filters": condition})
        return [r.file_id for r in found.data]

    found = await client.vector_stores.search(
        store.id, query="zebras", filters={"type": "in", "key": "region", "value": [*strings, "africa"]}
    )
    assert [r.file_id for r in found.data] == [zebra]
    wild_in_2020 = {
        "type": "and",
        "filters": [
            {"type": "nin", "key": "region", "value": [*strings, "europe"]},
            {"type": "in", "key": "year", "value": [*numbers, 2020, "2024"]},
            {"type": "in", "key": "wild", "value": [*strings, *numbers, True]},
        ],
    }
    assert await ids(wild_in_2020) == [zebra]


@pytest.mark.usefixtures("sqlite_default_parameter_limit")
async def test_a_compound_filter_of_many_comparisons(client: openai.AsyncOpenAI) -> None:
    """An ``or`` of 5,000 comparisons is answered (SQLite refused its chain
    of ORs past a depth of 1,000: a 500); one needing more values than the
    databases bind is a 400 (a 500 there too)."""
    store = await client.vector_stores.create()
    zebra = await _upload(client, "zebra.txt", ZEBRA.encode())
    await client.vector_stores.file_batches.create_and_poll(
        store.id, files=[{"file_id": zebra, "attributes": {"region": "africa"}}]
    )

    def any_of(count: int) -> dict[str, Any]:
        others = [{"type": "eq", "key": "region", "value": f"region-{n}"} for n in range(count)]
        return {"type": "or", "filters": [*others, {"type": "eq", "key": "region", "value": "africa"}]}

    # As extra_body: the SDK's typed transform of filters= takes seconds at this size.
    found = await client.vector_stores.search(store.id, query="zebras", extra_body={"filters": any_of(5_000)})
    assert [r.file_id for r in found.data] == [zebra]
    with pytest.raises(openai.BadRequestError) as exc:
        await client.vector_stores.search(store.id, query="zebras", extra_body={"filters": any_of(40_000)})
    error = error_of(exc)
    assert error["message"].startswith("Invalid 'filters': the filter is too large: it needs ")
    assert error["message"].endswith(
        " bound values, and at most 30,000 are supported. Compare long lists of values with 'in' or 'nin'."
    )
    assert {key: error[key] for key in ("type", "param", "code")} == {
        "type": "invalid_request_error",
        "param": "filters",
        "code": None,
    }


async def test_a_filtered_search_sees_attribute_changes_at_once(client: openai.AsyncOpenAI) -> None:
    """The same filtered search before and after a file's attributes change
    (on SQLite the passing files are kept between searches while the
    database is unchanged: the update must be seen by the next search)."""
    store = await client.vector_stores.create()
    zebra = await _upload(client, "zebra.txt", ZEBRA.encode())
    llama = await _upload(client, "llama.txt", f"{LLAMA} Zebras are not llamas.".encode())
    await client.vector_stores.file_batches.create_and_poll(
        store.id,
        files=[{"file_id": zebra, "attributes": {"keep": True}}, {"file_id": llama, "attributes": {"keep": False}}],
    )
    kept = {"type": "eq", "key": "keep", "value": True}

    async def found() -> list[str]:
        return [r.file_id for r in (await client.vector_stores.search(store.id, query="zebras", filters=kept)).data]

    assert await found() == [zebra]
    assert await found() == [zebra]
    await client.vector_stores.files.update(llama, vector_store_id=store.id, attributes={"keep": True})
    assert await found() == [zebra, llama]
    await client.vector_stores.files.update(zebra, vector_store_id=store.id, attributes={"keep": "yes"})
    assert await found() == [llama]
    await client.vector_stores.files.delete(llama, vector_store_id=store.id)
    assert await found() == []


async def test_batch_cancel(client: openai.AsyncOpenAI, app: FastAPI) -> None:
    store = await client.vector_stores.create()
    file_ids = [await _upload(client, f"doc{i}.txt", f"document number {i}".encode()) for i in range(3)]
    # The worker must not pick the files up before the cancel: hold their
    # leases as another worker would while parsing.
    stop = app.state.runtime
    batch = await client.vector_stores.file_batches.create(store.id, file_ids=file_ids)
    async with stop.transaction() as session:
        await session.execute(
            update(orm.VectorStoreFile)
            .where(orm.VectorStoreFile.batch_id == batch.id)
            .values(lease_owner="someone-else", lease_expires_at=4102444800.0)
        )
    cancelled = await client.vector_stores.file_batches.cancel(batch.id, vector_store_id=store.id)
    assert cancelled.status == "cancelled"
    assert cancelled.file_counts.model_dump() == {
        "in_progress": 0,
        "completed": 0,
        "failed": 0,
        "cancelled": 3,
        "total": 3,
    }
    listed = await client.vector_stores.file_batches.list_files(batch.id, vector_store_id=store.id, filter="cancelled")
    assert len(listed.data) == 3
    store_now = await client.vector_stores.retrieve(store.id)
    assert store_now.file_counts.cancelled == 3 and store_now.status == "completed"


async def test_store_lifecycle_files_and_pagination(client: openai.AsyncOpenAI) -> None:
    first = await _upload(client, "a.txt", b"alpha text")
    second = await _upload(client, "b.txt", b"beta text")
    store = await client.vector_stores.create(
        name="s",
        file_ids=[first, second],
        metadata={"k": "v"},
        chunking_strategy={"type": "static", "static": {"max_chunk_size_tokens": 200, "chunk_overlap_tokens": 100}},
    )
    assert store.file_counts.total == 2 and store.metadata == {"k": "v"}
    file = await client.vector_stores.files.create_and_poll(file_id=first, vector_store_id=store.id)
    assert file.status == "completed" and file.chunking_strategy.model_dump() == {  # type: ignore[union-attr]
        "type": "static",
        "static": {"max_chunk_size_tokens": 800, "chunk_overlap_tokens": 400},
    }
    page = await client.vector_stores.files.list(store.id, limit=1, order="asc")
    assert [f.id for f in page.data] == [first] and page.has_more
    page = await client.vector_stores.files.list(store.id, limit=1, order="asc", after=first)
    assert [f.id for f in page.data] == [second] and not page.has_more
    updated = await client.vector_stores.files.update(first, vector_store_id=store.id, attributes={"tag": "x"})
    assert updated.attributes == {"tag": "x"}
    modified = await client.vector_stores.update(
        store.id, name="renamed", expires_after={"anchor": "last_active_at", "days": 2}
    )
    assert modified.name == "renamed" and modified.expires_at == modified.last_active_at + 2 * 86400  # type: ignore[operator]
    assert store.id in [s.id for s in (await client.vector_stores.list()).data]
    removed = await client.vector_stores.files.delete(first, vector_store_id=store.id)
    assert removed.deleted and removed.object == "vector_store.file.deleted"
    assert (await client.files.retrieve(first)).id == first  # the file survives
    assert (await client.vector_stores.retrieve(store.id)).file_counts.total == 1
    deleted = await client.vector_stores.delete(store.id)
    assert deleted.deleted and deleted.object == "vector_store.deleted"
    with pytest.raises(openai.NotFoundError) as exc:
        await client.vector_stores.retrieve(store.id)
    assert error_of(exc)["message"] == f"No vector store found with id '{store.id}'."


async def test_deleting_a_file_removes_it_from_every_store(client: openai.AsyncOpenAI) -> None:
    doc = await _upload(client, "zebra.txt", ZEBRA.encode())
    stores = [await client.vector_stores.create(file_ids=[doc]) for _ in range(2)]
    for store in stores:
        await client.vector_stores.files.poll(doc, vector_store_id=store.id)
        assert (await client.vector_stores.search(store.id, query="zebras")).data
    await client.files.delete(doc)
    for store in stores:
        assert (await client.vector_stores.retrieve(store.id)).file_counts.total == 0
        assert (await client.vector_stores.search(store.id, query="zebras")).data == []


async def test_expired_store(client: openai.AsyncOpenAI, app: FastAPI) -> None:
    store = await client.vector_stores.create(expires_after={"anchor": "last_active_at", "days": 1})
    assert store.expires_at == store.last_active_at + 86400  # type: ignore[operator]
    async with app.state.runtime.transaction() as session:
        await session.execute(update(orm.VectorStore).where(orm.VectorStore.id == store.id).values(expires_at=1))
    assert (await client.vector_stores.retrieve(store.id)).status == "expired"
    with pytest.raises(openai.BadRequestError):
        await client.vector_stores.search(store.id, query="x")
    doc = await _upload(client, "a.txt", b"a")
    with pytest.raises(openai.BadRequestError):
        await client.vector_stores.files.create(vector_store_id=store.id, file_id=doc)


@pytest.mark.parametrize(
    ("call", "param"),
    [
        (
            lambda c, s, f: c.vector_stores.create(expires_after={"anchor": "last_active_at", "days": 0}),
            "expires_after.days",
        ),
        (
            lambda c, s, f: c.vector_stores.create(expires_after={"anchor": "created_at", "days": 1}),
            "expires_after.anchor",
        ),
        (lambda c, s, f: c.vector_stores.create(file_ids=["nope"]), "file_id"),
        (
            lambda c, s, f: c.vector_stores.files.create(
                vector_store_id=s,
                file_id=f,
                chunking_strategy={
                    "type": "static",
                    "static": {"max_chunk_size_tokens": 99, "chunk_overlap_tokens": 0},
                },
            ),
            "chunking_strategy.static.max_chunk_size_tokens",
        ),
        (
            lambda c, s, f: c.vector_stores.files.create(
                vector_store_id=s,
                file_id=f,
                chunking_strategy={
                    "type": "static",
                    "static": {"max_chunk_size_tokens": 200, "chunk_overlap_tokens": 101},
                },
            ),
            "chunking_strategy.static.chunk_overlap_tokens",
        ),
        (lambda c, s, f: c.vector_stores.file_batches.create(s, file_ids=[]), "file_ids"),
        (lambda c, s, f: c.vector_stores.file_batches.create(s), "file_ids"),
        (lambda c, s, f: c.vector_stores.search(s, query="x", max_num_results=51), "max_num_results"),
        (
            lambda c, s, f: c.vector_stores.search(s, query="x", ranking_options={"score_threshold": 2}),
            "ranking_options.score_threshold",
        ),
        (
            lambda c, s, f: c.vector_stores.search(s, query="x", filters={"type": "like", "key": "a", "value": 1}),
            "filters",
        ),
        (lambda c, s, f: c.vector_stores.files.list(s, filter="done"), "filter"),  # type: ignore[arg-type]
        (lambda c, s, f: c.vector_stores.retrieve("store"), "vector_store_id"),
        (lambda c, s, f: c.vector_stores.file_batches.retrieve("batch", vector_store_id=s), "batch_id"),
        (
            lambda c, s, f: c.vector_stores.files.update(f, vector_store_id=s, attributes={"k": "x" * 513}),
            "attributes.k",
        ),
    ],
)
async def test_bad_parameters_are_400_and_change_nothing(client: openai.AsyncOpenAI, call: Any, param: str) -> None:
    store = await client.vector_stores.create(name="keep")
    doc = await _upload(client, "a.txt", b"alpha")
    await client.vector_stores.files.create_and_poll(file_id=doc, vector_store_id=store.id)
    with pytest.raises(openai.BadRequestError) as exc:
        await call(client, store.id, doc)
    assert error_of(exc)["param"] is None or error_of(exc)["param"].startswith(param.split(".")[0])
    after = await client.vector_stores.retrieve(store.id)
    assert after.name == "keep" and after.file_counts.model_dump() == {
        "in_progress": 0,
        "completed": 1,
        "failed": 0,
        "cancelled": 0,
        "total": 1,
    }
    assert [s.id for s in (await client.vector_stores.list()).data] == [store.id]


async def test_unknown_ids_are_404(client: openai.AsyncOpenAI) -> None:
    store = await client.vector_stores.create()
    with pytest.raises(openai.NotFoundError):
        await client.vector_stores.files.retrieve("file-missing", vector_store_id=store.id)
    with pytest.raises(openai.NotFoundError):
        await client.vector_stores.file_batches.retrieve("vsfb_missing", vector_store_id=store.id)
    with pytest.raises(openai.NotFoundError) as exc:
        await client.vector_stores.files.create(vector_store_id=store.id, file_id="file-missing")
    assert error_of(exc)["message"] == "No such File object: file-missing"


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        # The spec's maxItems (CreateVectorStoreRequest.file_ids: 500;
        # CreateVectorStoreFileBatchRequest.file_ids and .files: 2000): far
        # below the databases' limits, even where rows are written per id.
        ("/vector_stores", {"file_ids": [f"file-{n}" for n in range(501)]}, "file_ids"),
        ("/vector_stores/{store}/file_batches", {"file_ids": [f"file-{n}" for n in range(2001)]}, "file_ids"),
        ("/vector_stores/{store}/file_batches", {"files": [{"file_id": f"file-{n}"} for n in range(2001)]}, "files"),
    ],
    ids=["store-file-ids", "batch-file-ids", "batch-files"],
)
async def test_id_lists_past_the_specs_max_items_are_400(
    client: openai.AsyncOpenAI, path: str, body: dict[str, Any], param: str
) -> None:
    store = await client.vector_stores.create()
    with pytest.raises(openai.BadRequestError) as exc:
        await client.post(path.format(store=store.id), body=body, cast_to=object)
    error = error_of(exc)
    assert (error["param"], error["code"]) == (param, "array_above_max_length"), error
