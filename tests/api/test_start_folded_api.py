"""A lone provider run through the API and the official SDK, on both
databases: its create inserts it started (Worker.prepare's fold, issue
17); what a client sees is as before: the create's
answer the run as queued, a stream's events in order from
``thread.run.created``, ``thread.run.queued`` and ``thread.run.in_progress``,
the retrieve's ``openai-poll-after-ms``."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
from fastapi import FastAPI

from app.runner import execute
from app.settings import Settings
from tests.runner.fake_openai import FakeOpenAI

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def fake_settings(settings: Settings, fake: FakeOpenAI, tmp_path: Path) -> Settings:
    """Every model to the fake provider, on a direct route."""
    entry = {"model": "openai/*", "api_base": fake.api_base, "api_key": "sk-fake", "max_retries": 0}
    path = tmp_path / "models.json"
    path.write_text(json.dumps({"model_list": [{"model_name": "*", "litellm_params": entry, "direct": True}]}))
    settings.llm_config = path
    return settings


@pytest.fixture
def folded(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The runs whose hand-off found them started by their create."""
    taken: list[str] = []
    real = execute.take_started

    async def noted(runtime: Any, owner: str, created: Any, *args: Any) -> Any:
        taken.append(created.id)
        return await real(runtime, owner, created, *args)

    monkeypatch.setattr(execute, "take_started", noted)
    return taken


async def test_a_lone_provider_runs_create_answers_it_queued_and_its_stream_goes_on_in_order(
    fake_settings: Settings,
    fake: FakeOpenAI,
    app: FastAPI,
    client: openai.AsyncOpenAI,
    http: httpx2.AsyncClient,
    folded: list[str],
    database_url: str,
) -> None:
    fake.texts["fake-words"] = ["hello", " world"]
    assistant = await client.beta.assistants.create(model="fake-words")
    body = {"assistant_id": assistant.id, "thread": {"messages": [{"role": "user", "content": "hi"}]}}
    created = await http.post("/v1/threads/runs", json=body, headers={"OpenAI-Beta": "assistants=v2"})
    assert created.status_code == 200 and created.json()["status"] == "queued"
    run_id, thread_id = created.json()["id"], created.json()["thread_id"]
    run = await client.beta.threads.runs.poll(run_id, thread_id=thread_id, poll_interval_ms=10)
    assert run.status == "completed", run.last_error
    retrieved = await http.get(f"/v1/threads/{thread_id}/runs/{run_id}", headers={"OpenAI-Beta": "assistants=v2"})
    assert retrieved.headers["openai-poll-after-ms"] == str(fake_settings.poll_after_ms)
    worker = app.state.runtime.worker
    await asyncio.wait_for(worker.wait_until_released(run_id), 10)  # idle again: the next run is lone
    names: list[str] = []
    statuses: list[str] = []
    stream = await client.beta.threads.create_and_run(assistant_id=assistant.id, stream=True, thread=body["thread"])
    async for event in stream:
        if event.event.startswith("thread.run.") and not event.event.startswith("thread.run.step"):
            names.append(event.event)
            statuses.append(event.data.status)  # type: ignore[union-attr]
    assert names[:3] == ["thread.run.created", "thread.run.queued", "thread.run.in_progress"], names
    assert statuses[:3] == ["queued", "queued", "in_progress"] and names[-1] == "thread.run.completed"
    assert names.count("thread.run.in_progress") == 1
    # Both databases fold a lone run's start into its create (when its
    # worker is idle and not ticking: the first run may meet the worker's
    # first ticks).
    assert folded, database_url
