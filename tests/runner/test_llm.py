"""app.llm: the offline model's cue language, routing, token counting, and the
provider paths (direct and litellm) against a real OpenAI-compatible HTTP server
on loopback (tests/runner/fake_openai.py)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from app.llm import (
    LLM,
    ChatRequest,
    Event,
    Finish,
    LLMConfigError,
    LLMError,
    Route,
    TextDelta,
    ToolCallDelta,
    Usage,
    explicit_params,
    litellm_adapter,
)
from tests.runner.fake_openai import USAGE, FakeOpenAI

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
LOOKUP = {"type": "function", "function": {"name": "lookup"}}


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def request(text: str, **options: Any) -> ChatRequest:
    return ChatRequest(model="gpt-4o", messages=[user(text)], **options)


async def collect(llm: LLM, chat: ChatRequest) -> list[Event]:
    return [event async for event in llm.stream(chat)]


def text_of(events: list[Event]) -> str:
    return "".join(event.text for event in events if isinstance(event, TextDelta))


def calls_of(events: list[Event]) -> list[dict[str, Any]]:
    """Reassemble tool calls from their deltas, checking id/name come only first."""
    calls: dict[int, dict[str, Any]] = {}
    for event in events:
        if not isinstance(event, ToolCallDelta):
            continue
        if event.index not in calls:
            assert event.id and event.name
            calls[event.index] = {"id": event.id, "name": event.name, "arguments": ""}
        else:
            assert event.id is None and event.name is None
        calls[event.index]["arguments"] += event.arguments
    return [calls[index] for index in sorted(calls)]


def finish_of(events: list[Event]) -> Finish:
    assert isinstance(events[-1], Finish)
    assert sum(isinstance(event, Finish) for event in events) == 1
    return events[-1]


@pytest.fixture
def offline() -> LLM:
    return LLM.from_config(None)


def write_config(tmp_path: Path, config: dict[str, Any], name: str = "models.yaml") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(config))  # JSON is YAML too; the .json variant is tested separately
    return path


# ----------------------------------------------------------- the offline model


async def test_echo_streams_word_by_word_with_usage(offline: LLM) -> None:
    chat = request("Hello there, general Kenobi")
    events = await collect(offline, chat)
    assert text_of(events) == "You said: Hello there, general Kenobi"
    deltas = events[:-1]
    assert [event.text for event in deltas if isinstance(event, TextDelta)] == [
        "You",
        " said:",
        " Hello",
        " there,",
        " general",
        " Kenobi",
    ]
    prompt = offline.count_tokens("gpt-4o", chat.messages)
    assert finish_of(events) == Finish("stop", Usage(prompt_tokens=prompt, completion_tokens=len(deltas)))


async def test_echo_keeps_line_breaks_and_drops_directives(offline: LLM) -> None:
    events = await collect(offline, request("line one\nline [[finish stop]] two"))
    assert text_of(events) == "You said: line one\nline two"


async def test_same_request_same_stream(offline: LLM) -> None:
    chat = request('Plan [[reply Sure.]] [[call get_weather {"city": "Oslo"}]]', tools=[WEATHER])
    assert await collect(offline, chat) == await collect(offline, chat)


async def test_cjk_text_is_one_token_per_character(offline: LLM) -> None:
    events = await collect(offline, request("[[reply 東京は晴れ]]"))
    assert [event.text for event in events[:-1] if isinstance(event, TextDelta)] == ["東", "京", "は", "晴", "れ"]
    assert finish_of(events).usage.completion_tokens == 5


async def test_reply_directive_is_exact(offline: LLM) -> None:
    events = await collect(offline, request("ignored [[reply The answer is 42.]]"))
    assert text_of(events) == "The answer is 42."
    assert finish_of(events).reason == "stop"


async def test_tokens_directive_and_max_tokens(offline: LLM) -> None:
    events = await collect(offline, request("[[tokens 40]]"))
    assert len(events) == 41
    assert finish_of(events).usage.completion_tokens == 40
    cut = await collect(offline, request("[[tokens 40]]", max_tokens=7))
    assert len(cut) == 8
    assert finish_of(cut).reason == "length"
    assert finish_of(cut).usage.completion_tokens == 7
    assert text_of(cut) == text_of(events)[: len(text_of(cut))]


async def test_max_tokens_cuts_a_tool_call(offline: LLM) -> None:
    chat = request('[[call get_weather {"city": "Tokyo", "unit": "C"}]]', tools=[WEATHER], max_tokens=2)
    events = await collect(offline, chat)
    assert calls_of(events) == [{"id": calls_of(events)[0]["id"], "name": "get_weather", "arguments": '{"city":'}]
    assert finish_of(events).reason == "length"


async def test_call_streams_arguments_in_fragments(offline: LLM) -> None:
    events = await collect(offline, request('Weather? [[call get_weather {"city": "Tokyo"}]]', tools=[WEATHER]))
    [call] = calls_of(events)
    assert call["name"] == "get_weather"
    assert json.loads(call["arguments"]) == {"city": "Tokyo"}
    assert call["id"].startswith("call_") and len(call["id"]) == 29
    assert sum(isinstance(event, ToolCallDelta) for event in events) == 3  # header + two fragments
    assert text_of(events) == ""
    assert finish_of(events).reason == "tool_calls"
    assert finish_of(events).usage.completion_tokens == 3


async def test_call_without_arguments_and_json_with_brackets(offline: LLM) -> None:
    chat = request(
        '[[call lookup]] [[call get_weather {"q": "a]] b", "xs": [[1], {"k": "}"}]}]]', tools=[WEATHER, LOOKUP]
    )
    calls = calls_of(await collect(offline, chat))
    assert [call["name"] for call in calls] == ["lookup", "get_weather"]
    assert calls[0]["arguments"] == "{}"
    assert json.loads(calls[1]["arguments"]) == {"q": "a]] b", "xs": [[1], {"k": "}"}]}


async def test_parallel_calls_and_parallel_tool_calls_false(offline: LLM) -> None:
    text = '[[call get_weather {"city": "Oslo"}]] [[call get_weather {"city": "Rome"}]]'
    calls = calls_of(await collect(offline, request(text, tools=[WEATHER])))
    assert [json.loads(call["arguments"])["city"] for call in calls] == ["Oslo", "Rome"]
    assert calls[0]["id"] != calls[1]["id"]
    single = calls_of(await collect(offline, request(text, tools=[WEATHER], parallel_tool_calls=False)))
    assert [json.loads(call["arguments"])["city"] for call in single] == ["Oslo"]


async def test_text_before_a_tool_call(offline: LLM) -> None:
    events = await collect(offline, request("[[reply Let me check.]] [[call lookup]]", tools=[LOOKUP]))
    assert text_of(events) == "Let me check."
    first_call = next(n for n, event in enumerate(events) if isinstance(event, ToolCallDelta))
    assert all(isinstance(event, TextDelta) for event in events[:first_call])
    assert finish_of(events).reason == "tool_calls"


def tool_round(call_id: str, name: str, output: str) -> list[dict[str, Any]]:
    call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": "{}"}}
    return [
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call_id, "content": output},
    ]


async def test_then_scripts_several_tool_rounds(offline: LLM) -> None:
    script = user("[[call lookup]] [[then call get_weather]] [[then]] [[reply Done: sunny.]]")
    tools = [WEATHER, LOOKUP]
    rounds = [
        [script],
        [script, *tool_round("call_1", "lookup", "42")],
        [script, *tool_round("call_1", "lookup", "42"), *tool_round("call_2", "get_weather", '{"t": 20}')],
    ]
    answers = [await collect(offline, ChatRequest("m", messages, tools=tools)) for messages in rounds]
    assert [call["name"] for call in calls_of(answers[0])] == ["lookup"]
    assert [call["name"] for call in calls_of(answers[1])] == ["get_weather"]
    assert text_of(answers[2]) == "Done: sunny."
    assert [finish_of(events).reason for events in answers] == ["tool_calls", "tool_calls", "stop"]


async def test_after_the_script_it_reports_tool_results(offline: LLM) -> None:
    messages = [
        user("[[call lookup]] [[call get_weather]]"),
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_a", "type": "function", "function": {"name": "lookup", "arguments": "{}"}},
                {"id": "call_b", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}},
            ],
        },
        {"role": "tool", "tool_call_id": "call_a", "content": "42"},
        {"role": "tool", "tool_call_id": "call_b", "content": '{"temp": 22}'},
    ]
    events = await collect(offline, ChatRequest("m", messages, tools=[WEATHER, LOOKUP]))
    assert text_of(events) == 'Tool results: lookup -> 42; get_weather -> {"temp": 22}'
    assert finish_of(events).reason == "stop"


async def test_a_new_user_message_restarts_the_script(offline: LLM) -> None:
    messages = [user("[[call lookup]]"), *tool_round("call_1", "lookup", "1"), user("again [[call lookup]]")]
    events = await collect(offline, ChatRequest("m", messages, tools=[LOOKUP]))
    assert [call["name"] for call in calls_of(events)] == ["lookup"]


async def test_tool_choice_none_drops_calls(offline: LLM) -> None:
    events = await collect(offline, request("hi [[call lookup]]", tools=[LOOKUP], tool_choice="none"))
    assert calls_of(events) == []
    assert text_of(events) == "You said: hi"


async def test_calls_are_dropped_when_no_tools_are_offered(offline: LLM) -> None:
    events = await collect(offline, request("hi [[call lookup]]"))
    assert calls_of(events) == []
    assert text_of(events) == "You said: hi"
    assert finish_of(events).reason == "stop"


async def test_tool_choice_required_calls_the_first_tool_once(offline: LLM) -> None:
    chat = request("hi", tools=[LOOKUP, WEATHER], tool_choice="required")
    assert calls_of(await collect(offline, chat)) == [
        {"id": calls_of(await collect(offline, chat))[0]["id"], "name": "lookup", "arguments": "{}"}
    ]
    chat.messages += tool_round("call_1", "lookup", "ok")
    assert text_of(await collect(offline, chat)) == "Tool results: lookup -> ok"


async def test_tool_choice_named_function(offline: LLM) -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    plain = await collect(offline, request("hi", tools=[LOOKUP, WEATHER], tool_choice=named))
    assert [(call["name"], call["arguments"]) for call in calls_of(plain)] == [("get_weather", "{}")]
    text = '[[call lookup]] [[call get_weather {"city": "Lima"}]]'
    scripted = await collect(offline, request(text, tools=[LOOKUP, WEATHER], tool_choice=named))
    assert [(call["name"], call["arguments"]) for call in calls_of(scripted)] == [("get_weather", '{"city": "Lima"}')]


async def test_json_object_mode(offline: LLM) -> None:
    events = await collect(offline, request("hello", response_format={"type": "json_object"}))
    assert json.loads(text_of(events)) == {"message": "You said: hello"}
    forced = await collect(offline, request("hello [[json]]"))
    assert json.loads(text_of(forced)) == {"message": "You said: hello"}


async def test_json_schema_mode_fills_required_keys(offline: LLM) -> None:
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "kind": {"enum": ["cat", "dog"]},
            "owner": {"$ref": "#/$defs/owner"},
            "note": {"type": ["string", "null"]},
            "extra": {"type": "number"},
        },
        "required": ["name", "age", "tags", "kind", "owner", "note"],
        "$defs": {"owner": {"type": "object", "properties": {"ok": {"type": "boolean"}}}},
    }
    response_format = {"type": "json_schema", "json_schema": {"name": "pet", "schema": schema, "strict": True}}
    events = await collect(offline, request("describe", response_format=response_format))
    assert json.loads(text_of(events)) == {
        "name": "",
        "age": 0,
        "tags": [],
        "kind": "cat",
        "owner": {"ok": False},
        "note": "",
    }


@pytest.mark.parametrize(
    ("cue", "code"),
    [
        ("[[fail rate_limit]]", "rate_limit_exceeded"),
        ("[[fail rate_limit_exceeded]]", "rate_limit_exceeded"),
        ("[[fail server_error]]", "server_error"),
        ("[[fail invalid_prompt]]", "invalid_prompt"),
    ],
)
async def test_fail_on_cue_before_any_output(offline: LLM, cue: str, code: str) -> None:
    seen: list[Event] = []
    with pytest.raises(LLMError) as failure:
        async for event in offline.stream(request(f"hi {cue}")):
            seen.append(event)
    assert failure.value.code == code
    assert seen == []


@pytest.mark.parametrize("cue", ["[[fail server_error after 3]]", "[[fail_after 3 server_error]]"])
async def test_fail_mid_stream(offline: LLM, cue: str) -> None:
    seen: list[Event] = []
    with pytest.raises(LLMError) as failure:
        async for event in offline.stream(request(f"{cue} [[tokens 10]]")):
            seen.append(event)
    assert failure.value.code == "server_error"
    assert len(seen) == 3 and all(isinstance(event, TextDelta) for event in seen)


async def test_fail_after_more_deltas_than_the_answer_has(offline: LLM) -> None:
    seen: list[Event] = []
    with pytest.raises(LLMError):
        async for event in offline.stream(request("[[reply two words]] [[fail rate_limit after 9]]")):
            seen.append(event)
    assert text_of(seen) == "two words" and not any(isinstance(event, Finish) for event in seen)


async def test_fail_in_a_later_round(offline: LLM) -> None:
    messages = [user("[[call lookup]] [[then]] [[fail invalid_prompt]]")]
    assert calls_of(await collect(offline, ChatRequest("m", messages, tools=[LOOKUP])))
    with pytest.raises(LLMError) as failure:
        await collect(offline, ChatRequest("m", messages + tool_round("c", "lookup", "x"), tools=[LOOKUP]))
    assert failure.value.code == "invalid_prompt"


async def test_finish_reason_override(offline: LLM) -> None:
    events = await collect(offline, request("[[reply Redacted]] [[finish content_filter]]"))
    assert finish_of(events).reason == "content_filter"
    assert text_of(events) == "Redacted"


async def test_system_directives_script_the_assistant(offline: LLM) -> None:
    system = {"role": "system", "content": "You are a tutor. [[reply Tutor here.]]"}
    assert text_of(await collect(offline, ChatRequest("m", [system, user("hi")]))) == "Tutor here."
    # The last user message's directives win over the instructions'.
    assert text_of(await collect(offline, ChatRequest("m", [system, user("[[reply Mine.]]")]))) == "Mine."


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[[shout hi]]", "unknown directive [[shout]]"),
        ("[[tokens many]]", "whole number"),
        ("[[fail meltdown]]", "KIND in"),
        ("[[finish maybe]]", "stop, length or content_filter"),
        ("[[call get_weather]]", "offers no such function"),
    ],
)
async def test_bad_cues_fail_loudly(offline: LLM, text: str, needle: str) -> None:
    with pytest.raises(LLMError) as failure:
        await collect(offline, request(text, tools=[LOOKUP]))
    assert failure.value.code == "invalid_prompt"
    assert needle in failure.value.message


async def test_images_are_described(offline: LLM) -> None:
    content = [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg", "detail": "low"}},
    ]
    chat = ChatRequest("m", [{"role": "user", "content": content}])
    events = await collect(offline, chat)
    assert text_of(events) == "You said: What is this? [image: image/png, 8 bytes] [image: https://example.com/cat.jpg]"
    assert finish_of(events).usage.prompt_tokens == 3 + 3 + 3 + 2 * 85


async def test_delay_still_streams_everything(offline: LLM) -> None:
    events = await collect(offline, request("[[delay 1]] [[tokens 3]]"))
    assert len(events) == 4 and finish_of(events).usage.completion_tokens == 3


async def test_hang_never_finishes_until_cancelled(offline: LLM) -> None:
    stream = offline.stream(request("[[reply Working]] [[hang]]"))
    assert await anext(stream) == TextDelta("Working")
    pending = asyncio.ensure_future(anext(stream))
    for _ in range(20):
        await asyncio.sleep(0)  # let the model run as far as it can (no wall-clock wait)
    assert not pending.done()
    pending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await pending


async def test_rules_file_scripts_the_model(tmp_path: Path) -> None:
    (tmp_path / "rules.yaml").write_text(
        '- match: "(?i)weather in (\\\\w+)"\n'
        '  respond: \'[[call get_weather {"city": "\\1"}]]\'\n'
        '- match: "^hello"\n'
        '  respond: "Hi! How can I help?"\n'
    )
    llm = LLM.from_config(write_config(tmp_path, {"offline": {"rules": "rules.yaml"}}))
    calls = calls_of(await collect(llm, request("What's the weather in Paris?", tools=[WEATHER])))
    assert [(call["name"], json.loads(call["arguments"])) for call in calls] == [("get_weather", {"city": "Paris"})]
    assert text_of(await collect(llm, request("hello there"))) == "Hi! How can I help?"
    assert text_of(await collect(llm, request("bye"))) == "You said: bye"
    # Message directives win over rules.
    assert text_of(await collect(llm, request("hello [[reply no rule]]"))) == "no rule"


# ----------------------------------------------------------------------- routing


def test_routing_exact_before_wildcards(tmp_path: Path) -> None:
    config = {
        "model_list": [
            {"model_name": "*", "litellm_params": {"model": "openai/*", "api_base": "http://127.0.0.1:9/v1"}},
            {"model_name": "claude-*", "litellm_params": {"model": "anthropic/claude-*"}},
            {"model_name": "claude-3-*", "litellm_params": {"model": "offline/claude-3-*"}},
            {"model_name": "gpt-4o", "litellm_params": {"model": "offline/fixed"}},
            {"model_name": "gpt-4o", "litellm_params": {"model": "offline/second"}},
        ]
    }
    llm = LLM.from_config(write_config(tmp_path, config))
    assert llm.route("gpt-4o").target == "offline/fixed"
    assert llm.route("claude-3-opus").target == "offline/claude-3-opus"
    assert llm.route("claude-2").target == "anthropic/claude-2"
    assert llm.route("mistral-large").target == "openai/mistral-large"
    assert llm.route("mistral-large").params["api_base"] == "http://127.0.0.1:9/v1"
    assert llm.route("gpt-4o").offline and not llm.route("claude-2").offline


async def test_unknown_model_is_a_clear_error(tmp_path: Path) -> None:
    config = {"model_list": [{"model_name": "gpt-4o", "litellm_params": {"model": "offline"}}]}
    llm = LLM.from_config(write_config(tmp_path, config))
    assert llm.is_configured("gpt-4o") and not llm.is_configured("gpt-5")
    assert text_of(await collect(llm, request("hi"))) == "You said: hi"
    with pytest.raises(LLMError) as failure:
        await collect(llm, ChatRequest("gpt-5", [user("hi")]))
    assert failure.value.code == "invalid_prompt"
    assert "'gpt-5' is not configured" in failure.value.message


async def test_no_config_or_no_model_list_means_offline(tmp_path: Path) -> None:
    for llm in (LLM.from_config(None), LLM.from_config(write_config(tmp_path, {}))):
        assert llm.route("anything-at-all").offline
        assert text_of(await collect(llm, ChatRequest("anything-at-all", [user("x")]))) == "You said: x"


def test_json_config_file(tmp_path: Path) -> None:
    config = {"model_list": [{"model_name": "a", "litellm_params": {"model": "offline"}}]}
    llm = LLM.from_config(write_config(tmp_path, config, name="models.json"))
    assert llm.route("a").offline


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("model_list: 3", "model_list must be a list"),
        ("model_list: [{model_name: a}]", "litellm_params.model"),
        ("model_list: [{litellm_params: {model: x}}]", "model_name"),
        ("- just a list", "expected a mapping"),
        ("model_list: [\n", "cannot read"),
        ("offline: {rules: [{match: '('}]}", "offline.rules[0]"),
        ("offline: {rules: [{match: '(', respond: x}]}", "offline.rules[0].match"),
    ],
)
def test_malformed_config(tmp_path: Path, content: str, needle: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(LLMConfigError) as failure:
        LLM.from_config(path)
    assert needle in str(failure.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(LLMConfigError, match="cannot read"):
        LLM.from_config(tmp_path / "nope.yaml")


# ------------------------------------------------------- tokens and context windows


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any DNS lookup or non-loopback connection fails the test."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_importing_litellm_needs_no_network(tmp_path: Path) -> None:
    """In a fresh process without LITELLM_LOCAL_MODEL_COST_MAP, any network attempt aborts it."""
    config = write_config(tmp_path, {"model_list": [{"model_name": "*", "litellm_params": {"model": "openai/*"}}]})
    script = (
        "import os, socket\n"
        "def abort(*args, **kwargs): os._exit(3)\n"
        "socket.getaddrinfo = socket.create_connection = abort\n"
        "from pathlib import Path\n"
        "from app.llm import LLM\n"
        f"llm = LLM.from_config(Path({str(config)!r}))\n"
        "assert llm.context_window('gpt-4o') == 128000\n"
        "assert llm.count_tokens('gpt-4o', [{'role': 'user', 'content': 'hi'}]) > 0\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "LITELLM_LOCAL_MODEL_COST_MAP"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_offline_token_count_formula(offline: LLM) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        user("two words"),
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "function": {"arguments": '{"a": 1}'}}]},
        {"role": "tool", "tool_call_id": "c", "content": "ok"},
    ]
    # 3 + (3+2) + (3+2) + (3 + 1+2) + (3+1)
    assert offline.count_tokens("m", messages) == 23
    tools = [LOOKUP]
    words_of_tools = len(json.dumps(tools).split())
    assert offline.count_tokens("m", messages, tools) == 23 + words_of_tools


def test_provider_token_count_works_offline(tmp_path: Path, no_network: None) -> None:
    config = {"model_list": [{"model_name": "*", "litellm_params": {"model": "openai/*"}}]}
    llm = LLM.from_config(write_config(tmp_path, config))
    short = llm.count_tokens("gpt-4o", [user("hello")])
    long = llm.count_tokens("gpt-4o", [user("hello " * 50)])
    assert 0 < short < long
    # Models litellm has no tokenizer for still count (its default encoding), without downloads.
    assert llm.count_tokens("meta-llama-3-8b", [user("hello"), {"role": "assistant", "content": None}]) > 0
    assert llm.count_text_tokens("gpt-4o", "hello world") == 2


def test_context_windows(tmp_path: Path, no_network: None) -> None:
    config = {
        "model_list": [
            {"model_name": "small", "litellm_params": {"model": "offline"}, "model_info": {"max_input_tokens": 200}},
            {"model_name": "local", "litellm_params": {"model": "openai/local", "max_input_tokens": 4096}},
            {"model_name": "off", "litellm_params": {"model": "offline/x"}},
            {"model_name": "*", "litellm_params": {"model": "openai/*"}},
        ]
    }
    llm = LLM.from_config(write_config(tmp_path, config))
    assert llm.context_window("small") == 200
    assert llm.context_window("local") == 4096
    assert llm.context_window("off") == 128_000
    assert llm.context_window("gpt-4o") == 128_000  # litellm's bundled model map
    assert llm.context_window("my-own-finetune") == 8192
    assert LLM.from_config(None).context_window("anything") == 128_000
    strict = LLM.from_config(write_config(tmp_path, {"model_list": config["model_list"][:1]}, "strict.yaml"))
    assert strict.context_window("unrouted") == 8192


def test_direct_routes_read_the_model_map_once(tmp_path: Path) -> None:
    """The 2 MB model map is read once per process; a new model name's window
    is decoded from that text, with no file read (and no whole-map parse)."""
    params = {"model": "openai/*", "api_base": "http://127.0.0.1:9/v1"}
    llm = LLM.from_config(write_config(tmp_path, {"model_list": [{"model_name": "*", "litellm_params": params}]}))
    assert llm.context_window("gpt-4o") == 128_000
    opened: list[str] = []
    watching = True

    def audit(event: str, args: tuple[Any, ...]) -> None:
        if watching and event == "open" and "model_prices" in str(args[0]):
            opened.append(str(args[0]))

    sys.addaudithook(audit)  # hooks cannot be removed: this one stops watching at the end
    try:
        assert llm.context_window("gpt-4o-mini") == 128_000
        assert llm.context_window("gpt-3.5-turbo") == 16_385
        assert llm.context_window("my-own-finetune") == 8192
    finally:
        watching = False
    assert opened == []


# ------------------------------ direct and litellm against a loopback HTTP server


@pytest.fixture(params=["direct", "litellm"])
async def routed(
    request: pytest.FixtureRequest, fake: FakeOpenAI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[LLM]:
    """The same OpenAI-compatible route served by our own HTTP request and
    (``direct: false``) through litellm: every provider test runs on both."""
    params = {
        "model": "openai/*",
        "api_base": fake.api_base,
        "api_key": "os.environ/FAKE_OPENAI_KEY",
        "max_retries": 0,  # the SDK's default retries would repeat every 429/500
    }
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    entries: list[dict[str, Any]] = [
        {"model_name": "*", "litellm_params": params},
        {"model_name": "fake-stall*", "litellm_params": {**params, "model": "openai/fake-stall*", "timeout": 0.5}},
        {"model_name": "fake-flaky", "litellm_params": {**params, "model": "openai/fake-flaky", "max_retries": 2}},
        {"model_name": "dead", "litellm_params": {**params, "api_base": f"http://127.0.0.1:{closed_port}/v1"}},
    ]
    direct = request.param == "direct"
    config = {"model_list": [{**entry, "direct": direct} for entry in entries]}
    monkeypatch.delenv("FAKE_OPENAI_KEY", raising=False)
    llm = LLM.from_config(write_config(tmp_path, config))
    assert llm.route("gpt-4o").direct is (request.param == "direct")
    # Set after loading: os.environ/ references are resolved when a model is called.
    monkeypatch.setenv("FAKE_OPENAI_KEY", "sk-fake-123")
    try:
        yield llm
    finally:
        await llm.aclose()


async def test_provider_text_tool_call_and_usage(routed: LLM, fake: FakeOpenAI) -> None:
    chat = ChatRequest(
        "fake-chat",
        [{"role": "system", "content": "sys"}, user("weather?")],
        tools=[WEATHER],
        tool_choice="auto",
        max_tokens=50,
        temperature=0.5,
    )
    events = await collect(routed, chat)
    assert [event.text for event in events if isinstance(event, TextDelta)] == ["Hello", " world"]
    fragments = [event for event in events if isinstance(event, ToolCallDelta)]
    assert [fragment.arguments for fragment in fragments] == ["", '{"ci', 'ty": "To', 'kyo"}']
    assert calls_of(events) == [{"id": "call_fake1", "name": "get_weather", "arguments": '{"city": "Tokyo"}'}]
    usage = USAGE["prompt_tokens"], USAGE["completion_tokens"]
    assert finish_of(events) == Finish("tool_calls", Usage(*usage))
    [sent] = fake.requests
    assert sent["authorization"] == "Bearer sk-fake-123"
    body = sent["body"]
    assert body["model"] == "fake-chat" and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["messages"] == chat.messages
    assert body["tools"] == [WEATHER] and body["tool_choice"] == "auto"
    assert body["max_tokens"] == 50 and body["temperature"] == 0.5


async def test_provider_without_usage_is_counted(routed: LLM) -> None:
    chat = ChatRequest("fake-no-usage", [user("hi")])
    events = await collect(routed, chat)
    assert text_of(events) == "Plain answer"
    finish = finish_of(events)
    assert finish.reason == "stop"
    assert finish.usage.prompt_tokens > 0 and finish.usage.completion_tokens == 2


@pytest.mark.parametrize("routed", ["litellm"], indirect=True)
async def test_litellm_does_no_bookkeeping_the_server_never_reads(
    routed: LLM, fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through litellm a streamed answer is priced by nobody (a stream's
    response metadata is skipped) and starts none of litellm's success
    callbacks (the stream is closed at its usage chunk, before the
    end-of-stream step that assembles the answer again for them): issue 17."""
    from litellm.litellm_core_utils.litellm_logging import Logging

    priced: list[object] = []
    calculate = Logging._response_cost_calculator

    def counting(self: Logging, *args: Any, **kwargs: Any) -> Any:
        priced.append(kwargs.get("result", args[0] if args else None))
        return calculate(self, *args, **kwargs)

    monkeypatch.setattr(Logging, "_response_cost_calculator", counting)
    before = asyncio.all_tasks()
    events = await collect(routed, ChatRequest("fake-chat", [user("hi")]))
    assert finish_of(events).usage == Usage(USAGE["prompt_tokens"], USAGE["completion_tokens"])
    started = [task.get_coro().__qualname__ for task in asyncio.all_tasks() - before if not task.done()]  # type: ignore[union-attr]
    assert "Logging.dispatch_success_handlers" not in started
    assert priced == []


@pytest.mark.parametrize("routed", ["litellm"], indirect=True)
async def test_litellm_success_callbacks_still_see_every_streamed_call(
    routed: LLM, fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An operator's litellm callback (Langfuse, Datadog, a CustomLogger)
    gets every call, priced, as before the bookkeeping was skipped: with a
    callback configured the stream is read to its end (review of litecall)."""
    import litellm
    from litellm.integrations.custom_logger import CustomLogger

    from app.llm import litellm_adapter

    # A callback set for one call only (a route's litellm_params) counts too.
    class OneCall:
        dynamic_success_callbacks = ("langfuse",)
        dynamic_async_success_callbacks = None

    assert litellm_adapter._observed(OneCall()) and not litellm_adapter._observed(None)

    seen: list[object] = []

    class Counting(CustomLogger):  # type: ignore[misc]
        async def async_log_success_event(self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any) -> None:
            seen.append(kwargs.get("response_cost"))

    # litellm files a callback into its other lists at the first call: every
    # list is put back after the test, or the callback outlives it.
    for name in ("success_callback", "_async_success_callback", "failure_callback", "_async_failure_callback"):
        monkeypatch.setattr(litellm, name, list(getattr(litellm, name)))
    monkeypatch.setattr(litellm, "callbacks", [Counting()])
    for _ in range(2):
        events = await collect(routed, ChatRequest("fake-chat", [user("hi")]))
        assert finish_of(events).usage == Usage(USAGE["prompt_tokens"], USAGE["completion_tokens"])
    async with asyncio.timeout(10):
        while True:
            if len(seen) >= 2:
                break
            await asyncio.sleep(0.01)
    assert len(seen) == 2


REJECTED = "The provider rejected the request for model '{0}' (openai/{0}): "
FAILED = "The provider failed for model '{0}' (openai/{0}) "


# The direct path and litellm give the same code and text for each kind of
# failure: what a run's last_error says does not depend on the path.
@pytest.mark.parametrize(
    ("model", "code", "message", "partial"),
    [
        ("fake-429", "rate_limit_exceeded", "Rate limit reached for model '{0}' (openai/{0}): "
         "Rate limit reached for fake-429 (test).", 0),
        ("fake-400", "invalid_prompt", REJECTED + "This model's maximum context length is 10 tokens.", 0),
        ("fake-413", "invalid_prompt", REJECTED + "The request body of fake-413 exceeds 1 MB (test).", 0),
        ("fake-422", "invalid_prompt", REJECTED + "The fake server cannot process this request.", 0),
        ("fake-500", "server_error", FAILED + "(HTTP 500): The fake server had an error.", 0),
        ("fake-503", "server_error", FAILED + "(HTTP 503): The fake server is overloaded.", 0),
        ("fake-502", "server_error", FAILED + "(HTTP 502): Error code: 502", 0),  # a plain-text body
        ("dead", "server_error", FAILED + "(HTTP 500): Connection error.", 0),
        ("fake-stall-head", "server_error", FAILED + "(HTTP 408): Request timed out.", 0),
        ("fake-stall", "server_error", FAILED + "(HTTP 408): Request timed out.", 1),
        ("fake-drop", "server_error", FAILED + "(HTTP 500): Connection error.", 1),
        ("fake-stream-error", "server_error", FAILED + "(HTTP 500): The model crashed mid-answer.", 1),
        ("fake-malformed", "server_error", FAILED + "(HTTP 500): "
         "Expecting property name enclosed in double quotes: line 1 column 2 (char 1)", 1),
    ],
)  # fmt: skip
async def test_provider_errors_are_mapped(
    routed: LLM, fake: FakeOpenAI, model: str, code: str, message: str, partial: int
) -> None:
    seen: list[Event] = []
    with pytest.raises(LLMError) as failure:
        async for event in routed.stream(ChatRequest(model, [user("hi")])):
            seen.append(event)
    assert failure.value.code == code
    assert len(seen) == partial  # deltas that came before the failure reach the run
    expected = message.format(model)
    if model == "fake-502":  # the direct path also shows the body litellm drops
        assert failure.value.message.startswith(expected), failure.value.message
    else:
        assert failure.value.message == expected
    assert len(fake.requests) == (0 if model == "dead" else 1)  # max_retries: 0


async def test_retries_before_the_answer_starts(routed: LLM, fake: FakeOpenAI) -> None:
    """max_retries 2: a 503 with Retry-After-Ms is retried after that wait."""
    assert text_of(await collect(routed, ChatRequest("fake-flaky", [user("hi")]))) == "Plain answer"
    assert [sent["body"]["model"] for sent in fake.requests] == ["fake-flaky", "fake-flaky"]


async def test_unusual_but_legal_server_sent_events(routed: LLM) -> None:
    events = await collect(routed, ChatRequest("fake-sse-odd", [user("hi")]))
    assert text_of(events) == "Plain answer" and finish_of(events).reason == "stop"


async def test_provider_connection_cut_mid_stream(routed: LLM) -> None:
    seen: list[Event] = []
    with pytest.raises(LLMError) as failure:
        async for event in routed.stream(ChatRequest("fake-drop", [user("hi")])):
            seen.append(event)
    assert seen == [TextDelta("Partial")]
    assert failure.value.code == "server_error"


async def test_a_key_rotated_in_the_environment_is_sent_by_a_route_already_looked_up(
    routed: LLM, fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A name's Route is made once and kept (routing.Router); the key it reads
    from the environment is still read for each call."""
    assert routed.route("fake-chat") is routed.route("fake-chat")
    with pytest.raises(TypeError):  # shared by every lookup of the name: nobody may change it
        routed.route("fake-chat").params["api_base"] = "http://elsewhere"  # type: ignore[index]
    await collect(routed, ChatRequest("fake-chat", [user("hi")]))
    monkeypatch.setenv("FAKE_OPENAI_KEY", "sk-rotated")
    await collect(routed, ChatRequest("fake-chat", [user("hi")]))
    assert [sent["authorization"] for sent in fake.requests][-1] == "Bearer sk-rotated"
    assert fake.requests[0]["authorization"] != "Bearer sk-rotated"


def test_routes_kept_are_bounded(tmp_path: Path) -> None:
    """Requests name their model: a wildcard admits any number of names, of which only so many are kept."""
    config = {"model_list": [{"model_name": "*", "litellm_params": {"model": "offline/*"}}]}
    llm = LLM.from_config(write_config(tmp_path, config))
    first = llm.route("model-0")
    for number in range(1, 3000):
        assert llm.route(f"model-{number}").target == f"offline/model-{number}"
    assert len(llm._router._routes) <= 1024
    assert llm.route("model-0") == first


def test_context_windows_kept_are_bounded(tmp_path: Path) -> None:
    """Runs name their model: any number of names, of which only so many windows are kept."""
    config = {"model_list": [{"model_name": "*", "litellm_params": {"model": "offline/*"}}]}
    llm = LLM.from_config(write_config(tmp_path, config))
    first = llm.context_window("model-0")
    for number in range(1, 3000):
        assert llm.context_window(f"model-{number}") == first
    assert len(llm._windows) <= 1024


def test_a_long_model_name_is_routed_but_not_kept(tmp_path: Path) -> None:
    """A chat completion's model may be as long as its body: routed, never
    kept (1,024 names of megabytes each would be gigabytes one client chose)."""
    config = {"model_list": [{"model_name": "*", "litellm_params": {"model": "offline/*"}}]}
    llm = LLM.from_config(write_config(tmp_path, config))
    long_name = "m" * 100_000
    assert llm.route(long_name).target == "offline/" + long_name
    assert llm.route("m" * 256) is not None
    assert list(llm._router._routes) == ["m" * 256]


async def test_unset_environment_key_is_a_server_error(
    routed: LLM, fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FAKE_OPENAI_KEY")
    with pytest.raises(LLMError) as failure:
        await collect(routed, ChatRequest("fake-chat", [user("hi")]))
    assert failure.value.code == "server_error"
    assert "FAKE_OPENAI_KEY" in failure.value.message
    assert fake.requests == []


async def test_parameters_the_user_sets_reach_the_provider(routed: LLM, fake: FakeOpenAI) -> None:
    """litellm's model table says gpt-4 lacks response_format; drop_params
    must not remove what the user set (issue 12), only the server's defaults."""
    chat = ChatRequest(
        "gpt-4",
        [user("json please")],
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0.2,
        top_p=0.9,
        max_tokens=40,
        response_format={"type": "json_object"},
    )
    await collect(routed, chat)
    [sent] = fake.requests
    body = sent["body"]
    assert body["response_format"] == {"type": "json_object"}
    assert body["tool_choice"] == "required" and body["parallel_tool_calls"] is False
    assert (body["temperature"], body["top_p"], body["max_tokens"]) == (0.2, 0.9, 40)
    assert "allowed_openai_params" not in body


async def test_a_rejected_parameter_is_named_in_the_error(routed: LLM, fake: FakeOpenAI) -> None:
    chat = ChatRequest("fake-no-format", [user("json please")], response_format={"type": "json_object"})
    with pytest.raises(LLMError) as failure:
        await collect(routed, chat)
    assert failure.value.code == "invalid_prompt"
    assert "parameters set for this request: response_format" in failure.value.message
    assert "'fake-no-format'" in failure.value.message
    # Without the parameter the same provider answers.
    assert text_of(await collect(routed, ChatRequest("fake-no-format", [user("hi")]))) == "Plain answer"


def test_openai_defaults_are_not_forced_on_a_provider() -> None:
    """A run without its own temperature/top_p carries OpenAI's defaults (1);
    they may be dropped for a model without them, unlike a user's values."""
    defaults = ChatRequest("o1", [user("hi")], tools=[WEATHER], tool_choice="auto", temperature=1.0, top_p=1.0)
    assert explicit_params(defaults) == []
    chosen = ChatRequest("o1", [user("hi")], tools=[WEATHER], tool_choice="none", temperature=0.2, max_tokens=9)
    assert explicit_params(chosen) == ["temperature", "max_tokens", "tool_choice"]


@pytest.mark.parametrize(
    ("target", "forwarded"),
    [
        ("gemini/gemini-1.5-pro", ["seed"]),  # stop, max_tokens, the tool settings translated
        ("mistral/mistral-large-latest", []),  # seed as random_seed
        ("vertex_ai/claude-3-5-sonnet@20240620", ["seed"]),  # Anthropic's body has no seed
        ("cohere_chat/command-r", ["parallel_tool_calls", "tool_choice"]),  # listed, but "required" not mapped
        ("openai/gpt-4", ["response_format"]),  # litellm's table: gpt-4 lacks it (issue 12)
    ],
)
def test_litellm_forwards_as_they_are_only_parameters_it_does_not_translate(target: str, forwarded: list[str]) -> None:
    """litellm adds each allowed_openai_params entry to the provider's body
    under its OpenAI name beside its own translation (``stop`` beside
    stop_sequences, a raw ``seed`` beside Mistral's random_seed): providers
    refuse the unknown field. Only what it does not translate is allowed."""
    fields: dict[str, Any] = {"tools": [WEATHER], "tool_choice": "required", "parallel_tool_calls": False}
    json_mode = {"type": "json_object"} if target.startswith("openai/") else {"type": "text"}  # text: a default
    chat = ChatRequest(
        "m", [user("hi")], **fields, max_tokens=9, response_format=json_mode, extra={"stop": "X", "seed": 1}
    )
    kwargs = litellm_adapter.completion_kwargs(Route("m", {"model": target}), chat)
    assert kwargs.get("allowed_openai_params", []) == forwarded


@pytest.mark.parametrize(
    ("params", "chosen", "forwarded"),
    [
        # litellm lists these as supported for the model, but its mapping makes nothing of the value
        ({"model": "mistral/mistral-large-latest"}, {"tool_choice": {"type": "function", "function": {"name": "w"}}},
         ["tool_choice"]),
        ({"model": "anthropic/claude-opus-4-7"}, {"temperature": 0.3}, ["temperature"]),  # no sampling there
        ({"model": "vertex_ai/claude-3-5-sonnet@20240620"}, {"response_format": {"type": "json_object"}},
         ["response_format"]),
        ({"model": "azure/gpt-4o", "api_version": "2023-05-15"}, {"response_format": {"type": "json_object"}},
         ["response_format"]),
        # mapped only into a flag of litellm's own, which Bedrock's Converse body never carries
        ({"model": "bedrock/meta.llama3-70b-instruct-v1:0"}, {"response_format": {"type": "json_object"}},
         ["response_format"]),
        ({"model": "bedrock/anthropic.claude-3-5-sonnet-20240620-v1:0"}, {"parallel_tool_calls": False},
         ["parallel_tool_calls"]),
        # and what it maps is not forwarded
        ({"model": "anthropic/claude-sonnet-4-5"}, {"temperature": 0.3}, []),
        ({"model": "anthropic/claude-sonnet-4-5"}, {"max_tokens": 123}, []),
    ],
)  # fmt: skip
def test_a_parameter_litellm_lists_but_does_not_map_is_still_forwarded(
    params: dict[str, Any], chosen: dict[str, Any], forwarded: list[str]
) -> None:
    """Its parameter lists say what passes its check, not what it sends
    (issue 12: a value the user set reaches the provider, whose error names
    it, rather than being silently dropped)."""
    chat = ChatRequest("m", [user("hi")], tools=[WEATHER], **chosen)
    kwargs = litellm_adapter.completion_kwargs(Route("m", params), chat)
    assert kwargs.get("allowed_openai_params", []) == forwarded


@pytest.mark.parametrize("routed", ["litellm"], indirect=True)
async def test_litellm_mapping_questions_are_asked_off_the_loop_once(
    routed: LLM, fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Which parameters to forward is asked of litellm's mapping, whose first
    answer for a provider takes tens of milliseconds: never on the event
    loop, where every other run's stream would wait; and once per question."""
    import threading

    asked: list[bool] = []
    mapped = litellm_adapter._mapped

    def recording(question: Any) -> bool:
        asked.append(threading.current_thread() is threading.main_thread())
        return mapped(question)

    monkeypatch.setattr(litellm_adapter, "_mapped", recording)
    monkeypatch.setattr(litellm_adapter, "_ANSWERS", litellm_adapter.OrderedDict())
    assert threading.current_thread() is threading.main_thread()  # the loop's thread
    chat = ChatRequest("fake-chat", [user("hi")], temperature=0.25, max_tokens=7, extra={"seed": 3})
    for _ in range(2):
        assert text_of(await collect(routed, chat))
    assert asked == [False, False, False]  # three questions, each asked once, in a thread


def test_litellm_mapping_answers_forget_the_least_recently_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bound on the kept answers: a question asked often (the route's usual
    temperature) is kept past a stream of one-off ones (every other value)."""
    asked: list[str] = []

    def answering(question: Any) -> bool:
        asked.append(question.value)
        return True

    monkeypatch.setattr(litellm_adapter, "_mapped", answering)
    monkeypatch.setattr(litellm_adapter, "_ANSWERS", litellm_adapter.OrderedDict())
    monkeypatch.setattr(litellm_adapter, "_ANSWERS_KEPT", 2)
    params = {"model": "openai/gpt-4o"}
    for value in (0.5, 0.1, 0.5, 0.2, 0.5, 0.3, 0.5):
        litellm_adapter.completion_kwargs(Route("m", params), ChatRequest("m", [user("hi")], temperature=value))
    assert asked == ["0.5", "0.1", "0.2", "0.3"]  # 0.5 asked once, the one-offs each once


async def test_a_whole_completion_answering_a_stream_request_is_read(fake: FakeOpenAI, tmp_path: Path) -> None:
    """A server that ignores ``stream: true`` and sends a plain chat.completion
    (application/json): the direct path reads the answer, its tool call,
    finish_reason and usage. (Through litellm the openai SDK finds no events in
    such a body and the answer comes out empty.)"""
    params = {"model": "openai/*", "api_base": fake.api_base, "max_retries": 0}
    llm = LLM.from_config(write_config(tmp_path, {"model_list": [{"model_name": "*", "litellm_params": params}]}))
    assert llm.route("fake-json").direct
    try:
        events = await collect(llm, ChatRequest("fake-json", [user("weather?")], tools=[WEATHER]))
        assert text_of(events) == "Whole answer"
        assert calls_of(events) == [{"id": "call_fake1", "name": "get_weather", "arguments": '{"city": "Tokyo"}'}]
        assert finish_of(events) == Finish("tool_calls", Usage(USAGE["prompt_tokens"], USAGE["completion_tokens"]))
        with pytest.raises(LLMError) as failure:  # an error object as that whole body is the provider's error
            await collect(llm, ChatRequest("fake-json-error", [user("hi")]))
        assert failure.value.code == "server_error"
        assert failure.value.message == FAILED.format("fake-json-error") + "(HTTP 500): The model is not loaded."
    finally:
        await llm.aclose()
