"""The bytes on the wire: event names, payloads and order of wire notes 3.4
(a), (b) and (c), strict SSE framing, and errors that stay plain JSON.
Every stream also passes tests/streaming/rules.py (schemas and accumulator
rules) as it is read."""

from __future__ import annotations

from typing import Any

import httpx2
import openai
import pytest

from tests.streaming.conftest import LiveServer
from tests.streaming.rules import SSE, names
from tests.streaming.support import of, poll_run, stream, thread_with

pytestmark = pytest.mark.timeout(60)

RUN_START = ["thread.run.created", "thread.run.queued", "thread.run.in_progress"]
MESSAGE = [
    "thread.run.step.created",
    "thread.run.step.in_progress",
    "thread.message.created",
    "thread.message.in_progress",
    "thread.message.delta*",
    "thread.message.completed",
    "thread.run.step.completed",
]
TOOL_CALLS = ["thread.run.step.created", "thread.run.step.in_progress", "thread.run.step.delta*"]


def test_text_run(raw: httpx2.Client, sdk: openai.OpenAI, assistant_id: str) -> None:
    thread_id = thread_with(sdk, "Hello there")
    response, events, _ = stream(raw, f"/threads/{thread_id}/runs", {"assistant_id": assistant_id})
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["x-request-id"].startswith("req_")
    assert names(events) == [*RUN_START, *MESSAGE, "thread.run.completed", "done"]

    created, queued, started = events[0].data, events[1].data, events[2].data
    assert created["status"] == queued["status"] == "queued"
    assert created["expires_at"] == created["created_at"] + 600 and created["started_at"] is None
    assert started["status"] == "in_progress" and started["started_at"] is not None

    step = of(events, "thread.run.step.created")[0]
    message = of(events, "thread.message.created")[0]
    assert step["type"] == "message_creation"
    assert step["step_details"] == {"type": "message_creation", "message_creation": {"message_id": message["id"]}}
    assert message["status"] == "in_progress" and message["content"] == [] and message["run_id"] == created["id"]

    parts = [delta["delta"]["content"][0] for delta in of(events, "thread.message.delta")]
    assert [part["index"] for part in parts] == [0] * len(parts)
    assert parts[0]["text"]["annotations"] == [] and all("annotations" not in p["text"] for p in parts[1:])
    assert "".join(part["text"]["value"] for part in parts) == "You said: Hello there"

    completed = of(events, "thread.message.completed")[0]
    assert completed["status"] == "completed" and completed["completed_at"] is not None
    assert completed["content"] == [{"type": "text", "text": {"value": "You said: Hello there", "annotations": []}}]
    assert raw.get(f"/threads/{thread_id}/messages/{message['id']}").json() == completed
    step_done = of(events, "thread.run.step.completed")[0]
    assert step_done["id"] == step["id"] and step_done["usage"]["completion_tokens"] == len(parts)
    run = events[-2].data
    assert run["completed_at"] is not None and run["expires_at"] is None and run["usage"]["total_tokens"] > 0
    assert raw.get(f"/threads/{thread_id}/runs/{run['id']}").json() == run


def _requires_action(raw: httpx2.Client, sdk: openai.OpenAI, assistant_id: str, script: str) -> tuple[str, list[SSE]]:
    thread_id = thread_with(sdk, f"Weather? {script}")
    _, events, _ = stream(raw, f"/threads/{thread_id}/runs", {"assistant_id": assistant_id})
    return thread_id, events


def test_run_stopping_at_requires_action(raw: httpx2.Client, sdk: openai.OpenAI, assistant_id: str) -> None:
    thread_id, events = _requires_action(raw, sdk, assistant_id, '[[call get_weather {"city": "Tokyo"}]]')
    assert names(events) == [*RUN_START, *TOOL_CALLS, "thread.run.requires_action", "done"]

    step = of(events, "thread.run.step.created")[0]
    assert step["type"] == "tool_calls" and step["step_details"] == {"type": "tool_calls", "tool_calls": []}
    deltas = [delta["delta"]["step_details"]["tool_calls"] for delta in of(events, "thread.run.step.delta")]
    first = deltas[0][0]
    assert first == {
        "index": 0,
        "id": first["id"],
        "type": "function",
        "function": {"name": "get_weather", "arguments": "", "output": None},
    }
    assert [call for (call,) in deltas[1:]] == [
        {"index": 0, "type": "function", "function": {"arguments": '{"city":'}},
        {"index": 0, "type": "function", "function": {"arguments": ' "Tokyo"}'}},
    ]
    run = events[-2].data
    assert run["required_action"]["submit_tool_outputs"]["tool_calls"] == [
        {"id": first["id"], "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Tokyo"}'}}
    ]
    assert run["usage"] is not None
    # No step.completed: the tool step waits for the outputs.
    listed = raw.get(f"/threads/{thread_id}/runs/{run['id']}/steps").json()["data"]
    assert [(s["id"], s["status"]) for s in listed] == [(step["id"], "in_progress")]


def test_submit_tool_outputs_continuation(raw: httpx2.Client, sdk: openai.OpenAI, assistant_id: str) -> None:
    thread_id, events = _requires_action(raw, sdk, assistant_id, '[[call get_weather {"city": "Tokyo"}]]')
    run_id, step_id = events[0].data["id"], of(events, "thread.run.step.created")[0]["id"]
    call_id = events[-2].data["required_action"]["submit_tool_outputs"]["tool_calls"][0]["id"]

    body = {"tool_outputs": [{"tool_call_id": call_id, "output": '{"temp": 22}'}]}
    _, events, _ = stream(raw, f"/threads/{thread_id}/runs/{run_id}/submit_tool_outputs", body)
    assert names(events) == [
        "thread.run.step.completed",
        "thread.run.queued",
        "thread.run.in_progress",
        *MESSAGE,
        "thread.run.completed",
        "done",
    ]
    earlier = events[0].data
    assert earlier["id"] == step_id and earlier["status"] == "completed" and earlier["usage"] is not None
    assert earlier["step_details"]["tool_calls"][0]["function"]["output"] == '{"temp": 22}'
    assert events[1].data["status"] == "queued" and events[1].data["required_action"] is None
    answer = of(events, "thread.message.completed")[0]["content"][0]["text"]["value"]
    assert answer == 'Tool results: get_weather -> {"temp": 22}'


def test_create_thread_and_run_opens_with_the_thread(raw: httpx2.Client, assistant_id: str) -> None:
    body = {"assistant_id": assistant_id, "thread": {"messages": [{"role": "user", "content": "Hi"}]}}
    _, events, _ = stream(raw, "/threads/runs", body)
    assert names(events) == ["thread.created", *RUN_START, *MESSAGE, "thread.run.completed", "done"]
    thread = events[0].data
    assert thread["object"] == "thread" and events[1].data["thread_id"] == thread["id"]
    assert raw.get(f"/threads/{thread['id']}").json() == thread


def test_parallel_tool_calls_are_indexed_from_zero(raw: httpx2.Client, sdk: openai.OpenAI, assistant_id: str) -> None:
    script = '[[call get_weather {"city": "Tokyo"}]] [[call get_weather {"city": "Paris"}]]'
    _, events = _requires_action(raw, sdk, assistant_id, script)
    calls = [
        call for delta in of(events, "thread.run.step.delta") for call in delta["delta"]["step_details"]["tool_calls"]
    ]
    firsts = [call for call in calls if "id" in call]
    assert [call["index"] for call in firsts] == [0, 1]
    assert len(events[-2].data["required_action"]["submit_tool_outputs"]["tool_calls"]) == 2


def test_text_before_a_tool_call_is_closed_first(raw: httpx2.Client, sdk: openai.OpenAI, assistant_id: str) -> None:
    script = '[[reply Let me check.]] [[call get_weather {"city": "Tokyo"}]]'
    _, events = _requires_action(raw, sdk, assistant_id, script)
    assert names(events) == [*RUN_START, *MESSAGE, *TOOL_CALLS, "thread.run.requires_action", "done"]
    assert of(events, "thread.message.completed")[0]["content"][0]["text"]["value"] == "Let me check."


def test_failure_mid_stream_ends_with_run_failed(raw: httpx2.Client, sdk: openai.OpenAI, assistant_id: str) -> None:
    thread_id = thread_with(sdk, "one two three four five [[fail server_error after 3]]")
    _, events, _ = stream(raw, f"/threads/{thread_id}/runs", {"assistant_id": assistant_id})
    assert names(events) == [
        *RUN_START,
        *MESSAGE[:5],
        "thread.run.step.failed",
        "thread.message.incomplete",
        "thread.run.failed",
        "done",
    ]
    assert len(of(events, "thread.message.delta")) == 3
    run = events[-2].data
    assert run["last_error"]["code"] == "server_error" and run["failed_at"] is not None
    message = of(events, "thread.message.incomplete")[0]
    assert message["incomplete_details"] == {"reason": "run_failed"}
    assert message["content"][0]["text"]["value"] == "You said: one"
    assert poll_run(sdk, thread_id, run["id"]).status == "failed"


def test_keepalives_while_the_model_is_slow(raw: httpx2.Client, sdk: openai.OpenAI, assistant_id: str) -> None:
    thread_id = thread_with(sdk, "Hi [[delay 700]]")
    _, events, keepalives = stream(raw, f"/threads/{thread_id}/runs", {"assistant_id": assistant_id})
    assert events[-2].event == "thread.run.completed"
    assert keepalives >= 2


def _json_error(response: httpx2.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error: dict[str, Any] = response.json()["error"]
    return error


def test_errors_before_the_stream_are_plain_json(raw: httpx2.Client, sdk: openai.OpenAI, assistant_id: str) -> None:
    thread_id = thread_with(sdk, "Hi")
    answer = raw.post(f"/threads/{thread_id}/runs", json={"assistant_id": "asst_nope", "stream": True})
    assert _json_error(answer, 404)["message"] == "No assistant found with id 'asst_nope'."
    answer = raw.post("/threads/runs", json={"stream": True})
    assert _json_error(answer, 400)["message"] == "Missing required parameter: 'assistant_id'."
    answer = raw.post("/threads/thread_nope/runs", json={"assistant_id": assistant_id, "stream": True})
    assert _json_error(answer, 404)["message"] == "No thread found with id 'thread_nope'."

    locked, events = _requires_action(raw, sdk, assistant_id, "[[call get_weather]]")
    run_id = events[0].data["id"]
    answer = raw.post(f"/threads/{locked}/runs", json={"assistant_id": assistant_id, "stream": True})
    assert _json_error(answer, 400)["message"] == f"Thread {locked} already has an active run {run_id}."
    body = {"tool_outputs": [{"tool_call_id": "call_wrong", "output": "x"}], "stream": True}
    answer = raw.post(f"/threads/{locked}/runs/{run_id}/submit_tool_outputs", json=body)
    assert _json_error(answer, 400)["message"].startswith("Expected tool outputs for call_ids")

    run = sdk.beta.threads.runs.create_and_poll(thread_id=thread_id, assistant_id=assistant_id)
    body = {"tool_outputs": [], "stream": True}
    answer = raw.post(f"/threads/{thread_id}/runs/{run.id}/submit_tool_outputs", json=body)
    assert _json_error(answer, 400)["message"] == 'Runs in status "completed" do not accept tool outputs.'


def test_the_body_chooses_streaming_not_accept(raw: httpx2.Client, sdk: openai.OpenAI, assistant_id: str) -> None:
    sse = {"Accept": "text/event-stream"}
    for stream_field in ({}, {"stream": False}, {"stream": None}):
        thread_id = thread_with(sdk, "Hi")
        body = {"assistant_id": assistant_id, **stream_field}
        answer = raw.post(f"/threads/{thread_id}/runs", json=body, headers=sse)
        assert answer.status_code == 200 and answer.headers["content-type"] == "application/json"
        assert answer.json()["status"] == "queued"
        poll_run(sdk, thread_id, answer.json()["id"])
    thread_id = thread_with(sdk, "Hi")
    with raw.stream(
        "POST", f"/threads/{thread_id}/runs", json={"assistant_id": assistant_id, "stream": True}
    ) as answer:
        assert answer.headers["content-type"].startswith("text/event-stream")
        assert b"event: done\ndata: [DONE]\n\n" in answer.read()


def test_azure_paths_stream_too(live: LiveServer, raw: httpx2.Client, sdk: openai.OpenAI, assistant_id: str) -> None:
    thread_id = thread_with(sdk, "Hi")
    url = f"http://127.0.0.1:{live.port}/openai/threads/{thread_id}/runs?api-version=2024-05-01-preview"
    _, events, _ = stream(raw, url, {"assistant_id": assistant_id})
    assert events[-2].event == "thread.run.completed"
