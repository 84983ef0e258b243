"""The outermost ASGI middleware: gives each request its id, binds it (and
the ASGI scope, for the run id) to every log line written while serving it,
counts it for /metrics and writes one compact access-log line when it ends.

Routes are labelled by their template (``/v1/threads/{thread_id}/runs/{run_id}``),
never by the raw path: ids would make a new series per object. Successful
GETs (clients polling a run, Prometheus scraping, probes) are logged at DEBUG
so they do not flood the default level; everything else at INFO, 5xx at
WARNING. The logged path has its key-like query parameters masked, and no
header is ever logged.
"""

from __future__ import annotations

import logging
import random
import time
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, urlencode

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.activity import ACTIVITY
from app.observability import logs

if TYPE_CHECKING:
    from app.runtime import Runtime

access_log = logging.getLogger("app.access")

UNMATCHED_ROUTE = "unmatched"
# Query parameters whose value is a credential (AzureOpenAI-style clients and
# some proxies put the key in the URL).
SECRET_PARAMS = frozenset({"api-key", "api_key", "apikey", "key", "access_token", "token"})


def new_request_id() -> str:
    """An id to find a request by in logs, not a secret: Python's own
    generator, not the system's (secrets.token_hex is a system call, about
    2 % of a create's CPU: issue 17)."""
    return f"req_{random.getrandbits(128):032x}"


def route_template(scope: Scope) -> str:
    """The matched route's path template, e.g. ``/openai/v1/threads/{thread_id}``.

    FastAPI puts the route on the scope; since routers are included rather
    than copied, its path lacks the prefix it was included under (/v1,
    /openai, ...). The prefix is what the request path has before the
    template's segments (our templates' parameters never contain a slash).
    """
    template = getattr(scope.get("route"), "path", None)
    if not isinstance(template, str):
        return UNMATCHED_ROUTE
    segments = scope.get("path", "").split("/")
    prefix = "/".join(segments[: max(len(segments) - template.count("/"), 1)])
    return prefix + template


def redacted_target(scope: Scope) -> str:
    path: str = scope.get("path", "")
    query = scope.get("query_string", b"").decode("latin-1")
    if not query:
        return path
    pairs = parse_qsl(query, keep_blank_values=True)
    masked = [(name, logs.REDACTED if name.lower() in SECRET_PARAMS else value) for name, value in pairs]
    return f"{path}?{urlencode(masked, safe='[]/:')}"


class RequestObserver:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        tokens = logs.bind_request(new_request_id(), scope)
        started = time.perf_counter()
        status = 500  # what the client gets if the app raises before answering

        async def observe_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        ACTIVITY.requests += 1
        try:
            await self.app(scope, receive, observe_status)
        finally:
            ACTIVITY.requests -= 1
            elapsed = time.perf_counter() - started
            try:
                _record(scope, status, elapsed)
            finally:
                logs.unbind_request(tokens)


def _record(scope: Scope, status: int, seconds: float) -> None:
    method: str = scope.get("method", "")
    route = route_template(scope)
    # Absent before the lifespan has started (and in apps without one).
    runtime: Runtime | None = getattr(scope["app"].state, "runtime", None) if "app" in scope else None
    if runtime is not None:
        runtime.metrics.observe_request(method, route, status, seconds)
    if status >= 500:
        level = logging.WARNING
    elif method in ("GET", "HEAD") and status < 400:
        level = logging.DEBUG
    else:
        level = logging.INFO
    if not access_log.isEnabledFor(level):
        return
    target = redacted_target(scope)
    client = scope.get("client")
    access_log.log(
        level,
        "%s %s %d %.1fms",
        method,
        target,
        status,
        seconds * 1000,
        extra={
            "http": {
                "method": method,
                "path": target,
                "route": route,
                "status": status,
                "duration_ms": round(seconds * 1000, 1),
                "client": f"{client[0]}:{client[1]}" if client else None,
            }
        },
    )
