"""What callers of app.llm speak: the chat request, the streamed events, the
record of one exchange, and the errors.

Errors of the model layer::

    LLMConfigError (ValueError)   the routing file is unreadable or malformed (at start-up)
    LLMError (Exception)          a completion failed; .code becomes the run's last_error.code:
                                  rate_limit_exceeded | server_error | invalid_prompt
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from app.llm.whole_text import whole
from app.scripting import RequestContext

FinishReason = Literal["stop", "length", "tool_calls", "content_filter"]
ErrorCode = Literal["rate_limit_exceeded", "server_error", "invalid_prompt"]

FINISH_REASONS: Mapping[str, FinishReason] = {
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
class RefusalDelta:
    """A piece of the model declining to answer (OpenAI's ``delta.refusal``,
    a non-streamed ``message.refusal``): kept apart from its text, as the
    message's own ``refusal`` content part."""

    refusal: str


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


Event = TextDelta | RefusalDelta | ToolCallDelta | Finish
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


def event_to_json(event: Event) -> dict[str, Any]:
    if isinstance(event, TextDelta):
        return {"text": event.text}
    if isinstance(event, RefusalDelta):
        return {"refusal": event.refusal}
    if isinstance(event, ToolCallDelta):
        return {"tool_call": {"index": event.index, "id": event.id, "name": event.name, "arguments": event.arguments}}
    usage = {"prompt_tokens": event.usage.prompt_tokens, "completion_tokens": event.usage.completion_tokens}
    return {"finish": event.reason, "usage": usage}


def event_from_json(item: Mapping[str, Any]) -> Event:
    if "text" in item:
        return TextDelta(str(item["text"]))
    if "refusal" in item:
        return RefusalDelta(str(item["refusal"]))
    if "tool_call" in item:
        call = item["tool_call"]
        return ToolCallDelta(int(call["index"]), call.get("id"), call.get("name"), str(call.get("arguments") or ""))
    reason = FINISH_REASONS.get(str(item.get("finish")), "stop")
    usage = item.get("usage") or {}
    return Finish(reason, Usage(int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))))


@dataclass
class Exchange:
    """One completion as sent and as answered, assembled from its events."""

    request: ChatRequest
    started: float = field(default_factory=time.monotonic)
    created_at: int = field(default_factory=lambda: int(time.time()))
    text: list[str] = field(default_factory=list)
    refusal: list[str] = field(default_factory=list)
    calls: dict[int, dict[str, str]] = field(default_factory=dict)
    finish: Finish | None = None
    error: dict[str, str] | None = None

    def observe(self, event: Event) -> None:
        if isinstance(event, TextDelta):
            self.text.append(event.text)
        elif isinstance(event, RefusalDelta):
            self.refusal.append(event.refusal)
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
            **({"refusal": "".join(self.refusal)} if self.refusal else {}),
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
        # Made valid Unicode wherever it is raised: a provider's error or an
        # offline cue's can quote text holding half a surrogate pair, and a
        # run's last_error must read back (whole_text.py).
        message = whole(message)
        super().__init__(message)
        self.code: ErrorCode = code
        self.message = message


class LLMConfigError(ValueError):
    """The routing config is unreadable or malformed (raised at start-up, not per run)."""


# OpenAI's defaults: a run without its own values carries these (services/runs),
# so they count as the server's, and a model that lacks the parameter (o-series
# and temperature) still works.
# response_format text is a default too (services/chat.py does not pass it on).
_DEFAULT_VALUES: Mapping[str, Any] = {"temperature": 1.0, "top_p": 1.0, "response_format": {"type": "text"}}


def explicit_params(request: ChatRequest) -> list[str]:
    """Parameters the user set (issue 12): they must reach the provider, so
    litellm's ``drop_params`` may not remove them. tool_choice "auto",
    parallel_tool_calls true, temperature/top_p 1 and response_format text
    are the defaults, which the server may add itself."""
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


class TokenCounter(Protocol):
    """What a provider adapter asks of the facade when a stream reports no usage."""

    def count_tokens(
        self, model: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> int: ...

    def count_text_tokens(self, model: str, text: str) -> int: ...
