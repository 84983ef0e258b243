"""app.llm.direct: which routes go direct, what the request carries, that
litellm stays unimported, and that cassettes and the model-request log see
direct completions. Failures and stream shapes are pinned on both paths in
test_llm.py (its ``routed`` fixture runs each provider test direct and
through litellm)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from app import cassettes
from app.llm import LLM, ChatRequest, Exchange, Finish, LLMConfigError, LLMError, TextDelta
from app.llm.provider import ChunkReader
from tests.runner.fake_openai import USAGE, FakeOpenAI

pytestmark = pytest.mark.timeout(60)


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def config_file(tmp_path: Path, entries: list[dict[str, Any]], name: str = "models.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps({"model_list": entries}))
    return path


def _python_output(script: str) -> str:
    """What ``script`` printed, run in a fresh interpreter (what it imports is its own)."""
    done = subprocess.run(
        [sys.executable, "-c", script], env=dict(os.environ), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def entry(name: str, model: str, **params: Any) -> dict[str, Any]:
    return {"model_name": name, "litellm_params": {"model": model, **params}}


def test_which_routes_go_direct(tmp_path: Path) -> None:
    base = "http://127.0.0.1:9/v1"
    llm = LLM.from_config(
        config_file(
            tmp_path,
            [
                entry("vllm", "hosted_vllm/llama", api_base=base),
                entry("no-base", "openai/gpt-4o"),
                entry("extra", "openai/x", api_base=base, input_cost_per_token=1e-6),
                entry("defaults", "openai/x", api_base=base, temperature=0.1, timeout=5, extra_headers={"X": "1"}),
                {**entry("forced", "openai/x", api_base=base), "direct": False},
                entry("off", "offline"),
                entry("*", "openai/*", api_base=base, api_key="k", max_retries=0),
            ],
        )
    )
    verdicts = {name: llm.route(name).direct for name in ("vllm", "no-base", "extra", "defaults", "forced", "off")}
    assert verdicts == {
        "vllm": True,
        "no-base": False,  # api.openai.com's own quirks stay litellm's
        "extra": False,  # a litellm_param only litellm understands
        "defaults": True,
        "forced": False,
        "off": False,
    }
    assert llm.route("anything-else").direct


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({**entry("a", "bedrock/claude-3", api_base="http://x"), "direct": True}, "not a model the direct path serves"),
        ({**entry("a", "openai/x"), "direct": True}, "no api_base"),
        ({**entry("a", "openai/x", api_base="http://x", mock_response="hi"), "direct": True}, "mock_response"),
        ({**entry("a", "openai/x", api_base="http://x"), "direct": "yes"}, "direct must be true or false"),
    ],
)
def test_direct_true_that_cannot_be_served_is_a_start_up_error(
    tmp_path: Path, raw: dict[str, Any], needle: str
) -> None:
    with pytest.raises(LLMConfigError, match=needle):
        LLM.from_config(config_file(tmp_path, [raw]))


async def test_the_request_as_sent(
    fake: FakeOpenAI, tmp_path: Path, llms: list[LLM], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Route parameters are defaults under the request's; the provider prefix
    is not part of the model name sent; headers and extra_body reach it."""
    monkeypatch.setenv("HOSTED_VLLM_API_KEY", "sk-vllm")
    params = {
        "api_base": fake.api_base + "/",
        "temperature": 0.1,
        "seed": 7,
        "extra_headers": {"X-Tenant": "t1"},
        "extra_body": {"top_k": 5},
        "drop_params": True,
    }
    llm = LLM.from_config(config_file(tmp_path, [entry("*", "hosted_vllm/*", **params)]))
    llms.append(llm)
    chat = ChatRequest("fake-chat", [user("hi")], temperature=0.5, extra={"stop": ["\n\n"]})
    events = [event async for event in llm.stream(chat)]
    assert events[-1] == Finish("tool_calls", usage=events[-1].usage)  # type: ignore[union-attr]
    [sent] = fake.requests
    assert sent["authorization"] == "Bearer sk-vllm"  # the provider's environment variable
    assert sent["body"] == {
        "model": "fake-chat",
        "messages": [user("hi")],
        "temperature": 0.5,
        "seed": 7,
        "stop": ["\n\n"],
        "top_k": 5,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def test_without_a_key_no_authorization_is_sent(
    fake: FakeOpenAI, tmp_path: Path, llms: list[LLM], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    llm = LLM.from_config(config_file(tmp_path, [entry("*", "openai/*", api_base=fake.api_base)]))
    llms.append(llm)
    assert [event async for event in llm.stream(ChatRequest("fake-no-usage", [user("hi")]))]
    assert fake.requests[0]["authorization"] is None


async def test_cassettes_and_the_model_request_log_see_direct_completions(
    fake: FakeOpenAI, tmp_path: Path, llms: list[LLM]
) -> None:
    path = config_file(tmp_path, [entry("*", "openai/*", api_base=fake.api_base, api_key="k")])
    recorder = LLM.from_config(path)
    llms.append(recorder)
    recorder.cassettes = cassettes.Cassettes(tmp_path / "tapes", "record")
    logged: list[Exchange] = []

    async def log(exchange: Exchange) -> None:
        logged.append(exchange)

    recorder.observer = log
    chat = ChatRequest("fake-chat", [user("weather?")])
    recorded = [event async for event in recorder.stream(chat)]
    [exchange] = logged
    assert exchange.response_body()["text"] == "Hello world"
    assert exchange.response_body()["usage"] == USAGE
    assert len(list((tmp_path / "tapes").glob("*.json"))) == 1

    await fake.stop()  # replay needs no provider
    player = LLM.from_config(path, replaying=True)
    llms.append(player)
    player.cassettes = cassettes.Cassettes(tmp_path / "tapes", "replay")
    assert [event async for event in player.stream(chat)] == recorded
    with pytest.raises(LLMError, match=r"No recorded answer|closest"):
        [event async for event in player.stream(ChatRequest("fake-chat", [user("other")]))]


async def test_a_closed_pool_is_reopened_on_next_use(fake: FakeOpenAI, tmp_path: Path, llms: list[LLM]) -> None:
    llm = LLM.from_config(config_file(tmp_path, [entry("*", "openai/*", api_base=fake.api_base, api_key="k")]))
    llms.append(llm)
    chat = ChatRequest("fake-no-usage", [user("hi")])
    first = [event async for event in llm.stream(chat)]
    await llm.aclose()
    assert [event async for event in llm.stream(chat)] == first
    assert isinstance(first[0], TextDelta)


def test_direct_and_offline_routes_never_import_litellm(tmp_path: Path) -> None:
    """Start-up, token counting, context windows and token-id decoding: no litellm (150 MiB)."""
    path = config_file(
        tmp_path,
        [
            entry("offline-*", "offline/*"),
            {
                **entry("sized", "openai/local", api_base="http://127.0.0.1:9/v1"),
                "model_info": {"max_input_tokens": 999},
            },
            entry("*", "openai/*", api_base="http://127.0.0.1:9/v1"),
        ],
    )
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from app.llm import LLM, decode_tokens\n"
        f"llm = LLM.from_config(Path({str(path)!r}))\n"
        "messages = [{'role': 'user', 'content': 'hello there'}]\n"
        "assert 0 < llm.count_tokens('gpt-4o', messages) < 20\n"
        "assert llm.count_text_tokens('gpt-4o', 'hello world') == 2\n"
        "assert llm.context_window('sized') == 999\n"
        "assert llm.context_window('my-finetune') == 8192\n"
        "windows = llm.context_window('gpt-4o')\n"
        "assert decode_tokens([15339, 1917]) == 'hello world'\n"
        "assert 'litellm' not in sys.modules, 'litellm was imported'\n"
        "print(windows)\n"
    )
    # From the model map litellm ships, read as data when litellm is installed (it is, in development).
    assert _python_output(script).strip() == "128000"


def test_litellm_is_imported_at_start_up_only_when_a_route_or_embeddings_need_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.llm import litellm_adapter

    loads: list[str] = []
    monkeypatch.setattr(litellm_adapter, "load", lambda: loads.append("litellm"))
    base = "http://127.0.0.1:9/v1"
    direct_only = [entry("emb", "openai/text-embedding-3-small", api_base=base), entry("*", "openai/*", api_base=base)]
    for entries, extra, expected in [
        (direct_only, {}, []),
        (direct_only, {"embedding_model": "emb"}, ["litellm"]),  # embeddings always go through litellm
        ([*direct_only, entry("claude", "bedrock/anthropic.claude-3")], {}, ["litellm"]),
        ([entry("*", "offline/*")], {"embedding_model": "hashing"}, []),
    ]:
        loads.clear()
        path = tmp_path / "models.json"
        path.write_text(json.dumps({"model_list": entries, **extra}))
        LLM.from_config(path)
        assert loads == expected, (entries, extra)


def test_a_routing_file_naming_no_embedding_model_leaves_numpy_unloaded_at_start_up(tmp_path: Path) -> None:
    """The default embedder needs no start-up check: resolving it would import
    numpy (~10 MiB of an idle server) before anything is embedded."""
    path = tmp_path / "models.json"
    path.write_text(json.dumps({"model_list": [entry("*", "openai/*", api_base="http://127.0.0.1:9/v1")]}))
    script = (
        "import sys; from pathlib import Path; from app import preflight; from app.settings import Settings; "
        f"preflight.check_models(Settings(llm_config=Path({str(path)!r}), data_dir=Path({str(tmp_path / 'data')!r}))); "
        "print('numpy' in sys.modules)"
    )
    assert _python_output(script).strip() == "False"


def test_direct_routes_to_plain_http_bases_leave_httpx_unloaded_at_start_up(tmp_path: Path) -> None:
    """httpx (with the rich and pygments its command line imports: ~100
    modules, 4-6 MiB of an idle server) is imported, off the loop, for the
    first call plain_http does not take (https://, a proxy), not when the
    server starts with direct routes, nor for calls plain_http takes."""
    closed = "http://127.0.0.1:9"
    entries = [
        entry("azure-bench", "azure/azure-bench", api_base=closed, api_version="2024-10-21", api_key="x"),
        entry("claude-bench", "anthropic/claude-bench", api_base=closed, api_key="x"),
        entry("*", "openai/*", api_base=f"{closed}/v1", max_retries=0),  # refused at once: a failure through plain_http
    ]
    path = config_file(tmp_path, entries)
    script = (
        "import asyncio, sys\n"
        "from pathlib import Path\n"
        "import app.main\n"
        "from app.llm import LLM, ChatRequest, LLMError\n"
        f"llm = LLM.from_config(Path({str(path)!r}))\n"
        "async def call() -> str:\n"
        "    try:\n"
        "        [event async for event in llm.stream(ChatRequest(model='gpt-4o', messages=[]))]\n"
        "    except LLMError as error:\n"
        "        return error.message\n"
        "    finally:\n"
        "        await llm.aclose()\n"
        "    return 'answered'\n"
        "print(asyncio.run(call()), 'httpx' in sys.modules, 'litellm' in sys.modules)\n"
    )
    printed = _python_output(script).strip()
    assert printed.endswith("Connection error. False False"), printed


async def test_tool_choice_without_tools_is_not_sent(fake: FakeOpenAI, tmp_path: Path, llms: list[LLM]) -> None:
    """As through litellm: providers refuse tool_choice and parallel_tool_calls
    without tools, whether the request or the route sets them."""
    params = {"api_base": fake.api_base, "tool_choice": "auto", "parallel_tool_calls": False}
    llm = LLM.from_config(config_file(tmp_path, [entry("*", "openai/*", **params)]))
    llms.append(llm)
    assert [event async for event in llm.stream(ChatRequest("fake-no-usage", [user("hi")], tool_choice="none"))]
    assert "tool_choice" not in fake.requests[0]["body"]
    assert "parallel_tool_calls" not in fake.requests[0]["body"]


async def test_an_unusable_route_setting_is_the_runs_error(fake: FakeOpenAI, tmp_path: Path, llms: list[LLM]) -> None:
    """A value only a call can read (a typo, or one from the environment) fails the call as an LLMError."""
    llm = LLM.from_config(config_file(tmp_path, [entry("*", "openai/*", api_base=fake.api_base, timeout="30s")]))
    llms.append(llm)
    with pytest.raises(LLMError) as failure:
        [event async for event in llm.stream(ChatRequest("fake-no-usage", [user("hi")]))]
    assert failure.value.code == "server_error"
    assert "routing entry for model 'fake-no-usage'" in failure.value.message


def test_odd_chunk_fields_are_ignored_not_crashed_on() -> None:
    """The direct path reads providers' JSON as it is: a number where text
    belongs must not reach the answer (litellm's objects never let it)."""
    reader = ChunkReader()
    chunk = {
        "choices": [
            {
                "index": 0,
                "finish_reason": ["stop"],
                "delta": {
                    "content": 5,
                    "tool_calls": [{"index": 0, "id": 7, "function": {"name": 3, "arguments": {"a": 1}}}],
                },
            }
        ]
    }
    events = list(reader.read(chunk))
    assert all(not isinstance(event, TextDelta) for event in events)
    assert reader.output == [""] and reader.reason is None


async def test_a_cassette_keeps_a_providers_surrogate_halves_as_escapes(
    fake: FakeOpenAI, tmp_path: Path, llms: list[LLM]
) -> None:
    """Recording keeps the provider's stream as it came (the halves as JSON
    escapes: UTF-8 cannot carry them, and writing them raised mid-run);
    both the recording run and its replay pass on the mended text."""
    fake.texts["fake-halves"] = ["a \ud83d", "\ude00 b \ud83d"]
    path = config_file(tmp_path, [entry("*", "openai/*", api_base=fake.api_base, api_key="k")])
    recorder = LLM.from_config(path)
    llms.append(recorder)
    recorder.cassettes = cassettes.Cassettes(tmp_path / "tapes", "record")
    chat = ChatRequest("fake-halves", [user("hi")])
    recorded = [event async for event in recorder.stream(chat)]
    assert "".join(event.text for event in recorded if isinstance(event, TextDelta)) == "a \U0001f600 b \ufffd"
    [tape] = (tmp_path / "tapes").glob("*.json")
    assert "\\ud83d" in tape.read_text(encoding="utf-8")

    await fake.stop()
    player = LLM.from_config(path, replaying=True)
    llms.append(player)
    player.cassettes = cassettes.Cassettes(tmp_path / "tapes", "replay")
    assert [event async for event in player.stream(chat)] == recorded
