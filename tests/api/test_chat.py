"""Chat completions, embeddings and models through the official SDK (issue
12), served by the built-in offline model with nothing configured; every
JSON response is checked against OpenAI's schemas (tests/conftest.py), each
streamed chunk explicitly (tests/oas.py)."""

from __future__ import annotations

import base64
import json
import math
import struct
from typing import Any

import httpx2
import openai
import pytest

from app.retrieval import embed
from tests import oas
from tests.conftest import error_of

pytestmark = pytest.mark.timeout(60)

WEATHER: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME: Any = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


async def test_plain_completion(client: openai.AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}],
    )
    assert completion.object == "chat.completion" and completion.id.startswith("chatcmpl-")
    assert completion.model == "gpt-4o-mini"
    (choice,) = completion.choices
    assert choice.message.role == "assistant" and choice.message.content == "You said: Hello there"
    assert choice.finish_reason == "stop" and choice.message.tool_calls is None
    assert completion.usage is not None and completion.usage.completion_tokens == 4
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 4


async def test_directives_work_in_chat(client: openai.AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "[[reply Speaker: critic]]"}]
    )
    assert completion.choices[0].message.content == "Speaker: critic"


async def test_parallel_tool_calls_then_tool_results(client: openai.AsyncOpenAI) -> None:
    ask = 'Weather and time? [[call get_weather {"city": "Paris"}]] [[call get_time]]'
    messages: list[Any] = [{"role": "user", "content": ask}]
    completion = await client.chat.completions.create(model="gpt-4o", messages=messages, tools=[WEATHER, TIME])
    (choice,) = completion.choices
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = choice.message.tool_calls or []
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [  # type: ignore[union-attr]
        ("get_weather", {"city": "Paris"}),
        ("get_time", {}),
    ]
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)
    messages.append(choice.message.model_dump(exclude_none=True))
    messages += [{"role": "tool", "tool_call_id": calls[0].id, "content": "18C"}]
    messages += [{"role": "tool", "tool_call_id": calls[1].id, "content": "noon"}]
    answer = await client.chat.completions.create(model="gpt-4o", messages=messages, tools=[WEATHER, TIME])
    assert answer.choices[0].message.content == "Tool results: get_weather -> 18C; get_time -> noon"


async def test_tool_choice_forces_one_call(client: openai.AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(
        model="gpt-4o",
        messages=[{"role": "user", "content": "anything"}],
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        parallel_tool_calls=False,
    )
    calls = completion.choices[0].message.tool_calls or []
    assert [c.function.name for c in calls] == ["get_time"]  # type: ignore[union-attr]


async def test_response_formats(client: openai.AsyncOpenAI) -> None:
    messages: Any = [{"role": "user", "content": "Give me JSON"}]
    as_object = await client.chat.completions.create(
        model="gpt-4o", messages=messages, response_format={"type": "json_object"}
    )
    assert json.loads(as_object.choices[0].message.content or "") == {"message": "You said: Give me JSON"}
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    as_schema = await client.chat.completions.create(
        model="gpt-4o",
        messages=messages,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}},
    )
    assert json.loads(as_schema.choices[0].message.content or "") == {"name": "", "age": 0}


async def test_streaming_with_usage(client: openai.AsyncOpenAI, http: httpx2.AsyncClient) -> None:
    stream = await client.chat.completions.create(
        model="gpt-4o",
        messages=[{"role": "user", "content": "Stream this please"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "You said: Stream this please"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1
    # The raw frames: data lines only (no event:), each chunk OpenAPI-valid, then [DONE].
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    response = await http.post("/v1/chat/completions", json=body)
    frames = response.text.split("\n\n")
    assert frames[-2:] == ["data: [DONE]", ""]
    for frame in frames[:-2]:
        assert frame.startswith("data: ")
        oas.validate(json.loads(frame[len("data: ") :]), "CreateChatCompletionStreamResponse")


async def test_streamed_tool_calls_accumulate(client: openai.AsyncOpenAI) -> None:
    ask = '[[call get_weather {"city": "Tokyo"}]] [[call get_time]]'
    stream = await client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": ask}], tools=[WEATHER, TIME], stream=True
    )
    calls: dict[int, dict[str, str]] = {}
    finish = None
    async for chunk in stream:
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for call in choice.delta.tool_calls or []:
                entry = calls.setdefault(call.index, {"id": "", "name": "", "arguments": ""})
                entry["id"] += call.id or ""
                entry["name"] += (call.function.name if call.function else None) or ""
                entry["arguments"] += (call.function.arguments if call.function else None) or ""
    assert finish == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        ("get_weather", {"city": "Tokyo"}),
        ("get_time", {}),
    ]
    assert all(c["id"].startswith("call_") and c["id"].count("call_") == 1 for c in calls.values())


async def test_sdk_stream_helper_and_parse(client: openai.AsyncOpenAI) -> None:
    """The SDK's own helpers (chat.completions.stream, parse) read our shapes."""
    async with client.chat.completions.stream(
        model="gpt-4o", messages=[{"role": "user", "content": "helper"}]
    ) as stream:
        final = await stream.get_final_completion()
    assert final.choices[0].message.content == "You said: helper"


async def test_failures_are_openai_errors(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.RateLimitError) as limited:
        await client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "[[fail rate_limit]]"}]
        )
    assert error_of(limited)["code"] == "rate_limit_exceeded"
    stream = await client.chat.completions.create(
        model="gpt-4o",
        messages=[{"role": "user", "content": "[[tokens 5]] [[fail server_error after 3]]"}],
        stream=True,
    )
    seen = []
    with pytest.raises(openai.APIError, match="failing on cue"):
        async for chunk in stream:
            seen.append(chunk)
    assert len(seen) == 4  # the role chunk and three words


@pytest.mark.parametrize(
    ("body", "status", "param", "needle"),
    [
        ({"messages": [{"role": "user", "content": "x"}]}, 400, None, "you must provide a model parameter"),
        ({"model": "gpt-4o", "messages": []}, 400, "messages", "messages"),
        ({"model": "gpt-4o"}, 400, "messages", "Missing required parameter"),
        ({"model": "gpt-4o", "messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role", "robot"),
        ({"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}], "n": 2}, 400, "n", "'n' must be 1"),
        (
            {
                "model": "gpt-4o",
                "messages": [{"role": "user", "content": "x"}],
                "stream_options": {"include_usage": True},
            },
            400,
            "stream_options",
            "only allowed when 'stream' is enabled",
        ),
        ({"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}], "bogus": 1}, 400, "bogus", "bogus"),
    ],
)
async def test_bad_requests(
    http: httpx2.AsyncClient, body: dict[str, Any], status: int, param: Any, needle: str
) -> None:
    response = await http.post("/v1/chat/completions", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert needle in error["message"] and error["param"] == param and error["type"] == "invalid_request_error"


async def test_azure_deployment_paths(http: httpx2.AsyncClient) -> None:
    azure = openai.AsyncAzureOpenAI(
        azure_endpoint="http://testserver",
        api_key="azure-key",
        api_version="2024-10-21",
        http_client=http,
        max_retries=0,
    )
    completion = await azure.chat.completions.create(
        model="my-gpt4o-deployment", messages=[{"role": "user", "content": "Hi Azure"}]
    )
    assert completion.model == "my-gpt4o-deployment"
    assert completion.choices[0].message.content == "You said: Hi Azure"
    oas.validate(completion.model_dump(exclude_unset=True), "CreateChatCompletionResponse")
    embedded = await azure.embeddings.create(model="my-embedding-deployment", input="hello", encoding_format="float")
    assert embedded.model == "my-embedding-deployment" and len(embedded.data[0].embedding) == embed.DIMENSIONS
    oas.validate(embedded.model_dump(exclude_unset=True), "CreateEmbeddingResponse")


@pytest.mark.parametrize("prefix", ["/v1", "/openai", "/openai/v1"])
async def test_every_prefix_serves_chat(http: httpx2.AsyncClient, prefix: str) -> None:
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "prefix"}]}
    response = await http.post(f"{prefix}/chat/completions", json=body)
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"] == "You said: prefix"
    assert (await http.get(f"{prefix}/models")).status_code == 200


# ----------------------------------------------------------------- embeddings


async def test_embeddings_float_and_base64(client: openai.AsyncOpenAI) -> None:
    texts = ["refund policy", "the weather in Paris"]
    floats = await client.embeddings.create(model="text-embedding-3-small", input=texts, encoding_format="float")
    assert [item.index for item in floats.data] == [0, 1]
    assert floats.usage.prompt_tokens == floats.usage.total_tokens == 6
    vector = floats.data[0].embedding
    assert len(vector) == embed.DIMENSIONS and math.isclose(sum(v * v for v in vector), 1.0, rel_tol=1e-6)
    assert vector == pytest.approx(embed.HashingEmbedder().vector("refund policy"))
    # The SDK asks for base64 by default and decodes it itself.
    default = await client.embeddings.create(model="text-embedding-3-small", input=texts)
    assert default.data[1].embedding == pytest.approx(floats.data[1].embedding, rel=1e-6)


async def test_embeddings_raw_base64_tokens_and_dimensions(http: httpx2.AsyncClient) -> None:
    body = {"model": "text-embedding-3-small", "input": "hello world", "encoding_format": "base64", "dimensions": 64}
    response = await http.post("/v1/embeddings", json=body)
    assert response.status_code == 200, response.text
    raw = base64.b64decode(response.json()["data"][0]["embedding"])
    vector = struct.unpack(f"<{len(raw) // 4}f", raw)
    assert len(vector) == 64 and math.isclose(sum(v * v for v in vector), 1.0, rel_tol=1e-5)
    # Token ids, as LangChain's OpenAIEmbeddings sends them (cl100k: "Hello world").
    tokens = await http.post("/v1/embeddings", json={"model": "text-embedding-3-small", "input": [[9906, 1917]]})
    text = await http.post("/v1/embeddings", json={"model": "text-embedding-3-small", "input": "Hello world"})
    assert tokens.json()["data"][0]["embedding"] == text.json()["data"][0]["embedding"]
    too_many = await http.post("/v1/embeddings", json={**body, "dimensions": 4096})
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "dimensions"
    empty = await http.post("/v1/embeddings", json={"model": "text-embedding-3-small", "input": ""})
    assert empty.status_code == 400 and empty.json()["error"]["param"] == "input"


# --------------------------------------------------------------------- models


async def test_models_list_and_retrieve(client: openai.AsyncOpenAI) -> None:
    listed = await client.models.list()
    assert [model.id for model in listed.data] == ["offline"]
    # With nothing configured every name routes to the offline model.
    model = await client.models.retrieve("gpt-4o")
    assert model.id == "gpt-4o" and model.object == "model"


async def test_json_schema_format_needs_its_schema(http: httpx2.AsyncClient) -> None:
    body = {
        "model": "gpt-4o",
        "messages": [{"role": "user", "content": "x"}],
        "response_format": {"type": "json_schema"},
    }
    response = await http.post("/v1/chat/completions", json=body)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "response_format.json_schema"
