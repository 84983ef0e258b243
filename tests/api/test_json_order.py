"""The JSON a user gives keeps its key order on both databases, as OpenAI
keeps it: a function's ``parameters`` and a json_schema reach the provider
with their properties in the user's order (structured outputs generate
fields in schema order), a read gives back ``metadata``, ``tools`` and
``response_format`` as written, and the run event log replays a stream's
run objects as the live stream gave them. PostgreSQL's jsonb sorted each
object's keys (shortest first): its JSON columns are json (migration
0016_pgjson)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest

from app.settings import Settings
from tests.runner.fake_openai import FakeOpenAI

pytestmark = pytest.mark.timeout(60)

# Keys out of every sorted order (jsonb's is shortest first, then bytewise).
_ORDER = ["zeta", "a", "middle"]
_PROPERTIES = {name: {"type": "string"} for name in _ORDER}
_PARAMETERS = {"type": "object", "properties": _PROPERTIES, "required": ["zeta"]}
_TOOLS: Any = [{"type": "function", "function": {"name": "lookup", "parameters": _PARAMETERS}}]
_SCHEMA = {"name": "answer", "schema": {"type": "object", "properties": _PROPERTIES}}
_RESPONSE_FORMAT: Any = {"type": "json_schema", "json_schema": _SCHEMA}
_METADATA = {"b": "1", "a": "2"}


@pytest.fixture
def fake_settings(settings: Settings, fake: FakeOpenAI, tmp_path: Path) -> Settings:
    """Every model to the fake provider, by this server's own request; the
    admin API on (its model-request log)."""
    entry = {"model": "openai/*", "api_base": fake.api_base, "api_key": "sk-fake", "max_retries": 0}
    path = tmp_path / "models.json"
    path.write_text(json.dumps({"model_list": [{"model_name": "*", "litellm_params": entry, "direct": True}]}))
    settings.llm_config = path
    settings.admin_api = True
    return settings


def _assert_ordered(obj: dict[str, Any], *, tools: str = "tools") -> None:
    """``obj`` (an assistant or a run, as decoded in its text's order) has
    the user's key orders."""
    assert list(obj["metadata"]) == list(_METADATA)
    assert list(obj[tools][0]["function"]["parameters"]["properties"]) == _ORDER
    assert list(obj["response_format"]["json_schema"]["schema"]["properties"]) == _ORDER


def _assert_request_ordered(body: dict[str, Any]) -> None:
    assert list(body["tools"][0]["function"]["parameters"]["properties"]) == _ORDER
    assert list(body["response_format"]["json_schema"]["schema"]["properties"]) == _ORDER


async def _assistant(client: openai.AsyncOpenAI) -> str:
    created = await client.beta.assistants.with_raw_response.create(
        model="fake-no-usage", tools=_TOOLS, response_format=_RESPONSE_FORMAT, metadata=_METADATA
    )
    _assert_ordered(json.loads(created.text))
    return created.parse().id


async def test_a_read_gives_back_the_key_order_written(fake_settings: Settings, client: openai.AsyncOpenAI) -> None:
    assistant_id = await _assistant(client)
    read = await client.beta.assistants.with_raw_response.retrieve(assistant_id)
    _assert_ordered(json.loads(read.text))
    parsed = read.parse()
    assert list(parsed.metadata or {}) == list(_METADATA)  # as a user's model_dump() has it
    listed = await client.beta.assistants.with_raw_response.list()
    _assert_ordered(json.loads(listed.text)["data"][0])


async def test_the_provider_and_the_request_log_get_the_properties_in_order(
    fake_settings: Settings, client: openai.AsyncOpenAI, http: httpx2.AsyncClient, fake: FakeOpenAI
) -> None:
    assistant_id = await _assistant(client)
    thread = await client.beta.threads.create(messages=[{"role": "user", "content": "Tell me"}])
    run = await client.beta.threads.runs.create_and_poll(
        thread_id=thread.id, assistant_id=assistant_id, metadata=_METADATA
    )
    assert run.status == "completed", run.last_error
    (sent,) = fake.requests
    _assert_request_ordered(sent["body"])
    log = await http.get("/admin/model_requests", params={"run_id": run.id})
    assert log.status_code == 200, log.text
    (logged,) = log.json()["data"]
    _assert_request_ordered(logged["request"])
    read = await client.beta.threads.runs.with_raw_response.retrieve(run.id, thread_id=thread.id)
    _assert_ordered(json.loads(read.text))


def _run_frames(text: str) -> list[tuple[str, str]]:
    """Each run object's event and its data's text, in a stream's order."""
    frames = []
    for block in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if fields.get("event", "").startswith("thread.run.") and not fields["event"].startswith("thread.run.step"):
            frames.append((fields["event"], fields["data"]))
    return frames


async def test_the_event_log_replays_run_objects_as_the_stream_gave_them(
    fake_settings: Settings, client: openai.AsyncOpenAI, http: httpx2.AsyncClient
) -> None:
    assistant_id = await _assistant(client)
    thread = await client.beta.threads.create(messages=[{"role": "user", "content": "Tell me"}])
    body = {"assistant_id": assistant_id, "stream": True, "metadata": _METADATA}
    live = await http.post(f"/v1/threads/{thread.id}/runs", json=body)
    assert live.status_code == 200
    streamed = _run_frames(live.text)
    assert [event for event, _data in streamed] == [
        "thread.run.created",
        "thread.run.queued",
        "thread.run.in_progress",
        "thread.run.completed",
    ]
    for _event, data in streamed:
        _assert_ordered(json.loads(data))
    run_id = json.loads(streamed[0][1])["id"]
    replayed = await http.get(f"/v1/threads/{thread.id}/runs/{run_id}/events")
    assert replayed.status_code == 200
    assert _run_frames(replayed.text) == streamed  # the same text, key for key
