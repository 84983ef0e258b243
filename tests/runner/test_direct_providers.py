"""Providers served directly besides openai/ and hosted_vllm/ (app/llm/providers.py):
Azure OpenAI deployments and the OpenAI-compatible providers litellm passes
requests to as they are. Each request is sent through the direct path and
through litellm (``direct: false``) to the same loopback server, and the two
must match: URL, credential headers, body, streamed answer, errors."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
import types
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import openai
import pytest

from app.llm import (
    LLM,
    ChatRequest,
    Event,
    Finish,
    LLMConfigError,
    LLMError,
    TextDelta,
    ToolCallDelta,
    Usage,
    litellm_adapter,
    model_map,
)
from app.llm.direct import Call
from app.settings import Settings
from tests.runner.fake_openai import USAGE, FakeOpenAI

pytestmark = pytest.mark.timeout(60)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
# Every variable either path reads for these providers: a test sets the ones it means.
CREDENTIAL_VARIABLES = (
    "OPENAI_API_KEY",
    "OPENAI_ORGANIZATION",
    "OPENAI_ORG_ID",
    "OPENAI_PROJECT_ID",
    "AZURE_API_KEY",
    "AZURE_OPENAI_API_KEY",
    "AZURE_API_BASE",
    "AZURE_API_VERSION",
    "AZURE_AD_TOKEN",
    "AZURE_OPENAI_AD_TOKEN",
    "AZURE_OPENAI_ENDPOINT",
    "OPENAI_API_VERSION",
    "NEBIUS_API_KEY",
    "NEBIUS_API_BASE",
    "LAMBDA_API_KEY",
    "GITHUB_API_KEY",
    "FRIENDLIAI_API_KEY",
    "FRIENDLI_TOKEN",
)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in CREDENTIAL_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def load(tmp_path: Path, entries: list[dict[str, Any]], name: str = "models.json") -> LLM:
    path = tmp_path / name
    path.write_text(json.dumps({"model_list": entries}))
    return LLM.from_config(path)


def entry(name: str, model: str, direct: bool | None = None, **params: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {"model_name": name, "litellm_params": {"model": model, **params}}
    if direct is not None:
        raw["direct"] = direct
    return raw


async def collect(llm: LLM, chat: ChatRequest) -> list[Event]:
    return [event async for event in llm.stream(chat)]


async def both_paths(
    tmp_path: Path, fake: FakeOpenAI, chat: ChatRequest, model: str, *, served_direct: bool = True, **params: Any
) -> tuple[list[dict[str, Any]], list[Event]]:
    """The request each path sent for one route and the first path's events:
    first as the route is served by default (direct, or litellm where
    ``served_direct`` is False), then through litellm (``direct: false``)."""
    sent: list[dict[str, Any]] = []
    events: list[Event] = []
    for direct in (None, False):
        fake.requests.clear()
        llm = load(tmp_path, [entry("*", model, direct, max_retries=0, **params)], f"{direct}.json")
        assert llm.route(chat.model).direct is (served_direct and direct is None)
        try:
            answer = await collect(llm, chat)
        finally:
            await llm.aclose()
        events = events or answer
        [request] = fake.requests
        sent.append(request)
    return sent, events


TOOL_CHAT = ChatRequest(
    "fake-chat",
    [{"role": "system", "content": "sys"}, user("weather in Tokyo?")],
    tools=[WEATHER],
    tool_choice="required",
    parallel_tool_calls=False,
    temperature=0.2,
    top_p=0.9,
    max_tokens=40,
    response_format={"type": "json_object"},
    extra={"seed": 7},
)


@pytest.mark.parametrize(
    ("model", "params", "environment"),
    [
        ("azure/fake-chat", {"api_key": "az-key", "api_version": "2024-10-21"}, {}),
        ("azure/fake-chat", {}, {"AZURE_API_KEY": "az-env", "AZURE_API_VERSION": "2024-08-01-preview"}),
        ("azure/fake-chat", {}, {"AZURE_OPENAI_API_KEY": "az-first", "AZURE_API_KEY": "az-second"}),
        ("azure/fake-chat", {"azure_ad_token": "os.environ/MY_TOKEN"}, {"MY_TOKEN": "entra-token"}),
        ("azure/fake-chat", {"api_key": "az-key", "api_version": "v1"}, {}),
        ("azure/other", {"api_key": "az-key", "api_base": "{root}/openai/deployments/fake-chat"}, {}),
        ("nebius/fake-chat", {"api_key": "nb-key", "stop": ["\n"], "presence_penalty": 0.5}, {}),
        ("nebius/fake-chat", {}, {"NEBIUS_API_KEY": "nb-env", "OPENAI_API_KEY": "sk-openai"}),
        ("lambda_ai/fake-chat", {}, {"OPENAI_API_KEY": "sk-openai"}),
        ("novita/fake-chat", {"api_key": "nv-key", "max_completion_tokens": 99}, {}),
        ("friendliai/fake-chat", {}, {"FRIENDLI_TOKEN": "fr-token"}),
        ("github/fake-chat", {"api_key": "gh", "extra_headers": {"X-Tenant": "t1"}, "temperature": 0.1}, {}),
        # litellm leaves these out for the plain providers (and metadata for
        # openai/ and hosted_vllm/): such routes stay on litellm.
        ("nebius/fake-chat", {"api_key": "nb", "user": "u1"}, {}),
        ("novita/fake-chat", {"api_key": "nv", "reasoning_effort": "low"}, {}),
        ("wandb/fake-chat", {"api_key": "wb", "metadata": {"team": "a"}}, {}),
        ("openai/fake-chat", {"api_key": "sk", "metadata": {"team": "a"}}, {}),
        ("openai/fake-chat", {"api_key": "sk", "user": "u1", "reasoning_effort": "low"}, {}),
        ("hosted_vllm/fake-chat", {"api_key": "vl", "metadata": {"team": "a"}, "user": "u1"}, {}),
        # OpenAI-Organization: from OPENAI_ORGANIZATION (not for hosted_vllm/ nor Azure), or the route's.
        ("nebius/fake-chat", {"api_key": "nb"}, {"OPENAI_ORGANIZATION": "org-env"}),
        ("openai/fake-chat", {"api_key": "sk"}, {"OPENAI_ORGANIZATION": "org-env"}),
        ("openai/fake-chat", {"api_key": "sk", "organization": "org-x"}, {"OPENAI_ORGANIZATION": "org-env"}),
        ("hosted_vllm/fake-chat", {"api_key": "vl"}, {"OPENAI_ORGANIZATION": "org-env"}),
        ("azure/fake-chat", {"api_key": "az", "api_version": "2024-10-21"}, {"OPENAI_ORGANIZATION": "org-env"}),
        # The openai SDK under litellm reads OPENAI_ORG_ID when litellm passes
        # no organization, and OPENAI_PROJECT_ID (OpenAI-Project) always.
        ("openai/fake-chat", {"api_key": "sk"}, {"OPENAI_ORG_ID": "org-sdk", "OPENAI_PROJECT_ID": "proj-1"}),
        ("openai/fake-chat", {"api_key": "sk"}, {"OPENAI_ORGANIZATION": "org-env", "OPENAI_ORG_ID": "org-sdk"}),
        ("nebius/fake-chat", {"api_key": "nb"}, {"OPENAI_PROJECT_ID": "proj-1"}),
        ("hosted_vllm/fake-chat", {"api_key": "vl"}, {"OPENAI_ORG_ID": "org-sdk", "OPENAI_PROJECT_ID": "proj-1"}),
        ("azure/fake-chat", {"api_key": "az", "api_version": "2024-10-21"}, {"OPENAI_PROJECT_ID": "proj-1"}),
        ("azure/fake-chat", {"api_key": "az", "api_version": "2024-10-21"}, {"OPENAI_ORG_ID": "org-sdk"}),
        ("azure/fake-chat", {"api_key": "az", "api_version": "v1"}, {"OPENAI_ORG_ID": "o", "OPENAI_PROJECT_ID": "p"}),
    ],
)
async def test_the_direct_request_is_what_litellm_sends(
    fake: FakeOpenAI,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    model: str,
    params: dict[str, Any],
    environment: dict[str, str],
) -> None:
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    root = fake.api_base.removesuffix("/v1")
    params = dict(params)
    base = params.pop("api_base", "{root}" if model.startswith("azure/") else "{root}/v1").format(root=root)
    chat = TOOL_CHAT if model.endswith("/fake-chat") else replace(TOOL_CHAT, model=model.partition("/")[2])
    served_direct = not {"user", "reasoning_effort", "metadata"} & set(params)
    (direct, through_litellm), events = await both_paths(
        tmp_path, fake, chat, model, served_direct=served_direct, api_base=base, **params
    )
    assert direct["path"] == through_litellm["path"]
    assert direct["headers"] == through_litellm["headers"]  # credentials, organization, extra_headers
    assert direct["body"] == through_litellm["body"]
    assert direct["authorization"] or direct["api-key"]  # each case names a credential
    assert [event.text for event in events if isinstance(event, TextDelta)] == ["Hello", " world"]
    assert [event.name for event in events if isinstance(event, ToolCallDelta) and event.name] == ["get_weather"]
    assert events[-1] == Finish("tool_calls", Usage(USAGE["prompt_tokens"], USAGE["completion_tokens"]))


async def test_azure_urls_and_credentials(fake: FakeOpenAI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the comparison above pins, spelled out: the deployment URL with
    api-version (default litellm's), the api-key header, AZURE_API_BASE."""
    monkeypatch.setenv("AZURE_API_BASE", fake.api_base.removesuffix("/v1") + "/")
    monkeypatch.setenv("AZURE_API_KEY", "az-env")
    llm = load(tmp_path, [entry("*", "azure/*", max_retries=0)])
    try:
        await collect(llm, ChatRequest("my deployment", [user("hi")]))
    finally:
        await llm.aclose()
    [sent] = fake.requests
    assert sent["path"] == "/openai/deployments/my%20deployment/chat/completions?api-version=2025-02-01-preview"
    assert (sent["api-key"], sent["authorization"]) == ("az-env", None)
    assert sent["body"]["model"] == "my deployment"


def test_default_base_urls_need_no_api_base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Providers with a fixed base URL are direct without api_base (no call is made here)."""
    monkeypatch.setenv("NEBIUS_API_KEY", "nb")
    llm = load(tmp_path, [entry("*", "nebius/*")])
    route = llm.route("meta-llama/Llama-3.3-70B-Instruct")
    assert route.direct
    call = Call.build(route, ChatRequest(route.model, [user("hi")]))
    assert call.url == "https://api.studio.nebius.ai/v1/chat/completions"
    assert call.headers["Authorization"] == "Bearer nb"
    assert json.loads(call.body)["model"] == "meta-llama/Llama-3.3-70B-Instruct"
    monkeypatch.setenv("NEBIUS_API_BASE", "http://127.0.0.1:9/nebius")
    assert Call.build(route, ChatRequest(route.model, [user("hi")])).url == "http://127.0.0.1:9/nebius/chat/completions"


@pytest.fixture(params=["direct", "litellm"])
async def azure(request: pytest.FixtureRequest, fake: FakeOpenAI, tmp_path: Path) -> AsyncIterator[LLM]:
    """An Azure deployment route served directly and through litellm."""
    params = {"api_base": fake.api_base.removesuffix("/v1"), "api_key": "az", "api_version": "2024-10-21"}
    with_stall = {**params, "timeout": 0.5}
    llm = load(
        tmp_path,
        [
            entry("*", "azure/*", request.param == "direct", max_retries=0, **params),
            entry("fake-stall*", "azure/fake-stall*", request.param == "direct", max_retries=0, **with_stall),
            entry("fake-flaky", "azure/fake-flaky", request.param == "direct", max_retries=2, **params),
        ],
    )
    assert llm.route("gpt-4o").direct is (request.param == "direct")
    try:
        yield llm
    finally:
        await llm.aclose()


REJECTED = "The provider rejected the request for model '{0}' (azure/{0}): "
FAILED = "The provider failed for model '{0}' (azure/{0}) "


@pytest.mark.parametrize(
    ("model", "code", "message", "partial"),
    [
        ("fake-429", "rate_limit_exceeded", "Rate limit reached for model '{0}' (azure/{0}): "
         "Rate limit reached for fake-429 (test).", 0),
        ("fake-400", "invalid_prompt", REJECTED + "This model's maximum context length is 10 tokens.", 0),
        ("fake-422", "invalid_prompt", REJECTED + "The fake server cannot process this request.", 0),
        ("fake-500", "server_error", FAILED + "(HTTP 500): The fake server had an error.", 0),
        ("fake-502", "server_error", FAILED + "(HTTP 502): Error code: 502", 0),
        ("fake-internal", "server_error", FAILED + "(HTTP 500): Internal server error - Internal server error", 0),
        ("fake-named", "server_error", FAILED + "(HTTP 500): FooException raised by the model worker.", 0),
        ("fake-stall-head", "server_error", FAILED + "(HTTP 408): Request timed out.", 0),
        ("fake-drop", "server_error", FAILED + "(HTTP 500): Connection error.", 1),
        ("fake-stream-error", "server_error", FAILED + "(HTTP 500): The model crashed mid-answer.", 1),
    ],
)  # fmt: skip
async def test_azure_errors_are_mapped_as_through_litellm(
    azure: LLM, fake: FakeOpenAI, model: str, code: str, message: str, partial: int
) -> None:
    seen: list[Event] = []
    with pytest.raises(LLMError) as failure:
        async for event in azure.stream(ChatRequest(model, [user("hi")])):
            seen.append(event)
    assert failure.value.code == code
    assert len(seen) == partial
    expected = message.format(model)
    if model == "fake-502":  # the direct path also shows the body litellm drops
        assert failure.value.message.startswith(expected), failure.value.message
    else:
        assert failure.value.message == expected
    assert len(fake.requests) == 1


async def test_azure_retries_before_the_answer_starts(azure: LLM, fake: FakeOpenAI) -> None:
    events = await collect(azure, ChatRequest("fake-flaky", [user("hi")]))
    assert "".join(event.text for event in events if isinstance(event, TextDelta)) == "Plain answer"
    assert len(fake.requests) == 2


def test_which_routes_go_direct(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = "http://127.0.0.1:9"
    monkeypatch.setenv("AZURE_CLIENT_ID", "set-but-not-read-here")
    llm = load(
        tmp_path,
        [
            entry("az", "azure/gpt-4o-prod", api_base=base, api_key="k"),
            entry("az-token", "azure/gpt-4o-prod", api_base=base, azure_ad_token="t"),  # noqa: S106
            entry("az-o3", "azure/o3-mini", api_base=base, api_key="k"),
            entry("az-gpt5", "azure/gpt-5-chat", api_base=base, api_key="k"),
            entry("az-35", "azure/gpt-35-turbo", api_base=base, api_key="k"),
            entry("az-old", "azure/gpt-4o", api_base=base, api_key="k", api_version="2024-02-01"),
            entry("az-entra", "azure/gpt-4o", api_base=base, tenant_id="t", client_id="c", client_secret="s"),  # noqa: S106
            entry("az-nocreds", "azure/gpt-4o", api_base=base),
            entry("az-both", "azure/gpt-4o", api_base=base, api_key="k", azure_ad_token="t"),  # noqa: S106
            entry("az-nobase", "azure/gpt-4o", api_key="k"),
            entry("az-effort", "azure/gpt-4o", api_base=base, api_key="k", reasoning_effort="low"),
            entry("az-forced", "azure/gpt-4o", False, api_base=base, api_key="k"),
            entry("nebius", "nebius/llama"),
            entry("novita-org", "novita/llama", organization="org"),
            entry("vllm-org", "hosted_vllm/llama", api_base=base, organization="org"),  # litellm drops it
            entry("nebius-renamed", "nebius/llama", max_completion_tokens=10),
            entry("groq", "groq/llama-3.3-70b", api_base=base),
            entry("deepseek", "deepseek/deepseek-chat"),
            entry("mistral", "mistral/mistral-large"),
            entry("together", "together_ai/meta-llama/Llama-3-70b"),
            entry("xai", "xai/grok-3"),
            entry("openrouter", "openrouter/openai/gpt-4o"),
        ],
    )
    direct = {name for name in ("az", "az-token", "nebius") if llm.route(name).direct}
    assert direct == {"az", "az-token", "nebius"}
    others = [
        "az-o3", "az-gpt5", "az-35", "az-old", "az-entra", "az-nocreds", "az-both", "az-nobase", "az-effort",
        "az-forced", "novita-org", "vllm-org", "nebius-renamed", "groq", "deepseek", "mistral", "together", "xai",
        "openrouter",
    ]  # fmt: skip
    assert [name for name in others if llm.route(name).direct] == []


def test_azure_key_variables_make_a_route_without_api_key_direct(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = [entry("*", "azure/*", api_base="http://127.0.0.1:9")]
    assert not load(tmp_path, raw).route("gpt-4o").direct  # Entra ID sign-in is litellm's
    monkeypatch.setenv("AZURE_API_KEY", "k")
    assert load(tmp_path, raw).route("gpt-4o").direct


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (entry("a", "azure/o1-preview", True, api_base="http://x", api_key="k"), "translates requests"),
        (entry("a", "azure/gpt-4o", True, api_key="k"), "no api_base"),
        (entry("a", "azure/gpt-4o", True, api_base="http://x"), "Entra ID"),
        (entry("a", "azure/gpt-4o", True, api_base="http://x", api_key="k", api_version="2023-05-15"), "2023-05-15"),
        (entry("a", "groq/llama-3.3-70b", True, api_base="http://x"), "not a model the direct path serves"),
        (entry("a", "nebius/llama", True, input_cost_per_token=1e-6), "input_cost_per_token"),
    ],
)
def test_direct_true_that_cannot_be_served_is_a_start_up_error(
    tmp_path: Path, raw: dict[str, Any], needle: str
) -> None:
    with pytest.raises(LLMConfigError, match=needle):
        load(tmp_path, [raw])


def test_azure_and_plain_provider_routes_never_import_litellm(tmp_path: Path) -> None:
    path = tmp_path / "models.json"
    entries = [
        entry("gpt-4o", "azure/gpt-4o-prod", api_base="http://127.0.0.1:9", api_key="os.environ/AZURE_KEY"),
        entry("*", "nebius/*"),
    ]
    path.write_text(json.dumps({"model_list": entries}))
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from app.llm import LLM\n"
        f"llm = LLM.from_config(Path({str(path)!r}))\n"
        "assert llm.route('gpt-4o').direct and llm.route('llama').direct\n"
        "print(llm.context_window('gpt-4o'), llm.count_tokens('gpt-4o', [{'role': 'user', 'content': 'hi'}]) > 0)\n"
        "assert 'litellm' not in sys.modules, 'litellm was imported'\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], env=dict(os.environ), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["8192", "True"]  # azure/gpt-4o-prod is not in litellm's model map


async def test_an_azure_base_gone_from_the_environment_fails_the_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chosen at start-up from AZURE_API_BASE, read again per call: unset since, the call fails clearly."""
    monkeypatch.setenv("AZURE_API_BASE", "http://127.0.0.1:9")
    monkeypatch.setenv("AZURE_API_KEY", "k")
    llm = load(tmp_path, [entry("*", "azure/*")])
    assert llm.route("gpt-4o").direct
    monkeypatch.delenv("AZURE_API_BASE")
    try:
        with pytest.raises(LLMError) as failure:
            await collect(llm, ChatRequest("gpt-4o", [user("hi")]))
    finally:
        await llm.aclose()
    assert failure.value.code == "server_error"
    assert failure.value.message.endswith("(azure/gpt-4o) is not usable: no api_base and AZURE_API_BASE is not set")


def test_a_wildcard_sends_names_litellm_translates_through_litellm(tmp_path: Path) -> None:
    """litellm reshapes requests for OpenAI's and Azure's o-series and gpt-5
    models by name (max_completion_tokens, system messages, sampling
    parameters): what a direct wildcard fills in with such a name goes through
    litellm; every other name stays direct."""
    base = "http://127.0.0.1:9"
    llm = load(
        tmp_path,
        [
            entry("az-*", "azure/*", api_base=base, api_key="k"),
            entry("*", "openai/*", api_base=base + "/v1"),
        ],
    )
    names = ["gpt-4o", "o3-mini", "o1", "gpt-5-mini", "gpt-5-chat-latest", "gpt-4.1", "omni-moderation"]
    names += ["o3-mini-distill", "o4-local", "o1-2024-12-17"]  # o-series only as litellm lists OpenAI's models
    assert [name for name in names if llm.route(name).direct] == [
        "gpt-4o",
        "gpt-5-chat-latest",
        "gpt-4.1",
        "omni-moderation",
        "o3-mini-distill",
        "o4-local",
    ]
    azure_names = ["az-gpt-4o", "az-o3-mini", "az-gpt-5", "az-gpt-35-turbo", "az-prod-4o"]
    assert [name for name in azure_names if llm.route(name).direct] == ["az-gpt-4o", "az-prod-4o"]


def test_without_litellm_s_model_map_its_own_o_series_names_are_known(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(model_map, "available", lambda: False)
    llm = load(tmp_path, [entry("*", "openai/*", api_base="http://127.0.0.1:9/v1")])
    names = ["o3-mini", "o1-pro", "o3-mini-distill", "gpt-4o"]
    assert [name for name in names if llm.route(name).direct] == ["o3-mini-distill", "gpt-4o"]


async def test_an_o_series_model_through_a_direct_wildcard_is_sent_as_litellm_sends_it(
    fake: FakeOpenAI, tmp_path: Path
) -> None:
    """The request litellm makes for o3-mini: max_completion_tokens, not max_tokens."""
    llm = load(tmp_path, [entry("*", "openai/*", api_base=fake.api_base, api_key="k", max_retries=0)])
    try:
        await collect(llm, ChatRequest("o3-mini", [user("hi")], max_tokens=30))
    finally:
        await llm.aclose()
    [sent] = fake.requests
    assert sent["body"].get("max_completion_tokens") == 30 and "max_tokens" not in sent["body"]


@pytest.fixture
def without_litellm(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """``import litellm`` fails as where it is not installed (None in sys.modules
    halts the import; restored after the test); the names of the threads
    that tried to import it are collected."""
    monkeypatch.setitem(sys.modules, "litellm", None)
    monkeypatch.setattr(litellm_adapter, "_loading", None)  # however earlier tests left them
    monkeypatch.setattr(litellm_adapter, "_loaded", False)
    threads: list[str] = []
    real_load = litellm_adapter.load

    def load() -> Any:
        threads.append(threading.current_thread().name)
        return real_load()

    monkeypatch.setattr(litellm_adapter, "load", load)
    return threads


async def test_a_name_handed_to_litellm_without_litellm_fails_clearly_off_the_loop(
    tmp_path: Path, without_litellm: list[str]
) -> None:
    """o3-mini behind a direct openai/* wildcard needs litellm: without it the
    call fails with an LLMError saying so (not a bare ModuleNotFoundError),
    and the import is tried in a worker thread, not on the event loop."""
    llm = load(tmp_path, [entry("*", "openai/*", api_base="http://127.0.0.1:9/v1", api_key="k")])
    route = llm.route("o3-mini")
    assert not route.direct and route.handed_to_litellm
    assert llm.count_tokens("o3-mini", [user("hi")]) > 0 and llm.context_window("o3-mini") > 0
    try:
        with pytest.raises(LLMError) as failure:
            await collect(llm, ChatRequest("o3-mini", [user("hi")]))
    finally:
        await llm.aclose()
    assert failure.value.code == "server_error"
    message = failure.value.message
    assert message.startswith("The model 'o3-mini' (openai/o3-mini) needs litellm, which reshapes"), message
    assert message.endswith(': pip install "assistants-server[litellm]"'), message
    assert without_litellm and threading.main_thread().name not in without_litellm


async def test_calls_during_the_first_import_of_litellm_wait_for_it_off_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two first calls at once import litellm once, in a thread: the second
    found the half-imported module in sys.modules and imported it on the
    event loop, where it waited on the import lock (about three seconds)."""
    monkeypatch.setattr(litellm_adapter, "_loading", None)
    monkeypatch.setattr(litellm_adapter, "_loaded", False)
    threads: list[str] = []
    imported = types.ModuleType("litellm")

    def slow_load() -> Any:
        threads.append(threading.current_thread().name)
        monkeypatch.setitem(sys.modules, "litellm", imported)  # as an import in progress does
        time.sleep(0.3)
        return imported

    monkeypatch.setattr(litellm_adapter, "load", slow_load)
    llm = load(tmp_path, [entry("*", "openai/*", api_base="http://127.0.0.1:9/v1", api_key="k")])
    route = llm.route("o3-mini")
    first = asyncio.ensure_future(litellm_adapter.load_off_the_loop(route))
    await asyncio.sleep(0.05)  # the import has begun
    async with asyncio.timeout(10):
        loaded = await asyncio.gather(first, litellm_adapter.load_off_the_loop(route))
    assert loaded == [imported, imported]
    assert threads == ["litellm-import"]


async def test_a_cancelled_call_leaves_the_first_import_of_litellm_to_the_others(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A call cancelled while litellm's first import runs (its run
    cancelled) cancels its own wait only: the others get litellm (the
    shared import was cancelled for all, its thread died, and the runs
    waiting failed)."""
    monkeypatch.setattr(litellm_adapter, "_loading", None)
    monkeypatch.setattr(litellm_adapter, "_loaded", False)
    release = threading.Event()
    imported = types.ModuleType("litellm")

    def blocked_load() -> Any:
        release.wait(10)
        return imported

    monkeypatch.setattr(litellm_adapter, "load", blocked_load)
    route = load(tmp_path, [entry("*", "openai/*", api_base="http://127.0.0.1:9/v1", api_key="k")]).route("o3-mini")
    cancelled = asyncio.ensure_future(litellm_adapter.load_off_the_loop(route))
    waiting = asyncio.ensure_future(litellm_adapter.load_off_the_loop(route))
    await asyncio.sleep(0.05)  # both wait for the import
    cancelled.cancel()
    release.set()
    async with asyncio.timeout(10):
        assert await waiting is imported
    assert cancelled.cancelled() and litellm_adapter._loaded


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    """The API's settings: a direct openai/* wildcard (to nowhere: its calls here never connect)."""
    path = tmp_path / "models.json"
    path.write_text(json.dumps({"model_list": [entry("*", "openai/*", api_base="http://127.0.0.1:9/v1", api_key="k")]}))
    return Settings(data_dir=tmp_path / "data", database_url=database_url, poll_after_ms=10, llm_config=path)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_the_chat_endpoint_answers_a_missing_litellm_as_a_provider_error(
    client: openai.AsyncOpenAI, without_litellm: list[str]
) -> None:
    with pytest.raises(openai.InternalServerError) as failure:
        await client.chat.completions.create(model="o3-mini", messages=[{"role": "user", "content": "hi"}])
    assert failure.value.status_code == 500
    assert failure.value.code == "server_error"
    assert "needs litellm" in failure.value.message and "assistants-server[litellm]" in failure.value.message


async def test_direct_true_sends_every_name_its_wildcard_fills_in_direct(fake: FakeOpenAI, tmp_path: Path) -> None:
    """The operator chose the direct path: o3-mini is sent as configured
    (max_tokens as the request set it), not handed to litellm."""
    llm = load(tmp_path, [entry("*", "openai/*", True, api_base=fake.api_base, api_key="k", max_retries=0)])
    route = llm.route("o3-mini")
    assert route.direct and not route.handed_to_litellm
    try:
        await collect(llm, ChatRequest("o3-mini", [user("hi")], max_tokens=30))
    finally:
        await llm.aclose()
    [sent] = fake.requests
    assert sent["body"].get("max_tokens") == 30 and "max_completion_tokens" not in sent["body"]


async def test_an_azure_gpt_3_5_deployment_with_dashes_stays_on_litellm(fake: FakeOpenAI, tmp_path: Path) -> None:
    """litellm reads the deployment gpt-3-5-turbo as gpt-3.5-turbo, whose
    json_schema response_format it also sends as a forced tool: the name goes
    through litellm, and the request is litellm's."""
    params = {"api_base": fake.api_base.removesuffix("/v1"), "api_key": "az", "api_version": "2024-10-21"}
    llm = load(tmp_path, [entry("*", "azure/*", max_retries=0, **params)])
    route = llm.route("gpt-3-5-turbo")
    assert not route.direct and route.handed_to_litellm
    schema = {"name": "weather", "schema": {"type": "object", "properties": {"city": {"type": "string"}}}}
    chat = ChatRequest("gpt-3-5-turbo", [user("hi")], response_format={"type": "json_schema", "json_schema": schema})
    try:
        await collect(llm, chat)
    finally:
        await llm.aclose()
    [sent] = fake.requests
    assert sent["path"].startswith("/openai/deployments/gpt-3-5-turbo/chat/completions")
    assert [tool["function"]["name"] for tool in sent["body"]["tools"]] == ["json_tool_call"]


@pytest.mark.parametrize(
    "raw",
    [
        entry("openai", "openai/gpt-4o", api_base="http://127.0.0.1:9/v1?tenant=a"),
        entry("vllm", "hosted_vllm/llama", api_base="os.environ/GW_BASE"),
        entry("nebius", "nebius/llama", api_key="k"),
        entry("azure", "azure/gpt-4o-prod", api_base="http://127.0.0.1:9/?tenant=a", api_key="k"),
        entry("chosen", "openai/gpt-4o", direct=False, api_base="http://127.0.0.1:9/v1?key=secret"),
    ],
    ids=lambda raw: raw["model_name"],
)
def test_an_api_base_with_a_query_string_is_refused_at_start_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, raw: dict[str, Any]
) -> None:
    """Both paths append /chat/completions to the base URL, which a query
    would swallow (``...?tenant=a/chat/completions``): such an entry is a
    start-up error naming it (it went to litellm, which built the same
    wrong URL), without the URL (its query may hold a key)."""
    monkeypatch.setenv("NEBIUS_API_BASE", "http://127.0.0.1:9/v1?tenant=a")
    monkeypatch.setenv("GW_BASE", "http://127.0.0.1:9/v1?tenant=a")
    with pytest.raises(LLMConfigError) as failure:
        load(tmp_path, [entry("plain", "openai/gpt-4o", api_base="http://127.0.0.1:9/v1"), raw])
    message = str(failure.value)
    assert f"model_list[1] ('{raw['model_name']}'): its api_base has a query string" in message
    assert "tenant=a" not in message and "secret" not in message


@pytest.mark.parametrize("target", ["openai/gpt-4o", "azure/gpt-4o-prod"])
async def test_an_api_base_with_a_fragment_is_served_without_it(fake: FakeOpenAI, tmp_path: Path, target: str) -> None:
    """A fragment is never sent (httpx under litellm drops it, and the entry
    worked there): the direct path drops it too, rather than refusing to
    start (review of the query-string refusal)."""
    azure = target.startswith("azure/")
    base = fake.api_base.removesuffix("/v1") if azure else fake.api_base
    params: dict[str, Any] = {"api_base": base + "#frag", "api_key": "k", "max_retries": 0}
    if azure:
        params["api_version"] = "2024-10-21"
    llm = load(tmp_path, [entry("gpt-4o", target, **params)])
    assert llm.route("gpt-4o").direct
    try:
        await collect(llm, ChatRequest("gpt-4o", [user("hi")]))
    finally:
        await llm.aclose()
    [sent] = fake.requests
    expected = "/openai/deployments/gpt-4o-prod/chat/completions" if azure else "/v1/chat/completions"
    assert sent["path"].partition("?")[0] == expected


@pytest.mark.usefixtures("without_litellm")
def test_routes_that_need_litellm_without_it_are_named_at_start_up(tmp_path: Path) -> None:
    """litellm leaves user, metadata and reasoning_effort out of an openai/
    request to a model it does not list (a local server's): such an entry
    goes through litellm, and without it start-up fails naming the entry,
    its key and the ways out (it was a bare ModuleNotFoundError)."""
    entries = [
        entry("plain", "openai/llama", api_base="http://127.0.0.1:9/v1", api_key="k"),
        entry("tagged", "openai/llama", api_base="http://127.0.0.1:9/v1", api_key="k", user="svc"),
        entry("chosen", "openai/llama", direct=False, api_base="http://127.0.0.1:9/v1", api_key="k"),
    ]
    with pytest.raises(LLMConfigError) as failure:
        load(tmp_path, entries)
    message = str(failure.value)
    assert (
        "models.json: litellm is not installed (import of litellm halted; None in sys.modules), and these " in message
    )
    assert message.endswith(
        "routes need it: model_list entry 'tagged' (openai/llama): litellm leaves user out for openai/; "
        "model_list entry 'chosen' (openai/llama): it says direct: false. "
        'Install it (pip install "assistants-server[litellm]"), or make each entry one the direct path serves: '
        "remove the litellm_params it names (litellm leaves user, metadata and reasoning_effort out for these "
        "providers), or its direct: false."
    ), message
