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
    RefusalDelta,
    TextDelta,
    TokenCounter,
    ToolCallDelta,
    Usage,
)
from app.llm.routing import Route


def _field(item: Any, name: str) -> Any:
    """A field of a chunk part: litellm gives objects, the direct adapter parsed JSON."""
    if isinstance(item, dict):
        return item.get(name)
    return getattr(item, name, None)


def _text(item: Any, name: str) -> str | None:
    """A string field of a chunk part; anything else (a provider's odd JSON) is absent."""
    value = _field(item, name)
    return value if isinstance(value, str) else None


class ChunkReader:
    """Turns chat.completion.chunk objects (litellm's) or JSON (the direct adapter's) into our events."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self.usage: Usage | None = None
        self.output: list[str] = []
        self.calls: dict[int, str | None] = {}  # index -> id

    def read(self, chunk: Any) -> Iterator[Event]:
        usage = _field(chunk, "usage")
        if usage is not None:
            prompt, completion = _field(usage, "prompt_tokens"), _field(usage, "completion_tokens")
            if prompt or completion:
                self.usage = Usage(int(prompt or 0), int(completion or 0))
        for choice in _field(chunk, "choices") or []:
            if (_field(choice, "index") or 0) != 0:
                continue  # n > 1 is never requested
            self.reason = _text(choice, "finish_reason") or self.reason
            delta = _field(choice, "delta")
            content = _text(delta, "content")
            if content:
                self.output.append(content)
                yield TextDelta(content)
            calls = _field(delta, "tool_calls")
            if calls:
                for call in calls:
                    yield self._tool_delta(call)
            elif not content and (refusal := _text(delta, "refusal")):
                # A refusal's pieces come in their own field, ``content``
                # null (OpenAI's first delta has ``"content": ""`` and
                # ``"refusal": null``), never with text or tool calls in
                # the same delta. So the field is read only from a delta
                # with neither: a text delta (the hot path) and a tool
                # call's argument chunk pay nothing for it, and a delta
                # carrying text and a refusal both, which OpenAI does not
                # send, keeps only its text.
                self.output.append(refusal)
                yield RefusalDelta(refusal)

    def _tool_delta(self, call: Any) -> ToolCallDelta:
        call_id = _text(call, "id")
        index = _field(call, "index")
        if not isinstance(index, int):  # some providers omit it: place the call by id
            known = [i for i, seen in self.calls.items() if seen == call_id]
            index = known[0] if known else (len(self.calls) if call_id or not self.calls else max(self.calls))
        function = _field(call, "function")
        arguments = _text(function, "arguments") or ""
        self.output.append(arguments)
        if index in self.calls:  # repeated ids and names are dropped, as the interface promises
            return ToolCallDelta(index, arguments=arguments)
        self.calls[index] = call_id
        return ToolCallDelta(index, id=call_id, name=_text(function, "name"), arguments=arguments)

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
# ("litellm.BadRequestError: ContextWindowExceededError: OpenAIException - ...",
# "litellm.Timeout: Request timed out. Error_str: Request timed out.").
_CLASS_PREFIX = re.compile(r"\b(?:litellm\.)?[A-Za-z]*(?:Error|Exception|Timeout)(?::\s+|\s+-\s+)")
# litellm puts some providers' names first without a separator ("AzureException
# Rate limit reached ..."), always as ``provider.capitalize() + "Exception"``:
# only the route's provider's is taken off, so a provider's own text that
# starts with a class name ("FooException raised by ...") is left whole.
_LITELLM_NAMED = ("Azure", "Bedrock", "Anthropic")  # the names litellm also writes for other routes


def _provider_prefix(route: Route) -> re.Pattern[str]:
    names = {route.target.partition("/")[0].capitalize(), *_LITELLM_NAMED}
    return re.compile(r"^(?:" + "|".join(map(re.escape, sorted(names))) + r")Exception (?=\S)")


_REPEATS = (" Original exception: ", " Error_str: ")
# litellm appends the stream's traceback to some providers' mid-stream errors.
_TRACEBACK = "\nTraceback (most recent call last):"


class ProviderFailure(Exception):
    """A failure the direct adapter saw, in the terms litellm reports it
    (a status code and a message), so both paths give the same LLMError."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code


def provider_error(exc: Exception, route: Route, explicit: Sequence[str] = ()) -> LLMError:
    """429 -> rate_limit_exceeded; 400/413/422 (bad or too long prompt) -> invalid_prompt; else server_error.
    A rejected request names the parameters the user set, since one of them may be the cause."""
    status = getattr(exc, "status_code", None)
    # The provider's own words (from its JSON: a lone surrogate is possible)
    # become the run's last_error; LLMError makes them valid Unicode.
    text = str(exc).partition(_TRACEBACK)[0]
    provider_prefix = _provider_prefix(route)
    detail = provider_prefix.sub("", _CLASS_PREFIX.sub("", text).strip()) or type(exc).__name__
    for separator in _REPEATS:
        head, _, cause = detail.partition(separator)
        # "Request timed out. Error_str: Request timed out. - timeout value=0.5, ...": said once
        cause = provider_prefix.sub("", cause.strip())
        detail = head if head.strip() and cause.startswith(head.strip()) else detail
    where = f"model '{route.model}' ({route.target})"
    if status == 429:
        return LLMError("rate_limit_exceeded", f"Rate limit reached for {where}: {detail}")
    if status in (400, 413, 422):
        named = [name for name in explicit if name in detail] or list(explicit)
        sent = f" (parameters set for this request: {', '.join(named)})" if named else ""
        return LLMError("invalid_prompt", f"The provider rejected the request for {where}{sent}: {detail}")
    kind = f"HTTP {status}" if isinstance(status, int) else type(exc).__name__
    return LLMError("server_error", f"The provider failed for {where} ({kind}): {detail}")
