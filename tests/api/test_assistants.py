"""Assistants through the official SDK, on both databases."""

from __future__ import annotations

import openai
import pytest

from tests.conftest import error_of


async def test_create_retrieve_update_delete(client: openai.AsyncOpenAI) -> None:
    created = await client.beta.assistants.create(
        model="gpt-4o",
        name="Math Tutor",
        instructions="You are a personal math tutor.",
        tools=[{"type": "code_interpreter"}, {"type": "function", "function": {"name": "get_weather"}}],
        metadata={"team": "math"},
        temperature=0.5,
    )
    assert created.id.startswith("asst_")
    assert created.object == "assistant"
    assert created.name == "Math Tutor"
    assert created.tools[1].type == "function"
    assert created.metadata == {"team": "math"}
    assert created.temperature == 0.5 and created.top_p == 1.0
    assert created.response_format == "auto"

    fetched = await client.beta.assistants.retrieve(created.id)
    assert fetched.model_dump() == created.model_dump()

    updated = await client.beta.assistants.update(created.id, name="Tutor 2", metadata={"v": "2"})
    assert updated.name == "Tutor 2"
    assert updated.instructions == "You are a personal math tutor."
    assert updated.metadata == {"v": "2"}

    deleted = await client.beta.assistants.delete(created.id)
    assert deleted.deleted is True and deleted.object == "assistant.deleted"
    with pytest.raises(openai.NotFoundError) as exc:
        await client.beta.assistants.retrieve(created.id)
    assert error_of(exc)["message"] == f"No assistant found with id '{created.id}'."


async def test_file_search_tool_defaults_are_echoed(client: openai.AsyncOpenAI) -> None:
    created = await client.beta.assistants.create(model="m", tools=[{"type": "file_search"}])
    tool = created.tools[0]
    assert tool.type == "file_search"
    assert tool.file_search is not None and tool.file_search.ranking_options is not None
    assert tool.file_search.ranking_options.score_threshold == 0.0


async def test_list_pagination_is_stable_and_exact(client: openai.AsyncOpenAI) -> None:
    made = [(await client.beta.assistants.create(model="m", name=f"a{i}")).id for i in range(7)]
    first = await client.beta.assistants.list(limit=3)
    assert [a.id for a in first.data] == made[::-1][:3]
    assert first.has_more is True
    everything = [a.id async for a in client.beta.assistants.list(limit=3)]
    assert everything == made[::-1]
    ascending = await client.beta.assistants.list(order="asc", after=made[1], limit=10)
    assert [a.id for a in ascending.data] == made[2:]
    assert ascending.has_more is False
    before = await client.beta.assistants.list(order="asc", before=made[5], limit=2)
    assert [a.id for a in before.data] == made[3:5]
    assert before.has_more is True


async def test_list_and_delete_everything_loop(client: openai.AsyncOpenAI) -> None:
    for i in range(5):
        await client.beta.assistants.create(model="m", name=str(i))
    async for assistant in client.beta.assistants.list(limit=2):
        await client.beta.assistants.delete(assistant.id)
    assert (await client.beta.assistants.list()).data == []


@pytest.mark.parametrize(
    ("kwargs", "param", "code"),
    [
        ({"name": "x" * 257}, "name", "string_above_max_length"),
        ({"description": "x" * 513}, "description", "string_above_max_length"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata", "object_above_max_properties"),
        ({"metadata": {"k": "v" * 513}}, "metadata.k", "string_above_max_length"),
        ({"temperature": 3}, "temperature", "integer_above_max_value"),
        ({"tools": [{"type": "code_interpreter"}] * 129}, "tools", "array_above_max_length"),
        ({"tools": [{"type": "retrieval"}]}, "tools[0].type", "invalid_value"),
        (
            {"tools": [{"type": "function", "function": {"name": "bad name!"}}]},
            "tools[0].function.name",
            "invalid_value",
        ),
        ({"extra_body": {"file_ids": ["file-abc"]}}, "file_ids", "unknown_parameter"),
        ({"name": 5}, "name", "invalid_type"),
    ],
)
async def test_bad_input_is_400_and_stores_nothing(
    client: openai.AsyncOpenAI, kwargs: dict, param: str, code: str
) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        await client.beta.assistants.create(model="gpt-4o", **kwargs)
    assert exc.value.status_code == 400
    body = error_of(exc)
    assert body["param"] == param
    assert body["code"] == code
    assert body["type"] == "invalid_request_error"
    assert (await client.beta.assistants.list()).data == []


async def test_missing_model(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        await client.post("/assistants", body={"name": "x"}, cast_to=object)
    assert error_of(exc)["message"] == "Missing required parameter: 'model'."


async def test_wrong_prefix_is_400(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        await client.beta.assistants.retrieve("thread_abc")
    assert error_of(exc)["message"] == "Invalid 'assistant_id': 'thread_abc'. Expected an ID that begins with 'asst'."


async def test_update_with_nulls_changes_nothing(client: openai.AsyncOpenAI) -> None:
    created = await client.beta.assistants.create(model="gpt-4o", name="keep", metadata={"a": "b"})
    # go-openai's ModifyAssistant sends "model": "" and nulls for unset fields.
    updated = await client.post(
        f"/assistants/{created.id}",
        body={"model": "", "name": None, "metadata": None, "tools": None},
        cast_to=openai.types.beta.Assistant,
    )
    assert updated.model == "gpt-4o" and updated.name == "keep" and updated.metadata == {"a": "b"}


async def test_integers_beyond_64_bits_and_non_ascii_keep_their_values(client: openai.AsyncOpenAI) -> None:
    """A function's free-form ``parameters`` may hold any integer: those
    beyond 64 bits (which orjson neither writes nor reads back exactly) and
    non-ASCII text come back unchanged from the stored row, in the response
    and in the run's stream (app/wire/jsontext.py)."""
    parameters = {
        "type": "object",
        "properties": {"n": {"type": "integer", "maximum": 2**70, "minimum": -(2**64), "title": "Zähler 数"}},
        # (the last two: below -2**63 with 19 digits, read back as floats by orjson; review)
        "examples": [18446744073709551615, -9223372036854775808, 12345678901234567890123, -(2**63) - 1, -(10**19) + 1],
    }
    created = await client.beta.assistants.create(
        model="gpt-4o", tools=[{"type": "function", "function": {"name": "count", "parameters": parameters}}]
    )
    fetched = await client.beta.assistants.retrieve(created.id)
    for assistant in (created, fetched):
        function = assistant.tools[0].function  # type: ignore[union-attr]
        assert function.parameters == parameters
    async with await client.beta.threads.create_and_run(
        assistant_id=created.id, thread={"messages": [{"role": "user", "content": "Grüße, 世界"}]}, stream=True
    ) as stream:
        events = [item async for item in stream]
    assert events[-1].event == "thread.run.completed"
    for item in events:
        if item.event.startswith("thread.run.") and not item.event.startswith("thread.run.step"):
            assert item.data.tools[0].function.parameters == parameters  # type: ignore[union-attr]
