"""Exception handlers and the ASGI middleware every request passes through:
request ids, API-key checks and the OpenAI-Beta version check."""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import errors

log = logging.getLogger("app.api")

V1_DEPRECATED = (
    "The v1 Assistants API has been deprecated. Please try again by setting the header "
    "'OpenAI-Beta: assistants=v2'."
)
MISSING_KEY = (
    "You didn't provide an API key. You need to provide your API key in an Authorization "
    "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
)


def error_response(error: errors.APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


async def _api_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, errors.APIError)
    return error_response(exc)


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return error_response(errors.from_validation_errors(exc.errors(), getattr(exc, "body", None)))


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code in (404, 405):
        # OpenAI answers unknown paths and wrong methods alike.
        error = errors.APIError(404, f"Invalid URL ({request.method} {request.url.path})")
    else:
        error = errors.APIError(exc.status_code, str(exc.detail))
    return error_response(error)


async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    return error_response(errors.server_error())


def install(app: FastAPI, api_keys: Sequence[str]) -> None:
    app.add_exception_handler(errors.APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
    app.add_middleware(RequestGate, api_keys=list(api_keys))


def _mask(key: str) -> str:
    return key if len(key) <= 8 else f"{key[:3]}***{key[-4:]}"


class RequestGate:
    """Pure ASGI (no response buffering, so SSE streams pass straight through)."""

    def __init__(self, app: ASGIApp, api_keys: list[str]) -> None:
        self.app = app
        self.api_keys = set(api_keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = "req_" + secrets.token_hex(16)
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        rejection = self._check(headers)
        if rejection is not None:
            await _send_error(rejection, send_with_id)
            return
        await self.app(scope, receive, send_with_id)

    def _check(self, headers: dict[str, str]) -> errors.APIError | None:
        if "assistants=v1" in headers.get("openai-beta", "").replace(" ", ""):
            return errors.invalid(V1_DEPRECATED, code="invalid_beta")
        if not self.api_keys:
            return None
        key = headers.get("api-key") or ""
        authorization = headers.get("authorization", "")
        if authorization.lower().startswith("bearer "):
            key = authorization[7:].strip()
        if not key:
            return errors.APIError(401, MISSING_KEY)
        if key not in self.api_keys:
            return errors.APIError(401, f"Incorrect API key provided: {_mask(key)}.", code="invalid_api_key")
        return None


async def _send_error(error: errors.APIError, send: Any) -> None:
    body = json.dumps(error.body()).encode()
    await send(
        {
            "type": "http.response.start",
            "status": error.status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
