"""Chat completions through the same model routing and offline model as runs
(issue 12): frameworks that point one base_url at this server call
``/chat/completions`` beside the Assistants API (AutoGen picks a group chat's
next speaker with one, agency-swarm and Semantic Kernel use it for helpers).

A completion is one ``LLM.stream`` call: collected into a ``chat.completion``,
or relayed as ``chat.completion.chunk`` objects in OpenAI's order (role
first, content and tool-call pieces, the finish reason, then usage if asked).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, Literal

from app import errors, ids, llm
from app.wire import chat as wire

COMPLETION = "chatcmpl-"
FINGERPRINT = "fp_assistants_server"
# Passed to a provider as set (the offline model ignores them).
_PASSED_THROUGH = ("stop", "seed", "frequency_penalty", "presence_penalty", "logit_bias", "user")


def model_not_found(model: str) -> errors.APIError:
    return errors.APIError(
        404, f"The model `{model}` does not exist or you do not have access to it.", code="model_not_found"
    )


def request(models: llm.LLM, body: wire.ChatCompletionCreate, deployment: str | None = None) -> llm.ChatRequest:
    """The model call a request asks for, or an OpenAI-style 4xx."""
    model = deployment or body.model
    if not model:
        raise errors.invalid("you must provide a model parameter")
    if not models.is_configured(model):
        raise model_not_found(model)
    if body.functions is not None or body.function_call is not None:
        param = "functions" if body.functions is not None else "function_call"
        raise errors.invalid(f"'{param}' is deprecated and not supported here: use 'tools'.", param=param)
    if body.n is not None and body.n != 1:
        raise errors.invalid("This server returns one choice per request: 'n' must be 1.", param="n")
    if body.stream_options is not None and not body.stream:
        raise errors.invalid(
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.", param="stream_options"
        )
    tools = [tool.model_dump(exclude_none=True) for tool in body.tools or []]
    choice = body.tool_choice
    response_format = (
        body.response_format.model_dump(exclude_none=True, by_alias=True) if body.response_format else None
    )
    return llm.ChatRequest(
        model=model,
        messages=[message.model_dump(exclude_unset=True) for message in body.messages],
        tools=tools,
        tool_choice=choice.model_dump() if isinstance(choice, wire.NamedToolChoice) else choice,
        parallel_tool_calls=True if body.parallel_tool_calls is None else body.parallel_tool_calls,
        temperature=body.temperature,
        top_p=body.top_p,
        max_tokens=body.max_completion_tokens or body.max_tokens,
        response_format=None if (response_format or {}).get("type") == "text" else response_format,
        reasoning_effort=body.reasoning_effort,
        extra={name: getattr(body, name) for name in _PASSED_THROUGH if getattr(body, name) is not None},
    )


def provider_error(error: llm.LLMError) -> errors.APIError:
    """A failed model call as OpenAI would report it."""
    if error.code == "rate_limit_exceeded":
        return errors.APIError(429, error.message, type="requests", code="rate_limit_exceeded")
    if error.code == "invalid_prompt":
        return errors.APIError(400, error.message, code="invalid_prompt")
    return errors.APIError(500, error.message, type="server_error", code="server_error")


@dataclass
class _Call:
    id: str
    name: str = ""
    arguments: str = ""


@dataclass
class _Answer:
    """The model's output so far, and the per-call positions OpenAI indexes by."""

    text: list[str] = field(default_factory=list)
    refusal: list[str] = field(default_factory=list)
    calls: dict[int, _Call] = field(default_factory=dict)

    def call(self, delta: llm.ToolCallDelta) -> tuple[int, bool]:
        """(position of the call in the answer, whether this delta starts it)."""
        if delta.index in self.calls:
            return list(self.calls).index(delta.index), False
        self.calls[delta.index] = _Call(delta.id or ids.new_id(ids.CALL), delta.name or "")
        return len(self.calls) - 1, True


def _usage(usage: llm.Usage) -> wire.CompletionUsage:
    total = usage.prompt_tokens + usage.completion_tokens
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens, "total_tokens": total}


async def complete(models: llm.LLM, call: llm.ChatRequest) -> wire.ChatCompletion:
    answer = _Answer()
    finish: llm.Finish | None = None
    try:
        async for event in models.stream(call):
            if isinstance(event, llm.TextDelta):
                answer.text.append(event.text)
            elif isinstance(event, llm.RefusalDelta):
                answer.refusal.append(event.refusal)
            elif isinstance(event, llm.ToolCallDelta):
                answer.call(event)
                answer.calls[event.index].arguments += event.arguments
            else:
                finish = event
    except llm.LLMError as error:
        raise provider_error(error) from error
    assert finish is not None  # LLM.stream ends with exactly one Finish
    message: wire.AssistantMessage = {
        "role": "assistant",
        # A refusal alone has content null, as OpenAI's does.
        "content": "".join(answer.text) if answer.text or not (answer.calls or answer.refusal) else None,
        "refusal": "".join(answer.refusal) if answer.refusal else None,
        "annotations": [],
    }
    if answer.calls:
        message["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in answer.calls.values()
        ]
    choice: wire.Choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish.reason}
    return {
        "id": ids.new_id(COMPLETION),
        "object": "chat.completion",
        "created": ids.now(),
        "model": call.model,
        "choices": [choice],
        "usage": _usage(finish.usage),
        "system_fingerprint": FINGERPRINT,
        "service_tier": "default",
    }


@dataclass
class ChunkWriter:
    """Makes the chunks of one streamed completion (all share id and created)."""

    model: str
    include_usage: bool
    id: str = field(default_factory=lambda: ids.new_id(COMPLETION))
    created: int = field(default_factory=ids.now)

    def chunk(self, delta: dict[str, Any], finish: llm.FinishReason | None = None) -> wire.ChatCompletionChunk:
        choice: wire.ChunkChoice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return self._base([choice])

    def usage(self, usage: llm.Usage) -> wire.ChatCompletionChunk:
        chunk = self._base([])
        chunk["usage"] = _usage(usage)
        return chunk

    def _base(self, choices: list[wire.ChunkChoice]) -> wire.ChatCompletionChunk:
        chunk: wire.ChatCompletionChunk = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "system_fingerprint": FINGERPRINT,
            "service_tier": "default",
        }
        if self.include_usage:
            chunk["usage"] = None  # OpenAI sends null until the last chunk
        return chunk


ChunkOrError = wire.ChatCompletionChunk | dict[Literal["error"], dict[str, Any]]


async def open_stream(
    models: llm.LLM, call: llm.ChatRequest, include_usage: bool
) -> AsyncGenerator[ChunkOrError, None]:
    """The chunks of a streamed completion. The model's first event is awaited
    here, so a call that fails at once is an HTTP error, as on OpenAI; a failure
    later ends the stream with OpenAI's ``{"error": {...}}`` object (the SDKs
    raise it as an APIError)."""
    events = _events(models, call)
    try:
        first = await anext(events)
    except llm.LLMError as error:
        await events.aclose()
        raise provider_error(error) from error
    return _chunks(events, first, ChunkWriter(call.model, include_usage))


async def _chunks(
    events: AsyncGenerator[llm.Event, None], first: llm.Event, writer: ChunkWriter
) -> AsyncGenerator[ChunkOrError, None]:
    answer = _Answer()
    yield writer.chunk({"role": "assistant", "content": "", "refusal": None})
    async with aclosing(events):
        event: llm.Event | None = first
        while event is not None:
            if isinstance(event, llm.TextDelta):
                yield writer.chunk({"content": event.text})
            elif isinstance(event, llm.RefusalDelta):
                yield writer.chunk({"refusal": event.refusal})
            elif isinstance(event, llm.ToolCallDelta):
                yield writer.chunk({"tool_calls": [_call_delta(answer, event)]})
            else:
                yield writer.chunk({}, event.reason)
                if writer.include_usage:
                    yield writer.usage(event.usage)
            try:
                event = await anext(events, None)
            except llm.LLMError as error:
                yield {"error": provider_error(error).body()["error"]}
                return


async def _events(models: llm.LLM, call: llm.ChatRequest) -> AsyncGenerator[llm.Event, None]:
    """The model's events; closing this closes the model call too (a client that left)."""
    source = models.stream(call)
    try:
        async for event in source:
            yield event
    finally:
        close = getattr(source, "aclose", None)
        if close is not None:
            await close()


def _call_delta(answer: _Answer, delta: llm.ToolCallDelta) -> dict[str, Any]:
    position, first = answer.call(delta)
    if not first:
        return {"index": position, "function": {"arguments": delta.arguments}}
    call = answer.calls[delta.index]
    function = {"name": call.name, "arguments": delta.arguments}
    return {"index": position, "id": call.id, "type": "function", "function": function}
