"""GET /threads/{thread_id}/runs/{run_id}/events (issue 11): a run's event
log as SSE, from the start or from a sequence number (``after``,
``Last-Event-ID``), then live until the run stops for the stream; the same
frames, ids included, as the stream that created the run."""

from __future__ import annotations

import threading
from typing import Any

import httpx2
import openai
import pytest

from tests import oas
from tests.streaming import rules
from tests.streaming.rules import SSE, names
from tests.streaming.support import poll_run, stream, thread_with

pytestmark = pytest.mark.timeout(60)

WEATHER_TOOL: Any = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
}


def _events(raw: httpx2.Client, thread_id: str, run_id: str, **options: Any) -> list[SSE]:
    """The events of one GET; a stream from the start is checked like any
    stream (a resumed one continues objects created before it)."""
    resumed = "params" in options or "headers" in options
    with raw.stream("GET", f"/threads/{thread_id}/runs/{run_id}/events", **options) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        if resumed:
            return [item for item in rules.frames(response.iter_raw()) if isinstance(item, SSE)]
        events, _keepalives = rules.read(response.iter_raw())
    return events


def _seen(events: list[SSE]) -> list[tuple[int | None, str, Any]]:
    return [(event.id, event.event, event.data) for event in events]


def test_the_log_replays_the_stream_that_created_the_run(
    raw: httpx2.Client, sdk: openai.OpenAI, assistant_id: str
) -> None:
    thread_id = thread_with(sdk, "Hello log")
    _response, streamed, _ = stream(raw, f"/threads/{thread_id}/runs", {"assistant_id": assistant_id})
    run_id = streamed[0].data["id"]
    assert [event.id for event in streamed[:-1]] == list(range(1, len(streamed)))
    assert _seen(_events(raw, thread_id, run_id)) == _seen(streamed)
    # From a sequence number: the query parameter, or the header EventSource sends on reconnect.
    middle = streamed[5].id
    assert _seen(_events(raw, thread_id, run_id, params={"after": middle})) == _seen(streamed[6:])
    by_header = _events(raw, thread_id, run_id, headers={"Last-Event-ID": str(middle)})
    assert _seen(by_header) == _seen(streamed[6:])
    # After its last event a finished run has nothing more: done at once.
    last = streamed[-2].id
    assert _seen(_events(raw, thread_id, run_id, params={"after": last})) == [(None, "done", "[DONE]")]


def test_a_client_follows_a_run_it_did_not_create_live(
    raw: httpx2.Client, sdk: openai.OpenAI, assistant_id: str
) -> None:
    thread_id = thread_with(sdk, "[[delay 20]] [[tokens 15]]")
    run = sdk.beta.threads.runs.create(thread_id=thread_id, assistant_id=assistant_id)
    events = _events(raw, thread_id, run.id)
    assert names(events)[:2] == ["thread.run.created", "thread.run.queued"]
    assert names(events)[-2:] == ["thread.run.completed", "done"]
    deltas = [e for e in events if e.event == "thread.message.delta"]
    assert len("".join(d.data["delta"]["content"][0]["text"]["value"] for d in deltas).split()) == 15


def test_a_stream_segment_ends_at_requires_action_and_the_next_begins_after_it(
    raw: httpx2.Client, sdk: openai.OpenAI
) -> None:
    assistant = sdk.beta.assistants.create(model="gpt-4o", tools=[WEATHER_TOOL])
    thread_id = thread_with(sdk, 'Weather? [[call get_weather {"city": "Tokyo"}]]')
    _r, first, _ = stream(raw, f"/threads/{thread_id}/runs", {"assistant_id": assistant.id})
    run_id, paused = first[0].data["id"], first[-2]
    assert paused.event == "thread.run.requires_action"
    call_id = paused.data["required_action"]["submit_tool_outputs"]["tool_calls"][0]["id"]
    followed: list[list[SSE]] = []
    # A client waiting after requires_action gets the continuation when it comes.
    follower = threading.Thread(
        target=lambda: followed.append(_events(raw, thread_id, run_id, params={"after": paused.id}))
    )
    follower.start()
    body = {"tool_outputs": [{"tool_call_id": call_id, "output": "22"}]}
    _r, continuation, _ = stream(raw, f"/threads/{thread_id}/runs/{run_id}/submit_tool_outputs", body)
    follower.join(timeout=30)
    assert continuation[0].id == paused.id + 1
    assert followed and _seen(followed[0]) == _seen(continuation)
    assert _seen(_events(raw, thread_id, run_id)) == _seen(first)


def test_a_cancelled_run_s_log_ends_with_the_cancel(raw: httpx2.Client, sdk: openai.OpenAI, assistant_id: str) -> None:
    thread_id = thread_with(sdk, "[[delay 50]] [[tokens 100]]")
    run = sdk.beta.threads.runs.create(thread_id=thread_id, assistant_id=assistant_id)
    sdk.beta.threads.runs.cancel(run.id, thread_id=thread_id)
    assert poll_run(sdk, thread_id, run.id).status == "cancelled"
    assert names(_events(raw, thread_id, run.id))[-2:] == ["thread.run.cancelled", "done"]


@pytest.mark.parametrize(
    "query", [{"after": "-1"}, {"after": "two"}, {"after": "1.5"}, {"after": "\u00b2"}, {"after": "9" * 30}]
)
def test_a_bad_sequence_number_is_a_400(raw: httpx2.Client, sdk: openai.OpenAI, assistant_id: str, query: Any) -> None:
    thread_id = thread_with(sdk, "hi")
    run = sdk.beta.threads.runs.create(thread_id=thread_id, assistant_id=assistant_id)
    response = raw.get(f"/threads/{thread_id}/runs/{run.id}/events", params=query)
    assert response.status_code == 400
    oas.validate(response.json(), "ErrorResponse")
    assert response.json()["error"]["param"] == "after"
    bad_header = raw.get(f"/threads/{thread_id}/runs/{run.id}/events", headers={"Last-Event-ID": "x"})
    assert bad_header.status_code == 400 and bad_header.json()["error"]["param"] == "Last-Event-ID"
    poll_run(sdk, thread_id, run.id)


def test_an_unknown_run_or_thread_is_a_404(raw: httpx2.Client, sdk: openai.OpenAI, assistant_id: str) -> None:
    thread_id = thread_with(sdk, "hi")
    run = sdk.beta.threads.runs.create(thread_id=thread_id, assistant_id=assistant_id)
    missing = raw.get(f"/threads/{thread_id}/runs/run_missing/events")
    assert missing.status_code == 404 and missing.json()["error"]["message"] == "No run found with id 'run_missing'."
    other = thread_with(sdk, "other")
    assert raw.get(f"/threads/{other}/runs/{run.id}/events").status_code == 404
    poll_run(sdk, thread_id, run.id)


def test_the_endpoint_is_documented_as_an_extension(raw: httpx2.Client, live: Any) -> None:
    schema = httpx2.get(live.base_url.removesuffix("/v1") + "/openapi.json").json()
    operation = schema["paths"]["/v1/threads/{thread_id}/runs/{run_id}/events"]["get"]
    assert "Extension" in operation["description"] and "Last-Event-ID" in operation["description"]
