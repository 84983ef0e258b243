"""GET /metrics after real runs through the SDK: runs by final status and
model, durations and time to first token, model calls by outcome with
tokens, the queue, vector store files, HTTP requests by route template."""

from __future__ import annotations

import asyncio
import math

import httpx2
import openai
import pytest
from fastapi import FastAPI

import app as package
from app.llm import Usage
from app.main import create_app
from app.observability import metrics
from app.runner import execute
from app.settings import Settings
from tests.ops.conftest import scrape, value
from tests.runner.helpers import until

MODEL = "gpt-4o"
RUN_ROUTE = "/v1/threads/{thread_id}/runs/{run_id}"


async def run_once(sdk: openai.AsyncOpenAI, assistant_id: str, content: str) -> str:
    run = await sdk.beta.threads.create_and_run_poll(
        assistant_id=assistant_id,
        thread={"messages": [{"role": "user", "content": content}]},
        poll_interval_ms=10,
    )
    return run.status


async def test_runs_and_model_calls_are_counted(sdk: openai.AsyncOpenAI, plain: httpx2.AsyncClient) -> None:
    assistant = await sdk.beta.assistants.create(model=MODEL)
    statuses = [await run_once(sdk, assistant.id, text) for text in ("hello", "again", "[[fail server_error]]")]
    assert statuses == ["completed", "completed", "failed"]

    samples = await scrape(plain)
    assert value(samples, "assistants_runs_total", status="completed", model=MODEL) == 2
    assert value(samples, "assistants_runs_total", status="failed", model=MODEL) == 1
    assert value(samples, "assistants_run_duration_seconds_count", status="completed", model=MODEL) == 2
    assert value(samples, "assistants_run_duration_seconds_count", status="failed", model=MODEL) == 1
    # The failed run never produced text: two first tokens, not three.
    assert value(samples, "assistants_run_time_to_first_token_seconds_count", model=MODEL) == 2
    assert value(samples, "assistants_model_calls_total", model=MODEL, outcome="ok") == 2
    assert value(samples, "assistants_model_calls_total", model=MODEL, outcome="server_error") == 1
    assert value(samples, "assistants_model_call_duration_seconds_count", model=MODEL, outcome="ok") == 2
    assert value(samples, "assistants_model_tokens_total", model=MODEL, kind="prompt") > 0
    assert value(samples, "assistants_model_tokens_total", model=MODEL, kind="completion") > 0
    assert value(samples, "assistants_runs_queued") == 0
    assert value(samples, "assistants_runs_queued_oldest_age_seconds") == 0
    assert ("assistants_sandbox_sessions", frozenset()) in samples
    assert value(samples, "assistants_build_info", version=package.__version__) == 1
    assert value(samples, "assistants_runs_executing") == 0
    assert 0 <= value(samples, "assistants_worker_seconds_since_last_loop") < 30


async def test_a_held_poll_answers_an_ended_run_before_its_task_has_wound_down(
    sdk: openai.AsyncOpenAI, plain: httpx2.AsyncClient, app: FastAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SDK's held poll is answered at the run's final event, not after
    its task's last step (issue 17), and the run is already counted as
    executing no more: here the task is kept from ending after the run's
    end, and the poll holds for a minute, so an answer that waited for the
    task would miss the test's deadline. (An answer that takes time: the
    offline model's instant one is given without a task of its own.)"""
    runtime = app.state.runtime
    monkeypatch.setattr(runtime, "settings", runtime.settings.model_copy(update={"poll_hold_ms": 60_000}))
    wound_down = asyncio.Event()
    execute_run = execute.run

    async def kept_after_its_end(execution: execute.RunExecution) -> None:
        await execute_run(execution)
        await wound_down.wait()

    monkeypatch.setattr(execute, "run", kept_after_its_end)
    assistant = await sdk.beta.assistants.create(model=MODEL)
    worker = runtime.worker
    try:
        async with asyncio.timeout(20):
            assert await run_once(sdk, assistant.id, "[[delay 1]] hello") == "completed"
        assert (worker.busy, worker.executing) == (1, 0)
        assert value(await scrape(plain), "assistants_runs_executing") == 0
    finally:
        wound_down.set()
    await until(lambda: worker.busy == 0, "the run's task to end")


async def test_http_requests_are_labelled_by_route_template(sdk: openai.AsyncOpenAI, plain: httpx2.AsyncClient) -> None:
    assistant = await sdk.beta.assistants.create(model=MODEL)
    thread = await sdk.beta.threads.create()
    run = await sdk.beta.threads.runs.create_and_poll(
        thread_id=thread.id, assistant_id=assistant.id, poll_interval_ms=10
    )
    await sdk.beta.threads.runs.retrieve(run.id, thread_id=thread.id)
    assert (await plain.get("/v1/no/such/path", headers={"OpenAI-Beta": "assistants=v2"})).status_code == 404

    samples = await scrape(plain)
    assert value(samples, "assistants_http_requests_total", method="GET", route=RUN_ROUTE, status="200") >= 2
    assert value(samples, "assistants_http_requests_total", method="POST", route="/v1/threads", status="200") == 1
    assert value(samples, "assistants_http_requests_total", method="GET", route="unmatched", status="404") == 1
    assert value(samples, "assistants_http_request_duration_seconds_count", method="GET", route=RUN_ROUTE) >= 2
    routes = {dict(labels).get("route") for _name, labels in samples} - {None}
    ids = (assistant.id, thread.id, run.id)
    assert not [route for route in routes if any(object_id in route for object_id in ids)]


@pytest.fixture
async def replica(settings: Settings) -> FastAPI:
    """An API replica without a worker: runs stay queued."""
    return create_app(settings.model_copy(update={"embedded_worker": False}))


async def test_queue_depth_and_vector_store_files(replica: FastAPI) -> None:
    async with (
        replica.router.lifespan_context(replica),
        httpx2.AsyncClient(transport=httpx2.ASGITransport(app=replica), base_url="http://testserver") as http,
    ):
        sdk = openai.AsyncOpenAI(base_url="http://testserver/v1", api_key="x", http_client=http, max_retries=0)
        assistant = await sdk.beta.assistants.create(model=MODEL)
        for _ in range(2):
            thread = await sdk.beta.threads.create()
            await sdk.beta.threads.runs.create(thread_id=thread.id, assistant_id=assistant.id)
        upload = await sdk.files.create(file=("notes.txt", b"queue depth"), purpose="assistants")
        store = await sdk.vector_stores.create(file_ids=[upload.id])

        samples = await scrape(http)
        assert value(samples, "assistants_runs_queued") == 2
        assert value(samples, "assistants_runs_queued_oldest_age_seconds") >= 0
        assert value(samples, "assistants_vector_store_files", status="in_progress") == 1
        assert value(samples, "assistants_vector_store_files", status="completed") == 0
        assert store.file_counts.in_progress == 1
        assert math.isnan(value(samples, "assistants_worker_seconds_since_last_loop"))  # no worker here


def test_model_labels_are_bounded() -> None:
    registry = metrics.Metrics()
    labels = {registry.model_label(f"model-{n}") for n in range(metrics.MAX_MODEL_LABELS + 5)}
    assert len(labels) == metrics.MAX_MODEL_LABELS + 1
    assert metrics.OTHER_MODEL in labels
    assert registry.model_label("model-0") == "model-0"


def test_each_app_counts_only_its_own() -> None:
    first, second = metrics.Metrics(), metrics.Metrics()
    first.observe_request("GET", "/healthz", 200, 0.01)
    assert (
        first.registry.get_sample_value(
            "assistants_http_requests_total", {"method": "GET", "route": "/healthz", "status": "200"}
        )
        == 1
    )
    assert (
        second.registry.get_sample_value(
            "assistants_http_requests_total", {"method": "GET", "route": "/healthz", "status": "200"}
        )
        is None
    )


def test_repeated_observations_all_count_and_names_past_the_cap_count_as_other() -> None:
    registry = metrics.Metrics()
    for _ in range(3):
        registry.observe_request("POST", "/v1/threads/runs", 200, 0.01)
    registry.observe_request("POST", "/v1/threads/runs", 400, 0.01)
    sample = registry.registry.get_sample_value
    assert (
        sample("assistants_http_requests_total", {"method": "POST", "route": "/v1/threads/runs", "status": "200"}) == 3
    )
    assert (
        sample("assistants_http_requests_total", {"method": "POST", "route": "/v1/threads/runs", "status": "400"}) == 1
    )
    assert (
        sample("assistants_http_request_duration_seconds_count", {"method": "POST", "route": "/v1/threads/runs"}) == 4
    )

    usage = Usage(prompt_tokens=5, completion_tokens=2)
    for n in range(metrics.MAX_MODEL_LABELS + 3):
        registry.observe_model_call(f"model-{n}", "ok", 0.1, usage)
        registry.observe_model_call(f"model-{n}", "ok", 0.1, None)
    assert sample("assistants_model_calls_total", {"model": "model-0", "outcome": "ok"}) == 2
    assert sample("assistants_model_tokens_total", {"model": "model-0", "kind": "prompt"}) == 5
    assert sample("assistants_model_calls_total", {"model": metrics.OTHER_MODEL, "outcome": "ok"}) == 6
    assert sample("assistants_model_tokens_total", {"model": metrics.OTHER_MODEL, "kind": "completion"}) == 6
    # A model that never reported usage has no token series.
    fresh = metrics.Metrics()
    fresh.observe_model_call("quiet-model", "error", 0.1, None)
    assert (
        fresh.registry.get_sample_value("assistants_model_calls_total", {"model": "quiet-model", "outcome": "error"})
        == 1
    )
    assert (
        fresh.registry.get_sample_value("assistants_model_tokens_total", {"model": "quiet-model", "kind": "prompt"})
        is None
    )
