"""A lone provider run through the API and the official SDK, on both
databases: its create inserts it started (Worker.prepare's fold, issue
17); what a client sees is as before: the create's
answer the run as queued, a stream's events in order from
``thread.run.created``, ``thread.run.queued`` and ``thread.run.in_progress``,
the retrieve's ``openai-poll-after-ms``."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
from fastapi import FastAPI
from sqlalchemy import select

from app import db, llm, orm
from app.runner import execute, prompt
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
    # Only the ticks a wake asks for: a periodic one (its reap, its claim)
    # that a create met under way would leave that run unfolded (the rule of
    # a lone run), a fold these tests assert (1 run in 10 on a busy machine).
    settings.worker_poll_seconds = 3600
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
    # Both databases fold a lone run's start into its create, when its
    # worker is idle and not ticking. A tick can still come between two runs
    # (a wake: on PostgreSQL also a NOTIFY on the workers' channel, heard
    # late; CI's run met one once in a PostgreSQL case with the periodic
    # ticks off, cause not pinned down), and that run is handed or claimed
    # instead, as the lone-run rule says: up to three runs, each streamed in
    # order, until one is folded.
    for _attempt in range(3):
        await asyncio.wait_for(worker.wait_until_released(run_id), 10)  # idle again: the next run is lone
        run_id, names, statuses = await _streamed_run(client, assistant.id, body["thread"])
        assert names[:3] == ["thread.run.created", "thread.run.queued", "thread.run.in_progress"], names
        assert statuses[:3] == ["queued", "queued", "in_progress"] and names[-1] == "thread.run.completed"
        assert names.count("thread.run.in_progress") == 1
        if run_id in folded:
            break
    assert run_id in folded, database_url


async def _streamed_run(client: openai.AsyncOpenAI, assistant_id: str, thread: Any) -> tuple[str, list[str], list[str]]:
    """A thread and run created and streamed to its end: the run's id, and
    its run events' names and statuses in order."""
    run_id, names, statuses = "", [], []
    stream = await client.beta.threads.create_and_run(assistant_id=assistant_id, stream=True, thread=thread)
    async for event in stream:
        if event.event.startswith("thread.run.") and not event.event.startswith("thread.run.step"):
            run_id = event.data.id  # type: ignore[union-attr]
            names.append(event.event)
            statuses.append(event.data.status)  # type: ignore[union-attr]
    return run_id, names, statuses


_HEADERS = {"OpenAI-Beta": "assistants=v2"}


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_sqlite_a_folded_run_on_an_existing_thread_is_prompted_with_the_threads_messages(
    fake_settings: Settings,
    fake: FakeOpenAI,
    app: FastAPI,
    client: openai.AsyncOpenAI,
    http: httpx2.AsyncClient,
    folded: list[str],
) -> None:
    """SQLite: POST /threads/{id}/runs folded, as JSON and then streamed with
    ``additional_messages``: the prompt is the thread's messages as the
    fold's read gives them (the first answer among them), the stream's
    head as before."""
    fake.texts["fake-words"] = ["hello", " world"]
    assistant = await client.beta.assistants.create(model="fake-words", instructions="be brief")
    thread = await client.beta.threads.create(messages=[{"role": "user", "content": "hi"}])
    worker = app.state.runtime.worker
    created = await http.post(f"/v1/threads/{thread.id}/runs", json={"assistant_id": assistant.id}, headers=_HEADERS)
    assert created.status_code == 200 and created.json()["status"] == "queued", created.text
    first_id = created.json()["id"]
    first = await client.beta.threads.runs.poll(first_id, thread_id=thread.id, poll_interval_ms=10)
    assert first.status == "completed", first.last_error
    await asyncio.wait_for(worker.wait_until_released(first_id), 10)  # idle again: the next run is lone
    names: list[str] = []
    statuses: list[str] = []
    second_id = None
    stream = await client.beta.threads.runs.create(
        thread.id, assistant_id=assistant.id, stream=True, additional_messages=[{"role": "user", "content": "again"}]
    )
    async for event in stream:
        if event.event.startswith("thread.run.") and not event.event.startswith("thread.run.step"):
            names.append(event.event)
            statuses.append(event.data.status)  # type: ignore[union-attr]
            second_id = event.data.id  # type: ignore[union-attr]
    assert names[:3] == ["thread.run.created", "thread.run.queued", "thread.run.in_progress"], names
    assert statuses[:3] == ["queued", "queued", "in_progress"] and names[-1] == "thread.run.completed"
    assert names.count("thread.run.in_progress") == 1
    assert second_id in folded  # (the first may meet the worker's first ticks)
    messages = fake.requests[-1]["body"]["messages"]
    assert [(each["role"], each["content"]) for each in messages] == [
        ("system", "be brief"),
        ("user", "hi"),
        ("assistant", "hello world"),
        ("user", "again"),
    ], messages


# A 1x1 PNG.
_PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_sqlite_a_folded_runs_prompt_that_needs_a_read_is_read_on_the_wal_reader(
    fake_settings: Settings,
    fake: FakeOpenAI,
    app: FastAPI,
    client: openai.AsyncOpenAI,
    folded: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SQLite: a folded run whose prompt needs a read (an image file's
    bytes): the fold's session, which never connects (db.READS_ELSEWHERE),
    refuses the read (db.RawSessionConnected) and the prompt is read on a
    WAL reader instead, once: the provider is sent the image, the run's
    start() builds nothing again."""
    built: dict[str, list[tuple[bool, str]]] = {}
    real_build = prompt.build

    async def build(session: Any, *args: Any, **kwargs: Any) -> Any:
        run = args[2]
        elsewhere = db.READS_ELSEWHERE in session.info
        try:
            chat = await real_build(session, *args, **kwargs)
        except db.RawSessionConnected:
            built.setdefault(run.id, []).append((elsewhere, "refused"))
            raise
        built.setdefault(run.id, []).append((elsewhere, "built"))
        return chat

    monkeypatch.setattr(prompt, "build", build)
    fake.texts["fake-words"] = ["a dot"]
    image = await client.files.create(file=("dot.png", _PNG, "image/png"), purpose="vision")
    assistant = await client.beta.assistants.create(model="fake-words")
    worker = app.state.runtime.worker
    thread = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "what is this"},
                    {"type": "image_file", "image_file": {"file_id": image.id}},
                ],
            }
        ]
    }
    run_ids: list[str] = []
    for _ in range(2):  # (the first may meet the worker's first ticks)
        run = await client.beta.threads.create_and_run_poll(
            assistant_id=assistant.id, thread=thread, poll_interval_ms=10
        )
        assert run.status == "completed", run.last_error
        await asyncio.wait_for(worker.wait_until_released(run.id), 10)
        run_ids.append(run.id)
        assert "data:image/png;base64," in json.dumps(fake.requests[-1]["body"]["messages"])
    last = run_ids[-1]
    assert last in folded
    assert built[last] == [(True, "refused"), (False, "built")], built


@pytest.mark.parametrize("update_metadata", [False, True], ids=["as_started", "metadata_updated"])
async def test_a_folded_runs_end_event_is_the_run_as_retrieved(
    fake_settings: Settings,
    app: FastAPI,
    http: httpx2.AsyncClient,
    folded: list[str],
    monkeypatch: pytest.MonkeyPatch,
    update_metadata: bool,
) -> None:
    """A folded run's completed event (made from the object its create sent
    its start as, with the end's fields: issue 17, loopcut2) is the run as
    a retrieve gives it after the end, key for key; with its metadata
    updated through the API while the model answers, the new metadata (the
    end then made again reading the run)."""
    runtime = app.state.runtime
    asked, go_on = asyncio.Event(), asyncio.Event()

    async def gated(_request: Any) -> Any:
        asked.set()
        await go_on.wait()
        yield llm.TextDelta("Hello")
        yield llm.Finish("stop", llm.Usage(3, 2))

    monkeypatch.setattr(runtime.llm, "stream", gated)
    assistant = (await http.post("/v1/assistants", json={"model": "fake-words"}, headers=_HEADERS)).json()
    body = {
        "assistant_id": assistant["id"],
        "metadata": {"b": "2", "a": "1"},
        "thread": {"messages": [{"role": "user", "content": "hi"}]},
    }
    for _attempt in range(3):  # a tick between runs leaves one unfolded (see the first test)
        created = (await http.post("/v1/threads/runs", json=body, headers=_HEADERS)).json()
        run_id, thread_id = created["id"], created["thread_id"]
        await asyncio.wait_for(asked.wait(), 20)
        asked.clear()
        if update_metadata:
            updated = await http.post(
                f"/v1/threads/{thread_id}/runs/{run_id}", json={"metadata": {"stage": "late"}}, headers=_HEADERS
            )
            assert updated.status_code == 200, updated.text
        go_on.set()
        await asyncio.wait_for(runtime.worker.wait_until_released(run_id), 20)
        go_on.clear()
        if run_id in folded:
            break
    assert run_id in folded
    retrieved = (await http.get(f"/v1/threads/{thread_id}/runs/{run_id}", headers=_HEADERS)).json()
    assert retrieved["status"] == "completed"
    async with runtime.transaction() as session:
        query = select(orm.RunEvent.data).where(
            orm.RunEvent.run_id == run_id, orm.RunEvent.event == "thread.run.completed"
        )
        (completed,) = (await session.scalars(query)).all()
    assert completed["metadata"] == ({"stage": "late"} if update_metadata else {"b": "2", "a": "1"})
    assert json.dumps(completed) == json.dumps(retrieved)  # key order at every depth
