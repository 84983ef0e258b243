"""``anthropic/`` routes served over Anthropic's Messages API by one streamed
HTTP request of our own, without litellm.

Through litellm an anthropic/ completion cost about 6.5 ms of CPU against
1 ms for a direct route, and litellm's import 150 MiB (bench/README.md,
issue 17). Here the request is the one litellm 1.100 would send
(anthropic_request.py builds it), over direct.py's pooled clients, and the
Server-Sent Events become the events litellm's stream gave:

- text deltas as they come; a tool_use block's start is the call's id and
  name, each input_json_delta a piece of its arguments, and "{}" at the
  block's end when those pieces were all empty (a call without arguments;
  litellm adds nothing for a call whose input never streams);
- the finish reason from message_delta's stop_reason (end_turn and
  stop_sequence -> stop, tool_use -> tool_calls, max_tokens -> length,
  refusal -> content_filter), usage from message_start's input (cache
  creation and cache reads included, as litellm counts them) and the last
  output count;
- failures as litellm maps Anthropic's (its texts: the body as litellm
  quotes it, its own suffixes), an ``error`` event mid-stream likewise.

A request anthropic_request.request_refusal turns down goes through litellm,
imported on first need (litellm_adapter.load_off_the_loop). The route's
``timeout`` (600 s) bounds connecting and each read; there are no retries
unless the route sets ``max_retries`` (litellm's Anthropic client makes none).
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncGenerator, Iterator
from typing import Any

from app.llm import anthropic_request, litellm_adapter
from app.llm.direct import (
    Call,
    DirectClient,
    StreamedResponse,
    call_limits,
    failures,
    opened,
    reading,
    sse_data,
    unusable,
)
from app.llm.interface import (
    ChatRequest,
    Event,
    Finish,
    TextDelta,
    TokenCounter,
    ToolCallDelta,
    Usage,
    explicit_params,
)
from app.llm.provider import ChunkReader, ProviderFailure, provider_error
from app.llm.routing import Route, resolve_env
from app.wire import jsontext

_STOP_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "tool_use": "tool_calls",
    "max_tokens": "length",
    "refusal": "content_filter",
    "compaction": "length",
}


async def stream(
    route: Route, request: ChatRequest, counter: TokenCounter, client: DirectClient
) -> AsyncGenerator[Event, None]:
    """Deltas as they arrive, then one Finish; LLMError on any failure."""
    if anthropic_request.request_refusal(request) is not None:
        async for event in litellm_adapter.stream(route, request, counter):
            yield event
        return
    try:
        call = _call(route, request)
    except anthropic_request.MissingKey as exc:
        raise provider_error(ProviderFailure(401, exc.message), route) from exc
    except (ValueError, TypeError) as exc:  # (building the call touches no HTTP client)
        raise unusable(route, exc) from exc
    reader = _Reader()
    async with opened(call, client.here(), route, explicit_params(request), _failure) as response:
        with reading(route):  # an error event, a broken stream, an event that is not JSON: as litellm reports them
            async for data in sse_data(response):
                for event in reader.read(jsontext.loads(data)):  # (as direct._chunk's)
                    yield event
    yield reader.finish(request, counter)


def _call(route: Route, request: ChatRequest) -> Call:
    params = resolve_env(dict(route.params), request.model)
    sent = anthropic_request.build(params, request)
    timeout, max_retries = call_limits(params, sent.headers, 0)  # litellm's Anthropic client makes no retries
    # litellm writes the body with json.dumps' defaults (ASCII escapes).
    body = json.dumps(sent.body).encode()
    return Call(sent.url, sent.headers, body, timeout, max_retries)


class _Reader:
    """Anthropic's stream events into ours; ChunkReader keeps what the Finish needs."""

    def __init__(self) -> None:
        self.chunks = ChunkReader()
        self.tool_index = -1
        self.block: str | None = None  # the type of the content block being streamed
        self.empty_input: bool | None = None  # whether the tool block's input is empty so far; None before any

    def read(self, event: dict[str, Any]) -> Iterator[Event]:
        kind = event.get("type")
        if kind == "content_block_delta":
            delta = event["delta"]
            if "text" in delta:
                if delta["text"]:
                    self.chunks.output.append(delta["text"])
                    yield TextDelta(delta["text"])
            elif "partial_json" in delta and self.block in ("tool_use", "server_tool_use"):
                self.empty_input = self.empty_input is not False and not delta["partial_json"]
                self.chunks.output.append(delta["partial_json"])
                yield ToolCallDelta(self.tool_index, arguments=delta["partial_json"])
        elif kind == "content_block_start":
            block = event["content_block"]
            self.block = block["type"]
            if self.block == "text" and block.get("text"):
                self.chunks.output.append(block["text"])
                yield TextDelta(block["text"])
            elif self.block in ("tool_use", "server_tool_use"):
                self.tool_index += 1
                self.chunks.calls[self.tool_index] = block["id"]
                yield ToolCallDelta(self.tool_index, id=block["id"], name=block["name"], arguments="")
        elif kind == "content_block_stop":
            if self.empty_input:
                # A call without arguments streams one empty fragment; litellm
                # then gives "{}", which clients can json.loads.
                self.chunks.output.append("{}")
                yield ToolCallDelta(self.tool_index, arguments="{}")
            self.block, self.empty_input = None, None
        elif kind == "message_start":
            self._usage(event["message"].get("usage"))
        elif kind == "message_delta":
            reason = (event.get("delta") or {}).get("stop_reason") or "stop"
            self.chunks.reason = _STOP_REASONS.get(reason, "stop")
            self._usage(event.get("usage"))
        elif kind == "error":
            error = event.get("error") or {}
            raise _failure_of(500, (error.get("message") if isinstance(error, dict) else None) or str(event))

    def _usage(self, usage: Any) -> None:
        """litellm's count: input tokens with cache writes and reads, the latest output count."""
        if not isinstance(usage, dict):
            return
        prompt = sum(
            int(usage.get(name) or 0)
            for name in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
        )
        # message_delta's usage may leave the input out: message_start's count stands.
        earlier = self.chunks.usage
        prompt = prompt or (earlier.prompt_tokens if earlier is not None else 0)
        completion = int(usage.get("output_tokens") or 0)
        if prompt or completion:
            self.chunks.usage = Usage(prompt, completion)

    def finish(self, request: ChatRequest, counter: TokenCounter) -> Finish:
        return self.chunks.finish(request, counter)


async def _failure(response: StreamedResponse) -> ProviderFailure:
    """An error answer as litellm reports it: its status, and the body quoted as the bytes it read."""
    try:
        body = await response.aread()
    except failures().http:
        body = b""
    finally:
        await response.aclose()
    return _failure_of(response.status_code, str(body))


_CONTEXT_WINDOW = re.compile(
    r"prompt is too long|prompt: length|exceed context limit|this model's maximum context length is"
    r"|model's maximum context limit|is longer than the model's context length|input tokens exceed the configured limit"
    r"|exceeds the available context size|exceeds the maximum number of tokens allowed",
    re.IGNORECASE,
)


def _failure_of(status: int, text: str) -> ProviderFailure:
    """litellm's mapping of an Anthropic failure: the status its exception
    carries and the text it reports (the class names it puts first are
    taken off by provider_error on both paths)."""
    if _CONTEXT_WINDOW.search(text) and "string_above_max_length" not in text.lower():
        return ProviderFailure(400, text)
    if "overloaded_error" in text or "Overloaded" in text:
        return ProviderFailure(500, text)
    if "Invalid API Key" in text:
        return ProviderFailure(401, text)
    if "content filtering policy" in text or "Client error '400 Bad Request'" in text:
        return ProviderFailure(400, text)
    mapped = {413: 400, 529: 500}.get(status, status)
    if mapped == 500:
        return ProviderFailure(500, f"{text}. Handle with `litellm.InternalServerError`.")
    if mapped == 503:
        return ProviderFailure(503, f"{text}. Handle with `litellm.ServiceUnavailableError`.")
    return ProviderFailure(mapped, text)
