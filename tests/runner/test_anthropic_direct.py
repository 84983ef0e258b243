"""anthropic/ routes served directly (app/llm/anthropic_messages.py): each
request of the matrix goes once through litellm (``direct: false``) and once
directly to the same Anthropic Messages stub (tests/runner/fake_anthropic.py),
and both must send the same body and headers and give the same events, or
the same LLMError: the proof that the direct path sends what litellm sends."""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Any

import openai
import pytest

from app.llm import LLM, ChatRequest, Event, LLMConfigError, LLMError, Route, litellm_adapter
from app.llm.anthropic_request import request_refusal
from app.settings import Settings
from tests.runner.fake_anthropic import FakeAnthropic

pytestmark = pytest.mark.timeout(120)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "title": "Weather",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}  # no parameters, no description
CALLS = [
    {"id": "toolu_01", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
    {"id": "call.2", "type": "function", "function": {"name": "get_time", "arguments": ""}},
]
PNG = "data:image/png;base64,iVBORw0KGgo="


def user(text: Any) -> dict[str, Any]:
    return {"role": "user", "content": text}


def tool_round(content: Any = None) -> list[dict[str, Any]]:
    return [
        {"role": "system", "content": "Use tools."},
        user("Weather and time in Paris?"),
        {"role": "assistant", "content": content, "tool_calls": CALLS},
        {"role": "tool", "tool_call_id": "toolu_01", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call.2", "content": [{"type": "text", "text": "12:00"}]},
    ]


# name -> (model, request fields): the requests this server makes.
MATRIX: dict[str, tuple[str, dict[str, Any]]] = {
    "text": ("claude-text", {"messages": [user("hi")]}),
    "system and turns": (
        "claude-text",
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                user("one"),
                user([{"type": "text", "text": "two"}, {"type": "text", "text": ""}]),
                {"role": "assistant", "content": "an answer  "},
                {"role": "system", "content": [{"type": "text", "text": "Later rules."}]},
                {"role": "system", "content": ""},
                user("   "),
                {"role": "assistant", "content": "Sure,  "},
            ]
        },
    ),
    "tools offered": ("claude-tool", {"messages": [user("weather?")], "tools": [WEATHER, TIME]}),
    "tool results": ("claude-text", {"messages": tool_round(), "tools": [WEATHER, TIME]}),
    "tool results, empty assistant text": ("claude-text", {"messages": tool_round(""), "tools": [WEATHER, TIME]}),
    "tool results, no tools offered": ("claude-text", {"messages": [*tool_round("Checking."), user("and?")]}),
    "tool_choice auto": ("claude-tool", {"messages": [user("w")], "tools": [WEATHER], "tool_choice": "auto"}),
    "tool_choice required": ("claude-tool", {"messages": [user("w")], "tools": [WEATHER], "tool_choice": "required"}),
    "tool_choice none": ("claude-text", {"messages": [user("w")], "tools": [WEATHER], "tool_choice": "none"}),
    "tool_choice named": (
        "claude-tool",
        {
            "messages": [user("w")],
            "tools": [WEATHER, TIME],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        },
    ),
    "no parallel tool calls": (
        "claude-tool",
        {"messages": [user("w")], "tools": [WEATHER], "parallel_tool_calls": False},
    ),
    "sampling and stop": (
        "claude-stop-sequence",
        {"messages": [user("x")], "temperature": 0.2, "top_p": 0.9, "max_tokens": 100, "extra": {"stop": ["\n\n"]}},
    ),
    "stop as a string, defaults": (
        "claude-max",
        {"messages": [user("x")], "temperature": 1.0, "top_p": 1.0, "extra": {"stop": "END"}},
    ),
    "seed and stop": ("claude-text", {"messages": [user("x")], "extra": {"stop": "END", "seed": 3}}),
    "images": (
        "claude-text",
        {
            "messages": [
                user(
                    [
                        {"type": "text", "text": "what?"},
                        {"type": "image_url", "image_url": {"url": PNG}},
                        {"type": "image_url", "image_url": {"url": "https://example.com/a.png", "detail": "low"}},
                    ]
                )
            ]
        },
    ),
    "assistant parts, names, repeated ids": (
        "claude-text",
        {
            "messages": [
                {"role": "user", "content": "héllo ✓", "name": "ann"},
                {"role": "assistant", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": " "}]},
                {"role": "assistant", "content": None, "tool_calls": CALLS[:1]},
                {"role": "assistant", "content": "again", "tool_calls": CALLS[:1]},
                {"role": "tool", "tool_call_id": "toolu_01", "content": ""},
                {"role": "assistant", "content": [{"type": "text", "text": "last  "}]},
            ],
            "tools": [WEATHER],
        },
    ),
    "odd tool schemas and choices": (
        "claude-tool",
        {
            "messages": [user("w")],
            "tools": [
                {"type": "function", "function": {"name": "a", "parameters": None}},
                {"type": "function", "function": {"name": "b", "parameters": {"type": "string", "$defs": {"x": {}}}}},
                {"type": "function", "function": {"name": "c", "parameters": {}, "strict": True}},
            ],
            "tool_choice": {"type": "required"},
        },
    ),
    "tool_choice none as an object, no parallel calls": (
        "claude-text",
        {"messages": [user("w")], "tools": [WEATHER], "tool_choice": {"type": "none"}, "parallel_tool_calls": False},
    ),
    "tool_choice none, no parallel calls": (
        "claude-text",
        {"messages": [user("w")], "tools": [WEATHER], "tool_choice": "none", "parallel_tool_calls": False},
    ),
    "an image with its format": (
        "claude-text",
        {"messages": [user([{"type": "image_url", "image_url": {"url": PNG, "format": "image/webp"}}])]},
    ),
    "no sampling, temperature 1 and top_p": (
        "claude-opus-4-7",
        {"messages": [user("hi")], "temperature": 1.0, "top_p": 0.5, "max_tokens": 10},
    ),
    "response_format text": (
        "claude-tool",
        {"messages": [user("w")], "tools": [WEATHER], "response_format": {"type": "text"}},
    ),
    "response_format json_object": (
        "claude-tool",
        {"messages": [user("w")], "tools": [WEATHER], "response_format": {"type": "json_object"}},
    ),
    "response_format json_object, native structured output": (
        "claude-sonnet-4-5",
        {"messages": [user("w")], "response_format": {"type": "json_object"}},
    ),
    "cache usage": ("claude-cache", {"messages": [user("again")]}),
    "a model the map knows": ("claude-3-5-sonnet-20240620", {"messages": [user("hi")]}),
    "a model without sampling": ("claude-opus-4-7", {"messages": [user("hi")], "temperature": 0.3}),
}
# Cases with a parameter litellm has no Anthropic name for: sent as it is,
# Anthropic refuses it, naming it (issue 12); every other case is answered.
REFUSED = {
    "seed and stop": "seed",
    "response_format json_object": "response_format",
    "response_format json_object, native structured output": "response_format",
}
FAILURES = [
    "claude-400", "claude-401", "claude-403", "claude-404", "claude-413", "claude-429", "claude-500", "claude-529",
    "claude-502", "claude-503", "claude-504", "claude-422", "claude-stream-error",
]  # fmt: skip


@pytest.fixture
async def fake_anthropic() -> AsyncIterator[FakeAnthropic]:
    server = FakeAnthropic()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def routing(tmp_path: Path, params: dict[str, Any], direct: bool) -> Path:
    entry: dict[str, Any] = {"model_name": "*", "litellm_params": {"model": "anthropic/*", **params}}
    if not direct:
        entry["direct"] = False
    path = tmp_path / f"models-{direct}.json"
    path.write_text(json.dumps({"model_list": [entry]}))
    return path


async def outcome(llm: LLM, request: ChatRequest) -> list[Event] | tuple[str, str]:
    try:
        return [event async for event in llm.stream(request)]
    except LLMError as exc:
        return (exc.code, exc.message)


async def both(
    tmp_path: Path, fake: FakeAnthropic, llms: list[LLM], request: ChatRequest, **params: Any
) -> tuple[Any, Any, list[dict[str, Any]], list[dict[str, Any]]]:
    """(litellm's outcome, the direct one, the requests litellm sent, those sent directly)."""
    params = {"api_base": fake.api_base, "api_key": "sk-ant-test", **params}
    through, direct = (
        LLM.from_config(routing(tmp_path, params, False)),
        LLM.from_config(routing(tmp_path, params, True)),
    )
    llms += [through, direct]
    assert direct.route(request.model).direct and not through.route(request.model).direct
    before = len(fake.requests)
    expected = await outcome(through, request)
    middle = len(fake.requests)
    got = await outcome(direct, request)
    return expected, got, fake.requests[before:middle], fake.requests[middle:]


@pytest.mark.parametrize("case", list(MATRIX))
async def test_the_same_request_and_events_as_litellm(
    case: str, fake_anthropic: FakeAnthropic, tmp_path: Path, llms: list[LLM]
) -> None:
    model, fields = MATRIX[case]
    request = ChatRequest(model, **fields)
    assert request_refusal(request) is None  # served directly, not handed back to litellm
    expected, got, sent_by_litellm, sent_directly = await both(tmp_path, fake_anthropic, llms, request)
    assert [sent["body"] for sent in sent_directly] == [sent["body"] for sent in sent_by_litellm]
    assert [sent["headers"] for sent in sent_directly] == [sent["headers"] for sent in sent_by_litellm]
    assert [sent["path"] for sent in sent_directly] == [sent["path"] for sent in sent_by_litellm] == ["/v1/messages"]
    assert got == expected
    if case in REFUSED:
        assert isinstance(got, tuple) and f"{REFUSED[case]}: Extra inputs are not permitted" in got[1], got
    else:
        assert isinstance(got, list), got  # nothing Anthropic refuses, such as an OpenAI name beside its translation


@pytest.mark.parametrize("model", FAILURES)
async def test_the_same_errors_as_litellm(
    model: str, fake_anthropic: FakeAnthropic, tmp_path: Path, llms: list[LLM]
) -> None:
    request = ChatRequest(model, [user("hi")], temperature=0.5)
    expected, got, sent_by_litellm, sent_directly = await both(tmp_path, fake_anthropic, llms, request)
    assert isinstance(expected, tuple)
    assert got == expected
    assert len(sent_directly) == len(sent_by_litellm) == 1  # litellm's Anthropic client does not retry


@pytest.mark.parametrize(
    ("params", "extra"),
    [
        ({"temperature": 0.3, "max_tokens": 50, "stop": "STOP", "extra_headers": {"X-Tenant": "t1"}}, {"stop": "C"}),
        ({"api_base": "os.environ/TEST_ANTHROPIC_BASE", "api_key": "os.environ/TEST_ANTHROPIC_KEY"}, {}),
        ({"api_key": "sk-ant-oat01-subscription"}, {}),
        ({"stop": ["A", "B"], "max_tokens": 7, "top_p": 0.5}, {"stop": "C"}),
        ({"stop": ["X", " "], "temperature": 0.7}, {}),  # the route's stop alone: stop_sequences only
        ({"api_base": "os.environ/TEST_ANTHROPIC_MESSAGES_URL"}, {}),
        ({"api_key": None}, {}),
    ],
)
async def test_route_parameters_as_litellm_sends_them(
    params: dict[str, Any],
    extra: dict[str, Any],
    fake_anthropic: FakeAnthropic,
    tmp_path: Path,
    llms: list[LLM],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TEST_ANTHROPIC_BASE", fake_anthropic.api_base + "/")
    monkeypatch.setenv("TEST_ANTHROPIC_KEY", "sk-ant-from-env")
    monkeypatch.setenv("TEST_ANTHROPIC_MESSAGES_URL", fake_anthropic.api_base + "/v1/messages")
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.setenv("ANTHROPIC_AUTH_TOKEN", "token-from-env")  # used only without a key
    request = ChatRequest("claude-text", [user("hi")], tools=[WEATHER], max_tokens=20, extra=extra)
    expected, got, sent_by_litellm, sent_directly = await both(tmp_path, fake_anthropic, llms, request, **params)
    assert [sent["body"] for sent in sent_directly] == [sent["body"] for sent in sent_by_litellm]
    assert [sent["headers"] for sent in sent_directly] == [sent["headers"] for sent in sent_by_litellm]
    assert [sent["path"] for sent in sent_directly] == [sent["path"] for sent in sent_by_litellm]
    assert got == expected


async def test_the_key_from_the_environment_and_none_at_all(
    fake_anthropic: FakeAnthropic, tmp_path: Path, llms: list[LLM], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-environment")
    request = ChatRequest("claude-text", [user("hi")])
    expected, got, by_litellm, directly = await both(tmp_path, fake_anthropic, llms, request, api_key=None)
    assert got == expected and directly[0]["headers"] == by_litellm[0]["headers"]
    assert directly[0]["headers"]["x-api-key"] == "sk-ant-environment"
    monkeypatch.delenv("ANTHROPIC_API_KEY")
    monkeypatch.delenv("ANTHROPIC_AUTH_TOKEN", raising=False)
    expected, got, by_litellm, directly = await both(tmp_path, fake_anthropic, llms, request, api_key=None)
    assert isinstance(got, tuple) and got[0] == expected[0] and "Missing Anthropic API Key" in got[1]
    assert by_litellm == directly == []


async def test_a_stalled_stream_times_out_as_through_litellm(
    fake_anthropic: FakeAnthropic, tmp_path: Path, llms: list[LLM]
) -> None:
    request = ChatRequest("claude-stall", [user("hi")])
    expected, got, _, _ = await both(tmp_path, fake_anthropic, llms, request, timeout=0.5)
    assert isinstance(got, tuple) and got[0] == expected[0] == "server_error"
    assert "Request timed out" in got[1]


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {}}}}, "response_format"),
        (
            {
                "response_format": {"type": "json_object"},
                "tools": [{"type": "function", "function": {"name": "json_tool_call"}}],
            },
            "response_format",
        ),
        ({"reasoning_effort": "low"}, "reasoning_effort"),
        # Port 1 on loopback refuses: litellm's download of the image never leaves the machine.
        ({"messages": [user([{"type": "image_url", "image_url": {"url": "http://127.0.0.1:1/a.png"}}])]}, "http://"),
        ({"messages": [{"role": "user", "content": "x", "cache_control": {"type": "ephemeral"}}]}, "keys"),
        ({"tools": [{"type": "function", "function": {"name": "a.b"}}]}, "name"),
    ],
)
async def test_requests_it_does_not_translate_go_through_litellm(
    fields: dict[str, Any],
    reason: str,
    fake_anthropic: FakeAnthropic,
    tmp_path: Path,
    llms: list[LLM],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    request = ChatRequest("claude-text", **{"messages": [user("hi")], **fields})
    assert reason in (request_refusal(request) or "")
    handed: list[ChatRequest] = []
    through_litellm = litellm_adapter.stream

    def recorded(route: Route, request: ChatRequest, counter: Any) -> AsyncGenerator[Event, None]:
        handed.append(request)
        return through_litellm(route, request, counter)

    monkeypatch.setattr(litellm_adapter, "stream", recorded)
    llm = LLM.from_config(routing(tmp_path, {"api_base": fake_anthropic.api_base, "api_key": "k"}, True))
    llms.append(llm)
    assert llm.route("claude-text").direct
    await outcome(llm, request)  # litellm's answer or its failure (it cannot download the http:// image here)
    assert handed == [request]


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"top_k": 5}, "top_k"),
        ({"drop_params": False}, "drop_params"),
        ({"extra_headers": {"anthropic-beta": "x"}}, "anthropic-beta"),
        ({"api_base": "http://x/?a=1"}, "query"),
    ],
)
def test_routes_it_does_not_serve(tmp_path: Path, params: dict[str, Any], needle: str) -> None:
    entry = {"model_name": "c", "litellm_params": {"model": "anthropic/claude", **params}, "direct": True}
    path = tmp_path / "models.json"
    path.write_text(json.dumps({"model_list": [entry]}))
    with pytest.raises(LLMConfigError, match=needle):
        LLM.from_config(path)


async def test_a_stream_cut_short_is_a_server_error_as_through_litellm(
    fake_anthropic: FakeAnthropic, tmp_path: Path, llms: list[LLM]
) -> None:
    """The code is litellm's; the text names the failure in this client's
    words (litellm's quotes its HTTP transport's own exception)."""
    expected, got, _, _ = await both(tmp_path, fake_anthropic, llms, ChatRequest("claude-drop", [user("hi")]))
    assert isinstance(got, tuple) and got[0] == expected[0] == "server_error"
    assert "Connection error." in got[1]


async def test_max_retries_on_the_route_retries(fake_anthropic: FakeAnthropic, tmp_path: Path, llms: list[LLM]) -> None:
    """litellm's Anthropic client never retries; a route that asks for retries gets them on the direct path."""
    llm = LLM.from_config(
        routing(tmp_path, {"api_base": fake_anthropic.api_base, "api_key": "k", "max_retries": 1}, True)
    )
    llms.append(llm)
    code, _ = await outcome(llm, ChatRequest("claude-529", [user("hi")]))  # type: ignore[misc]
    assert code == "server_error"
    assert len(fake_anthropic.requests) == 2


@pytest.fixture
def settings(database_url: str, tmp_path: Path, fake_anthropic: FakeAnthropic) -> Settings:
    """The API's settings: every model to the Anthropic stub, by the direct path."""
    params = {"api_base": fake_anthropic.api_base, "api_key": "sk-ant-test"}
    return Settings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        poll_after_ms=10,
        llm_config=routing(tmp_path, params, True),
    )


async def test_a_streamed_run_with_a_tool_call_through_the_sdk(
    client: openai.AsyncOpenAI, fake_anthropic: FakeAnthropic, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The official SDK streams a run on an anthropic/ route: text, the tool
    calls, the tool outputs sent back as tool_result blocks, the answer; and
    litellm is never imported (it cannot be, here)."""
    monkeypatch.setitem(sys.modules, "litellm", None)
    assistant = await client.beta.assistants.create(
        model="claude-tool",
        instructions="Use tools.",
        tools=[WEATHER, TIME],  # type: ignore[list-item]
    )
    thread = await client.beta.threads.create(messages=[{"role": "user", "content": "Weather in Paris?"}])
    async with client.beta.threads.runs.stream(thread_id=thread.id, assistant_id=assistant.id) as events:
        async for _ in events:
            pass
        run = await events.get_final_run()
    assert run.status == "requires_action", run.last_error
    calls = run.required_action.submit_tool_outputs.tool_calls  # type: ignore[union-attr]
    assert [(call.function.name, call.function.arguments) for call in calls] == [
        ("get_weather", '{"city": "Paris"}'),
        ("get_time", "{}"),  # litellm's arguments for a call without any (clients json.loads them)
    ]
    outputs = [{"tool_call_id": call.id, "output": f"{call.function.name} ok"} for call in calls]
    async with client.beta.threads.runs.submit_tool_outputs_stream(
        run_id=run.id, thread_id=thread.id, tool_outputs=outputs
    ) as events:
        async for _ in events:
            pass
        run = await events.get_final_run()
    assert run.status == "completed", run.last_error
    assert run.usage is not None and run.usage.prompt_tokens == 50 and run.usage.completion_tokens == 38
    messages = (await client.beta.threads.messages.list(thread.id, order="asc")).data
    assert [block.text.value for block in messages[-1].content] == ["Hello world"]  # type: ignore[union-attr]
    first, second = (sent["body"] for sent in fake_anthropic.requests)
    assert first["system"] == [{"type": "text", "text": "Use tools."}]
    assert second["messages"][-1] == {
        "role": "user",
        "content": [
            {"type": "tool_result", "tool_use_id": calls[0].id, "content": "get_weather ok"},
            {"type": "tool_result", "tool_use_id": calls[1].id, "content": "get_time ok"},
        ],
    }
