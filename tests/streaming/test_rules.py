"""The stream checker itself must catch what breaks the SDKs: each case
below is a stream the helpers would choke on (wire notes 3.3)."""

from __future__ import annotations

import copy
from typing import Any

import jsonschema
import pytest

from tests.streaming import rules

pytestmark = pytest.mark.timeout(30)

RUN = {
    "id": "run_1",
    "object": "thread.run",
    "created_at": 1,
    "thread_id": "thread_1",
    "assistant_id": "asst_1",
    "status": "queued",
    "required_action": None,
    "last_error": None,
    "expires_at": 601,
    "started_at": None,
    "cancelled_at": None,
    "failed_at": None,
    "completed_at": None,
    "incomplete_details": None,
    "model": "gpt-4o",
    "instructions": "",
    "tools": [],
    "metadata": {},
    "usage": None,
    "temperature": 1.0,
    "top_p": 1.0,
    "max_prompt_tokens": None,
    "max_completion_tokens": None,
    "truncation_strategy": {"type": "auto", "last_messages": None},
    "tool_choice": "auto",
    "parallel_tool_calls": True,
    "response_format": "auto",
}
STEP = {
    "id": "step_1",
    "object": "thread.run.step",
    "created_at": 1,
    "assistant_id": "asst_1",
    "thread_id": "thread_1",
    "run_id": "run_1",
    "type": "tool_calls",
    "status": "in_progress",
    "step_details": {"type": "tool_calls", "tool_calls": []},
    "last_error": None,
    "expired_at": None,
    "cancelled_at": None,
    "failed_at": None,
    "completed_at": None,
    "metadata": {},
    "usage": None,
}
MESSAGE = {
    "id": "msg_1",
    "object": "thread.message",
    "created_at": 1,
    "thread_id": "thread_1",
    "status": "in_progress",
    "incomplete_details": None,
    "completed_at": None,
    "incomplete_at": None,
    "role": "assistant",
    "content": [],
    "assistant_id": "asst_1",
    "run_id": "run_1",
    "attachments": [],
    "metadata": {},
}


def _run(status: str, **fields: Any) -> dict[str, Any]:
    return {**RUN, "status": status, **fields}


def _message_delta(*parts: dict[str, Any], message_id: str = "msg_1") -> rules.SSE:
    return rules.SSE(
        "thread.message.delta", {"id": message_id, "object": "thread.message.delta", "delta": {"content": list(parts)}}
    )


def _text(index: int, value: str) -> dict[str, Any]:
    return {"index": index, "type": "text", "text": {"value": value}}


def _call_delta(**call: Any) -> rules.SSE:
    details = {"type": "tool_calls", "tool_calls": [{"type": "function", **call}]}
    return rules.SSE(
        "thread.run.step.delta", {"id": "step_1", "object": "thread.run.step.delta", "delta": {"step_details": details}}
    )


def _text_stream() -> list[rules.SSE]:
    final = {
        **MESSAGE,
        "status": "completed",
        "completed_at": 2,
        "content": [{"type": "text", "text": {"value": "Hi there", "annotations": []}}],
    }
    return [
        rules.SSE("thread.run.created", _run("queued")),
        rules.SSE("thread.run.in_progress", _run("in_progress", started_at=1)),
        rules.SSE("thread.message.created", MESSAGE),
        _message_delta(_text(0, "Hi")),
        _message_delta(_text(0, " there")),
        rules.SSE("thread.message.completed", final),
        rules.SSE("thread.run.completed", _run("completed", completed_at=2)),
        rules.SSE("done", "[DONE]"),
    ]


def _tool_stream() -> list[rules.SSE]:
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    required = {"type": "submit_tool_outputs", "submit_tool_outputs": {"tool_calls": [call]}}
    return [
        rules.SSE("thread.run.created", _run("queued")),
        rules.SSE("thread.run.step.created", STEP),
        _call_delta(index=0, id="call_1", function={"name": "f", "arguments": "", "output": None}),
        _call_delta(index=0, function={"arguments": "{}"}),
        rules.SSE("thread.run.requires_action", _run("requires_action", required_action=required)),
        rules.SSE("done", "[DONE]"),
    ]


def _check(events: list[rules.SSE]) -> None:
    checker = rules.StreamRules()
    for event in events:
        checker.feed(event)
    checker.finish()


def test_good_streams_pass() -> None:
    _check(_text_stream())
    _check(_tool_stream())


def _replace(events: list[rules.SSE], index: int, event: rules.SSE) -> list[rules.SSE]:
    changed = copy.deepcopy(events)
    changed[index] = event
    return changed


BROKEN = {
    "gap in content indexes": _replace(_text_stream(), 4, _message_delta(_text(2, " there"))),
    "delta before its message": [e for e in _text_stream() if e.event != "thread.message.created"],
    "second message while one is open": _replace(
        _text_stream(), 4, rules.SSE("thread.message.created", {**MESSAGE, "id": "msg_2"})
    ),
    "delta for another message": _replace(_text_stream(), 4, _message_delta(_text(0, "x"), message_id="msg_2")),
    "final text shorter than the deltas": [
        *_text_stream()[:5],
        rules.SSE("thread.message.completed", {**MESSAGE, "status": "completed"}),
        *_text_stream()[6:],
    ],
    "no done": _text_stream()[:-1],
    "event after the run stopped": [*_text_stream()[:-1], rules.SSE("thread.run.step.created", STEP)],
    "call id sent twice": _replace(_tool_stream(), 3, _call_delta(index=0, id="call_1", function={"arguments": "{}"})),
    "call name sent twice": _replace(
        _tool_stream(), 3, _call_delta(index=0, function={"name": "f", "arguments": "{}"})
    ),
    "gap in tool call indexes": _replace(_tool_stream(), 2, _call_delta(index=1, id="call_1", function={"name": "f"})),
    "step delta before the step": [e for e in _tool_stream() if e.event != "thread.run.step.created"],
    "required action differs from the deltas": _replace(
        _tool_stream(), 3, _call_delta(index=0, function={"arguments": "{ }"})
    ),
    "bare error form": [
        *_text_stream()[:2],
        rules.SSE("error", {"code": "server_error", "message": "boom"}),
        rules.SSE("done", "[DONE]"),
    ],
    "payload off the schema": _replace(_text_stream(), 1, rules.SSE("thread.run.in_progress", {"id": "run_1"})),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_streams_are_caught(case: str) -> None:
    with pytest.raises((AssertionError, jsonschema.ValidationError)):
        _check(BROKEN[case])


@pytest.mark.parametrize(
    "raw",
    [
        b"event: x\r\ndata: {}\r\n\r\n",
        b"data: {}\n\n",
        b"event: x\ndata: {}\ndata: {}\n\n",
        b"event: done\ndata: [DONE]\n",
    ],
)
def test_bad_framing_is_caught(raw: bytes) -> None:
    with pytest.raises(AssertionError):
        list(rules.frames([raw]))
