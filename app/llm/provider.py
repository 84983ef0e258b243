"""What the provider adapters share: reading chat.completion.chunk objects
into our events, and mapping a provider's failure to an LLMError."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import Any

from app.llm.interface import (
    FINISH_REASONS,
    ChatRequest,
    Event,
    Finish,
    LLMError,
    TextDelta,
    TokenCounter,
    ToolCallDelta,
    Usage,
)
from app.llm.routing import Route


class ChunkReader:
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

    def finish(self, request: ChatRequest, llm: TokenCounter) -> Finish:
        reason = FINISH_REASONS.get(self.reason or "stop", "stop")
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


def provider_error(exc: Exception, route: Route, explicit: Sequence[str] = ()) -> LLMError:
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
