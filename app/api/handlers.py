"""Exception handlers, and the answers api/front.py gives before a route
runs: the API-key check, the URL check, the 500 envelope."""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Scope

from app import errors
from app.api import deps
from app.services import api_keys, projects

log = logging.getLogger("app.api")

# v1's file sub-resources, gone in v2; go-openai still calls them.
V1_FILES_DEPRECATED = (
    "The v1 Assistants API has been deprecated. See the migration guide for more information: "
    "https://platform.openai.com/docs/assistants/migration."
)
_V1_FILE_PATHS = re.compile(r"/(assistants/[^/]+|threads/[^/]+/messages/[^/]+)/files(/[^/]+)?/?$")
MISSING_KEY = (
    "You didn't provide an API key. You need to provide your API key in an Authorization "
    "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
)


# FastAPI's words when the body is not decodable at all (bad UTF-8, nesting
# too deep for the JSON parser): the same situation as malformed JSON to a client.
_BODY_PARSE_FAILURE = "There was an error parsing the body"


def _render(error: errors.APIError) -> bytes:
    # An error may echo a client's value; never let one that cannot be encoded
    # (a lone surrogate from a JSON escape) turn the error into a 5xx.
    return json.dumps(error.body(), ensure_ascii=False, separators=(",", ":")).encode("utf-8", "replace")


def error_response(error: errors.APIError) -> Response:
    return Response(_render(error), status_code=error.status, headers=error.headers, media_type="application/json")


async def _api_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, errors.APIError)
    return error_response(exc)


async def _validation_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    return error_response(errors.from_validation_errors(exc.errors(), getattr(exc, "body", None)))


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code in (404, 405) and _V1_FILE_PATHS.search(request.url.path):
        error = errors.invalid(V1_FILES_DEPRECATED)
    elif exc.status_code in (404, 405):
        # OpenAI answers unknown paths and wrong methods alike.
        error = errors.APIError(404, f"Invalid URL ({request.method} {request.url.path})")
    elif exc.status_code == 400 and exc.detail == _BODY_PARSE_FAILURE:
        error = errors.invalid(errors.JSON_PARSE_MESSAGE)
    else:
        error = errors.APIError(exc.status_code, str(exc.detail))
    return error_response(error)


def unexpected_error(exc: Exception) -> errors.APIError:
    """A database that is locked, whose connection dropped mid-request, or
    that refuses connections for now is a clear, retryable 503 (issue 10);
    anything else is OpenAI's 500."""
    if isinstance(exc, DBAPIError) and (
        exc.connection_invalidated or "database is locked" in str(exc.orig) or _unavailable(exc)
    ):
        return errors.database_unavailable()
    return errors.server_error()


# PostgreSQL's SQLSTATEs for a server that cannot take the request now but
# will: it is starting up, shutting down or restarted (57P01-57P03), out of
# connection slots (53300), or the connection failed (class 08). asyncpg
# raises these at a connect, which SQLAlchemy does not count as a lost
# connection (connection_invalidated stays false).
_UNAVAILABLE_STATES = frozenset({"57P01", "57P02", "57P03", "53300"})


def _unavailable(exc: DBAPIError) -> bool:
    state = getattr(exc.orig, "sqlstate", None)
    return isinstance(state, str) and (state in _UNAVAILABLE_STATES or state.startswith("08"))


async def _unexpected(_request: Request, exc: Exception) -> Response:
    log.exception("unhandled error", exc_info=exc)
    return error_response(unexpected_error(exc))


def install(app: FastAPI) -> None:
    """FastAPI's exception handlers; api/front.py is the ASGI layer in front."""
    app.add_exception_handler(errors.APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)


def _mask(key: str) -> str:
    return key if len(key) <= 8 else f"{key[:3]}***{key[-4:]}"


async def admit(scope: Scope, key: str) -> errors.APIError | None:
    """Let the request in for its key's project (recorded in the ASGI scope
    for deps.project_of), or answer OpenAI's 401. An open server (no keys at
    all) lets everyone in, for the default project. ``key``: the request's
    ``Authorization: Bearer`` or Azure ``api-key`` (api/front.py reads it)."""
    keys: api_keys.KeyRing = scope["app"].state.runtime.keys
    if await keys.is_open():
        deps.set_project(scope, projects.DEFAULT)
        return None
    if not key:
        return errors.APIError(401, MISSING_KEY)
    project = await keys.project_of(key)
    if project is None:
        return errors.APIError(401, f"Incorrect API key provided: {_mask(key)}.", code="invalid_api_key")
    deps.set_project(scope, project)
    return None


def check_url(scope: Scope) -> errors.APIError | None:
    """A NUL character in a path id or query value can never name anything we
    store, and PostgreSQL refuses it in any query: answer before the lookup."""
    path: str = scope.get("path", "")
    query: bytes = scope.get("query_string", b"")
    if "\x00" not in path and b"%00" not in query:
        return None
    raw_path = scope.get("raw_path") or path.replace("\x00", "%00").encode()
    url = raw_path.decode("latin-1") + ("?" + query.decode("latin-1") if query else "")
    return errors.invalid(f"Invalid URL ({scope.get('method', 'GET')} {url}): null characters (%00) are not allowed.")


async def send_error(error: errors.APIError, send: Any) -> None:
    body = _render(error)
    await send(
        {
            "type": "http.response.start",
            "status": error.status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
