"""CPU per request of the three hot routes, through the whole ASGI app and layer by layer (issue 17).

In process, no HTTP client and no socket: each request is one call of the
ASGI application with the headers the official Python SDK sends, its body
given by ``receive`` and its answer taken by ``send`` (read and dropped). A
SQLite database in a temporary folder, an API key configured, no embedded
worker (so a created run stays queued and a poll answers at once).

Routes: ``POST /v1/threads/runs``, ``POST /v1/threads/{id}/runs`` (on threads
made beforehand, one run each) and ``GET /v1/threads/{id}/runs/{id}`` with
and without ``X-Stainless-Poll-Helper``. Each is measured entering the app at
every layer of its middleware stack in turn (the outer layers' work already
done on the scope: the key's project recorded), then the endpoint function
called with its arguments and its response sent: the difference between two
entry points is what that layer costs. Rounds alternate the entry points;
the figure is the median over rounds of process CPU (all threads: aiosqlite's
included) per request, in µs.

    .venv/bin/python bench/request_cpu.py --rounds 5 --requests 200

Run it against another checkout with ``PYTHONPATH=that/folder``. Prints
markdown; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from app.api import deps
from app.main import create_app
from app.settings import Settings

KEY = "sk-bench-request-cpu"
SDK_HEADERS = [
    (b"host", b"testserver"),
    (b"accept-encoding", b"gzip, deflate"),
    (b"connection", b"keep-alive"),
    (b"accept", b"application/json"),
    (b"content-type", b"application/json"),
    (b"user-agent", b"AsyncOpenAI/Python 2.8.1"),
    (b"x-stainless-lang", b"python"),
    (b"x-stainless-package-version", b"2.8.1"),
    (b"x-stainless-os", b"Linux"),
    (b"x-stainless-arch", b"x64"),
    (b"x-stainless-runtime", b"CPython"),
    (b"x-stainless-runtime-version", b"3.11.7"),
    (b"authorization", b"Bearer " + KEY.encode()),
    (b"openai-beta", b"assistants=v2"),
    (b"x-stainless-async", b"async:asyncio"),
    (b"x-stainless-retry-count", b"0"),
    (b"x-stainless-read-timeout", b"600"),
]

Call = Callable[[dict[str, Any], bytes], Awaitable[int]]


def _scope(app: Any, method: str, path: str, body: bytes, extra: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    headers = [*SDK_HEADERS, *extra]
    if method == "POST":
        headers.append((b"content-length", str(len(body)).encode()))
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 50000),
        "scheme": "http",
        "method": method,
        "root_path": "",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": headers,
        "state": {},
        "app": app,
    }


async def _call(asgi: Any, scope: dict[str, Any], body: bytes) -> int:
    sent = False
    status = 0

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # a client that stays
        raise AssertionError

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await asyncio.wait_for(asyncio.ensure_future(asgi(scope, receive, send)), 30)
    return status


def _layers(app: Any) -> list[tuple[str, Any]]:
    """The middleware stack, outermost first, down to the layer above the router."""
    chain: list[tuple[str, Any]] = []
    layer = app.middleware_stack
    while layer is not None:
        if layer is app.router:  # FastAPI's handler needs the exit stack of the layer above
            break
        chain.append((type(layer).__name__, layer))
        layer = getattr(layer, "app", None)
    return chain


def _endpoint(template: str) -> Any:
    from app.api import runs

    return {
        "/threads/runs": runs.create_thread_and_run,
        "/threads/{thread_id}/runs": runs.create_run,
        "/threads/{thread_id}/runs/{run_id}": runs.retrieve_run,
    }[template]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument(
        "--stub-requests", type=int, default=5000, help="requests per round of the middleware-only table"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="request-cpu-") as temporary:
        await _measure(args, Path(temporary))
    sys.stdout.flush()


async def _measure(args: argparse.Namespace, folder: Path) -> None:
    settings = Settings(
        data_dir=folder,
        database_url=f"sqlite+aiosqlite:///{folder / 'db.sqlite'}",
        api_keys=[KEY],
        embedded_worker=False,
        log_level="warning",
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        app.middleware_stack = app.build_middleware_stack()
        layers = _layers(app)
        whole = ("FastAPI", app)
        # Below the key gate the scope carries the key's project already.
        gate_index = next(i for i, (name, _) in enumerate(layers) if name in ("RequestGate", "ApiFront"))
        project = await app.state.runtime.keys.project_of(KEY)
        assert project is not None

        def scope_for(
            index: int, method: str, path: str, body: bytes, extra: list[tuple[bytes, bytes]]
        ) -> dict[str, Any]:
            scope = _scope(app, method, path, body, extra)
            if index > gate_index:
                deps.set_project(scope, project)
            return scope

        async def post(path: str, payload: dict[str, Any]) -> dict[str, Any]:
            body = json.dumps(payload).encode()
            answer: list[bytes] = []

            async def send(message: dict[str, Any]) -> None:
                if message["type"] == "http.response.body":
                    answer.append(message.get("body", b""))

            async def receive() -> dict[str, Any]:
                return {"type": "http.request", "body": body, "more_body": False}

            await app(_scope(app, "POST", path, body, []), receive, send)
            result: dict[str, Any] = json.loads(b"".join(answer))
            return result

        assistant = await post("/v1/assistants", {"model": "gpt-4o", "instructions": "Be brief."})
        create_body = json.dumps(
            {"assistant_id": assistant["id"], "thread": {"messages": [{"role": "user", "content": "Hello"}]}}
        ).encode()
        run_body = json.dumps({"assistant_id": assistant["id"]}).encode()
        first = await post("/v1/threads/runs", json.loads(create_body))
        thread_id, run_id = first["thread_id"], first["id"]

        routes = {
            "POST /threads/runs": ("POST", "/threads/runs", lambda: ("/v1/threads/runs", create_body, [])),
            "POST /threads/{id}/runs": ("POST", "/threads/{thread_id}/runs", None),
            "GET run (poll)": (
                "GET",
                "/threads/{thread_id}/runs/{run_id}",
                lambda: (f"/v1/threads/{thread_id}/runs/{run_id}", b"", []),
            ),
            "GET run, poll helper": (
                "GET",
                "/threads/{thread_id}/runs/{run_id}",
                lambda: (f"/v1/threads/{thread_id}/runs/{run_id}", b"", [(b"x-stainless-poll-helper", b"true")]),
            ),
        }
        runtime = app.state.runtime
        fresh_threads: list[str] = []

        async def make_threads(count: int) -> None:
            for _ in range(count):
                fresh_threads.append((await post("/v1/threads", {}))["id"])

        def endpoint_caller(method: str, template: str) -> Call:
            """The endpoint function alone, called as FastAPI would after routing."""
            endpoint = _endpoint(template)

            async def call(scope: dict[str, Any], body: bytes) -> int:
                from app.wire.runs import RunCreate, ThreadAndRunCreate

                params: dict[str, Any] = {"runtime": runtime, "project": project}
                names = endpoint.__code__.co_varnames[: endpoint.__code__.co_argcount]
                parts = scope["path"].split("/")
                if template == "/threads/runs":
                    params["body"] = ThreadAndRunCreate.model_validate(json.loads(body))
                elif template == "/threads/{thread_id}/runs":
                    params["body"] = RunCreate.model_validate(json.loads(body))
                    params["thread_id"] = parts[3]
                    params["include"] = []
                else:
                    params["thread_id"], params["run_id"] = parts[3], parts[5]
                    helper = dict(scope["headers"]).get(b"x-stainless-poll-helper")
                    params["poll_helper"] = helper.decode() if helper else None
                response = await endpoint(**{name: params[name] for name in names if name in params})
                return await _call(response, scope, b"")

            return call

        entries: list[tuple[str, int]] = [("FastAPI (whole app)", -1)] + [
            (name, index) for index, (name, _) in enumerate(layers)
        ]
        results: dict[tuple[str, str], list[float]] = {}
        for _round in range(args.rounds):
            for label, (method, template, request) in routes.items():
                for entry_name, index in [*entries, ("endpoint alone", len(layers))]:
                    if template == "/threads/{thread_id}/runs":
                        await make_threads(args.requests)
                    asgi: Any = whole[1] if index < 0 else (layers[index][1] if index < len(layers) else None)
                    call: Call = (
                        endpoint_caller(method, template) if asgi is None else (lambda s, b, a=asgi: _call(a, s, b))
                    )
                    statuses: set[int] = set()
                    started = time.process_time()
                    for _ in range(args.requests):
                        if request is None:
                            path, body, extra = f"/v1/threads/{fresh_threads.pop()}/runs", run_body, []
                        else:
                            path, body, extra = request()
                        statuses.add(await call(scope_for(max(index, 0), method, path, body, extra), body))
                    spent = time.process_time() - started
                    if statuses != {200}:
                        raise SystemExit(f"{label} entered at {entry_name}: statuses {statuses}")
                    results.setdefault((label, entry_name), []).append(spent / args.requests * 1e6)

        names = [name for name, _ in entries] + ["endpoint alone"]
        print(f"µs of process CPU per request, median of {args.rounds} rounds x {args.requests} (min in brackets)\n")
        print("| entered at | " + " | ".join(routes) + " |")
        print("|---|" + "---:|" * len(routes))
        for name in names:
            cells = []
            for label in routes:
                values = results[(label, name)]
                cells.append(f"{statistics.median(values):.0f} ({min(values):.0f})")
            print(f"| {name} | " + " | ".join(cells) + " |")
        print("\nwhat each layer costs (median of the entry above minus median of the entry below):\n")
        print("| layer | " + " | ".join(routes) + " |")
        print("|---|" + "---:|" * len(routes))
        for upper, lower in itertools.pairwise(names):
            cells = [
                f"{statistics.median(results[(label, upper)]) - statistics.median(results[(label, lower)]):.0f}"
                for label in routes
            ]
            print(f"| {upper} | " + " | ".join(cells) + " |")
        await _middlewares_alone(app, layers, args.rounds, args.stub_requests, create_body)


async def _middlewares_alone(app: Any, layers: list[tuple[str, Any]], rounds: int, requests: int, body: bytes) -> None:
    """Our middlewares alone (from the observer to FastAPI's exception
    middleware, which a stub answering ``{}`` replaces): their CPU per
    request, without the noise of the database work under them."""
    names = [name for name, _ in layers]
    first = names.index("RequestObserver")
    last = names.index("ExceptionMiddleware")
    above = layers[last - 1][1]

    async def stub(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"{}"})

    kinds = {
        "GET": ("GET", "/v1/threads/thread_x/runs/run_x", b""),
        "POST": ("POST", "/v1/threads/runs", body),
    }
    spent: dict[tuple[str, str], list[float]] = {}
    original = above.app
    above.app = stub
    try:
        for _round in range(rounds):
            for kind, (method, path, content) in kinds.items():
                for label, entry in (("our middlewares", layers[first][1]), ("stub alone", stub)):
                    started = time.process_time()
                    for _ in range(requests):
                        await _call(entry, _scope(app, method, path, content, []), content)
                    spent.setdefault((kind, label), []).append((time.process_time() - started) / requests * 1e6)
    finally:
        above.app = original
    print(f"\nour middlewares alone ({' -> '.join(names[first:last])}), around a stub;")
    print(f"µs of CPU per request, median of {rounds} rounds x {requests}:\n")
    print("| | GET | POST |\n|---|---:|---:|")
    for label in ("our middlewares", "stub alone"):
        print(f"| {label} | " + " | ".join(f"{statistics.median(spent[(kind, label)]):.1f}" for kind in kinds) + " |")
    cost = [
        statistics.median(spent[(k, "our middlewares")]) - statistics.median(spent[(k, "stub alone")]) for k in kinds
    ]
    print("| difference | " + " | ".join(f"{value:.1f}" for value in cost) + " |")


if __name__ == "__main__":
    asyncio.run(main())
