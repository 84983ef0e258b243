"""A handed run is the run its claim would read, value for value (issue 17):
its row from the create's own values and its earlier messages as the
create noted them (run_execution.handed_run) against a twin's, claimed by a
tick (run_execution.claim_runs). Compared as the model gets them, key order
and number types kept: a provider is sent what they serialise to, a
cassette is keyed by the values and their numbers' types (app/cassettes.py),
and the offline model's answer to a json_schema follows the order of its
properties. Found by a cassette's miss (CI, the plugin's
record-then-replay test): SQLite's RETURNING gave the claimed run
``"temperature": 1`` where the handed one sent ``1.0``; on PostgreSQL the
claim read JSON values back from jsonb, its keys reordered (its columns are
json since migration 0016_pgjson: the text as written, on both)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from app import orm
from app.llm import chat_body
from app.runner import execute
from app.runtime import Runtime
from app.services import run_state
from app.settings import Settings
from app.worker import Worker
from tests.runner.fake_openai import FakeOpenAI
from tests.runner.test_hand_off import (
    _assistant,
    _count_hand_offs,
    _create,
    _create_on,
    _looping,
    _row,
    _thread,
    bare_runtime,
)

__all__ = ["bare_runtime"]  # (a fixture, by import)

pytestmark = pytest.mark.timeout(60)

_ON_SQLITE = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)

# No temperature nor top_p: the run takes 1.0 (services/runs), a whole
# number in a REAL column. Objects' keys out of jsonb's order (shortest
# first), which PostgreSQL's columns kept before migration 0016_pgjson: a
# function's parameters, the metadata, a json_schema's properties.
_OPTIONS: dict[str, Any] = {
    "instructions": "Be brief.",
    "metadata": {"zone": "eu", "a": "1"},
    "tools": [
        {
            "type": "function",
            "function": {
                "name": "lookup",
                "description": "Looks things up.",
                "parameters": {
                    "type": "object",
                    "properties": {
                        "question": {"type": "string"},
                        "n": {"type": "number", "minimum": 1.0, "maximum": float("nan"), "multipleOf": 1e23},
                    },
                    "required": ["question"],
                },
            },
        }
    ],
    "response_format": {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": {"type": "object", "properties": {"summary": {}, "id": {}}}},
    },
    "truncation_strategy": {"type": "last_messages", "last_messages": 8},
}

# Messages of several shapes: parts, an image by URL, characters JSON escapes.
_MESSAGES: list[dict[str, Any]] = [
    {"role": "user", "content": 'h\u00e9llo \u2028 "quoted" \\ back'},
    {
        "role": "assistant",
        "content": [
            {"type": "text", "text": "two parts"},
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png", "detail": "low"}},
        ],
    },
    {"role": "user", "content": "and \U0001f600", "metadata": {"k": "v"}},
]

_USER_TEXTS = [message["content"] for message in _MESSAGES if message["role"] == "user"]

# What differs between two runs made alike: ids, times, and the lease.
_OWN = {"id", "thread_id", "seq", "created_at", "expires_at", "started_at", "lease_owner", "lease_expires_at"}


def _seen(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """Each run's model requests as a provider receives them
    (llm.chat_body as JSON, key order and number types kept), each after
    the run's values as the execution took them (repr: 1 is not 1.0)."""
    seen: dict[str, list[str]] = {}
    original = execute.RunExecution._chat_request

    def noted(self: execute.RunExecution, run: orm.Run, *args: Any) -> Any:
        request = original(self, run, *args)
        values = {key: run.__dict__.get(key) for key in run_state.RUN_COLUMNS if key not in _OWN}
        seen.setdefault(run.id, []).extend([repr(values), json.dumps(chat_body(request), ensure_ascii=False)])
        return request

    monkeypatch.setattr(execute.RunExecution, "_chat_request", noted)
    return seen


async def _last_answer(runtime: Runtime, thread_id: str) -> Any:
    async with runtime.transaction() as session:
        query = orm.Message.__table__.select().where(orm.Message.thread_id == thread_id)
        row = (await session.execute(query.order_by(orm.Message.seq.desc()).limit(1))).one()
    assert row.role == "assistant"
    return row.content


async def _handed_and_claimed(runtime: Runtime, worker: Worker, create: Any) -> tuple[orm.Run, orm.Run]:
    """A run made by ``create`` handed, then its twin claimed by a tick; both ended."""
    handed = await create()
    assert worker.hand(handed)
    await worker._handed()
    await worker.run_until_idle()
    claimed = await create()
    await worker.run_until_idle()
    return handed, claimed


@pytest.mark.parametrize(
    ("database_url", "on_thread"),
    [("sqlite", False), ("postgres", False), ("sqlite", True)],
    ids=["sqlite-new thread", "postgres-new thread", "sqlite-existing thread"],
    indirect=["database_url"],
)  # (a run on an existing thread is handed on SQLite alone)
async def test_the_offline_model_is_asked_and_answers_alike_handed_or_claimed(
    bare_runtime: Runtime, monkeypatch: pytest.MonkeyPatch, on_thread: bool
) -> None:
    runtime = bare_runtime
    worker = _looping(Worker(runtime))
    seen, hand_offs = _seen(monkeypatch), _count_hand_offs(monkeypatch)
    assistant_id = await _assistant(runtime)

    async def create() -> orm.Run:
        if on_thread:
            thread_id = await _thread(runtime, _USER_TEXTS)
            return await _create_on(runtime, worker, thread_id, assistant_id=assistant_id, **_OPTIONS)
        return await _create(runtime, worker, (), assistant_id, thread={"messages": _MESSAGES}, **_OPTIONS)

    handed, claimed = await _handed_and_claimed(runtime, worker, create)
    assert [execution.run_id for execution in hand_offs] == [handed.id]
    assert len(seen[handed.id]) == 2
    assert seen[handed.id] == seen[claimed.id]
    for run in (handed, claimed):
        assert (await _row(runtime, run.id)).status == "completed"
    answers = [await _last_answer(runtime, run.thread_id) for run in (handed, claimed)]
    assert json.loads(answers[0][0]["text"]["value"]) == {"summary": None, "id": None}
    assert json.dumps(answers[0]) == json.dumps(answers[1])  # the same properties, in the same order
    await worker.stop()


@pytest.fixture(params=["direct", "litellm"])
async def routed_runtime(
    request: pytest.FixtureRequest, settings: Settings, fake: FakeOpenAI, tmp_path: Path
) -> AsyncIterator[Runtime]:
    """A runtime whose every model is the fake provider's, by this server's
    own HTTP request or through litellm."""
    entry = {"model": "openai/*", "api_base": fake.api_base, "api_key": "sk-fake", "max_retries": 0}
    config = {"model_list": [{"model_name": "*", "litellm_params": entry, "direct": request.param == "direct"}]}
    path = tmp_path / "models.json"
    path.write_text(json.dumps(config))
    settings.llm_config = path
    runtime = await Runtime.start(settings)
    try:
        yield runtime
    finally:
        await runtime.close()


@pytest.mark.parametrize(
    ("database_url", "on_thread"),
    [("sqlite", False), ("sqlite", True), ("postgres", False)],
    ids=["sqlite-new thread", "sqlite-existing thread", "postgres-new thread"],
    indirect=["database_url"],
)  # (a run on an existing thread is handed on SQLite alone)
@pytest.mark.parametrize("options", [{}, _OPTIONS], ids=["plain", "options"])
async def test_a_provider_gets_the_same_request_bytes_from_a_handed_run_as_from_a_claimed_one(
    routed_runtime: Runtime,
    fake: FakeOpenAI,
    monkeypatch: pytest.MonkeyPatch,
    on_thread: bool,
    options: dict[str, Any],
) -> None:
    """A provider's run is handed (on PostgreSQL too: its start the
    hand-off's one statement), and its request is byte for byte its claimed
    twin's (a cassette recorded from one is replayed for the other)."""
    runtime = routed_runtime
    worker = _looping(Worker(runtime))
    hand_offs = _count_hand_offs(monkeypatch)
    assistant_id = await _assistant(runtime)
    fields = {**options, "model": "fake-no-usage"}

    async def create() -> orm.Run:
        if on_thread:
            thread_id = await _thread(runtime, ["Tell me"])
            return await _create_on(runtime, worker, thread_id, assistant_id=assistant_id, **fields)
        return await _create(runtime, worker, ("Tell me",), assistant_id, **fields)

    handed, claimed = await _handed_and_claimed(runtime, worker, create)
    assert [execution.run_id for execution in hand_offs] == [handed.id]
    for run in (handed, claimed):
        row = await _row(runtime, run.id)
        assert row.status == "completed", row.last_error
    first, second = (json.dumps(sent["body"], ensure_ascii=False) for sent in fake.requests)
    assert '"temperature": 1.0' in first
    assert first == second
    await worker.stop()
