"""The SDK poller's held GET (app/api/poll_hold.py): answered from this
process's bus once the run stops here, without waiting for an event that
another process publishes (``serve --workers 2``), with the body a plain GET
answers; and the notes of the runs created here (app/created_runs.py)."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import SimpleNamespace
from typing import Any

import httpx2
import openai
import pytest
from fastapi import FastAPI
from sqlalchemy import update

from app import created_runs, orm
from app.api import poll_hold
from app.main import create_app
from app.runtime import Runtime
from app.services import api_keys, run_execution
from app.settings import Settings
from app.wire.events import Event
from app.worker import Worker
from tests.runner.helpers import until

# Far beyond each test's deadline: a hold that waits it out fails the test.
_HOLD_MS = 60_000
_DEADLINE_SECONDS = 15.0
_KEY = "sk-test"

# What the run objects carry that respond() and the run log's encoder may
# write differently (wire/jsontext.py): non-ASCII text, U+2028 (escaped in
# the log's text), an integer beyond 64 bits (the stdlib encoder's).
_EXOTIC = "a\u2028b é ü"
_BIG = 2**70


@asynccontextmanager
async def _app_with_idle_worker(settings: Settings, **update: Any) -> AsyncIterator[FastAPI]:
    """The app whose process has a worker that runs nothing until the test
    drives it (``Worker.run_until_idle``): the runs it creates stay queued,
    reserved for that worker."""
    application = create_app(settings.model_copy(update={"poll_hold_ms": _HOLD_MS, "embedded_worker": False, **update}))
    async with application.router.lifespan_context(application):
        runtime: Runtime = application.state.runtime
        runtime.attach_worker(Worker(runtime))
        yield application


@pytest.fixture
async def idle_worker_app(settings: Settings) -> AsyncIterator[FastAPI]:
    async with _app_with_idle_worker(settings) as application:
        yield application


@pytest.fixture
async def reserving_app(settings: Settings) -> AsyncIterator[FastAPI]:
    """As ``idle_worker_app``, with reservations that outlast each test (a
    held poll of a run created here trusts its note for the whole test) and
    API keys, so that projects can differ."""
    async with _app_with_idle_worker(
        settings, run_claim_affinity_seconds=_HOLD_MS / 1000, api_keys=[_KEY], key_cache_seconds=0.0
    ) as application:
        yield application


def _sdk(http: httpx2.AsyncClient, key: str = _KEY) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url="http://testserver/v1", api_key=key, http_client=http, max_retries=0)


async def _queued_run(http: httpx2.AsyncClient, key: str = _KEY) -> tuple[str, str]:
    sdk = _sdk(http, key)
    assistant = await sdk.beta.assistants.create(model="gpt-4o")
    run = await sdk.beta.threads.create_and_run(
        assistant_id=assistant.id, thread={"messages": [{"role": "user", "content": "Hello"}]}
    )
    assert run.status == "queued"
    return run.thread_id, run.id


async def _move(runtime: Runtime, run_id: str, **values: Any) -> None:
    async with runtime.transaction() as session:
        await session.execute(update(orm.Run).where(orm.Run.id == run_id).values(**values))


def _get(http: httpx2.AsyncClient, path: str, key: str = _KEY, *, held: bool = False) -> Any:
    headers = {"Authorization": f"Bearer {key}"}
    if held:
        headers["X-Stainless-Poll-Helper"] = "true"
    return http.get(path, headers=headers)


def _held_poll(http: httpx2.AsyncClient, thread_id: str, run_id: str, key: str = _KEY) -> asyncio.Task[httpx2.Response]:
    return asyncio.create_task(_get(http, f"/v1/threads/{thread_id}/runs/{run_id}", key, held=True))


async def test_a_held_poll_ends_once_another_process_claims_the_run(idle_worker_app: FastAPI) -> None:
    """The run is reserved for this process when the poll begins; its
    reservation lapses and another process's worker claims it while the poll
    is held: the poll answers the run as it now is (in progress), with the
    poller's interval, at its next read instead of holding ``poll_hold_ms``."""
    runtime: Runtime = idle_worker_app.state.runtime
    transport = httpx2.ASGITransport(app=idle_worker_app)
    async with httpx2.AsyncClient(transport=transport, base_url="http://testserver") as http:
        thread_id, run_id = await _queued_run(http)
        async with asyncio.timeout(_DEADLINE_SECONDS):
            poll = _held_poll(http, thread_id, run_id)
            await until(lambda: runtime.bus.watched(run_id) or poll.done(), "the poll held")
            now = time.time()
            await _move(
                runtime,
                run_id,
                status="in_progress",
                started_at=int(now),
                lease_owner="worker-elsewhere",
                lease_expires_at=now + 60,
            )
            response = await poll
    assert response.status_code == 200
    assert response.json()["status"] == "in_progress"
    assert response.headers["openai-poll-after-ms"] == str(runtime.settings.poll_after_ms)


async def test_a_held_poll_of_a_run_reserved_for_another_process_answers_at_its_first_read(
    idle_worker_app: FastAPI,
) -> None:
    """A queued run reserved for another process's worker is not this
    process's to execute: the poll answers it as it is at its first read
    (this process's note of the run, reserved for it when created, hides
    the row until that reservation lapses: a fraction of a second)."""
    runtime: Runtime = idle_worker_app.state.runtime
    transport = httpx2.ASGITransport(app=idle_worker_app)
    async with httpx2.AsyncClient(transport=transport, base_url="http://testserver") as http:
        thread_id, run_id = await _queued_run(http)
        await _move(
            runtime,
            run_id,
            lease_owner=run_execution.reserved_for("worker-elsewhere"),
            lease_expires_at=time.time() + 60,
        )
        async with asyncio.timeout(_DEADLINE_SECONDS):
            response = await _held_poll(http, thread_id, run_id)
    assert response.status_code == 200
    assert response.json()["status"] == "queued"


@pytest.mark.parametrize("path_of", ["another thread", "another project"])
async def test_a_held_poll_of_a_run_created_here_on_another_path_is_not_answered_its_event(
    reserving_app: FastAPI, path_of: str
) -> None:
    """A run this process created is answered without a read while it is
    this process's, but only on its own thread's path in its own project:
    a held poll on another's that is waiting when the run stops here answers
    the 404 a plain GET answers, not the run."""
    runtime: Runtime = reserving_app.state.runtime
    async with runtime.transaction() as session:
        key, _info = await api_keys.create(session, "team-a")
        other_key, _info = await api_keys.create(session, "team-b")
    transport = httpx2.ASGITransport(app=reserving_app)
    async with httpx2.AsyncClient(transport=transport, base_url="http://testserver") as http:
        other_thread = (await _sdk(http, key).beta.threads.create()).id
        thread_id, run_id = await _queued_run(http, key)
        run = (await _get(http, f"/v1/threads/{thread_id}/runs/{run_id}", key)).json()
        poll_thread, poll_key = (other_thread, key) if path_of == "another thread" else (thread_id, other_key)
        async with asyncio.timeout(_DEADLINE_SECONDS):
            poll = _held_poll(http, poll_thread, run_id, poll_key)
            await until(lambda: runtime.bus.watched(run_id) or poll.done(), "the poll held")
            # The run's stopping event, as a cancel here would publish it.
            runtime.bus.publish(run_id, [Event("thread.run.cancelled", {**run, "status": "cancelled"})])
            response = await poll
        plain = await _get(http, f"/v1/threads/{poll_thread}/runs/{run_id}", poll_key)
    assert response.status_code == plain.status_code == 404
    assert response.json() == plain.json()
    if path_of == "another thread":
        assert response.json()["error"]["message"] == f"No run found with id '{run_id}'."


async def _exotic_assistant(sdk: openai.AsyncOpenAI) -> str:
    parameters = {"type": "object", "properties": {"x": {"type": "integer", "maximum": _BIG, "minimum": 1e-7}}}
    assistant = await sdk.beta.assistants.create(
        model="gpt-4o",
        instructions=f"hi {_EXOTIC}",
        tools=[{"type": "function", "function": {"name": "f", "description": _EXOTIC, "parameters": parameters}}],
        metadata={"k": _EXOTIC},
    )
    return assistant.id


async def test_a_create_answers_what_a_get_of_the_run_answers(idle_worker_app: FastAPI) -> None:
    """A create answers the JSON text its queued event carries: the same
    JSON value as a GET of the run, whatever the text holds."""
    transport = httpx2.ASGITransport(app=idle_worker_app)
    async with httpx2.AsyncClient(transport=transport, base_url="http://testserver") as http:
        assistant_id = await _exotic_assistant(_sdk(http))
        thread_id = (await _sdk(http).beta.threads.create()).id
        creates = (
            (f"/v1/threads/{thread_id}/runs", {"assistant_id": assistant_id, "additional_instructions": _EXOTIC}),
            (
                "/v1/threads/runs",
                {"assistant_id": assistant_id, "thread": {"messages": [{"role": "user", "content": _EXOTIC}]}},
            ),
        )
        for path, body in creates:
            created = await http.post(path, json=body, headers={"Authorization": f"Bearer {_KEY}"})
            assert created.status_code == 200, created.text
            run = created.json()
            got = await _get(http, f"/v1/threads/{run['thread_id']}/runs/{run['id']}")
            assert run == got.json()
            assert (
                _EXOTIC in run["instructions"]
                and run["tools"][0]["function"]["parameters"]["properties"]["x"]["maximum"] == _BIG
            )


async def test_a_held_poll_answers_the_stopping_event_as_a_get_would(reserving_app: FastAPI) -> None:
    """A held poll of a run created here hears it stop without a read and
    answers the stopping event's JSON text: the same JSON value as a GET of
    the run; so does the submit of its tool outputs (its queued event's).
    The run's note is forgotten at its stopping event."""
    runtime: Runtime = reserving_app.state.runtime
    worker = runtime.worker
    assert worker is not None
    transport = httpx2.ASGITransport(app=reserving_app)
    async with httpx2.AsyncClient(transport=transport, base_url="http://testserver") as http:
        sdk = _sdk(http)
        assistant_id = await _exotic_assistant(sdk)
        thread = await sdk.beta.threads.create(messages=[{"role": "user", "content": f"[[call f]] {_EXOTIC}"}])
        run = await sdk.beta.threads.runs.create(thread_id=thread.id, assistant_id=assistant_id)
        path = f"/v1/threads/{thread.id}/runs/{run.id}"
        assert len(runtime.created_runs) == 1
        async with asyncio.timeout(_DEADLINE_SECONDS):
            poll = _held_poll(http, thread.id, run.id)
            await until(lambda: runtime.bus.watched(run.id), "the poll held")
            await worker.run_until_idle()
            held = await poll
        got = await _get(http, path)
        assert held.status_code == 200
        assert held.json()["status"] == "requires_action"
        assert held.json() == got.json()
        assert len(runtime.created_runs) == 0
        calls = held.json()["required_action"]["submit_tool_outputs"]["tool_calls"]
        outputs = [{"tool_call_id": call["id"], "output": _EXOTIC} for call in calls]
        submitted = await http.post(
            f"{path}/submit_tool_outputs",
            json={"tool_outputs": outputs},
            headers={"Authorization": f"Bearer {_KEY}"},
        )
        got = await _get(http, path)
    assert submitted.status_code == 200
    assert submitted.json()["status"] == "queued"
    assert submitted.json() == got.json()


def _row(status: str, lease_owner: str | None, lease_expires_at: float | None) -> Any:
    return SimpleNamespace(status=status, lease_owner=lease_owner, lease_expires_at=lease_expires_at)


async def test_a_held_poll_rechecks_sooner_only_after_reading_a_run_anyone_may_claim(
    idle_worker_app: FastAPI,
) -> None:
    """The interval between reads doubles only after a read that found the
    run claimable by any process, and never beyond ``RECHECK_MAX_SECONDS``:
    a read that trusted this worker's reservation or lease leaves it as it was."""
    runtime: Runtime = idle_worker_app.state.runtime
    worker = runtime.worker
    assert worker is not None
    now = time.time()
    first = poll_hold.RECHECK_SECONDS
    reserved = _row("queued", run_execution.reserved_for(worker.owner), now + 1.0)
    assert poll_hold.trusted_for(runtime, reserved, now, first) == (1.0, first)
    leased = _row("in_progress", worker.owner, now + 60.0)
    assert poll_hold.trusted_for(runtime, leased, now, first) == (math.inf, first)
    claimable = _row("queued", None, None)
    assert poll_hold.trusted_for(runtime, claimable, now, first) == (first, 2 * first)
    most = poll_hold.RECHECK_MAX_SECONDS
    assert poll_hold.trusted_for(runtime, claimable, now, most) == (most, most)


def test_the_notes_of_created_runs_are_forgotten_once_of_no_use() -> None:
    """A note past its reservation and grace is forgotten at the next add
    (oldest first) unless this worker executes its run, and when a hold
    finds it lapsed; one this worker executes stays until its stopping
    event."""
    notes = created_runs.CreatedRuns()
    executing = {"run_mine"}
    lapsed = time.time() - created_runs.GRACE_SECONDS - 1.0
    notes.add("run_elsewhere", "proj", "thread", lapsed, executing.__contains__)
    notes.add("run_mine", "proj", "thread", lapsed, executing.__contains__)
    assert len(notes) == 1  # run_elsewhere forgotten
    notes.add("run_new", "proj", "thread", time.time() + 60.0, executing.__contains__)
    assert len(notes) == 2  # run_mine kept
    assert notes.trusted_for(executing.__contains__, "proj", "thread", "run_mine", time.time()) == math.inf
    notes.tap("run_mine", [Event("thread.run.completed", {})])
    assert notes.trusted_for(executing.__contains__, "proj", "thread", "run_mine", time.time()) is None
    assert len(notes) == 1
    assert notes.trusted_for(executing.__contains__, "proj", "thread", "run_new", time.time() + 120.0) is None
    assert len(notes) == 0


async def test_a_held_poll_lets_the_runs_deltas_go_by_and_answers_its_stopping_event(reserving_app: FastAPI) -> None:
    """A poll held over a run being streamed is told of its stopping event
    alone: the deltas published meanwhile wait in no queue of the poll's
    (each woke its task, issue 17), the poll stays held through them, and
    the stopping event after them answers it, as a GET renders the run."""
    runtime: Runtime = reserving_app.state.runtime
    transport = httpx2.ASGITransport(app=reserving_app)
    async with httpx2.AsyncClient(transport=transport, base_url="http://testserver") as http:
        thread_id, run_id = await _queued_run(http)
        run = (await _get(http, f"/v1/threads/{thread_id}/runs/{run_id}")).json()
        async with asyncio.timeout(_DEADLINE_SECONDS):
            poll = _held_poll(http, thread_id, run_id)
            await until(lambda: runtime.bus.watched(run_id) or poll.done(), "the poll held")
            delta = {"id": "msg_x", "object": "thread.message.delta", "delta": {"content": []}}
            for _ in range(3):
                runtime.bus.publish(run_id, [Event("thread.message.delta", delta)] * 100)
                assert not runtime.bus.subscribed(run_id)  # nothing queued for the poll
                await asyncio.sleep(0)  # (the poll's task may run: nothing for it to do)
            assert not poll.done()
            runtime.bus.publish(run_id, [Event("thread.run.cancelled", {**run, "status": "cancelled"})])
            response = await poll
    assert response.status_code == 200
    assert response.json() == {**run, "status": "cancelled"}
    assert not runtime.bus.watched(run_id)
