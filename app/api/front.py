"""``ApiFront``: the one pure-ASGI layer between the request observer
(app/observability/http.py) and FastAPI, doing in one pass what three
layers did (issue 17): the request id on every answer, the API-key gate
and the URL check (api/handlers.py), the body limits (api/limits.py) and
the hand-off of v1 requests to their translation (api/v1compat). The
request's headers are read once, into a ``RequestHead`` kept in the scope
for the layers and routes inside (api/hot_routes.py reads its content type
there).

Order of the answers, as before: a missing or wrong key (401) first, then a
NUL in the URL (400), then a body too large (413) or too slow (408), then
whatever the v1 translation or the routes answer. A request that carries no
body (neither Content-Length nor Transfer-Encoding, or a Content-Length of
0: HTTP/1.1 gives it an empty one) skips the body's read and replay.

Pure ASGI (no response buffering, so SSE streams pass straight through). It
sits outside FastAPI's exception handling but inside Starlette's
ServerErrorMiddleware, so it also turns an unexpected exception into the
500 envelope itself: that response then carries an x-request-id too.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api import handlers, limits, v1compat
from app.observability import http, logs

log = logging.getLogger("app.api")

_HEAD = "assistants.head"


@dataclass(frozen=True, slots=True)
class RequestHead:
    """What the layers and hot routes need of a request's headers, read in one pass."""

    key: str  # Authorization: Bearer, else Azure's api-key; "" when neither
    content_type: bytes | None  # the first Content-Type, as sent
    content_length: int | None  # None when absent or not a number
    # A Transfer-Encoding, or a Content-Length that is not 0: HTTP/1.1 gives
    # any other request an empty body.
    has_body: bool
    v1: bool  # OpenAI-Beta asks for assistants=v1

    @staticmethod
    def read(scope: Scope) -> RequestHead:
        authorization = api_key = ""
        content_type: bytes | None = None
        content_length: bytes | None = None
        chunked = v1 = False
        for name, value in scope["headers"]:
            lowered = name.lower()
            # A repeated key header counts by its last value, the others by their first.
            if lowered == b"authorization":
                authorization = value.decode("latin-1")
            elif lowered == b"api-key":
                api_key = value.decode("latin-1")
            elif lowered == b"content-type":
                content_type = value if content_type is None else content_type
            elif lowered == b"content-length":
                content_length = value if content_length is None else content_length
            elif lowered == b"transfer-encoding":
                chunked = True
            elif lowered == b"openai-beta":
                v1 = v1 or v1compat.asks_for_v1(value)
        key = authorization[7:].strip() if authorization.lower().startswith("bearer ") else api_key
        length = limits.parse_length(content_length)
        has_body = chunked or (content_length is not None and length != 0)
        return RequestHead(key, content_type, length, has_body, v1)


def head_of(scope: Scope) -> RequestHead:
    """The request's head as ApiFront read it (read here when it did not)."""
    head = scope.get(_HEAD)
    return head if isinstance(head, RequestHead) else RequestHead.read(scope)


class ApiFront:
    def __init__(
        self,
        app: ASGIApp,
        *,
        public_paths: Collection[str] = (),
        max_body_bytes: int,
        body_timeout_seconds: float,
    ) -> None:
        self.app = app
        # Only v1 requests enter the translation layer.
        self.v1 = v1compat.AssistantsV1(app)
        self.public_paths = frozenset(public_paths)
        self.max_body_bytes, self.body_timeout_seconds = max_body_bytes, body_timeout_seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # Made by app/observability/http.py, which logs and counts the request.
        request_id = logs.current_request_id() or http.new_request_id()
        request_id_header = (b"x-request-id", request_id.encode())
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message["headers"] = [*message.get("headers", ()), request_id_header]
            await send(message)

        try:
            head = scope[_HEAD] = RequestHead.read(scope)
            # The console (app/console) signs in with a cookie, not a header;
            # probes, metrics and the docs are open (public_paths).
            path: str = scope.get("path", "")
            public = path.startswith("/console") or path in self.public_paths
            rejection = (None if public else await handlers.admit(scope, head.key)) or handlers.check_url(scope)
            if rejection is not None:
                await handlers.send_error(rejection, send_with_id)
                return
            if head.has_body and not limits.is_upload(scope, head.content_type):
                receive_body = await limits.read_limited_body(
                    scope, receive, send_with_id, head.content_length, self.max_body_bytes, self.body_timeout_seconds
                )
                if receive_body is None:  # answered (413, 408), or the client went away
                    return
                receive = receive_body
            await (self.v1 if head.v1 else self.app)(scope, receive, send_with_id)
        except Exception as exc:
            if started:  # a stream already under way: nothing left to answer with
                raise
            log.exception("unhandled error (request %s)", request_id, exc_info=exc)
            await handlers.send_error(handlers.unexpected_error(exc), send_with_id)
