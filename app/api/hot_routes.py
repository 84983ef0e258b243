"""The run routes every SDK client calls on every run, served without
FastAPI's per-request machinery (issue 17).

``POST /threads/runs``, ``POST /threads/{thread_id}/runs``, ``GET
/threads/{thread_id}/runs/{run_id}`` (the SDK's poll) and ``POST
/threads/{thread_id}/runs/{run_id}/submit_tool_outputs`` (a function call's
answer, the Assistants API's other common round) are declared in
api/runs.py as ordinary FastAPI routes: that is what the OpenAPI document
lists, and what answers every request this module does not. In front of
them, as the application router's first route, ``HotRoute`` matches the
request's method and path with one regular expression under each API
prefix (FastAPI's included routers match a route two or three times, once
per level of inclusion, each time walking the routers' version counters),
and calls the same endpoint function with its arguments taken straight
from the request: the runtime and the project from the scope, the path's
ids, the poll-helper header, the body parsed with ``json.loads`` and
validated by the route's own body field. No ``Depends`` tree is solved, no
``Request`` object made, no exit stacks opened.

Only the common case is taken here; a request that would make FastAPI
answer an error of its own (a body that is not JSON, fails validation, or
is sent without a JSON content type; a query string on ``create_run``,
whose ``include[]`` FastAPI parses) is handed, body replayed, to the
FastAPI route, so every 4xx keeps FastAPI's wording. The route sits inside
FastAPI's exception middleware like any other: an ``APIError`` raised by
the endpoint gets the same handler. ``scope["route"]`` is the FastAPI route,
so access logs and metrics label the request by its template as before.

While ``app.dependency_overrides`` holds anything (a test or an embedding
application replacing the key check, say), the hot routes stand aside and
FastAPI's router serves these routes too, so that the overrides apply.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi.dependencies.utils import get_flat_params
from fastapi.routing import APIRoute, APIRouter
from starlette.routing import BaseRoute, Match, NoMatchFound
from starlette.types import Receive, Scope, Send

from app.api import API_PREFIXES, runs
from app.api.asgi_body import read_body, replaying
from app.api.deps import project_of
from app.api.front import head_of
from app.runtime import Runtime

# The arguments of an endpoint, or None: FastAPI answers this request.
Arguments = Callable[[Scope, dict[str, str], Any], dict[str, Any] | None]
_NO_BODY = object()
_POLL_HELPER = b"x-stainless-poll-helper"
# A body this large is parsed by FastAPI alone: one that fails validation
# would otherwise be parsed twice (here, then by the FastAPI route).
_LARGEST_BODY_PARSED_HERE = 64 * 1024


@dataclass(frozen=True)
class _Hot:
    method: str
    endpoint: Callable[..., Awaitable[Any]]
    arguments: Arguments
    # What FastAPI reads for the endpoint (``_declared``), as ``arguments``
    # reads it here: a parameter added or changed (its alias, type or
    # default) must be read here too, or the app refuses to start.
    declared: tuple[str, ...]


def _thread_and_run(_scope: Scope, _path: dict[str, str], body: Any) -> dict[str, Any]:
    return {"body": body}


def _run(scope: Scope, path: dict[str, str], body: Any) -> dict[str, Any] | None:
    if scope.get("query_string"):  # include[]: FastAPI's query parsing decides
        return None
    return {"thread_id": path["thread_id"], "body": body, "include": []}


def _retrieve(scope: Scope, path: dict[str, str], _body: Any) -> dict[str, Any]:
    # FastAPI's Header(alias=...) reads the first such header, decoded as latin-1.
    helper = next((value for name, value in scope["headers"] if name.lower() == _POLL_HELPER), None)
    return {
        "thread_id": path["thread_id"],
        "run_id": path["run_id"],
        "poll_helper": None if helper is None else helper.decode("latin-1"),
    }


def _submit(_scope: Scope, path: dict[str, str], body: Any) -> dict[str, Any]:
    return {"thread_id": path["thread_id"], "run_id": path["run_id"], "body": body}


_DEPENDS = ("Depends get_runtime", "Depends get_project")
_HOT: tuple[_Hot, ...] = (
    _Hot(
        "POST",
        runs.create_thread_and_run,
        _thread_and_run,
        (*_DEPENDS, "Body body: <class 'app.wire.runs.ThreadAndRunCreate'>"),
    ),
    _Hot(
        "POST",
        runs.create_run,
        _run,
        (
            *_DEPENDS,
            "Path thread_id: <class 'str'> = PydanticUndefined",
            "Query include[]: list[str] = []",
            "Body body: <class 'app.wire.runs.RunCreate'>",
        ),
    ),
    _Hot(
        "GET",
        runs.retrieve_run,
        _retrieve,
        (
            *_DEPENDS,
            "Path thread_id: <class 'str'> = PydanticUndefined",
            "Path run_id: <class 'str'> = PydanticUndefined",
            "Header x-stainless-poll-helper: str | None = None",
        ),
    ),
    _Hot(
        "POST",
        runs.submit_tool_outputs,
        _submit,
        (
            *_DEPENDS,
            "Path thread_id: <class 'str'> = PydanticUndefined",
            "Path run_id: <class 'str'> = PydanticUndefined",
            "Body body: <class 'app.wire.runs.SubmitToolOutputs'>",
        ),
    ),
)


def _declared(route: APIRoute) -> tuple[str, ...]:
    """What FastAPI resolves for ``route``'s endpoint: its dependencies, its
    parameters (kind, alias, type, default) and its body's type."""
    depends = tuple(f"Depends {getattr(d.call, '__name__', d.call)}" for d in route.dependant.dependencies)
    parameters = tuple(
        f"{type(field.field_info).__name__} {field.alias}: {field.field_info.annotation} = {field.field_info.default!r}"
        for field in get_flat_params(route.dependant)
    )
    body = () if route.body_field is None else (f"Body body: {route.body_field.field_info.annotation}",)
    return depends + parameters + body


def _pattern(template: str) -> re.Pattern[str]:
    """The template under any API prefix; a parameter matches what Starlette's
    ``str`` convertor does (one path segment)."""
    prefixes = "|".join(re.escape(prefix) for prefix in API_PREFIXES)
    path = re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", re.escape(template).replace(r"\{", "{").replace(r"\}", "}"))
    return re.compile(f"^(?:{prefixes}){path}$")


def _is_json(scope: Scope) -> bool:
    """The content type FastAPI parses as JSON in the common spelling
    (``application/json``, with parameters or not); anything else goes to
    FastAPI, which decides."""
    content_type = head_of(scope).content_type
    return content_type is not None and content_type.split(b";", 1)[0].strip().lower() == b"application/json"


class HotRoute(BaseRoute):
    """One hot route under every API prefix (see the module's docstring)."""

    def __init__(self, route: APIRoute, hot: _Hot) -> None:
        if _declared(route) != hot.declared or hot.method not in (route.methods or ()):
            raise RuntimeError(
                f"hot route {route.path}: the endpoint's parameters or method changed; update api/hot_routes.py"
            )
        self.route, self.hot = route, hot
        self.pattern = _pattern(route.path)
        self.body_field = route.body_field

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        # A root_path (a server mounted under a prefix), HEAD and dependency
        # overrides go the usual way.
        if (
            scope["type"] != "http"
            or scope["method"] != self.hot.method
            or scope.get("root_path")
            or scope["app"].dependency_overrides
        ):
            return Match.NONE, {}
        found = self.pattern.match(scope["path"])
        if found is None:
            return Match.NONE, {}
        return Match.FULL, {"endpoint": self.route.endpoint, "path_params": found.groupdict(), "route": self.route}

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        body: Any = _NO_BODY
        if self.body_field is not None:
            raw = await read_body(receive)
            receive = replaying(raw, receive)
            body = self._parsed(scope, raw)
        arguments = None if body is None else self.hot.arguments(scope, scope["path_params"], body)
        if arguments is None:
            await self.route.handle(scope, receive, send)
            return
        runtime: Runtime = scope["app"].state.runtime
        response = await self.hot.endpoint(runtime=runtime, project=project_of(scope), **arguments)
        await response(scope, receive, send)

    def url_path_for(self, name: str, /, **path_params: Any) -> Any:
        # URLs are built from the FastAPI routes: not found here, so that
        # the router goes on looking (it catches only NoMatchFound).
        raise NoMatchFound(name, path_params)

    def _parsed(self, scope: Scope, raw: bytes) -> Any:
        """The validated body, or None where FastAPI must answer (its own error)."""
        if not raw or len(raw) > _LARGEST_BODY_PARSED_HERE or not _is_json(scope):
            return None
        try:
            decoded = json.loads(raw)
        except (ValueError, RecursionError):  # not JSON, not UTF-8, nested too deep: FastAPI's 400
            return None
        assert self.body_field is not None
        value, errors = self.body_field.validate(decoded, {}, loc=("body",))
        return None if errors else value


def install(app: FastAPI) -> None:
    """Put the hot routes first in the application's router."""
    by_endpoint = {route.endpoint: route for route in runs.router.routes if isinstance(route, APIRoute)}
    hot_routes = [HotRoute(by_endpoint[hot.endpoint], hot) for hot in _HOT]
    # An inclusion may add dependencies (``include_router(...,
    # dependencies=...)``), which the hot routes would skip.
    if _inclusion_adds_dependencies(app.router.routes, runs.router):
        raise RuntimeError("hot routes: an inclusion of the runs' router adds what api/hot_routes.py does not do")
    app.router.routes[0:0] = hot_routes


def _inclusion_adds_dependencies(routes: list[BaseRoute], target: APIRouter) -> bool:
    """Whether a router inclusion on the way to ``target``'s routes adds
    dependencies: as route copies (older FastAPI), or as included routers
    (FastAPI's ``_IncludedRouter``, which keeps the inclusion's context)."""
    declared = {hot.endpoint: hot.declared for hot in _HOT}
    for route in routes:
        if isinstance(route, APIRoute):
            if route.endpoint in declared and _declared(route) != declared[route.endpoint]:
                return True
            continue
        original = getattr(route, "original_router", None)
        if not isinstance(original, APIRouter) or not _leads_to(original, target):
            continue
        if getattr(getattr(route, "include_context", None), "dependencies", None):
            return True
        if _inclusion_adds_dependencies(original.routes, target):
            return True
    return False


def _leads_to(router: APIRouter, target: APIRouter) -> bool:
    return router is target or any(
        isinstance(original := getattr(route, "original_router", None), APIRouter) and _leads_to(original, target)
        for route in router.routes
    )
