"""A tiny OpenAI-compatible chat-completions server for tests, on loopback.

It serves ``POST /v1/chat/completions`` as Server-Sent Events, and what it does
is chosen by the requested model name (so a test picks a behaviour just by
naming a model routed to it):

- ``fake-chat``: "Hello", " world", then a get_weather tool call whose
  arguments arrive in three fragments, finish ``tool_calls``, usage 11/7.
- ``fake-no-usage``: "Plain", " answer", finish ``stop`` and no usage.
- ``fake-429`` / ``fake-500`` / ``fake-400`` (and ``fake-413``, ``fake-422``,
  ``fake-503``): an OpenAI error body with that status (400 is a
  context-length error).
- ``fake-internal``: a 500 whose message is Azure's "Internal server error".
- ``fake-named``: a 500 whose message starts with a class name of the server's own.
- ``fake-502``: a plain-text (not JSON) error body, as a proxy in front of a model sends.
- ``fake-drop``: one text chunk, then the connection is cut mid-stream.
- ``fake-stall``: one text chunk, then silence until the client gives up.
- ``fake-stall-head``: no response at all until the client gives up.
- ``fake-malformed``: one text chunk, then a ``data:`` line that is not JSON.
- ``fake-stream-error``: one text chunk, then an error object in place of a chunk.
- ``fake-sse-odd``: "Plain answer" as fake-no-usage, in legal but unusual
  Server-Sent Events: CRLF line ends, comments, a chunk split over two data lines.
- ``fake-flaky``: its first request answers 503 (``Retry-After-Ms: 1``), later ones as fake-no-usage.
- ``fake-no-format``: a 400 naming ``response_format`` when the request has one
  (a provider that rejects a parameter), else as ``fake-no-usage``.
- ``fake-json``: a plain ``chat.completion`` JSON body (200, application/json)
  although the request asked for a stream: "Whole answer", a get_weather call,
  finish ``tool_calls``, usage 11/7 (servers that ignore ``stream``);
  ``fake-json-error``: an error object as that 200 JSON body.
- ``fake-json-refusal``: a plain ``chat.completion`` JSON body whose message
  declines (``content`` null, ``refusal`` "I can't help with that."), finish ``stop``.
- a name in ``texts``: those text deltas, finish ``stop``, no usage.
- a name in ``deltas``: those delta objects as given (a refusal's
  ``{"content": None, "refusal": ...}``, say), finish ``stop``, no usage.

It also answers Azure OpenAI's paths (``/openai/deployments/{deployment}/chat/completions``
and ``/openai/v1/chat/completions``) the same way. Every request body, its
Authorization and ``api-key`` headers and its path (with the query) are
recorded in ``requests``, and under ``headers`` every header but the HTTP
client's own (``CLIENT_HEADERS``, ``X-Stainless-*``), names in lower case.
"""

from __future__ import annotations

import asyncio
import json
import socket
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

# Headers of the HTTP client itself, not of the request a provider route makes
# (the openai SDK under litellm also names itself in X-Stainless-* headers).
CLIENT_HEADERS = frozenset(
    {"host", "content-length", "content-type", "accept", "accept-encoding", "connection", "user-agent"}
)
REFUSAL = "I can't help with that."
USAGE = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
ERRORS = {
    "fake-429": (429, "rate_limit_exceeded", "Rate limit reached for fake-429 (test)."),
    "fake-500": (500, "server_error", "The fake server had an error."),
    "fake-400": (400, "context_length_exceeded", "This model's maximum context length is 10 tokens."),
    "fake-413": (413, "request_too_large", "The request body of fake-413 exceeds 1 MB (test)."),
    "fake-422": (422, "unprocessable_entity", "The fake server cannot process this request."),
    "fake-503": (503, "service_unavailable", "The fake server is overloaded."),
    "fake-internal": (500, "internal_error", "Internal server error"),  # as Azure words its 500s
    "fake-named": (500, "server_error", "FooException raised by the model worker."),
}


def _chunk(model: str, delta: dict[str, Any], finish: str | None = None) -> bytes:
    body = {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def _usage_chunk(model: str) -> bytes:
    body = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1, "model": model}
    return b"data: " + json.dumps({**body, "choices": [], "usage": USAGE}).encode() + b"\n\n"


def _tool_fragment(arguments: str, first: bool = False) -> dict[str, Any]:
    call: dict[str, Any] = {"index": 0, "function": {"arguments": arguments}}
    if first:
        call.update(id="call_fake1", type="function")
        call["function"]["name"] = "get_weather"
    return {"tool_calls": [call]}


def _script(model: str) -> list[bytes]:
    if model in ("fake-no-usage", "fake-no-format", "fake-flaky"):
        return [
            _chunk(model, {"role": "assistant", "content": "Plain"}),
            _chunk(model, {"content": " answer"}),
            _chunk(model, {}, "stop"),
        ]
    return [
        _chunk(model, {"role": "assistant", "content": "Hello"}),
        _chunk(model, {"content": " world"}),
        _chunk(model, _tool_fragment("", first=True)),
        _chunk(model, _tool_fragment('{"ci')),
        _chunk(model, _tool_fragment('ty": "To')),
        _chunk(model, _tool_fragment('kyo"}')),
        _chunk(model, {}, "tool_calls"),
        _usage_chunk(model),
    ]


def _completion(model: str) -> dict[str, Any]:
    call = {
        "id": "call_fake1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Tokyo"}'},
    }
    message = {"role": "assistant", "content": "Whole answer", "tool_calls": [call]}
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": 1,
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls"}],
        "usage": USAGE,
    }


@dataclass
class FakeOpenAI:
    requests: list[dict[str, Any]] = field(default_factory=list)
    # Text deltas a test gives a model name of its own: streamed as written
    # by json.dumps, a lone surrogate as its ``\udXXX`` escape.
    texts: dict[str, list[str]] = field(default_factory=dict)
    # Whole delta objects a test gives a model name of its own.
    deltas: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    _runner: web.AppRunner | None = None
    port: int = 0
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/openai/deployments/{deployment}/chat/completions", self._chat)
        app.router.add_post("/openai/v1/chat/completions", self._chat)

    async def start(self) -> None:
        app = web.Application()
        self.routes(app)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()

    async def stop(self) -> None:
        self._stopping.set()  # stalled answers end, so cleanup does not wait for them
        if self._runner is not None:
            await self._runner.cleanup()

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        headers = request.headers
        self.requests.append(
            {
                "body": body,
                "authorization": headers.get("Authorization"),
                "api-key": headers.get("api-key"),
                "path": request.path_qs,
                "headers": {
                    name.lower(): value
                    for name, value in headers.items()
                    if name.lower() not in CLIENT_HEADERS and not name.lower().startswith("x-stainless-")
                },
            }
        )
        model = body["model"]
        if model == "fake-no-format" and "response_format" in body:
            error = {
                "message": "Unrecognized request argument supplied: response_format",
                "type": "invalid_request_error",
                "param": "response_format",
                "code": None,
            }
            return web.json_response({"error": error}, status=400)
        if model == "fake-stall-head":
            await self._stopping.wait()  # silent until the client gives up and the server stops
            return web.Response(status=503)
        if model == "fake-flaky" and sum(1 for sent in self.requests if sent["body"]["model"] == model) == 1:
            error = {"message": "Try again.", "type": "server_error", "param": None, "code": None}
            return web.json_response({"error": error}, status=503, headers={"Retry-After-Ms": "1"})
        if model == "fake-502":  # a proxy in front of the model answers in plain text
            return web.Response(status=502, text="Bad gateway: upstream unavailable")
        if model == "fake-json":
            return web.json_response(_completion(model))
        if model == "fake-json-refusal":
            message = {"role": "assistant", "content": None, "refusal": REFUSAL}
            choice = {"index": 0, "message": message, "finish_reason": "stop"}
            body = {"id": "chatcmpl-fake", "object": "chat.completion", "created": 1, "model": model}
            return web.json_response({**body, "choices": [choice], "usage": USAGE})
        if model == "fake-json-error":
            return web.json_response({"error": {"message": "The model is not loaded.", "type": "server_error"}})
        if model in ERRORS:
            status, code, message = ERRORS[model]
            error = {"message": message, "type": "invalid_request_error", "param": None, "code": code}
            return web.json_response({"error": error}, status=status)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if model == "fake-drop":
            await response.write(_chunk(model, {"role": "assistant", "content": "Partial"}))
            assert request.transport is not None
            request.transport.abort()  # cut the connection without ending the chunked body
            return response
        if model == "fake-sse-odd":
            await response.write(b": keep-alive\r\n\r\n")
            for chunk in _script("fake-no-usage"):
                head, _, rest = chunk.decode().removeprefix("data: ").partition(", ")
                await response.write(f"data: {head},\r\ndata: {rest.rstrip()}\r\n\r\n".encode())
            await response.write(b"data: [DONE]\r\n\r\n")
            await response.write_eof()
            return response
        if model == "fake-stream-error":
            await response.write(_chunk(model, {"role": "assistant", "content": "Partial"}))
            error = {"message": "The model crashed mid-answer.", "type": "server_error", "param": None, "code": None}
            await response.write(b"data: " + json.dumps({"error": error}).encode() + b"\n\n")
            await response.write_eof()
            return response
        if model in ("fake-stall", "fake-malformed"):
            await response.write(_chunk(model, {"role": "assistant", "content": "Partial"}))
            if model == "fake-stall":
                await self._stopping.wait()
                return response
            await response.write(b"data: {not json\n\n")
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            return response
        script = _script(model)
        if model in self.texts:
            script = [_chunk(model, {"content": text}) for text in self.texts[model]] + [_chunk(model, {}, "stop")]
        if model in self.deltas:
            script = [_chunk(model, delta) for delta in self.deltas[model]] + [_chunk(model, {}, "stop")]
        for chunk in script:
            await response.write(chunk)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response
