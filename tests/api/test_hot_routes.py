"""The four hot run routes (app/api/hot_routes.py) answer exactly as
FastAPI's own routes do: every request below is sent twice to the same app,
once with the hot routes in front and once with them taken out, and the two
answers must match (status, headers that matter, body; ids aside)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import httpx2
import pytest
from fastapi import FastAPI

from app import errors
from app.api import hot_routes
from app.api.deps import ProjectDep, RuntimeDep, get_project
from app.api.runs import create_run, create_thread_and_run, retrieve_run, submit_tool_outputs

pytestmark = pytest.mark.timeout(60)

BETA = {"OpenAI-Beta": "assistants=v2"}
JSON = {**BETA, "content-type": "application/json"}
_IDS = re.compile(rb"(run|thread|msg|asst|step)_[0-9A-Za-z]+")
_GOING = ("queued", "in_progress", "cancelling")
_CREATED = re.compile(rb'"(created_at|expires_at)":\d+')


@contextmanager
def fastapi_only(app: FastAPI) -> Iterator[None]:
    """The app with its hot routes taken out: FastAPI answers everything."""
    hot = [route for route in app.router.routes if isinstance(route, hot_routes.HotRoute)]
    assert len(hot) == 4
    app.router.routes[:] = [route for route in app.router.routes if route not in hot]
    try:
        yield
    finally:
        app.router.routes[0:0] = hot


def _comparable(response: httpx2.Response) -> tuple[int, str | None, bytes]:
    body = _CREATED.sub(rb'"\1":0', _IDS.sub(rb"\1_x", response.content))
    return response.status_code, response.headers.get("content-type"), body


async def _both(
    app: FastAPI, http: httpx2.AsyncClient, method: str, url: str, **kwargs: Any
) -> tuple[httpx2.Response, httpx2.Response]:
    hot = await http.request(method, url, **kwargs)
    with fastapi_only(app):
        plain = await http.request(method, url, **kwargs)
    return hot, plain


@pytest.fixture
async def http(app: FastAPI) -> AsyncIterator[httpx2.AsyncClient]:
    """A raw client: no spec check of the answers (HEAD answers have no body;
    the error answers compared here are checked by tests/api/test_http.py)."""
    async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://testserver") as client:
        yield client


@pytest.fixture
async def assistant_id(http: httpx2.AsyncClient) -> str:
    response = await http.post("/v1/assistants", headers=BETA, json={"model": "gpt-4o"})
    assistant: str = response.json()["id"]
    return assistant


async def _thread(http: httpx2.AsyncClient) -> str:
    thread: str = (await http.post("/v1/threads", headers=BETA)).json()["id"]
    return thread


def _bodies(assistant_id: str) -> list[tuple[dict[str, str], bytes]]:
    """Bodies FastAPI answers with its own errors, and a few it accepts."""
    return [
        (JSON, b"not json"),
        (JSON, b""),
        (JSON, b"   "),
        (JSON, b"null"),
        (JSON, b"[1]"),
        (JSON, b"{}"),
        (JSON, b'{"assistant_id": 5}'),
        (JSON, b'{"assistant_id": "asst_nope"}'),
        (JSON, b'{"assistant_id": "' + assistant_id.encode() + b'", "temperature": 9}'),
        (JSON, b'{"assistant_id": "' + assistant_id.encode() + b'", "stream": "sure"}'),
        (JSON, b'{"assistant_id": "\xff\xfe"}'),
        (JSON, b"[" * 100_000 + b"]" * 100_000),
        (BETA, b'{"assistant_id": "' + assistant_id.encode() + b'"}'),  # no content type
        ({**BETA, "content-type": "text/plain"}, b'{"assistant_id": "' + assistant_id.encode() + b'"}'),
        ({**BETA, "content-type": "application/vnd.api+json"}, b'{"assistant_id": "asst_nope"}'),
        ({**BETA, "content-type": "Application/JSON; charset=utf-8"}, b'{"assistant_id": "asst_nope"}'),
        (JSON, b'{"assistant_id": "asst_nope", "instructions": "' + b"x" * 70_000 + b'"}'),  # parsed by FastAPI alone
    ]


async def test_create_thread_and_run_answers_as_fastapi(
    app: FastAPI, http: httpx2.AsyncClient, assistant_id: str
) -> None:
    for prefix in ("/v1", "/openai", "/openai/v1"):
        for headers, content in _bodies(assistant_id):
            hot, plain = await _both(app, http, "POST", f"{prefix}/threads/runs", headers=headers, content=content)
            assert _comparable(hot) == _comparable(plain), (prefix, content[:60])
    hot, plain = await _both(app, http, "POST", "/v1/threads/runs", headers=BETA, json={"assistant_id": assistant_id})
    assert hot.status_code == plain.status_code == 200
    assert hot.json().keys() == plain.json().keys()


async def test_create_run_answers_as_fastapi(app: FastAPI, http: httpx2.AsyncClient, assistant_id: str) -> None:
    for headers, content in _bodies(assistant_id):
        thread_id = await _thread(http)  # a run that is created keeps its thread busy
        hot, plain = await _both(
            app, http, "POST", f"/openai/threads/{thread_id}/runs", headers=headers, content=content
        )
        assert _comparable(hot) == _comparable(plain), content[:60]
    good = {"assistant_id": assistant_id}
    for query in ("", "?include[]=bogus", "?include[]=step_details.tool_calls[*].file_search.results[*].content"):
        first, second = await _thread(http), await _thread(http)
        hot = await http.post(f"/v1/threads/{first}/runs{query}", headers=BETA, json=good)
        with fastapi_only(app):
            plain = await http.post(f"/v1/threads/{second}/runs{query}", headers=BETA, json=good)
        assert _comparable(hot) == _comparable(plain), query
    for url in ("/v1/threads/thread_nope/runs", "/v1/threads/runs/runs"):
        hot, plain = await _both(app, http, "POST", url, headers=BETA, json=good)
        assert _comparable(hot) == _comparable(plain), url


async def test_retrieve_run_answers_as_fastapi(app: FastAPI, http: httpx2.AsyncClient, assistant_id: str) -> None:
    run = (await http.post("/v1/threads/runs", headers=BETA, json={"assistant_id": assistant_id})).json()
    thread_id, run_id = run["thread_id"], run["id"]
    # A stopped run answers at once, helper or not (a run still going would be
    # held until it stops: the same either way, but not at the same moment).
    # The worker may finish it before the cancel arrives: either way it stops.
    await http.post(f"/v1/threads/{thread_id}/runs/{run_id}/cancel", headers=BETA)
    deadline = asyncio.get_running_loop().time() + 10
    while (await http.get(f"/v1/threads/{thread_id}/runs/{run_id}", headers=BETA)).json()["status"] in _GOING:
        assert asyncio.get_running_loop().time() < deadline, "the run did not stop"
        await asyncio.sleep(0.01)
    for url in (
        f"/v1/threads/{thread_id}/runs/{run_id}",
        f"/openai/v1/threads/{thread_id}/runs/{run_id}?api-version=2024-05-01-preview",
        f"/v1/threads/{thread_id}/runs/run_nope",
        f"/v1/threads/thread_nope/runs/{run_id}",
        f"/v1/threads/{thread_id}/runs/{run_id}/",
    ):
        for extra in ({}, {"x-stainless-poll-helper": "true"}, {"x-stainless-poll-helper": "false"}):
            for method in ("GET", "HEAD"):
                hot, plain = await _both(app, http, method, url, headers={**BETA, **extra})
                assert _comparable(hot) == _comparable(plain), (method, url, extra)
                assert hot.headers.get("openai-poll-after-ms") == plain.headers.get("openai-poll-after-ms")


async def _waiting_for_its_call(http: httpx2.AsyncClient, assistant_id: str) -> tuple[str, str]:
    """A new run that called a function: its thread's and its own id, once it waits in requires_action."""
    body = {
        "assistant_id": assistant_id,
        "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}],
        "thread": {"messages": [{"role": "user", "content": "Weather? [[call get_weather]]"}]},
    }
    run = (await http.post("/v1/threads/runs", headers=BETA, json=body)).json()
    deadline = asyncio.get_running_loop().time() + 10
    while run["status"] != "requires_action":
        assert run["status"] in _GOING, run
        assert asyncio.get_running_loop().time() < deadline, "the run did not call its function"
        await asyncio.sleep(0.01)
        run = (await http.get(f"/v1/threads/{run['thread_id']}/runs/{run['id']}", headers=BETA)).json()
    return run["thread_id"], run["id"]


async def test_submit_tool_outputs_answers_as_fastapi(
    app: FastAPI, http: httpx2.AsyncClient, assistant_id: str
) -> None:
    thread_id, run_id = await _waiting_for_its_call(http, assistant_id)
    call_id = (await http.get(f"/v1/threads/{thread_id}/runs/{run_id}", headers=BETA)).json()["required_action"][
        "submit_tool_outputs"
    ]["tool_calls"][0]["id"]
    good = b'{"tool_outputs": [{"tool_call_id": "' + call_id.encode() + b'", "output": "sunny"}]}'
    refused = [
        (JSON, b"not json"),
        (JSON, b""),
        (JSON, b"{}"),
        (JSON, b'{"tool_outputs": 5}'),
        (JSON, b'{"tool_outputs": [{"tool_call_id": 5}]}'),
        (JSON, b'{"tool_outputs": []}'),  # the service's own error: not the calls it waits for
        (JSON, b'{"tool_outputs": [{"tool_call_id": "call_nope", "output": "x"}]}'),
        (JSON, b'{"tool_outputs": [{"tool_call_id": "\xff\xfe"}]}'),
        (JSON, good[:-1] + b', "stream": "sure"}'),
        (BETA, good),  # no content type
        ({**BETA, "content-type": "text/plain"}, good),
    ]
    # None of these moves the run: it still waits for its call's output.
    for prefix in ("/v1", "/openai", "/openai/v1"):
        for headers, content in refused:
            url = f"{prefix}/threads/{thread_id}/runs/{run_id}/submit_tool_outputs"
            hot, plain = await _both(app, http, "POST", url, headers=headers, content=content)
            assert _comparable(hot) == _comparable(plain), (prefix, content[:60])
    for url in (
        f"/v1/threads/{thread_id}/runs/run_nope/submit_tool_outputs",
        f"/v1/threads/thread_nope/runs/{run_id}/submit_tool_outputs",
    ):
        hot, plain = await _both(app, http, "POST", url, headers=JSON, content=good)
        assert _comparable(hot) == _comparable(plain), url
        assert hot.status_code == 404
    # Accepted: each side answers its own run's call, the run queued again.
    hot = await http.post(f"/v1/threads/{thread_id}/runs/{run_id}/submit_tool_outputs", headers=JSON, content=good)
    other_thread, other_run = await _waiting_for_its_call(http, assistant_id)
    other_call = (await http.get(f"/v1/threads/{other_thread}/runs/{other_run}", headers=BETA)).json()[
        "required_action"
    ]["submit_tool_outputs"]["tool_calls"][0]["id"]
    with fastapi_only(app):
        plain = await http.post(
            f"/v1/threads/{other_thread}/runs/{other_run}/submit_tool_outputs",
            headers=JSON,
            content=good.replace(call_id.encode(), other_call.encode()),
        )
    assert hot.status_code == plain.status_code == 200
    assert hot.json().keys() == plain.json().keys()
    assert hot.json()["status"] == plain.json()["status"] == "queued"
    assert hot.headers["content-type"] == plain.headers["content-type"]


async def test_the_hot_routes_are_the_fastapi_routes_endpoints(app: FastAPI, http: httpx2.AsyncClient) -> None:
    """Same endpoint functions, labelled by the same templates in /metrics."""
    hot = [route for route in app.router.routes if isinstance(route, hot_routes.HotRoute)]
    assert [route.route.endpoint for route in hot] == [
        create_thread_and_run,
        create_run,
        retrieve_run,
        submit_tool_outputs,
    ]
    assert app.router.routes[: len(hot)] == hot
    await http.get("/v1/threads/thread_nope/runs/run_nope", headers=BETA)
    metrics = (await http.get("/metrics")).text
    assert 'route="/v1/threads/{thread_id}/runs/{run_id}"' in metrics


def test_an_endpoint_whose_parameters_change_stops_the_start() -> None:
    """A parameter added to a hot endpoint must be read by its hot route too:
    the app refuses to start rather than pass it its default silently."""
    from fastapi.routing import APIRoute

    async def changed_retrieve_run(
        thread_id: str, run_id: str, runtime: Any, project: Any, poll_helper: Any, extra: int
    ) -> Any:
        raise AssertionError

    hot = next(hot for hot in hot_routes._HOT if hot.endpoint is retrieve_run)
    changed = APIRoute("/threads/{thread_id}/runs/{run_id}", changed_retrieve_run, methods=["GET"])
    with pytest.raises(RuntimeError, match="parameters or method changed"):
        hot_routes.HotRoute(changed, hot)


def test_an_endpoint_whose_header_alias_changes_stops_the_start() -> None:
    """Same names, another header read: the hot route would read the old one."""
    from typing import Annotated

    from fastapi import Header
    from fastapi.routing import APIRoute

    async def renamed_header(
        thread_id: str,
        run_id: str,
        runtime: RuntimeDep,
        project: ProjectDep,
        poll_helper: Annotated[str | None, Header(alias="x-poll-helper")] = None,
    ) -> Any:
        raise AssertionError

    hot = next(hot for hot in hot_routes._HOT if hot.endpoint is retrieve_run)
    changed = APIRoute("/threads/{thread_id}/runs/{run_id}", renamed_header, methods=["GET"])
    with pytest.raises(RuntimeError, match="parameters or method changed"):
        hot_routes.HotRoute(changed, hot)


async def test_dependency_overrides_apply_to_the_hot_routes(
    app: FastAPI, http: httpx2.AsyncClient, assistant_id: str
) -> None:
    """An override (a test's or an embedding app's) is honoured on the four
    routes as on every other: the hot routes stand aside while any is set."""
    thread = await _thread(http)

    async def refused() -> None:
        raise errors.APIError(403, "refused by an override")

    app.dependency_overrides[get_project] = refused
    try:
        answers = [
            await http.post("/v1/threads/runs", headers=JSON, json={"assistant_id": assistant_id}),
            await http.post(f"/v1/threads/{thread}/runs", headers=JSON, json={"assistant_id": assistant_id}),
            await http.get(f"/v1/threads/{thread}/runs/run_nope", headers=BETA),
            await http.post(
                f"/v1/threads/{thread}/runs/run_nope/submit_tool_outputs", headers=JSON, json={"tool_outputs": []}
            ),
        ]
    finally:
        app.dependency_overrides.clear()
    assert [answer.status_code for answer in answers] == [403, 403, 403, 403]


def test_urls_are_built_past_the_hot_routes(app: FastAPI) -> None:
    """The router asks every route in turn; a hot route says "not mine"."""
    assert app.url_path_for("retrieve_run", thread_id="a", run_id="b") == "/v1/threads/a/runs/b"


def test_a_dependency_added_where_the_routes_are_included_stops_the_start() -> None:
    """The hot routes call the endpoints themselves: a dependency an
    inclusion adds (a router's ``dependencies``) would be skipped."""
    from fastapi import Depends

    from app.api import runs

    async def refuse() -> None:
        raise AssertionError

    application = FastAPI()
    application.include_router(runs.router, prefix="/v1", dependencies=[Depends(refuse)])
    with pytest.raises(RuntimeError, match="an inclusion of the runs' router adds"):
        hot_routes.install(application)
