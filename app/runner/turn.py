"""One model call of a run: consumes the LLM stream, creates the message and
tool-call steps as output appears, and publishes the events OpenAI streams
(wire notes 3.3/3.4). Rows are written in short transactions; no session is
open while waiting on the model."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import object_session

from app import ids, llm, orm
from app.runner import markers
from app.runner.tools import BuiltinTool, CallStream
from app.runtime import Runtime
from app.services import core_rows, messages, run_steps
from app.wire.events import Event


class TurnStopped(Exception):
    """The run was cancelled while the model was answering."""


# The executor's own rows: inserted with Core statements (never through a
# session's unit of work, issue 17) and updated by naming what changed.
ExecutorRow = orm.Message | orm.RunStep


@dataclass
class RowUpdate:
    """Attributes of an executor's row to write (core_rows.update_row)."""

    row: ExecutorRow
    keys: tuple[str, ...]


@dataclass
class Pending:
    """Row changes written and events published by the executor's next
    transaction, so a run's last message and its ending cost one commit, not two."""

    rows: list[RowUpdate] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    # New rows (an instant answer's message and steps, Turn.at_once): each
    # inserted as it is at the commit, so their updates are not written apart.
    inserts: list[ExecutorRow] = field(default_factory=list)

    def insert(self, rows: list[ExecutorRow], events: list[Event]) -> None:
        self.inserts.extend(rows)
        self.events.extend(events)

    def add(self, rows: list[RowUpdate], events: list[Event]) -> None:
        for change in rows:
            if any(change.row is row for row in self.inserts):
                continue  # its insert carries the change
            same = next((pending for pending in self.rows if pending.row is change.row), None)
            if same is None:
                self.rows.append(change)
            else:  # one UPDATE per row
                same.keys = tuple(dict.fromkeys(same.keys + change.keys))
        self.events.extend(events)


async def write_rows(session: AsyncSession, changes: list[RowUpdate]) -> None:
    """The changes, each one UPDATE that waits for the transaction's next
    statement on SQLite (nothing reads their outcome)."""
    for change in changes:
        await core_rows.update_row(session, change.row, change.keys, write_behind=True)


_MESSAGE_CLOSED = {
    "completed": ("content", "status", "completed_at"),
    "incomplete": ("content", "status", "incomplete_at", "incomplete_details"),
}
_STEP_CLOSED = ("status", "completed_at", "usage")


@dataclass
class TurnResult:
    finish_reason: str
    usage: llm.Usage
    calls: list[dict[str, Any]]  # step entries, in order
    arguments: dict[str, str]  # raw arguments by call id
    message: orm.Message | None
    tool_step: orm.RunStep | None
    pending: Pending


@dataclass(frozen=True)
class _Opening:
    """A message the turn has made its own, still to be written: the events
    announcing it, and the parts a built-in tool made for it (put first)."""

    created: list[Event]
    leading: list[dict[str, Any]]


@dataclass
class Turn:
    runtime: Runtime
    run: orm.Run
    message: orm.Message | None = None
    message_step: orm.RunStep | None = None
    # The open message's and its step's objects as their opening events carry
    # them: their close sends these with the fields it sets (issue 17: the
    # same JSON as the rows validated and dumped again, for less).
    message_opened: dict[str, Any] = field(default_factory=dict)
    step_opened: dict[str, Any] = field(default_factory=dict)
    text: list[str] = field(default_factory=list)
    tool_step: orm.RunStep | None = None
    builtins: dict[str, BuiltinTool] = field(default_factory=dict)
    # Final content of a message from its text (built-in tools add citations).
    decorate: Callable[[list[dict[str, Any]]], list[dict[str, Any]]] = lambda content: content
    # Content parts built-in tools made for the next message (put before its text).
    leading: Callable[[], list[dict[str, Any]]] = lambda: []
    text_index: int = 0  # the text's content index in the open message
    # The model's refusal (llm.RefusalDelta): its own content part, indexed
    # in the order the message's text and refusal began (None: none yet).
    refusal: list[str] = field(default_factory=list)
    refusal_index: int | None = None
    # What this run's markers can be annotated with while streaming (issue 12).
    targets: markers.TargetSource = markers.no_targets
    marker_stream: markers.MarkerStream = field(default_factory=markers.MarkerStream)
    calls: dict[int, dict[str, Any]] = field(default_factory=dict)  # by the model's call index
    arguments: dict[int, str] = field(default_factory=dict)  # raw argument JSON, by call index
    streams: dict[int, CallStream] = field(default_factory=dict)  # built-in calls only
    pending: Pending = field(default_factory=Pending)
    # The whole answer is at hand (LLM.answer_at_once): its rows and events,
    # deltas included, all wait for the executor's next commit (issue 17:
    # one transaction for an instant answer instead of two and a flush).
    at_once: bool = False

    def _publish(self, events: list[Event]) -> None:
        """Deltas: streamed at once, logged in batches (app/run_log.py)."""
        if self.at_once:
            self.pending.add([], events)
            return
        self.runtime.run_log.publish(self.run.id, events)

    async def consume(self, stream: AsyncIterator[llm.Event]) -> TurnResult:
        """The answer in ``stream``, up to its Finish. A generator is closed
        here, on every way out: left suspended past its Finish, the loop's
        finalizer would close it later, in a task of its own and a wake-up
        from another thread's side (call_soon_threadsafe), once per turn."""
        try:
            async for item in stream:
                if isinstance(item, llm.Finish):
                    return await self._finish(item)
                if isinstance(item, llm.TextDelta):
                    await self._on_text(item.text)
                elif isinstance(item, llm.RefusalDelta):
                    await self._on_refusal(item.refusal)
                else:
                    await self._on_tool_call(item)
            raise llm.LLMError("server_error", "The model stream ended without finishing.")
        finally:
            if isinstance(stream, AsyncGenerator):
                await stream.aclose()

    async def _on_text(self, fragment: str) -> None:
        # A NUL character in a provider's text is kept as given, on both
        # databases: messages, steps and events are json columns, which
        # hold its escape (migration 0016_pgjson), and the client reads
        # back what the model said, as OpenAI sends it (``\u0000``).
        # Replacing it would change an answer the user did not write, for
        # no database that refuses it. (A request's NUL is refused: it
        # would be stored in text columns too; RequestModel.)
        if not fragment:
            return
        opening = self._new_message() if self.message is None else None
        self.text.append(fragment)  # the turn's before its message is written (_new_message)
        if opening is not None:
            await self._write_message(opening)
        self._publish_text(self.marker_stream.feed(fragment))

    async def _on_refusal(self, fragment: str) -> None:
        """A piece of the model's refusal, streamed as the message's refusal
        part (wire notes 2.4, 3.3). Text and refusal are separate parts,
        numbered in the order they began: a refusal after text follows it,
        text after a refusal follows the refusal. The run completes; a
        refusal is an answer, not a failure."""
        if not fragment:
            return
        opening = self._new_message() if self.message is None else None
        assert self.message is not None
        if self.refusal_index is None:
            if self.text:  # (a message open already: text is kept only in one)
                # Text held back for a possible marker goes out first: the
                # text part's first delta must precede the next index's.
                self._publish_text(self.marker_stream.flush())
                self.refusal_index = self.text_index + 1
            else:
                self.refusal_index, self.text_index = self.text_index, self.text_index + 1
        self.refusal.append(fragment)  # the turn's before its message is written (_new_message)
        if opening is not None:
            await self._write_message(opening)
        part = {"index": self.refusal_index, "type": "refusal", "refusal": fragment}
        self._publish([Event("thread.message.delta", _message_delta(self.message.id, [part]))])

    def _answer_parts(self) -> list[dict[str, Any]]:
        """The open message's text and refusal parts, in their indexes' order."""
        if not self.refusal:
            return [messages.text_part("".join(self.text))] if self.text else []
        refusal = {"type": "refusal", "refusal": "".join(self.refusal)}
        if not self.text:
            return [refusal]
        text = messages.text_part("".join(self.text))
        return [text, refusal] if self.text_index < (self.refusal_index or 0) else [refusal, text]

    def _publish_text(self, pieces: list[markers.Piece]) -> None:
        """Text deltas, a whole marker with its annotation in one (markers.py)."""
        assert self.message is not None
        for piece in pieces:
            part = markers.text_delta(self.text_index, piece)
            self._publish([Event("thread.message.delta", _message_delta(self.message.id, [part]))])

    def _new_message(self) -> _Opening:
        """A message for the model's first text or refusal, the turn's open
        message from now on, before it is written (_write_message), and so is
        the fragment that opened it: a cancel that reaches the executor while
        the message is written (at its COMMIT, seen through: the row written,
        the executor told only "cancelled") still finds both, and the
        cancelled run's message keeps its text (save_partial), as a cancel a
        moment later does. Written only after, the text the server had was
        dropped, the message closed empty (a flaky test under load). A write
        rolled back instead leaves no row, and save_partial's UPDATE none to
        change."""
        seq = ids.next_seq()
        message = core_rows.record(  # a record (issue 17): written by the run log, never added to a session
            orm.Message,
            id=ids.new_id(ids.MESSAGE, seq),
            seq=seq,
            created_at=ids.seconds(seq),
            thread_id=self.run.thread_id,
            role="assistant",
            content=[],
            status="in_progress",
            assistant_id=self.run.assistant_id,
            run_id=self.run.id,
            attachments=[],
            metadata_={},
        )
        step = run_steps.new(
            self.run, "message_creation", {"type": "message_creation", "message_creation": {"message_id": message.id}}
        )
        step_wire, message_wire = run_steps.to_wire(step), messages.to_wire(message)
        created = [
            *Event.each(("thread.run.step.created", "thread.run.step.in_progress"), step_wire),
            *Event.each(("thread.message.created", "thread.message.in_progress"), message_wire),
        ]
        self.message, self.message_step = message, step
        self.step_opened, self.message_opened = _object_of(created[0]), _object_of(created[2])
        self.marker_stream = markers.MarkerStream(self.targets)
        # Parts a built-in tool already made for this message (code_interpreter
        # images) come first, as OpenAI orders them; the text follows them.
        leading = self.leading()
        self.text_index = len(leading)
        return _Opening(created, leading)

    async def _write_message(self, opening: _Opening) -> None:
        """The turn's new message (_new_message) written and announced, then
        the parts a built-in tool made for it streamed."""
        message, step = self.message, self.message_step
        assert message is not None and step is not None
        await self._insert([step, message], opening.created)
        if opening.leading:
            content = [{"index": index, **part} for index, part in enumerate(opening.leading)]
            self._publish([Event("thread.message.delta", _message_delta(message.id, content))])

    async def _insert(self, rows: list[ExecutorRow], created: list[Event]) -> None:
        """New rows (a step, a message) and the events announcing them: written
        now, or, answering at once, left for the executor's commit."""
        if self.at_once:
            self.pending.insert(rows, created)
            return
        async with self.runtime.transaction() as session:
            await self.runtime.run_log.append(session, self.run.id, created, inserting=rows)

    async def _close_message(self, status: str, usage: llm.Usage | None, *, defer: bool = False) -> None:
        """Finish the open message (and its step) with the text so far. With
        ``defer`` the rows and events are left in ``pending`` for the
        executor's next transaction (the one that also ends the run).
        Closed in a transaction of its own, the message and its text stay
        the turn's until that commits: a cancel that rolls the close back
        (while it waits for SQLite's write lock, or a statement's round
        trip) leaves the row in_progress and its content unwritten, and
        save_partial writes the text the user saw streamed before the
        cancel closes it incomplete (forgotten first, it was closed empty).
        A close that commits despite the cancel (seen through) is left as
        it is: save_partial writes no completed message."""
        message, step = self.message, self.message_step
        if message is None or step is None:
            return
        self._publish_text(self.marker_stream.flush())
        now = ids.now()
        closed: dict[str, Any] = {"content": self.decorate(self._answer_parts()), "status": status}
        if status == "completed":
            closed["completed_at"] = now
        else:
            closed["incomplete_at"] = now
            closed["incomplete_details"] = {"reason": "max_tokens"}
        step_closed = {"status": "completed", "completed_at": now, "usage": _usage_dict(usage) if usage else None}
        _set_on_record(message, closed)
        _set_on_record(step, step_closed)
        # As messages.to_wire and run_steps.to_wire would send the rows now:
        # nothing but what the close set has changed since they were opened
        # (the open message's text goes out as deltas, not into its row), and
        # each value set is plain JSON (the content's parts, integers, None).
        # New dicts: an event's data is never changed once made.
        events = [
            Event(f"thread.message.{status}", {**self.message_opened, **closed}),
            Event("thread.run.step.completed", {**self.step_opened, **step_closed}),
        ]
        changes = [RowUpdate(message, _MESSAGE_CLOSED[status]), RowUpdate(step, _STEP_CLOSED)]
        if defer or self.at_once:
            self._forget_message()
            self.pending.add(changes, events)
            return
        async with self.runtime.transaction() as session:
            await write_rows(session, changes)
            await self.runtime.run_log.append(session, self.run.id, events)
        self._forget_message()

    def _forget_message(self) -> None:
        """The open message is closed (or its close is left to the executor's
        commit): the next text opens another."""
        self.message, self.message_step = None, None
        self.text = []
        self.refusal, self.refusal_index = [], None

    async def _on_tool_call(self, delta: llm.ToolCallDelta) -> None:
        if self.message is not None:
            # Text before a tool call is kept as its own completed message.
            await self._close_message("completed", None)
        if self.tool_step is None:
            step = run_steps.new(self.run, "tool_calls", {"type": "tool_calls", "tool_calls": []})
            wire = run_steps.to_wire(step)
            created = Event.each(("thread.run.step.created", "thread.run.step.in_progress"), wire)
            await self._insert([step], created)
            self.tool_step = step
        if delta.index not in self.calls:
            self._start_call(delta)
        self.arguments[delta.index] += delta.arguments
        position = list(self.calls).index(delta.index)
        call = self.calls[delta.index]
        stream = self.streams.get(delta.index)
        if stream is not None:
            body = stream.feed(delta.arguments) if delta.arguments else None
        else:
            call["function"]["arguments"] += delta.arguments
            body = {"type": "function", "function": {"arguments": delta.arguments}} if delta.arguments else None
        if body is not None:
            self.publish_step_delta({"index": position, **body})

    def _start_call(self, delta: llm.ToolCallDelta) -> None:
        """A new tool call: its step entry and its first delta (the only one
        with the id; the accumulators index a list, so positions are
        contiguous from 0)."""
        call_id = ids.new_id(ids.CALL)
        name = delta.name or ""
        builtin = self.builtins.get(name)
        if builtin is not None:
            stream = builtin.start_call(call_id)
            self.streams[delta.index] = stream
            call = {"id": call_id, **stream.first()}
        else:
            call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": "", "output": None}}
        self.calls[delta.index] = call
        self.arguments[delta.index] = ""
        first = {"index": len(self.calls) - 1, **json.loads(json.dumps(call))}
        self.publish_step_delta(first)

    def publish_step_delta(self, call_delta: dict[str, Any]) -> None:
        assert self.tool_step is not None
        data = {
            "id": self.tool_step.id,
            "object": "thread.run.step.delta",
            "delta": {"step_details": {"type": "tool_calls", "tool_calls": [call_delta]}},
        }
        self._publish([Event("thread.run.step.delta", data)])

    def publisher(self, call_id: str) -> Callable[[dict[str, Any]], None]:
        """Publishes step-delta bodies for one call (built-in tools' outputs)."""
        position = [call["id"] for call in self.calls.values()].index(call_id)
        return lambda body: self.publish_step_delta({"index": position, **body})

    async def _finish(self, finish: llm.Finish) -> TurnResult:
        calls = list(self.calls.values())
        finished = self.message
        if self.message is not None:
            status = "incomplete" if finish.reason == "length" else "completed"
            await self._close_message(status, None if calls else finish.usage, defer=True)
        if self.tool_step is not None:
            self.tool_step.step_details = {"type": "tool_calls", "tool_calls": calls}
            self.tool_step.usage = _usage_dict(finish.usage)
            self.pending.add([RowUpdate(self.tool_step, ("step_details", "usage"))], [])
        arguments = {self.calls[index]["id"]: text for index, text in self.arguments.items()}
        return TurnResult(finish.reason, finish.usage, calls, arguments, finished, self.tool_step, self.pending)

    async def save_partial(self) -> None:
        """Keep what was produced before a failure or cancel (close_out then
        marks the message incomplete and the steps failed/cancelled). The
        open message is written unless it is completed: its close may have
        committed as the cancel reached the turn (seen through:
        _close_message), and is not to be undone (its content decorated,
        its status). Only the turn completes its message (one it closes
        incomplete, max_tokens, is left to the executor's commit and
        forgotten at once); a message incomplete here was swept by a close_out
        (the reaper's: a run expired or abandoned while it executes), whose
        content is still empty and gets the text. The tool step is written
        as it is: the turn never closes it before it ends, only sweeps do.
        (Only a failed or cancelled run comes here: a run that completes
        never pays for the guard.)"""
        if self.message is None and self.tool_step is None:
            return
        async with self.runtime.transaction() as session:
            if self.message is not None:
                self.message.content = self._answer_parts()
                await core_rows.update_row(
                    session, self.message, ("content",), write_behind=True, unless_status="completed"
                )
            if self.tool_step is not None:
                self.tool_step.step_details = {"type": "tool_calls", "tool_calls": list(self.calls.values())}
                await write_rows(session, [RowUpdate(self.tool_step, ("step_details",))])


def _set_on_record(row: ExecutorRow, values: dict[str, Any]) -> None:
    """Set ``values`` on the turn's own row, a record (core_rows.record)
    never added to a session: straight into the instance's dict, as
    record() sets them (issue 17: the mapped attributes' set events, whose
    change tracking nothing reads here, cost more than the values; what is
    written is what a RowUpdate names, read from that dict by core_rows).
    A row in a session would have these values skipped by its flush."""
    assert object_session(row) is None, "the turn's rows are records, never in a session"
    row.__dict__.update(values)


def _message_delta(message_id: str, content: list[dict[str, Any]]) -> dict[str, Any]:
    return {"id": message_id, "object": "thread.message.delta", "delta": {"content": content}}


def _object_of(event: Event) -> dict[str, Any]:
    """The wire object an object's event carries (never ``[DONE]``'s text)."""
    assert isinstance(event.data, dict), event.name
    return event.data


def _usage_dict(usage: llm.Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }
