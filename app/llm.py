"""Chat models: routing, the litellm adapter and the built-in offline model.

This is the only module that imports litellm. The import costs about three
seconds, so it happens lazily: a server or test that only uses the offline
model never pays it, and ``LLM.from_config`` pays it at start-up when the
routing config names a real provider, so the first run does not stall the
event loop. Before importing, ``LITELLM_LOCAL_MODEL_COST_MAP`` is defaulted to
``True`` (no network at import) and HuggingFace tokenizer downloads are off,
so token counting never touches the network either.

Routing reads a LiteLLM-proxy-style config (YAML or JSON)::

    model_list:
      - model_name: gpt-4o                   # exact names win over wildcards
        litellm_params: {model: openai/gpt-4o, api_key: os.environ/OPENAI_API_KEY}
        model_info: {max_input_tokens: 128000}
      - model_name: "claude-*"               # the most specific wildcard wins
        litellm_params: {model: "anthropic/claude-*"}
      - model_name: "*"                      # `*` in the target takes what `*` matched
        litellm_params: {model: "offline/*"} # offline/... is the built-in model
    offline:
      rules: rules.yaml                      # optional: see docs/offline-model.md

With no config file, or a config without ``model_list``, every model name is
served by the offline model. Otherwise a name no entry matches fails with
``invalid_prompt``. ``os.environ/NAME`` values are resolved at call time.
Unlike the proxy, duplicate names are not load-balanced: the first one wins.
Other litellm_params go to ``litellm.acompletion`` as they are, over our
defaults ``drop_params: true`` and ``timeout: 600``; retries are the provider
SDK's own (set ``max_retries`` to change them). drop_params only ever drops
what the server adds: parameters the user set are always sent (issue 12).

The offline model is deterministic and instant. Test authors steer it with
``[[directives]]`` in the last user message (or, if that has none, in the
system instructions; then in the config's rules). The full cue language is
in docs/offline-model.md; in short::

    [[reply TEXT]]           answer exactly TEXT
    [[tokens N]]             answer N filler words (one word = one token)
    [[call NAME {json}]]     call a function tool (several = parallel calls)
    [[then]]                 start the script for the next tool round
    [[json]]                 answer JSON even without response_format
    [[fail KIND]]            raise LLMError (rate_limit | server_error | invalid_prompt)
    [[fail KIND after N]]    ... after N deltas (alias: [[fail_after N KIND]])
    [[finish REASON]]        end with stop | length | content_filter
    [[delay MS]]             pause MS milliseconds before each delta
    [[hang]]                 never finish (until the consumer cancels)

A ```python fenced block in a last user message without directives calls
``code_interpreter`` with that code when the request offers it; offered
``file_search`` and given no directives, it searches with the user's text.

Without directives it answers ``You said: <last user text>``, or after tool
results ``Tool results: name -> output; ...``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import time
import warnings
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import aclosing, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import yaml

from app import cassettes
from app.observability import logs
from app.scripting import RequestContext, ScriptBook

FinishReason = Literal["stop", "length", "tool_calls", "content_filter"]
ErrorCode = Literal["rate_limit_exceeded", "server_error", "invalid_prompt"]

OFFLINE_CONTEXT_WINDOW = 128_000
DEFAULT_CONTEXT_WINDOW = 8_192
OFFLINE = "offline"
ENV_REFERENCE = "os.environ/"
# Keys the LiteLLM proxy reads for its own routing; they are not completion
# parameters, so they must not reach litellm.acompletion().
_ROUTER_KEYS = frozenset({"rpm", "tpm", "order", "weight", "max_parallel_requests", "max_input_tokens"})
_FINISH_REASONS: Mapping[str, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",
    "content_filter": "content_filter",
}


@dataclass
class ChatRequest:
    model: str
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] = field(default_factory=list)
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    response_format: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    # Whose completion this is (the run, its assistant and thread); scripted
    # offline answers match on it. None outside runs.
    context: RequestContext | None = None
    # Further OpenAI parameters a caller set (stop, seed, ...): passed to a provider as they are.
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class TextDelta:
    text: str


@dataclass
class ToolCallDelta:
    """One piece of a tool call: id and name come only with an index's first piece."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Finish:
    reason: FinishReason
    usage: Usage


Event = TextDelta | ToolCallDelta | Finish
# Told of every completion when it ends: (model, outcome, seconds, usage);
# outcome is "ok", an ErrorCode, "cancelled" or "error". Metrics set it.
CallObserver = Callable[[str, str, float, "Usage | None"], None]


def chat_body(request: ChatRequest) -> dict[str, Any]:
    """The request in chat-completions terms (what a provider receives)."""
    body: dict[str, Any] = {"model": request.model, "messages": request.messages}
    if request.tools:
        body.update(tools=request.tools, parallel_tool_calls=request.parallel_tool_calls)
    for name in ("tool_choice", "temperature", "top_p", "max_tokens", "response_format", "reasoning_effort"):
        if getattr(request, name) is not None:
            body[name] = getattr(request, name)
    return {**body, **request.extra}


def _event_to_json(event: Event) -> dict[str, Any]:
    if isinstance(event, TextDelta):
        return {"text": event.text}
    if isinstance(event, ToolCallDelta):
        return {"tool_call": {"index": event.index, "id": event.id, "name": event.name, "arguments": event.arguments}}
    usage = {"prompt_tokens": event.usage.prompt_tokens, "completion_tokens": event.usage.completion_tokens}
    return {"finish": event.reason, "usage": usage}


def _event_from_json(item: Mapping[str, Any]) -> Event:
    if "text" in item:
        return TextDelta(str(item["text"]))
    if "tool_call" in item:
        call = item["tool_call"]
        return ToolCallDelta(int(call["index"]), call.get("id"), call.get("name"), str(call.get("arguments") or ""))
    reason = _FINISH_REASONS.get(str(item.get("finish")), "stop")
    usage = item.get("usage") or {}
    return Finish(reason, Usage(int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))))


@dataclass
class Exchange:
    """One completion as sent and as answered, assembled from its events."""

    request: ChatRequest
    started: float = field(default_factory=time.monotonic)
    created_at: int = field(default_factory=lambda: int(time.time()))
    text: list[str] = field(default_factory=list)
    calls: dict[int, dict[str, str]] = field(default_factory=dict)
    finish: Finish | None = None
    error: dict[str, str] | None = None

    def observe(self, event: Event) -> None:
        if isinstance(event, TextDelta):
            self.text.append(event.text)
        elif isinstance(event, ToolCallDelta):
            call = self.calls.setdefault(event.index, {"id": "", "name": "", "arguments": ""})
            call["id"] = event.id or call["id"]
            call["name"] = event.name or call["name"]
            call["arguments"] += event.arguments
        else:
            self.finish = event

    def duration_ms(self) -> int:
        return int((time.monotonic() - self.started) * 1000)

    def request_body(self) -> dict[str, Any]:
        return chat_body(self.request)

    def response_body(self) -> dict[str, Any]:
        finish = self.finish
        return {
            "text": "".join(self.text),
            "tool_calls": [self.calls[index] for index in sorted(self.calls)],
            "finish_reason": finish.reason if finish else None,
            "usage": None
            if finish is None
            else {
                "prompt_tokens": finish.usage.prompt_tokens,
                "completion_tokens": finish.usage.completion_tokens,
                "total_tokens": finish.usage.prompt_tokens + finish.usage.completion_tokens,
            },
            "error": self.error,
        }


class LLMError(Exception):
    """A completion failed; ``code`` is what the run's ``last_error.code`` becomes."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code: ErrorCode = code
        self.message = message


class LLMConfigError(ValueError):
    """The routing config is unreadable or malformed (raised at start-up, not per run)."""


# --------------------------------------------------------------------- routing


@dataclass(frozen=True)
class Route:
    """Where one requested model name goes: litellm_params with wildcards filled in."""

    model: str
    params: Mapping[str, Any]
    info: Mapping[str, Any] = field(default_factory=dict)

    @property
    def target(self) -> str:
        return str(self.params["model"])

    @property
    def offline(self) -> bool:
        return self.target == OFFLINE or self.target.startswith(OFFLINE + "/")

    def configured_window(self) -> int | None:
        value = self.info.get("max_input_tokens") or self.params.get("max_input_tokens")
        return int(value) if value else None


@dataclass(frozen=True)
class _Entry:
    """One model_list entry; ``pattern`` is None for an exact model_name."""

    name: str
    params: Mapping[str, Any]
    info: Mapping[str, Any]
    pattern: re.Pattern[str] | None

    @classmethod
    def parse(cls, raw: Any, position: int) -> _Entry:
        where = f"model_list[{position}]"
        if not isinstance(raw, dict) or not isinstance(raw.get("model_name"), str):
            raise LLMConfigError(f"{where}: expected a mapping with a string model_name")
        params, info = raw.get("litellm_params"), raw.get("model_info") or {}
        if not isinstance(params, dict) or not isinstance(params.get("model"), str):
            raise LLMConfigError(f"{where}: litellm_params.model (a string) is required")
        if not isinstance(info, dict):
            raise LLMConfigError(f"{where}: model_info must be a mapping")
        name: str = raw["model_name"]
        pattern = None
        if "*" in name:
            pattern = re.compile("(.*)".join(re.escape(part) for part in name.split("*")), re.DOTALL)
        return cls(name, params, info, pattern)

    def route(self, model: str) -> Route | None:
        if self.pattern is None:
            if model != self.name:
                return None
            captured: Sequence[str] = (model,)
        else:
            match = self.pattern.fullmatch(model)
            if match is None:
                return None
            captured = match.groups()
        params = dict(self.params)
        params["model"] = _fill_stars(str(params["model"]), captured)
        return Route(model, params, self.info)


def _fill_stars(template: str, captured: Sequence[str]) -> str:
    """``openai/*`` + ("gpt-4o",) -> ``openai/gpt-4o``; extra stars reuse the last capture."""
    pieces = template.split("*")
    out = [pieces[0]]
    for position, piece in enumerate(pieces[1:]):
        out += [captured[min(position, len(captured) - 1)], piece]
    return "".join(out)


@dataclass(frozen=True)
class _Router:
    exact: Mapping[str, _Entry]
    wildcards: Sequence[_Entry]  # most specific (longest literal text) first
    everything_offline: bool  # no model_list at all

    @classmethod
    def build(cls, entries: Sequence[_Entry] | None) -> _Router:
        if entries is None:
            return cls({}, (), True)
        exact: dict[str, _Entry] = {}
        for entry in entries:
            if entry.pattern is None:
                exact.setdefault(entry.name, entry)  # the first of duplicates wins (no load balancing)
        wildcards = [entry for entry in entries if entry.pattern is not None]
        wildcards.sort(key=lambda entry: -len(entry.name.replace("*", "")))  # stable: ties keep file order
        return cls(exact, wildcards, False)

    def route(self, model: str) -> Route | None:
        if model in self.exact:
            return self.exact[model].route(model)
        for entry in self.wildcards:
            route = entry.route(model)
            if route is not None:
                return route
        return Route(model, {"model": f"{OFFLINE}/{model}"}) if self.everything_offline else None

    def needs_litellm(self) -> bool:
        entries = [*self.exact.values(), *self.wildcards]
        return any(not Route(entry.name, entry.params).offline for entry in entries)


def _read_config(path: Path) -> tuple[_Router, list[_Rule]]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))  # YAML also reads JSON
    except (OSError, yaml.YAMLError) as exc:
        raise LLMConfigError(f"cannot read the model routing config {path}: {exc}") from exc
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise LLMConfigError(f"{path}: expected a mapping with a model_list")
    try:
        raw_list = data.get("model_list")
        if raw_list is not None and not isinstance(raw_list, list):
            raise LLMConfigError("model_list must be a list")
        entries = None if not raw_list else [_Entry.parse(raw, n) for n, raw in enumerate(raw_list)]
        return _Router.build(entries), _read_rules(data.get("offline"), path.parent)
    except LLMConfigError as exc:
        raise LLMConfigError(f"{path}: {exc}") from None


def _resolve_env(value: Any, model: str) -> Any:
    """Replace ``os.environ/NAME`` strings, at call time so key rotation needs no restart."""
    if isinstance(value, str) and value.startswith(ENV_REFERENCE):
        name = value[len(ENV_REFERENCE) :]
        if name not in os.environ:
            raise LLMError(
                "server_error",
                f"The routing config for model '{model}' reads the environment variable {name}, which is not set.",
            )
        return os.environ[name]
    if isinstance(value, dict):
        return {key: _resolve_env(item, model) for key, item in value.items()}
    if isinstance(value, list):
        return [_resolve_env(item, model) for item in value]
    return value


# ------------------------------------------------------------------- the facade


class LLM:
    """Every chat completion the server makes goes through one of these."""

    def __init__(self, router: _Router, rules: Sequence[_Rule] = ()) -> None:
        self._router = router
        # Rules a test adds at run time (admin API, pytest plugin).
        self.script = ScriptBook()
        # Called with each finished (or failed) completion: the model-request log.
        self.observer: Callable[[Exchange], Awaitable[None]] | None = None
        # Record or replay provider answers (app/cassettes.py).
        self.cassettes: cassettes.Cassettes | None = None
        self._offline = _OfflineModel(rules, self.script)
        self._windows: dict[str, int] = {}
        self.metrics_observer: CallObserver | None = None

    @classmethod
    def from_config(cls, path: Path | None, *, replaying: bool = False) -> LLM:
        """None (or a config without model_list) serves every model offline.
        ``replaying``: provider answers come from cassettes, so litellm is
        neither needed nor imported."""
        if path is None:
            return cls(_Router.build(None))
        router, rules = _read_config(path)
        if router.needs_litellm() and not replaying:
            _litellm()  # pay the import at start-up, not inside the first run
        return cls(router, rules)

    def route(self, model: str) -> Route:
        route = self._router.route(model)
        if route is None:
            raise LLMError(
                "invalid_prompt",
                f"The model '{model}' is not configured on this server: "
                "no model_list entry of the routing config matches it.",
            )
        return route

    def is_configured(self, model: str) -> bool:
        return self._router.route(model) is not None

    def model_names(self) -> list[str]:
        """Names to list on ``GET /models``: the routing file's exact model
        names, and ``offline`` (the built-in model) when a name routes to it."""
        names = list(self._router.exact)
        if OFFLINE not in names and self.is_configured(OFFLINE):
            names.append(OFFLINE)
        return names

    async def stream(self, request: ChatRequest) -> AsyncIterator[Event]:
        """Deltas as they come, then exactly one Finish; LLMError on any failure.
        Each call is reported to ``metrics_observer`` when it ends."""
        started, outcome, usage = time.monotonic(), "cancelled", None
        try:
            async with aclosing(self._stream(request)) as source:
                async for event in source:
                    if isinstance(event, Finish):
                        outcome, usage = "ok", event.usage
                    yield event
        except LLMError as exc:
            outcome = exc.code
            raise
        except Exception:
            outcome = "error"
            raise
        finally:
            if self.metrics_observer is not None:
                self.metrics_observer(request.model, outcome, time.monotonic() - started, usage)

    async def _stream(self, request: ChatRequest) -> AsyncGenerator[Event, None]:
        route = self.route(request.model)
        if route.offline:
            prompt_tokens = self.count_tokens(request.model, request.messages, request.tools)
            source = self._offline.stream(request, prompt_tokens)
        elif self.cassettes is not None and self.cassettes.mode == "replay":
            source = self._replay(request)
        else:
            source = _provider_stream(route, request, self)
            if self.cassettes is not None:
                source = self._recording(request, source, self.cassettes)
        exchange = Exchange(request) if self.observer is not None else None
        async with aclosing(source):
            try:
                async for event in source:
                    if exchange is not None:
                        exchange.observe(event)
                        if isinstance(event, Finish):
                            # Recorded before the run can finish, so whoever
                            # sees the run ended also sees what the model saw.
                            await self._record(exchange)
                    yield event
            except LLMError as exc:
                if exchange is not None:
                    exchange.error = {"code": exc.code, "message": exc.message}
                    await self._record(exchange)
                raise

    async def _replay(self, request: ChatRequest) -> AsyncGenerator[Event, None]:
        assert self.cassettes is not None
        recorded, why = self.cassettes.lookup(request.model, chat_body(request))
        if recorded is None:
            self.cassettes.misses.append(cassettes.Miss(request.model, why))
            raise LLMError("server_error", why)
        for item in recorded:
            await asyncio.sleep(0)
            yield _event_from_json(item)

    async def _recording(
        self, request: ChatRequest, source: AsyncGenerator[Event, None], book: cassettes.Cassettes
    ) -> AsyncGenerator[Event, None]:
        events: list[dict[str, Any]] = []
        async with aclosing(source):
            async for event in source:
                events.append(_event_to_json(event))
                if isinstance(event, Finish):
                    book.save(request.model, chat_body(request), events)
                yield event

    async def _record(self, exchange: Exchange) -> None:
        assert self.observer is not None
        try:
            await self.observer(exchange)
        except Exception:  # the log is a diagnostic: it never fails a run
            logging.getLogger("app.llm").exception("could not record a model request")

    def context_window(self, model: str) -> int:
        """Input tokens the model accepts: config, then litellm's model map, then a default."""
        if model not in self._windows:
            self._windows[model] = self._find_window(model)
        return self._windows[model]

    def _find_window(self, model: str) -> int:
        route = self._router.route(model)
        if route is None:
            return DEFAULT_CONTEXT_WINDOW
        configured = route.configured_window()
        if configured:
            return configured
        if route.offline:
            return OFFLINE_CONTEXT_WINDOW
        try:
            info = _litellm().get_model_info(route.target)
            return int(info.get("max_input_tokens") or info.get("max_tokens") or DEFAULT_CONTEXT_WINDOW)
        except Exception:  # litellm raises a bare Exception for models it does not know
            return DEFAULT_CONTEXT_WINDOW

    def count_tokens(
        self, model: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> int:
        """Prompt tokens, never using the network; exact for the offline model."""
        route = self._router.route(model)
        if route is not None and route.offline:
            return _offline_prompt_tokens(messages, tools)
        if route is not None:
            with suppress(Exception):  # odd message shapes; fall back to the estimate below
                return int(
                    _litellm().token_counter(
                        model=route.target, messages=messages, tools=tools or None, use_default_image_token_count=True
                    )
                )
        return _estimate_tokens(messages, tools)

    def count_text_tokens(self, model: str, text: str) -> int:
        route = self._router.route(model)
        if route is None or route.offline:
            return len(_tokens(text))
        with suppress(Exception):
            return int(_litellm().token_counter(model=route.target, text=text))
        return _estimate_text(text)


def _estimate_text(text: str) -> int:
    # About 4 bytes per token for English and 3 per CJK character: dividing by 3
    # over-estimates, which is the safe side for truncation.
    return -(-len(text.encode("utf-8")) // 3)


def _estimate_tokens(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> int:
    total = 3 + sum(4 + _estimate_text(json.dumps(message, ensure_ascii=False)) for message in messages)
    return total + (_estimate_text(json.dumps(tools)) if tools else 0)


# --------------------------------------------------------------------- litellm


def _litellm() -> Any:
    """litellm, imported on first use: offline at import, quiet, no telemetry."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    # litellm 1.100.5 walks dir() of streamed deltas and so touches pydantic
    # attributes deprecated in pydantic 2.11. Harmless, but where warnings are
    # errors (our test suite) it would abort the stream. Added on every use, not
    # once, because test runners reset the warning filters for each test.
    warnings.filterwarnings("ignore", message=r"Accessing the 'model_\w+' attribute on the instance is deprecated")
    import litellm

    logs.adopt_litellm_loggers()  # its lines once, in our format
    litellm.suppress_debug_info = True
    litellm.telemetry = False
    litellm.disable_hf_tokenizer_download = True  # token_counter must never download a tokenizer
    return litellm


async def embed(params: dict[str, Any], texts: Sequence[str]) -> list[list[float]]:
    """Embeddings through litellm's ``aembedding`` for one routing entry's
    ``litellm_params`` (already resolved: ``model`` plus provider options).
    Here because this module is the only one that imports litellm
    (app/retrieval/embed.py chooses the model and batches)."""
    options = dict(params)
    model = options.pop("model")
    response = await _litellm().aembedding(model=model, input=list(texts), **options)
    return [[float(value) for value in item["embedding"]] for item in response.data]


# OpenAI's defaults: a run without its own values carries these (services/runs),
# so they count as the server's, and a model that lacks the parameter (o-series
# and temperature) still works.
_DEFAULT_VALUES: Mapping[str, Any] = {"temperature": 1.0, "top_p": 1.0}


def explicit_params(request: ChatRequest) -> list[str]:
    """Parameters the user set (issue 12): they must reach the provider, so
    litellm's ``drop_params`` may not remove them. tool_choice "auto",
    parallel_tool_calls true and temperature/top_p 1 are the defaults, which
    the server may add itself."""
    names = [
        name
        for name in ("temperature", "top_p", "max_tokens", "response_format", "reasoning_effort")
        if getattr(request, name) is not None and getattr(request, name) != _DEFAULT_VALUES.get(name)
    ]
    if request.tools and request.tool_choice not in (None, "auto"):
        names.append("tool_choice")
    if request.tools and not request.parallel_tool_calls:
        names.append("parallel_tool_calls")
    return names + list(request.extra)


def decode_tokens(tokens: Sequence[int]) -> str:
    """Text of OpenAI token ids (cl100k_base, bundled with litellm: no network);
    LangChain's OpenAIEmbeddings sends its inputs as token ids."""
    return str(_litellm().decode(model="text-embedding-3-small", tokens=list(tokens)))


def _completion_kwargs(route: Route, request: ChatRequest) -> dict[str, Any]:
    params = {k: v for k, v in _resolve_env(dict(route.params), request.model).items() if k not in _ROUTER_KEYS}
    # Defaults a config may override. drop_params: a parameter the provider does
    # not support is left out rather than failing the run, but only one the
    # server added: allowed_openai_params forwards what the user set, even
    # where litellm's model table says the model lacks it (a user's vLLM
    # serving "gpt-4" honours response_format). timeout: litellm's own
    # default is 6000 s, which would leave a run stuck on a silent provider.
    kwargs: dict[str, Any] = {"drop_params": True, "timeout": 600, **params}
    kwargs.update(messages=request.messages, stream=True, stream_options={"include_usage": True})
    if request.tools:
        kwargs["tools"] = request.tools
        kwargs["parallel_tool_calls"] = request.parallel_tool_calls
        if request.tool_choice is not None:
            kwargs["tool_choice"] = request.tool_choice
    for name in ("temperature", "top_p", "max_tokens", "response_format", "reasoning_effort"):
        value = getattr(request, name)
        if value is not None:
            kwargs[name] = value
    kwargs.update(request.extra)
    explicit = explicit_params(request)
    if explicit:
        kwargs["allowed_openai_params"] = sorted({*explicit, *(params.get("allowed_openai_params") or [])})
    return kwargs


async def _provider_stream(route: Route, request: ChatRequest, llm: LLM) -> AsyncGenerator[Event, None]:
    litellm = _litellm()
    kwargs = _completion_kwargs(route, request)
    try:
        response = await litellm.acompletion(**kwargs)
    except Exception as exc:  # litellm maps every provider failure into its exception family
        raise _provider_error(exc, route, explicit_params(request)) from exc
    reader = _ChunkReader()
    async with aclosing(response):
        chunks = response.__aiter__()
        while True:
            try:
                chunk = await chunks.__anext__()
            except StopAsyncIteration:
                break
            except Exception as exc:
                raise _provider_error(exc, route) from exc
            for event in reader.read(chunk):
                yield event
    yield reader.finish(request, llm)


class _ChunkReader:
    """Turns litellm's chat.completion.chunk objects into our events."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self.usage: Usage | None = None
        self.output: list[str] = []
        self.calls: dict[int, str | None] = {}  # index -> id

    def read(self, chunk: Any) -> Iterator[Event]:
        usage = getattr(chunk, "usage", None)
        if usage is not None and (usage.prompt_tokens or usage.completion_tokens):
            self.usage = Usage(int(usage.prompt_tokens or 0), int(usage.completion_tokens or 0))
        for choice in getattr(chunk, "choices", None) or []:
            if (getattr(choice, "index", 0) or 0) != 0:
                continue  # n > 1 is never requested
            self.reason = getattr(choice, "finish_reason", None) or self.reason
            delta = getattr(choice, "delta", None)
            content = getattr(delta, "content", None)
            if content:
                self.output.append(content)
                yield TextDelta(content)
            for call in getattr(delta, "tool_calls", None) or []:
                yield self._tool_delta(call)

    def _tool_delta(self, call: Any) -> ToolCallDelta:
        call_id = getattr(call, "id", None)
        index = getattr(call, "index", None)
        if not isinstance(index, int):  # some providers omit it: place the call by id
            known = [i for i, seen in self.calls.items() if seen == call_id]
            index = known[0] if known else (len(self.calls) if call_id or not self.calls else max(self.calls))
        function = getattr(call, "function", None)
        arguments = getattr(function, "arguments", None) or ""
        self.output.append(arguments)
        if index in self.calls:  # repeated ids and names are dropped, as the interface promises
            return ToolCallDelta(index, arguments=arguments)
        self.calls[index] = call_id
        return ToolCallDelta(index, id=call_id, name=getattr(function, "name", None), arguments=arguments)

    def finish(self, request: ChatRequest, llm: LLM) -> Finish:
        reason = _FINISH_REASONS.get(self.reason or "stop", "stop")
        if reason == "stop" and self.calls:
            reason = "tool_calls"  # some providers say "stop" after a tool call
        usage = self.usage or Usage(
            llm.count_tokens(request.model, request.messages, request.tools),
            llm.count_text_tokens(request.model, "".join(self.output)),
        )
        return Finish(reason, usage)


# litellm prefixes messages with class names, often several times over
# ("litellm.BadRequestError: ContextWindowExceededError: OpenAIException - ...").
_CLASS_PREFIX = re.compile(r"\b(?:litellm\.)?[A-Za-z]*(?:Error|Exception)(?::\s+|\s+-\s+)")


def _provider_error(exc: Exception, route: Route, explicit: Sequence[str] = ()) -> LLMError:
    """429 -> rate_limit_exceeded; 400/413/422 (bad or too long prompt) -> invalid_prompt; else server_error.
    A rejected request names the parameters the user set, since one of them may be the cause."""
    status = getattr(exc, "status_code", None)
    detail = _CLASS_PREFIX.sub("", str(exc)).strip() or type(exc).__name__
    head, _, cause = detail.partition(" Original exception: ")
    detail = head if cause.strip() == head.strip() else detail
    where = f"model '{route.model}' ({route.target})"
    if status == 429:
        return LLMError("rate_limit_exceeded", f"Rate limit reached for {where}: {detail}")
    if status in (400, 413, 422):
        named = [name for name in explicit if name in detail] or list(explicit)
        sent = f" (parameters set for this request: {', '.join(named)})" if named else ""
        return LLMError("invalid_prompt", f"The provider rejected the request for {where}{sent}: {detail}")
    kind = f"HTTP {status}" if isinstance(status, int) else type(exc).__name__
    return LLMError("server_error", f"The provider failed for {where} ({kind}): {detail}")


# ------------------------------------------------------------ the offline model

_CJK = "\u3000-\u303f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef"
# A token is a word with the whitespace before it, or one CJK character (these
# scripts have no spaces); trailing whitespace is a token of its own. Joining
# the tokens gives back the text exactly.
_TOKEN = re.compile(rf"\s*[{_CJK}]|\s*[^\s{_CJK}]+|\s+")
_FILLER = ("lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit", "sed", "do", "eiusmod")
_IMAGE_TOKENS = 85
_FAIL_KINDS: Mapping[str, ErrorCode] = {
    "rate_limit": "rate_limit_exceeded",
    "rate_limit_exceeded": "rate_limit_exceeded",
    "server_error": "server_error",
    "invalid_prompt": "invalid_prompt",
}
_VERBS = ("reply", "tokens", "call", "then", "json", "fail", "fail_after", "finish", "delay", "hang")


def _tokens(text: str) -> list[str]:
    return _TOKEN.findall(text)


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(str(part.get("text", "")) for part in content if isinstance(part, dict) and "text" in part)
    return ""


def _images_of(content: Any) -> list[str]:
    """Short descriptions of a message's image parts, so replies show what arrived."""
    found = []
    for part in content if isinstance(content, list) else []:
        if not isinstance(part, dict) or part.get("type") not in ("image_url", "image_file"):
            continue
        ref = part.get(part["type"]) or {}
        url = str(ref.get("url") or ref.get("file_id") or "") if isinstance(ref, dict) else str(ref)
        header, _, data = url.partition(",")
        if url.startswith("data:") and header.endswith(";base64"):
            size = len(data) * 3 // 4 - (len(data) - len(data.rstrip("=")))
            url = f"{header[5:-7]}, {size} bytes"
        found.append(url)
    return found


def _offline_prompt_tokens(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> int:
    """3 + per message (3 + words + 85 per image + per tool call 1 + argument words), + words of the tools' JSON."""
    total = 3
    for message in messages:
        content = message.get("content")
        total += 3 + len(_tokens(_text_of(content))) + _IMAGE_TOKENS * len(_images_of(content))
        for call in message.get("tool_calls") or []:
            total += 1 + len(_tokens(str((call.get("function") or {}).get("arguments", ""))))
    return total + (len(_tokens(json.dumps(tools))) if tools else 0)


def _scan(text: str) -> tuple[list[tuple[str, str]], str]:
    """Split ``[[verb arg]]`` directives out of text; returns them and the remaining text."""
    directives: list[tuple[str, str]] = []
    plain: list[str] = []
    position = 0
    while (start := text.find("[[", position)) != -1:
        end = _directive_end(text, start + 2)
        if end == -1:
            break
        plain.append(text[position:start])
        verb, *arg = text[start + 2 : end].split(maxsplit=1) or [""]
        directives.append((verb.lower(), arg[0].strip() if arg else ""))
        position = end + 2
    plain.append(text[position:])
    # Close the gaps the directives leave, but keep the author's line breaks.
    return directives, re.sub(r"[ \t]{2,}", " ", "".join(plain)).strip() if directives else text.strip()


def _directive_end(text: str, start: int) -> int:
    """Index of the ``]]`` closing a directive, skipping brackets and strings of JSON arguments."""
    depth, in_string, escaped = 0, False, False
    for position in range(start, len(text)):
        char = text[position]
        if in_string:
            escaped, in_string = (False, True) if escaped else (char == "\\", char != '"')
        elif char == '"' and depth > 0:
            in_string = True
        elif depth == 0 and text.startswith("]]", position):
            return position
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
    return text.find("]]", start)  # unbalanced: the first ]] closes it


@dataclass
class _Step:
    """What the model does in one completion (one tool round)."""

    text: list[str] = field(default_factory=list)
    calls: list[tuple[str, str]] = field(default_factory=list)
    fail: tuple[ErrorCode, int] | None = None  # error, deltas emitted before it
    finish: FinishReason | None = None
    hang: bool = False


@dataclass
class _Script:
    steps: list[_Step] = field(default_factory=lambda: [_Step()])
    json: bool = False
    delay: float = 0.0

    @classmethod
    def parse(cls, directives: Sequence[tuple[str, str]]) -> _Script:
        script = cls()
        for verb, arg in directives:
            script.apply(verb, arg)
        return script

    def step(self, rounds: int) -> _Step | None:
        return self.steps[rounds] if rounds < len(self.steps) else None

    def apply(self, verb: str, arg: str) -> None:
        step = self.steps[-1]
        if verb == "then":
            self.steps.append(_Step())
            if arg:  # [[then call b]] is [[then]] [[call b]]
                verb, _, rest = arg.partition(" ")
                self.apply(verb.lower(), rest.strip())
        elif verb == "reply":
            step.text.append(arg)
        elif verb == "tokens":
            step.text.append(" ".join(_FILLER[n % len(_FILLER)] for n in range(_count(verb, arg))))
        elif verb == "call":
            name, _, arguments = arg.partition(" ")
            if not name:
                raise _cue_error("[[call NAME {json arguments}]] needs a function name")
            step.calls.append((name, arguments.strip() or "{}"))
        elif verb in ("fail", "fail_after"):
            step.fail = _parse_fail(verb, arg)
        else:
            self._apply_setting(step, verb, arg)

    def _apply_setting(self, step: _Step, verb: str, arg: str) -> None:
        if verb == "json":
            self.json = True
        elif verb == "delay":
            self.delay = _count(verb, arg) / 1000
        elif verb == "hang":
            step.hang = True
        elif verb == "finish" and arg in ("stop", "length", "content_filter"):
            step.finish = cast(FinishReason, arg)
        elif verb == "finish":
            raise _cue_error("[[finish REASON]] takes stop, length or content_filter")
        else:
            raise _cue_error(f"unknown directive [[{verb}]]; known: {', '.join(_VERBS)}")


def _cue_error(problem: str) -> LLMError:
    return LLMError("invalid_prompt", f"Offline model: {problem} (see docs/offline-model.md).")


def _count(verb: str, arg: str) -> int:
    if not (arg.isascii() and arg.isdigit()):  # isdigit() alone admits "²", which int() refuses
        raise _cue_error(f"[[{verb} N]] needs a whole number, got {arg!r}")
    return int(arg)


def _parse_fail(verb: str, arg: str) -> tuple[ErrorCode, int]:
    """``fail KIND``, ``fail KIND after N`` or ``fail_after N KIND``."""
    words = arg.split()
    if verb == "fail_after" and len(words) == 2:
        words = [words[1], "after", words[0]]
    if len(words) == 1:
        words += ["after", "0"]
    if len(words) != 3 or words[1] != "after" or words[0] not in _FAIL_KINDS:
        raise _cue_error(
            f"[[{verb} {arg}]]: use [[fail KIND]] or [[fail KIND after N]], KIND in {', '.join(_FAIL_KINDS)}"
        )
    return _FAIL_KINDS[words[0]], _count(verb, words[2])


@dataclass(frozen=True)
class _Rule:
    pattern: re.Pattern[str]
    respond: str

    def answer(self, text: str) -> str | None:
        match = self.pattern.search(text)
        if match is None:
            return None
        # Only \1 and \g<name> are group references; other backslashes stay as
        # written, so JSON escapes in `respond` survive.
        return re.sub(
            r"\\(\d+)|\\g<(\w+)>", lambda ref: match.group(int(ref[1]) if ref[1] else ref[2]) or "", self.respond
        )


def _read_rules(section: Any, base: Path) -> list[_Rule]:
    if section is None:
        return []
    raw = section.get("rules") if isinstance(section, dict) else None
    if isinstance(raw, str):  # a path to a YAML/JSON list, relative to the config file
        try:
            raw = yaml.safe_load((base / raw).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise LLMConfigError(f"offline.rules: cannot read {raw}: {exc}") from exc
    if not isinstance(raw, list):
        raise LLMConfigError("offline.rules must be a list of {match, respond} or a path to one")
    rules = []
    for position, rule in enumerate(raw):
        if not isinstance(rule, dict) or not isinstance(rule.get("match"), str) or "respond" not in rule:
            raise LLMConfigError(f"offline.rules[{position}]: expected {{match: REGEX, respond: TEXT}}")
        try:
            rules.append(_Rule(re.compile(rule["match"]), str(rule["respond"])))
        except re.error as exc:
            raise LLMConfigError(f"offline.rules[{position}].match: {exc}") from exc
    return rules


@dataclass
class _Conversation:
    """What the offline model reads from the messages."""

    user_text: str
    images: list[str]
    system_text: str
    rounds: int  # assistant tool-call turns since the last user message
    tool_results: list[tuple[str, str]]  # (name, output) of the trailing tool messages
    size: int

    @classmethod
    def read(cls, messages: list[dict[str, Any]]) -> _Conversation:
        users = [n for n, message in enumerate(messages) if message.get("role") == "user"]
        last_user = users[-1] if users else -1
        content = messages[last_user].get("content") if users else None
        names: dict[str, str] = {}
        for message in messages:
            for call in message.get("tool_calls") or []:
                names[str(call.get("id"))] = str((call.get("function") or {}).get("name"))
        trailing: list[tuple[str, str]] = []
        for message in reversed(messages):
            if message.get("role") != "tool":
                break
            name = names.get(str(message.get("tool_call_id")), "tool")
            trailing.insert(0, (name, _text_of(message.get("content"))))
        system = [_text_of(m.get("content")) for m in messages if m.get("role") in ("system", "developer")]
        later = messages[last_user + 1 :]
        rounds = sum(1 for message in later if message.get("role") == "assistant" and message.get("tool_calls"))
        return cls(_text_of(content), _images_of(content), "\n".join(system), rounds, trailing, len(messages))


_CODE_TOOL = "code_interpreter"
_SEARCH_TOOL = "file_search"
_FENCED_PYTHON = re.compile(r"```(?:python|py)[ \t]*\n(.*?)```", re.DOTALL)


def _fenced_python(text: str) -> str | None:
    """The first ```python fenced block of a message: the code the built-in
    tool runs when the model is offered code_interpreter (so it is testable offline)."""
    match = _FENCED_PYTHON.search(text)
    return match.group(1) if match else None


class _OfflineModel:
    def __init__(self, rules: Sequence[_Rule], script: ScriptBook) -> None:
        self._rules = rules
        self._book = script

    def _script(self, conversation: _Conversation, request: ChatRequest) -> tuple[_Script, str]:
        """Directives of the last user message, else the first scripted rule a
        test added that matches, else its fenced Python for code_interpreter,
        else the system messages, else the first matching config rule."""
        directives, user_text = _scan(conversation.user_text)
        if not directives:
            scripted = self._book.answer(request.model, user_text, conversation.rounds, request.context)
            directives = scripted or []
        code = _fenced_python(conversation.user_text)
        if not directives and code is not None and _CODE_TOOL in _function_names(request):
            directives = [("call", f"{_CODE_TOOL} {json.dumps({'code': code})}")]
        if not directives:
            directives = _scan(conversation.system_text)[0]
        for rule in [] if directives else self._rules:
            respond = rule.answer(conversation.user_text)
            if respond is not None:
                directives = _scan(respond)[0] or [("reply", respond)]
                break
        if not directives and user_text and _SEARCH_TOOL in _function_names(request) and request.tool_choice != "none":
            # Offered file_search and told nothing else: search with the question (issue 12).
            directives = [("call", _SEARCH_TOOL)]
        return _Script.parse(directives), user_text

    async def stream(self, request: ChatRequest, prompt_tokens: int) -> AsyncGenerator[Event, None]:
        conversation = _Conversation.read(request.messages)
        script, user_text = self._script(conversation, request)
        step = script.step(conversation.rounds)
        text, calls = _answer(request, conversation, script, step, user_text)
        deltas = _deltas(text, calls, conversation)
        truncated = request.max_tokens is not None and len(deltas) > request.max_tokens
        deltas = deltas[: request.max_tokens] if truncated else deltas
        fail_at = min(step.fail[1], len(deltas)) if step and step.fail else None
        for position, delta in enumerate([*deltas, None]):
            if position == fail_at and step and step.fail:
                raise LLMError(step.fail[0], f"Offline model: failing on cue ([[fail {step.fail[0]}]]).")
            await asyncio.sleep(script.delay)  # also yields to the loop between deltas
            if delta is not None:
                yield delta
        if step and step.hang:
            await asyncio.Future()  # never resolves: the consumer cancels it
        reason: FinishReason = "tool_calls" if calls else "stop"
        reason = "length" if truncated else (step.finish if step and step.finish else reason)
        yield Finish(reason, Usage(prompt_tokens, len(deltas)))


def _answer(
    request: ChatRequest, conversation: _Conversation, script: _Script, step: _Step | None, user_text: str
) -> tuple[str, list[tuple[str, str]]]:
    calls = _choose_calls(request, step.calls if step else [], conversation.rounds)
    calls = [_with_query(name, arguments, user_text) for name, arguments in calls]
    offered = _function_names(request)
    for name, _ in calls:
        if name not in offered:
            raise _cue_error(f"told to call '{name}', but the request offers no such function (offered: {offered})")
    if step is not None and step.text:
        return " ".join(step.text), calls
    if calls:
        return "", calls
    return _default_text(request, conversation, script.json, user_text), calls


def _function_names(request: ChatRequest) -> list[str]:
    return [str((tool.get("function") or {}).get("name")) for tool in request.tools]


def _with_query(name: str, arguments: str, question: str) -> tuple[str, str]:
    """A file_search call the script gave no query searches with the user's question."""
    if name != _SEARCH_TOOL or not question:
        return name, arguments
    with suppress(ValueError):
        parsed = json.loads(arguments or "{}")
        if isinstance(parsed, dict) and not parsed.get("query"):
            return name, json.dumps({**parsed, "query": question}, ensure_ascii=False)
    return name, arguments


def _choose_calls(request: ChatRequest, calls: list[tuple[str, str]], rounds: int) -> list[tuple[str, str]]:
    """Apply tool_choice; forcing a call applies only to a turn's first completion, so runs end.

    With no tools offered the script's calls are dropped, as with tool_choice
    "none": an assistant scripted to call tools still answers a run that
    disables them.
    """
    choice = request.tool_choice
    if choice == "none" or not request.tools:
        return []
    if isinstance(choice, dict):
        name = str((choice.get("function") or {}).get("name"))
        calls = [call for call in calls if call[0] == name]
        if not calls and rounds == 0:
            calls = [(name, "{}")]
    elif choice == "required" and not calls and rounds == 0:
        calls = [(_function_names(request)[0], "{}")]
    return calls if request.parallel_tool_calls else calls[:1]


def _default_text(request: ChatRequest, conversation: _Conversation, force_json: bool, user_text: str) -> str:
    if conversation.tool_results:
        sentence = "Tool results: " + "; ".join(f"{name} -> {output}" for name, output in conversation.tool_results)
    else:
        shown = " ".join([user_text, *(f"[image: {image}]" for image in conversation.images)]).strip()
        sentence = f"You said: {shown}" if shown else "You said nothing."
    response_format = request.response_format or {}
    if response_format.get("type") == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema") or {}
        return json.dumps(_placeholder(schema, schema), ensure_ascii=False)
    if force_json or response_format.get("type") == "json_object":
        return json.dumps({"message": sentence}, ensure_ascii=False)
    return sentence


def _placeholder(schema: Any, root: Mapping[str, Any], depth: int = 0) -> Any:
    """A value matching a JSON schema's required shape: "" / 0 / false / null, first enum or variant."""
    if not isinstance(schema, dict) or depth > 16:
        return None
    if isinstance(schema.get("$ref"), str):
        target: Any = root
        for key in schema["$ref"].removeprefix("#/").split("/"):
            target = target.get(key) if isinstance(target, dict) else None
        return _placeholder(target, root, depth + 1)
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        if schema.get(key):
            return _placeholder(schema[key][0], root, depth + 1)
    kind = schema.get("type", "object" if "properties" in schema else None)
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), None)
    if kind == "object":
        properties = schema.get("properties") or {}
        keys = schema.get("required") or list(properties)
        return {key: _placeholder(properties.get(key, {}), root, depth + 1) for key in keys}
    if kind == "array":
        return [_placeholder(schema.get("items", {}), root, depth + 1) for _ in range(schema.get("minItems", 0))]
    return {"string": "", "integer": 0, "number": 0, "boolean": False}.get(str(kind))


def _deltas(text: str, calls: list[tuple[str, str]], conversation: _Conversation) -> list[Event]:
    """One delta per token: text words first, then each call's header and argument words."""
    deltas: list[Event] = [TextDelta(token) for token in _tokens(text)]
    for index, (name, arguments) in enumerate(calls):
        seed = f"{conversation.size}:{conversation.rounds}:{index}:{name}:{arguments}"
        call_id = "call_" + hashlib.sha256(seed.encode()).hexdigest()[:24]
        deltas.append(ToolCallDelta(index, id=call_id, name=name))
        deltas.extend(ToolCallDelta(index, arguments=piece) for piece in _tokens(arguments))
    return deltas
