"""A tiny Anthropic Messages server for tests, on loopback.

It serves ``POST /v1/messages`` (``stream: true``) as Anthropic's Server-Sent
Events, and what it answers is chosen by the requested model name:

- ``claude-text``: a ping, "Hello", " world", stop ``end_turn``, usage 25 in / 7 out;
- ``claude-tool``: "Let me check.", a get_weather tool_use whose input arrives
  in three fragments after an empty one, a second tool_use (get_time) whose input is one empty fragment,
  stop ``tool_use``; asked with tool results last, it answers as ``claude-text``;
- ``claude-cache``: "Cached", with cache creation and cache read input tokens (repeated in message_delta);
- ``claude-max``: "Cut", stop ``max_tokens``; ``claude-stop-sequence``: stop ``stop_sequence``;
- ``claude-<status>`` for the statuses in ERRORS (400 to 529): Anthropic's
  error JSON with that status; ``claude-502``: a plain-text error body;
- ``claude-stream-error``: "Partial", then an ``error`` event (overloaded);
- ``claude-stall``: "Partial", then silence until the client gives up;
- ``claude-drop``: "Partial", then the connection is cut mid-stream.

A body with a top-level key the Messages API does not know is refused as
Anthropic refuses it: 400 invalid_request_error "<key>: Extra inputs are not
permitted".

Every request's body, path and headers (names in lower case, the HTTP
client's own left out) are recorded in ``requests``.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from tests.runner.fake_openai import FakeOpenAI

# Headers of the HTTP client itself, not of the request a route makes.
CLIENT_HEADERS = frozenset({"host", "content-length", "accept-encoding", "connection", "user-agent"})
ERRORS = {
    400: ("invalid_request_error", "messages.0.content: Input should be a valid list"),
    401: ("authentication_error", "invalid x-api-key"),
    403: ("permission_error", "Your API key does not have permission to use the specified resource."),
    404: ("not_found_error", "model: claude-404"),
    413: ("request_too_large", "Request exceeds the maximum allowed number of bytes."),
    429: ("rate_limit_error", "Number of request tokens has exceeded your per-minute rate limit"),
    500: ("api_error", "Internal server error"),
    503: ("api_error", "Service unavailable"),
    504: ("api_error", "Gateway timeout"),
    422: ("invalid_request_error", "Unprocessable"),
    529: ("overloaded_error", "Overloaded"),
}
# The Messages API's top-level body keys; any other is refused.
BODY_KEYS = frozenset(
    {"model", "messages", "max_tokens", "system", "metadata", "stop_sequences", "stream", "temperature", "top_p"}
    | {"top_k", "tools", "tool_choice", "thinking", "service_tier", "container", "mcp_servers", "output_format"}
    | {"context_management"}
)


def _event(kind: str, **data: Any) -> bytes:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n".encode()


def _start(model: str, usage: dict[str, Any]) -> bytes:
    message: dict[str, Any] = {
        "id": "msg_fake", "type": "message", "role": "assistant", "model": model, "content": [],
        "stop_reason": None, "stop_sequence": None, "usage": usage,
    }  # fmt: skip
    return _event("message_start", message=message)


def _text_block(index: int, *pieces: str) -> list[bytes]:
    deltas = [_event("content_block_delta", index=index, delta={"type": "text_delta", "text": p}) for p in pieces]
    start = _event("content_block_start", index=index, content_block={"type": "text", "text": ""})
    return [start, *deltas, _event("content_block_stop", index=index)]


def _tool_block(index: int, tool_id: str, name: str, *fragments: str) -> list[bytes]:
    block = {"type": "tool_use", "id": tool_id, "name": name, "input": {}}
    deltas = [
        _event("content_block_delta", index=index, delta={"type": "input_json_delta", "partial_json": fragment})
        for fragment in fragments
    ]
    return [
        _event("content_block_start", index=index, content_block=block),
        *deltas,
        _event("content_block_stop", index=index),
    ]


def _end(reason: str, output_tokens: int, sequence: str | None = None) -> list[bytes]:
    delta = {"stop_reason": reason, "stop_sequence": sequence}
    return [_event("message_delta", delta=delta, usage={"output_tokens": output_tokens}), _event("message_stop")]


def _answers_tool_results(body: dict[str, Any]) -> bool:
    last = (body.get("messages") or [{}])[-1]
    content = last.get("content")
    return isinstance(content, list) and any(block.get("type") == "tool_result" for block in content)


def script(model: str, body: dict[str, Any] | None = None) -> list[bytes]:
    """The streamed answer for a model name (see the module's docstring)."""
    usage = {"input_tokens": 25, "output_tokens": 1}
    if model == "claude-tool" and not (body and _answers_tool_results(body)):
        return [
            _start(model, usage),
            *_text_block(0, "Let me check."),
            *_tool_block(1, "toolu_01", "get_weather", "", '{"city": ', '"Par', 'is"}'),
            *_tool_block(2, "toolu_02", "get_time", ""),  # no arguments: one empty fragment, as Anthropic sends
            *_end("tool_use", 31),
        ]
    if model == "claude-cache":
        cached = {**usage, "cache_creation_input_tokens": 100, "cache_read_input_tokens": 50}
        end = _end("end_turn", 2)
        end[0] = _event("message_delta", delta={"stop_reason": "end_turn"}, usage={**cached, "output_tokens": 2})
        return [_start(model, cached), *_text_block(0, "Cached"), *end]
    if model == "claude-max":
        return [_start(model, usage), *_text_block(0, "Cut"), *_end("max_tokens", 1)]
    if model == "claude-stop-sequence":
        return [_start(model, usage), *_text_block(0, "Stopped"), *_end("stop_sequence", 1, "\n\n")]
    return [_start(model, usage), _event("ping"), *_text_block(0, "Hello", " world"), *_end("end_turn", 7)]


def _error(status: int, kind: str, message: str) -> web.Response:
    error = {"type": "error", "error": {"type": kind, "message": message}}
    return web.json_response(error, status=status, headers={"request-id": "req_fake"})


class FakeAnthropic(FakeOpenAI):
    """FakeOpenAI's server (its requests, start and stop) answering Anthropic's Messages path instead."""

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/messages", self._messages)

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        headers = {name.lower(): value for name, value in request.headers.items() if name.lower() not in CLIENT_HEADERS}
        self.requests.append({"body": body, "path": request.path_qs, "headers": headers})
        model = str(body.get("model"))
        status = model.removeprefix("claude-")
        extra = sorted(set(body) - BODY_KEYS)
        if extra:
            return _error(400, "invalid_request_error", f"{extra[0]}: Extra inputs are not permitted")
        if status.isdigit() and int(status) in ERRORS:
            return _error(int(status), *ERRORS[int(status)])
        if model == "claude-502":
            return web.Response(status=502, text="Bad gateway: upstream unavailable")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if model in ("claude-stream-error", "claude-stall", "claude-drop"):
            await response.write(_start(model, {"input_tokens": 25, "output_tokens": 1}))
            for chunk in _text_block(0, "Partial")[:2]:
                await response.write(chunk)
            if model == "claude-stall":
                await self._stopping.wait()
            elif model == "claude-drop":
                assert request.transport is not None
                request.transport.abort()  # cut the connection without ending the chunked body
            else:
                error = {"type": "overloaded_error", "message": "Overloaded"}
                await response.write(_event("error", error=error))
                await response.write_eof()
            return response
        for chunk in script(model, body):
            await response.write(chunk)
        await response.write_eof()
        return response
