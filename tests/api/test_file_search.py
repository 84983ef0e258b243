"""file_search in runs through the official SDK, on both databases: the
seed flow (store, batch upload, assistant, question, cited answer),
message attachments building the thread's store, expired stores."""

from __future__ import annotations

import json
from typing import Any

import openai
from fastapi import FastAPI
from sqlalchemy import update

from app import orm
from tests.retrieval import documents

ZEBRA = "Zebras sleep standing up in the savanna and graze on tall grasses."
LLAMA = "Llamas carry loads across the Andes and hum to each other."
QUOKKA = "Quokkas live on Rottnest Island and are known as the happiest animals."
INCLUDE = "step_details.tool_calls[*].file_search.results[*].content"


def _ask(query: str) -> str:
    return f"What do you know? [[call file_search {json.dumps({'query': query})}]]"


async def _store_with_animals(client: openai.AsyncOpenAI) -> tuple[str, dict[str, str]]:
    store = await client.vector_stores.create(name="Animals")
    await client.vector_stores.file_batches.upload_and_poll(
        store.id,
        files=[
            ("zebras.pdf", documents.pdf([ZEBRA])),
            ("llamas.docx", documents.docx([LLAMA])),
            ("quokkas.md", f"# Quokkas\n\n{QUOKKA}\n".encode()),
        ],
    )
    files = await client.vector_stores.files.list(store.id)
    names = {}
    for item in files.data:
        names[(await client.files.retrieve(item.id)).filename] = item.id
    return store.id, names


def _citations(message: Any) -> list[Any]:
    part = message.content[0]
    assert part.type == "text"
    return [a for a in part.text.annotations if a.type == "file_citation"]


async def test_seed_flow_answer_cites_the_right_file(client: openai.AsyncOpenAI) -> None:
    store_id, names = await _store_with_animals(client)
    assistant = await client.beta.assistants.create(
        model="gpt-4o",
        instructions="You answer from the files.",
        tools=[{"type": "file_search"}],
        tool_resources={"file_search": {"vector_store_ids": [store_id]}},
    )
    thread = await client.beta.threads.create(messages=[{"role": "user", "content": _ask("Where do zebras sleep?")}])
    run = await client.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant.id)
    assert run.status == "completed", run.last_error
    answer = (await client.beta.threads.messages.list(thread.id, order="desc")).data[0]
    citations = _citations(answer)
    assert citations, answer.content
    text = answer.content[0].text.value  # type: ignore[union-attr]
    first = citations[0]
    assert first.file_citation.file_id == names["zebras.pdf"]
    assert text[first.start_index : first.end_index] == first.text
    assert first.text.startswith("【") and first.text.endswith("†zebras.pdf】")


async def test_the_tool_step_records_results(client: openai.AsyncOpenAI) -> None:
    store_id, names = await _store_with_animals(client)
    assistant = await client.beta.assistants.create(
        model="gpt-4o",
        tools=[{"type": "file_search", "file_search": {"ranking_options": {"score_threshold": 0.1}}}],
        tool_resources={"file_search": {"vector_store_ids": [store_id]}},
    )
    run = await client.beta.threads.create_and_run_poll(
        assistant_id=assistant.id, thread={"messages": [{"role": "user", "content": _ask("zebras sleep")}]}
    )
    assert run.status == "completed", run.last_error
    steps = await client.beta.threads.runs.steps.list(run.id, thread_id=run.thread_id, order="asc")
    call = steps.data[0].step_details.tool_calls[0]  # type: ignore[union-attr]
    assert call.type == "file_search"
    assert call.file_search.ranking_options is not None
    assert call.file_search.ranking_options.score_threshold == 0.1
    results = call.file_search.results
    assert results and results[0].file_name == "zebras.pdf" and results[0].file_id == names["zebras.pdf"]
    assert results[0].content is None
    detailed = await client.beta.threads.runs.steps.retrieve(
        steps.data[0].id, thread_id=run.thread_id, run_id=run.id, include=[INCLUDE]
    )
    content = detailed.step_details.tool_calls[0].file_search.results[0].content  # type: ignore[union-attr]
    assert content and ZEBRA in content[0].text


async def test_attachments_build_the_thread_store_and_the_run_waits_for_it(client: openai.AsyncOpenAI) -> None:
    doc = (await client.files.create(file=("llamas.txt", LLAMA.encode()), purpose="assistants")).id
    assistant = await client.beta.assistants.create(model="gpt-4o", tools=[{"type": "file_search"}])
    thread = await client.beta.threads.create()
    await client.beta.threads.messages.create(
        thread.id,
        role="user",
        content=_ask("llamas Andes"),
        attachments=[{"file_id": doc, "tools": [{"type": "file_search"}]}],
    )
    thread = await client.beta.threads.retrieve(thread.id)
    assert thread.tool_resources is not None and thread.tool_resources.file_search is not None
    store_ids = thread.tool_resources.file_search.vector_store_ids
    assert store_ids and len(store_ids) == 1
    store = await client.vector_stores.retrieve(store_ids[0])
    assert store.expires_after is not None and store.expires_after.days == 7
    assert store.expires_at == store.last_active_at + 7 * 86400  # type: ignore[operator]
    run = await client.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant.id)
    assert run.status == "completed", run.last_error
    answer = (await client.beta.threads.messages.list(thread.id)).data[0]
    assert [c.file_citation.file_id for c in _citations(answer)] == [doc]
    # A second attachment extends the same store.
    other = (await client.files.create(file=("zebras.txt", ZEBRA.encode()), purpose="assistants")).id
    await client.beta.threads.messages.create(
        thread.id, role="user", content="more", attachments=[{"file_id": other, "tools": [{"type": "file_search"}]}]
    )
    again = await client.beta.threads.retrieve(thread.id)
    assert again.tool_resources.file_search.vector_store_ids == store_ids  # type: ignore[union-attr]
    assert (await client.vector_stores.retrieve(store_ids[0])).file_counts.total == 2


async def test_thread_helper_creates_a_store(client: openai.AsyncOpenAI) -> None:
    doc = (await client.files.create(file=("quokkas.md", QUOKKA.encode()), purpose="assistants")).id
    thread = await client.beta.threads.create(
        tool_resources={"file_search": {"vector_stores": [{"file_ids": [doc], "metadata": {"k": "v"}}]}}
    )
    assert thread.tool_resources is not None and thread.tool_resources.file_search is not None
    (store_id,) = thread.tool_resources.file_search.vector_store_ids or []
    store = await client.vector_stores.retrieve(store_id)
    assert store.metadata == {"k": "v"} and store.file_counts.total == 1
    # A thread's helper store expires a week after it was last active (an assistant's never).
    assert store.expires_after is not None and store.expires_after.days == 7
    assert store.expires_after.anchor == "last_active_at" and store.expires_at is not None
    assert (await client.vector_stores.files.retrieve(doc, vector_store_id=store_id)).id == doc


async def test_run_on_an_expired_store_fails_clearly(client: openai.AsyncOpenAI, app: FastAPI) -> None:
    store = await client.vector_stores.create(name="old", expires_after={"anchor": "last_active_at", "days": 1})
    async with app.state.runtime.transaction() as session:
        await session.execute(update(orm.VectorStore).where(orm.VectorStore.id == store.id).values(expires_at=1))
    assert (await client.vector_stores.retrieve(store.id)).status == "expired"
    assistant = await client.beta.assistants.create(
        model="gpt-4o",
        tools=[{"type": "file_search"}],
        tool_resources={"file_search": {"vector_store_ids": [store.id]}},
    )
    run = await client.beta.threads.create_and_run_poll(
        assistant_id=assistant.id, thread={"messages": [{"role": "user", "content": _ask("anything")}]}
    )
    assert run.status == "failed"
    assert run.last_error is not None and store.id in run.last_error.message and "expired" in run.last_error.message


async def test_assistant_helper_and_run_override(client: openai.AsyncOpenAI) -> None:
    zebra = (await client.files.create(file=("zebra.txt", ZEBRA.encode()), purpose="assistants")).id
    llama = (await client.files.create(file=("llama.txt", LLAMA.encode()), purpose="assistants")).id
    assistant = await client.beta.assistants.create(
        model="gpt-4o",
        tools=[{"type": "file_search"}],
        tool_resources={"file_search": {"vector_stores": [{"file_ids": [zebra]}]}},
    )
    assert assistant.tool_resources is not None and assistant.tool_resources.file_search is not None
    (own_store,) = assistant.tool_resources.file_search.vector_store_ids or []
    own = await client.vector_stores.retrieve(own_store)
    assert own.file_counts.total == 1 and own.expires_after is None
    other = await client.vector_stores.create(file_ids=[llama])
    await client.vector_stores.files.poll(llama, vector_store_id=other.id)
    await client.vector_stores.files.poll(zebra, vector_store_id=own_store)
    # The create-thread-and-run override replaces the assistant's store for this run.
    run = await client.beta.threads.create_and_run_poll(
        assistant_id=assistant.id,
        thread={"messages": [{"role": "user", "content": _ask("zebras llamas")}]},
        tool_resources={"file_search": {"vector_store_ids": [other.id]}},
    )
    assert run.status == "completed", run.last_error
    answer = (await client.beta.threads.messages.list(run.thread_id)).data[0]
    assert {c.file_citation.file_id for c in _citations(answer)} == {llama}
    # Without the override, the assistant's own store is searched.
    run = await client.beta.threads.create_and_run_poll(
        assistant_id=assistant.id, thread={"messages": [{"role": "user", "content": _ask("zebras llamas")}]}
    )
    answer = (await client.beta.threads.messages.list(run.thread_id)).data[0]
    assert {c.file_citation.file_id for c in _citations(answer)} == {zebra}


async def test_no_results_answer_has_no_citations(client: openai.AsyncOpenAI) -> None:
    store = await client.vector_stores.create()
    assistant = await client.beta.assistants.create(
        model="gpt-4o",
        tools=[{"type": "file_search"}],
        tool_resources={"file_search": {"vector_store_ids": [store.id]}},
    )
    run = await client.beta.threads.create_and_run_poll(
        assistant_id=assistant.id, thread={"messages": [{"role": "user", "content": _ask("anything at all")}]}
    )
    assert run.status == "completed", run.last_error
    answer = (await client.beta.threads.messages.list(run.thread_id)).data[0]
    assert _citations(answer) == [] and "No results" in answer.content[0].text.value  # type: ignore[union-attr]


async def test_streamed_run_emits_the_file_search_step_and_cited_message(client: openai.AsyncOpenAI) -> None:
    store_id, names = await _store_with_animals(client)
    assistant = await client.beta.assistants.create(
        model="gpt-4o",
        tools=[{"type": "file_search"}],
        tool_resources={"file_search": {"vector_store_ids": [store_id]}},
    )
    thread = await client.beta.threads.create(messages=[{"role": "user", "content": _ask("quokkas island")}])
    deltas: list[Any] = []
    async with client.beta.threads.runs.stream(thread_id=thread.id, assistant_id=assistant.id) as stream:
        async for event in stream:
            if event.event == "thread.run.step.delta":
                deltas += event.data.delta.step_details.tool_calls or []  # type: ignore[union-attr]
        final = await stream.get_final_messages()
        run = await stream.get_final_run()
    assert run.status == "completed"
    assert [(d.type, d.index, d.id is not None) for d in deltas] == [("file_search", 0, True)]
    citations = _citations(final[-1])
    assert citations and citations[0].file_citation.file_id == names["quokkas.md"]
