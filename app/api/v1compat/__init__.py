"""Assistants v1: requests sent with ``OpenAI-Beta: assistants=v1`` (the SDKs
of early 2024, go-openai up to v1.25, AzureOpenAI with api_version
2024-02-15-preview) are served in v1's shapes over the same store.

A pure ASGI layer that api/front.py hands v1 requests to, after the API-key
gate and the body limits: for a v1 request under
/assistants or /threads it rewrites the JSON body to v2 (shapes.py), lets
the v2 routes answer, and rewrites their JSON (or each server-sent event) to
v1. The endpoints v2 removed (assistant files, message files) and v1's
assistant modify, which keeps a managed retrieval store in step, are
answered here (handlers.py). Requests without the v1 header pass untouched.
"""

from __future__ import annotations

import json
import re
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import errors
from app.api import API_PREFIXES
from app.api.asgi_body import read_body, replaying
from app.api.v1compat import handlers, shapes
from app.api.v1compat.sse import EventRewriter

# Longest first: /openai/v1/... is not /openai + /v1/....
_PREFIXES = sorted(API_PREFIXES, key=len, reverse=True)
_BETA = b"openai-beta"


def asks_for_v1(openai_beta: bytes) -> bool:
    """Whether an OpenAI-Beta header's value asks for v1 (bytes compared,
    nothing decoded: every request's header passes here)."""
    return b"assistants=v1" in openai_beta.replace(b" ", b"")


def is_v1(scope: Scope) -> bool:
    return any(name.lower() == _BETA and asks_for_v1(value) for name, value in scope.get("headers") or [])


def split_prefix(path: str) -> tuple[str, str]:
    for prefix in _PREFIXES:
        if path.startswith(prefix + "/"):
            return prefix, path[len(prefix) :]
    return "", path


# (method, path pattern) -> how the request body is rewritten to v2.
_REQUEST_REWRITES: list[tuple[str, re.Pattern[str], str]] = [
    ("POST", re.compile(r"^/assistants/?$"), "assistant"),
    ("POST", re.compile(r"^/threads/?$"), "thread"),
    ("POST", re.compile(r"^/threads/runs/?$"), "run"),
    ("POST", re.compile(r"^/threads/[^/]+/messages/?$"), "message"),
    ("POST", re.compile(r"^/threads/[^/]+/runs/?$"), "run"),
]


def _rewrite(kind: str, body: dict[str, Any]) -> dict[str, Any]:
    if kind == "assistant":
        return shapes.assistant_to_v2(body, creating=True)[0]
    if kind == "thread":
        return shapes.thread_to_v2(body)
    if kind == "message":
        return shapes.message_to_v2(body)
    return shapes.run_to_v2(body)


class AssistantsV1:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_v1(scope):
            await self.app(scope, receive, send)
            return
        _, path = split_prefix(scope.get("path", ""))
        if not path.startswith(("/assistants", "/threads")):
            await self.app(scope, receive, send)
            return
        runtime = scope["app"].state.runtime
        try:
            handled = await handlers.dispatch(runtime, scope, path, receive)
            if handled is not None:
                await handlers.send_json(send, *handled)
                return
            receive = await self._rewritten_body(scope, path, receive)
        except shapes.V1Error as exc:
            await handlers.send_error(send, errors.invalid(exc.message, param=exc.param))
            return
        except errors.APIError as exc:
            await handlers.send_error(send, exc)
            return
        # In place, not a copy: the route the router records in the scope
        # labels the request in metrics and access logs (observability/http.py).
        scope["headers"] = [(k, v) for k, v in scope["headers"] if k.lower() != b"openai-beta"]
        await self.app(scope, receive, ResponseRewriter(runtime, send).send)

    async def _rewritten_body(self, scope: Scope, path: str, receive: Receive) -> Receive:
        method = scope.get("method", "GET")
        kind = next((kind for verb, pattern, kind in _REQUEST_REWRITES if verb == method and pattern.match(path)), None)
        if kind is None:
            return receive
        raw = await read_body(receive)
        try:
            body = json.loads(raw) if raw.strip() else None
        except ValueError:
            body = None  # not JSON: the v2 route answers with its own parse error
        if isinstance(body, dict):
            raw = json.dumps(_rewrite(kind, body)).encode()
        return replaying(raw, receive)


class ResponseRewriter:
    """Rewrites the v2 answer to v1: a JSON body whole, an event stream event by event."""

    def __init__(self, runtime: Any, send: Send) -> None:
        self.runtime = runtime
        self._send = send
        self._start: Message | None = None
        self._mode = "pass"
        self._chunks: list[bytes] = []
        self._events: EventRewriter | None = None

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in message.get("headers", [])}
            kind = headers.get("content-type", "")
            if kind.startswith("text/event-stream"):
                self._mode = "events"
                self._events = EventRewriter(self.runtime)
                await self._send(message)
            elif kind.startswith("application/json") and message["status"] < 400:
                self._mode = "json"
                self._start = message
            else:
                await self._send(message)
            return
        if message["type"] != "http.response.body":
            await self._send(message)
            return
        if self._mode == "events":
            assert self._events is not None
            body = await self._events.feed(message.get("body", b""))
            await self._send({**message, "body": body})
        elif self._mode == "json":
            self._chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                await self._send_json()
        else:
            await self._send(message)

    async def _send_json(self) -> None:
        assert self._start is not None
        value = json.loads(b"".join(self._chunks))
        body = json.dumps(await handlers.render_v1(self.runtime, value), ensure_ascii=False).encode()
        headers = [(k, v) for k, v in self._start.get("headers", []) if k.lower() != b"content-length"]
        await self._send({**self._start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
        await self._send({"type": "http.response.body", "body": body, "more_body": False})
