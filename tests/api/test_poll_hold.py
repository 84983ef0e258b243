"""The SDK poller's held GET (app/api/poll_hold.py) when another process
executes the run: its stopping event is published there, never on this
process's bus, so the hold must not wait for it (``serve --workers 2``)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx2
import openai
import pytest
from sqlalchemy import update

from app import orm
from app.main import create_app
from app.runner import execute
from app.runtime import Runtime
from app.services import run_execution, runs
from app.settings import Settings

# Far beyond each test's deadline: a hold that waits it out fails the test.
_HOLD_MS = 60_000
_DEADLINE_SECONDS = 15.0


@pytest.fixture
async def idle_worker_app(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Any]:
    """The app with its in-process worker, which claims nothing: the runs it
    creates stay queued, reserved for that worker, for the test to move as
    another process's worker would."""

    async def claim_nothing(*_args: Any, **_kwargs: Any) -> list[Any]:
        return []

    monkeypatch.setattr(execute, "claim_and_start", claim_nothing)
    application = create_app(settings.model_copy(update={"poll_hold_ms": _HOLD_MS}))
    async with application.router.lifespan_context(application):
        yield application


async def _queued_run(http: httpx2.AsyncClient) -> tuple[str, str]:
    sdk = openai.AsyncOpenAI(base_url="http://testserver/v1", api_key="sk-test", http_client=http, max_retries=0)
    assistant = await sdk.beta.assistants.create(model="gpt-4o")
    run = await sdk.beta.threads.create_and_run(
        assistant_id=assistant.id, thread={"messages": [{"role": "user", "content": "Hello"}]}
    )
    assert run.status == "queued"
    return run.thread_id, run.id


async def _move(runtime: Runtime, run_id: str, **values: Any) -> None:
    async with runtime.transaction() as session:
        await session.execute(update(orm.Run).where(orm.Run.id == run_id).values(**values))


def _held_poll(http: httpx2.AsyncClient, thread_id: str, run_id: str) -> asyncio.Task[httpx2.Response]:
    path = f"/v1/threads/{thread_id}/runs/{run_id}"
    return asyncio.create_task(http.get(path, headers={"X-Stainless-Poll-Helper": "true"}))


async def test_a_held_poll_ends_once_another_process_claims_the_run(
    idle_worker_app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run is reserved for this process when the poll reads it; its
    reservation lapses and another process's worker claims it while the poll
    is held: the poll answers the run as it now is (in progress), with the
    poller's interval, instead of holding ``poll_hold_ms``."""
    runtime: Runtime = idle_worker_app.state.runtime
    transport = httpx2.ASGITransport(app=idle_worker_app)
    async with httpx2.AsyncClient(transport=transport, base_url="http://testserver") as http:
        thread_id, run_id = await _queued_run(http)
        read = asyncio.Event()
        get_row = runs.get_row

        async def noting_reads(*args: Any) -> runs.RunRow:
            row = await get_row(*args)
            read.set()
            return row

        monkeypatch.setattr(runs, "get_row", noting_reads)
        async with asyncio.timeout(_DEADLINE_SECONDS):
            poll = _held_poll(http, thread_id, run_id)
            await read.wait()
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


async def test_a_held_poll_of_a_run_reserved_for_another_process_answers_at_once(idle_worker_app: Any) -> None:
    """A queued run reserved for another process's worker is not this
    process's to execute: the poll answers it as it is."""
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


async def test_a_held_poll_of_a_run_created_here_checks_its_thread(idle_worker_app: Any) -> None:
    """A run this process created is answered without a read while it runs
    here, but only on its own thread's path: another thread's is the 404 a
    read words."""
    transport = httpx2.ASGITransport(app=idle_worker_app)
    async with httpx2.AsyncClient(transport=transport, base_url="http://testserver") as http:
        _thread_id, run_id = await _queued_run(http)
        other = (await http.post("/v1/threads", json={})).json()["id"]
        async with asyncio.timeout(_DEADLINE_SECONDS):
            response = await _held_poll(http, other, run_id)
    assert response.status_code == 404
    assert response.json()["error"]["message"] == f"No run found with id '{run_id}'."
