"""What a client may rely on in a run's event stream, checked event by event.

``frames()`` parses the raw bytes as strictly as the SDKs need (wire notes
3.1): every frame is exactly one ``event:`` line and one ``data:`` line of
one-line JSON, or a comment (keep-alive). ``StreamRules`` then holds the
stream to the schemas of the official OpenAPI spec and to the rules the
SDKs' accumulators depend on (wire notes 3.3): contiguous indexes from 0, ids,
names and numbers sent once, deltas only after their object was created in
the same stream, and Node's one open message and one active run step at a
time. A violation is an AssertionError naming the rule.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from tests import oas

TERMINAL_RUN = {
    "thread.run.requires_action",
    "thread.run.completed",
    "thread.run.incomplete",
    "thread.run.failed",
    "thread.run.cancelled",
    "thread.run.expired",
}
STEP_ENDS = {
    "thread.run.step.completed",
    "thread.run.step.failed",
    "thread.run.step.cancelled",
    "thread.run.step.expired",
}
MESSAGE_ENDS = {"thread.message.completed", "thread.message.incomplete"}
KEEPALIVE = object()


@dataclass
class SSE:
    event: str
    data: Any  # the decoded JSON, or "[DONE]"
    id: int | None = None  # the run event's sequence number in its log (issue 11)


def frames(chunks: Iterable[bytes]) -> Iterator[SSE | object]:
    """SSE frames from raw body bytes; a comment frame yields KEEPALIVE."""
    buffer = b""
    for chunk in chunks:
        buffer += chunk
        while True:
            if buffer.startswith(b":") and b"\n" in buffer:  # a keep-alive: one comment line
                _comment, buffer = buffer.split(b"\n", 1)
                yield KEEPALIVE
            elif b"\n\n" in buffer:
                block, buffer = buffer.split(b"\n\n", 1)
                yield _frame(block)
            else:
                break
    assert buffer == b"", f"the stream ended inside a frame: {buffer!r}"


def _frame(block: bytes) -> SSE | object:
    assert b"\r" not in block, f"frames use LF only: {block!r}"
    lines = block.decode("utf-8").split("\n")
    if all(line.startswith(":") for line in lines):
        return KEEPALIVE
    seq = None
    if lines[0].startswith("id: "):  # every logged event has one; done and error frames do not
        seq = int(lines.pop(0)[len("id: ") :])
    assert len(lines) == 2, f"a frame is an id line, one event line and one data line: {block!r}"
    assert lines[0].startswith("event: ") and lines[1].startswith("data: "), block
    name, data = lines[0][len("event: ") :], lines[1][len("data: ") :]
    assert (seq is None) == (name in ("done", "error")), f"only done and error frames have no id: {block!r}"
    return SSE(name, data if name == "done" else json.loads(data), seq)


def read(chunks: Iterable[bytes]) -> tuple[list[SSE], int]:
    """Every event of a whole stream (checked) and the number of keep-alives."""
    rules, keepalives = StreamRules(), 0
    for item in frames(chunks):
        if item is KEEPALIVE:
            keepalives += 1
        else:
            assert isinstance(item, SSE)
            rules.feed(item)
    rules.finish()
    return rules.events, keepalives


def names(events: Iterable[SSE]) -> list[str]:
    """Event names with each run of identical delta events shown once, as ``name*``."""
    collapsed: list[str] = []
    for event in events:
        name = event.event + "*" if event.event.endswith(".delta") else event.event
        if not (collapsed and collapsed[-1] == name and name.endswith("*")):
            collapsed.append(name)
    return collapsed


@dataclass
class _Message:
    parts: list[dict[str, Any]] = field(default_factory=list)  # accumulated content parts
    annotations: list[list[dict[str, Any]]] = field(default_factory=list)  # streamed, per part
    role_sent: bool = False


@dataclass
class _Step:
    calls: list[dict[str, Any]] = field(default_factory=list)  # accumulated tool calls
    outputs: list[int] = field(default_factory=list)  # code interpreter outputs seen, per call


@dataclass
class StreamRules:
    events: list[SSE] = field(default_factory=list)
    run_id: str | None = None
    ended: bool = False  # the run stopped (or an error came): only done may follow
    done: bool = False
    messages: dict[str, _Message] = field(default_factory=dict)  # created in this stream
    open_message: str | None = None
    steps: dict[str, _Step] = field(default_factory=dict)  # created in this stream
    active_step: str | None = None

    def feed(self, event: SSE) -> None:
        assert not self.done, f"{event.event} after done"
        if event.id is not None:
            ids = [seen.id for seen in self.events if seen.id is not None]
            # One run's log, in order, with nothing left out or repeated.
            assert not ids or event.id == ids[-1] + 1, f"event id {event.id} after {ids[-1]}"
        self.events.append(event)
        if event.event == "done":
            assert event.data == "[DONE]"
            self.done = True
            return
        assert not self.ended, f"{event.event} after the run stopped"
        if event.event == "error":
            assert set(event.data) == {"error"}, "error data is wrapped: the bare form breaks the Python helpers"
            oas.validate(event.data["error"], "Error")  # the wrapped form (wire notes 3.6)
            self.ended = True
            return
        oas.validate({"event": event.event, "data": event.data}, "AssistantStreamEvent")
        family = event.event.split(".")[1] if event.event.startswith("thread.") else ""
        if event.event.startswith("thread.run.step."):
            self._step(event)
        elif family == "message":
            self._message(event)
        elif family == "run":
            self._run(event)
        else:
            assert event.event == "thread.created" and len(self.events) == 1, event.event

    def finish(self) -> None:
        assert self.done, "the stream did not end with done"
        assert self.ended, "the stream ended before the run stopped"

    def _run(self, event: SSE) -> None:
        run = event.data
        if self.run_id is None:
            self.run_id = run["id"]
        assert run["id"] == self.run_id, "one run per stream"
        if event.event == "thread.run.created":
            assert names(self.events[:-1]) in ([], ["thread.created"]), "thread.run.created opens the stream"
        if event.event == "thread.run.requires_action":
            self._check_required_action(run)
        self.ended = event.event in TERMINAL_RUN
        assert run["status"] == {"thread.run.created": "queued"}.get(event.event, event.event.rsplit(".", 1)[1])

    def _check_required_action(self, run: dict[str, Any]) -> None:
        required = run["required_action"]["submit_tool_outputs"]["tool_calls"]
        streamed = [call for step in self.steps.values() for call in step.calls if call["type"] == "function"]
        if streamed:
            wanted = [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in required]
            got = [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in streamed]
            assert wanted == got, f"required_action {wanted} differs from the streamed calls {got}"

    # Messages -----------------------------------------------------------

    def _message(self, event: SSE) -> None:
        message_id = event.data["id"]
        if event.event == "thread.message.created":
            assert self.open_message is None, f"message {message_id} created while {self.open_message} is open (Node)"
            assert message_id not in self.messages, f"message {message_id} created twice"
            assert event.data["status"] == "in_progress" and event.data["content"] == []
            self.messages[message_id] = _Message()
            self.open_message = message_id
            return
        assert message_id in self.messages, f"{event.event} for {message_id} before its creation in this stream"
        assert message_id == self.open_message, (
            f"{event.event} for {message_id}, the open message is {self.open_message}"
        )
        if event.event == "thread.message.delta":
            self._message_delta(self.messages[message_id], event.data["delta"])
        elif event.event in MESSAGE_ENDS:
            self._message_end(self.messages[message_id], event.data)
            self.open_message = None

    def _message_delta(self, message: _Message, delta: dict[str, Any]) -> None:
        if "role" in delta:
            assert not message.role_sent, "role sent twice (strings are concatenated)"
            message.role_sent = True
        for part in delta.get("content", []):
            index = part["index"]
            assert index <= len(message.parts), f"content index {index} leaves a gap"
            if index == len(message.parts):
                message.parts.append({"type": part["type"]})
                message.annotations.append([])
            accumulated = message.parts[index]
            assert part["type"] == accumulated["type"], "a content part changed type"
            if part["type"] == "text":
                self._text_delta(message, index, part["text"])
            elif part["type"] == "refusal":
                # Concatenated as text is: every delta carries a piece.
                assert isinstance(part.get("refusal"), str) and part["refusal"], f"a refusal delta without one: {part}"
                accumulated["refusal"] = accumulated.get("refusal", "") + part["refusal"]

    def _text_delta(self, message: _Message, index: int, text: dict[str, Any]) -> None:
        accumulated = message.parts[index]
        # Clients do `text += delta.value` (issue 12): a text delta always has one.
        assert isinstance(text.get("value"), str) and text["value"], f"a text delta without value: {text}"
        before = accumulated.get("value", "")
        accumulated["value"] = before + text["value"]
        for annotation in text.get("annotations", []):
            assert annotation["index"] == len(message.annotations[index]), "annotations are sent whole, in index order"
            # The marker arrives whole, in the delta that carries its annotation.
            assert text["value"] == annotation["text"], f"annotation {annotation} came with {text['value']!r}"
            assert (annotation["start_index"], annotation["end_index"]) == (len(before), len(accumulated["value"]))
            message.annotations[index].append(annotation)

    def _message_end(self, message: _Message, data: dict[str, Any]) -> None:
        content = data["content"]
        assert len(content) >= len(message.parts), "the final message has fewer parts than the deltas made"
        for index, part in enumerate(message.parts):
            if part["type"] == "text":
                final = content[index]["text"]["value"]
                # Built-in tools may decorate the final text (citation markers).
                assert final.startswith(part.get("value", "")) or content[index]["text"]["annotations"], (
                    f"final text {final!r} is not what the deltas said: {part.get('value')!r}"
                )
            elif part["type"] == "refusal":
                assert content[index] == part, f"final refusal {content[index]} is not what the deltas said: {part}"

    # Run steps ----------------------------------------------------------

    def _step(self, event: SSE) -> None:
        step_id = event.data["id"]
        if event.event == "thread.run.step.created":
            assert self.active_step is None, f"step {step_id} created while {self.active_step} is active (Node)"
            assert step_id not in self.steps, f"step {step_id} created twice"
            assert event.data["status"] == "in_progress"
            self.steps[step_id] = _Step()
            self.active_step = step_id
            return
        if step_id not in self.steps:
            # Only the continuation after submitted outputs may finish a step it did not create.
            assert event.event == "thread.run.step.completed", f"{event.event} for {step_id} before its creation"
            assert names(self.events[:-1]) == [], "the earlier step's completion opens a continuation"
            return
        assert step_id == self.active_step, f"{event.event} for {step_id}, the active step is {self.active_step}"
        if event.event == "thread.run.step.delta":
            assert "id" not in event.data["delta"], "a step delta carries no id of its own"
            self._step_delta(self.steps[step_id], event.data["delta"]["step_details"])
        elif event.event in STEP_ENDS:
            self._step_end(self.steps[step_id], event.data)
            self.active_step = None

    def _step_delta(self, step: _Step, details: dict[str, Any]) -> None:
        assert details["type"] == "tool_calls"
        for call in details["tool_calls"]:
            index = call["index"]
            assert "type" in call, "every tool call delta repeats its type"
            assert index <= len(step.calls), f"tool call index {index} leaves a gap"
            if index == len(step.calls):
                assert call.get("id"), "the first delta of a tool call carries its id"
                step.calls.append({"id": call["id"], "type": call["type"], call["type"]: {}})
                step.outputs.append(0)
            else:
                assert "id" not in call, "a tool call id is sent once (strings are concatenated)"
            accumulated = step.calls[index]
            assert call["type"] == accumulated["type"], "a tool call changed type"
            self._tool_delta(step, index, accumulated[call["type"]], call.get(call["type"], {}))

    def _tool_delta(self, step: _Step, index: int, accumulated: dict[str, Any], body: dict[str, Any]) -> None:
        """Strings other than arguments and code are concatenated and numbers
        added by the accumulators: every other field is sent once (or first
        as null, then filled)."""
        for key, value in body.items():
            if key == "outputs":
                for output in value:
                    assert output["index"] == step.outputs[index], "code outputs are sent whole, in index order"
                    step.outputs[index] += 1
            elif key in ("arguments", "input"):
                accumulated[key] = accumulated.get(key, "") + value
            else:
                assert accumulated.get(key) is None, f"tool call field {key!r} sent twice"
                accumulated[key] = value

    def _step_end(self, step: _Step, data: dict[str, Any]) -> None:
        if data["type"] != "tool_calls":
            return
        final = data["step_details"]["tool_calls"]
        assert len(final) >= len(step.calls), "the final step has fewer tool calls than the deltas made"
        for streamed, call in zip(step.calls, final, strict=False):
            assert streamed["id"] == call["id"]
            if call["type"] == "function":
                assert streamed["function"].get("arguments", "") == call["function"]["arguments"]
