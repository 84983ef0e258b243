"""Hybrid search (keyword + embeddings, fused by reciprocal rank) on both
databases, with the built-in hashing embedder chosen by the routing config's
``embedding_model`` key."""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest

from app.settings import Settings

ZEBRA = "Zebras sleep standing up in the savanna and graze on tall grasses."
LLAMA = "Llamas carry loads across the Andes and hum to each other."


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    config = tmp_path / "models.yaml"
    config.write_text("embedding_model: hashing\n")
    return Settings(data_dir=tmp_path / "data", database_url=database_url, poll_after_ms=10, llm_config=config)


async def _store(client: openai.AsyncOpenAI) -> tuple[str, dict[str, str]]:
    store = await client.vector_stores.create()
    ids = {}
    for name, text in (("zebra.txt", ZEBRA), ("llama.txt", LLAMA)):
        ids[name] = (await client.files.create(file=(name, text.encode()), purpose="assistants")).id
    batch = await client.vector_stores.file_batches.create_and_poll(store.id, file_ids=list(ids.values()))
    assert batch.file_counts.completed == 2
    return store.id, ids


async def test_embeddings_find_what_keywords_miss(client: openai.AsyncOpenAI) -> None:
    store_id, ids = await _store(client)
    # A misspelling shares no word with the text, only character trigrams.
    page = await client.vector_stores.search(store_id, query="zebbras savana")
    assert page.data and page.data[0].file_id == ids["zebra.txt"]
    assert all(0 <= result.score <= 1 for result in page.data)
    # Found by the vector side alone, whose texts are read for the final page only: still there.
    assert [part.text for part in page.data[0].content] == [ZEBRA]
    exact = await client.vector_stores.search(store_id, query="llamas andes")
    assert exact.data[0].file_id == ids["llama.txt"]
    filtered = await client.vector_stores.search(
        store_id, query="zebbras", filters={"type": "eq", "key": "missing", "value": "x"}
    )
    assert filtered.data == []


async def test_file_search_in_a_run_uses_hybrid_ranking(client: openai.AsyncOpenAI) -> None:
    store_id, ids = await _store(client)
    assistant = await client.beta.assistants.create(
        model="gpt-4o",
        tools=[{"type": "file_search"}],
        tool_resources={"file_search": {"vector_store_ids": [store_id]}},
    )
    query = json.dumps({"query": "zebbras"})
    run = await client.beta.threads.create_and_run_poll(
        assistant_id=assistant.id,
        thread={"messages": [{"role": "user", "content": f"[[call file_search {query}]]"}]},
    )
    assert run.status == "completed", run.last_error
    answer = (await client.beta.threads.messages.list(run.thread_id)).data[0]
    annotations = answer.content[0].text.annotations  # type: ignore[union-attr]
    assert annotations and annotations[0].file_citation.file_id == ids["zebra.txt"]  # type: ignore[union-attr]


@pytest.fixture
def minilm_settings(settings: Settings, tmp_path: Path) -> Settings:
    assert settings.llm_config is not None
    settings.llm_config.write_text("embedding_model: all-minilm-l6-v2\n")
    return settings


async def test_local_sentence_model_finds_meaning_without_shared_words(
    minilm_settings: Settings, client: openai.AsyncOpenAI
) -> None:
    store_id, ids = await _store(client)
    # No word of the query appears in either document; only meaning links it to the llama text.
    page = await client.vector_stores.search(store_id, query="pack animals of South American mountains")
    assert page.data and page.data[0].file_id == ids["llama.txt"]
    assert [part.text for part in page.data[0].content] == [LLAMA]


async def test_the_index_follows_the_store_at_once(client: openai.AsyncOpenAI) -> None:
    """A file removed from a store leaves its search at once, a new one joins
    once completed, and filters stay exact; in hybrid mode, so the vector
    side (SQLite's per-process matrix cache, pgvector on PostgreSQL) is held
    to it as well as the keyword index."""
    store_id, ids = await _store(client)
    for query in ("zebbras savana", "zebras"):  # vectors only / both lists; the first search fills the cache
        page = await client.vector_stores.search(store_id, query=query)
        assert page.data and page.data[0].file_id == ids["zebra.txt"]
    await client.vector_stores.files.delete(ids["zebra.txt"], vector_store_id=store_id)
    for query in ("zebbras savana", "zebras"):
        page = await client.vector_stores.search(store_id, query=query)
        assert ids["zebra.txt"] not in {result.file_id for result in page.data}, query

    okapi = await client.files.create(
        file=("okapi.txt", b"Okapis browse the Ituri forest at dawn."), purpose="assistants"
    )
    attached = await client.vector_stores.files.create_and_poll(
        file_id=okapi.id, vector_store_id=store_id, attributes={"kind": "forest"}
    )
    assert attached.status == "completed"
    for query in ("okapies iturri", "okapis forest"):
        page = await client.vector_stores.search(store_id, query=query)
        assert page.data and page.data[0].file_id == okapi.id, query
    forest = await client.vector_stores.search(
        store_id, query="okapies llamas", filters={"type": "eq", "key": "kind", "value": "forest"}
    )
    assert [result.file_id for result in forest.data] == [okapi.id]
    others = await client.vector_stores.search(
        store_id, query="okapies llamas", filters={"type": "ne", "key": "kind", "value": "forest"}
    )
    assert {result.file_id for result in others.data} == {ids["llama.txt"]}
