"""The Python SDK's stream helpers against the live server, as users write
them: AssistantEventHandler callbacks, text_deltas, until_done(),
get_final_messages(), submit_tool_outputs_stream, create_and_run_stream and
raw ``stream=True`` iteration with its typed events."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest
from openai import AssistantEventHandler, AsyncAssistantEventHandler
from openai.types.beta.assistant_stream_event import ThreadCreated, ThreadRunCreated
from openai.types.beta.threads import Message, Run, Text, TextDelta
from openai.types.beta.threads.runs import RunStep, ToolCall, ToolCallDelta

from tests.streaming.support import thread_with

pytestmark = pytest.mark.timeout(60)


class Recorder(AssistantEventHandler):
    """Writes down every callback, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []
        self.text = ""
        self.arguments = ""

    def on_run_step_created(self, run_step: RunStep) -> None:
        self.calls.append(f"on_run_step_created:{run_step.type}")

    def on_run_step_done(self, run_step: RunStep) -> None:
        self.calls.append(f"on_run_step_done:{run_step.type}:{run_step.status}")

    def on_message_created(self, message: Message) -> None:
        self.calls.append("on_message_created")

    def on_text_created(self, text: Text) -> None:
        self.calls.append("on_text_created")

    def on_text_delta(self, delta: TextDelta, snapshot: Text) -> None:
        self.text += delta.value or ""
        assert snapshot.value == self.text, "the snapshot is the text so far"
        self.calls.append("on_text_delta")

    def on_text_done(self, text: Text) -> None:
        self.calls.append(f"on_text_done:{text.value}")

    def on_message_done(self, message: Message) -> None:
        self.calls.append(f"on_message_done:{message.status}")

    def on_tool_call_created(self, tool_call: ToolCall) -> None:
        assert tool_call.type == "function"
        self.calls.append(f"on_tool_call_created:{tool_call.function.name}")

    def on_tool_call_delta(self, delta: ToolCallDelta, snapshot: ToolCall) -> None:
        assert delta.type == "function" and snapshot.type == "function"
        self.arguments += (delta.function and delta.function.arguments) or ""
        assert snapshot.function.arguments == self.arguments
        self.calls.append("on_tool_call_delta")

    def on_tool_call_done(self, tool_call: ToolCall) -> None:
        assert tool_call.type == "function"
        self.calls.append(f"on_tool_call_done:{tool_call.function.arguments}")

    def on_exception(self, exception: Exception) -> None:
        self.calls.append(f"on_exception:{exception}")

    def on_end(self) -> None:
        self.calls.append("on_end")


def collapsed(calls: list[str]) -> list[str]:
    """Repeated delta callbacks shown once, as ``name*``."""
    out: list[str] = []
    for call in calls:
        name = call + "*" if call.endswith("_delta") else call
        if not (out and out[-1] == name and name.endswith("*")):
            out.append(name)
    return out


def text_message_callbacks(text: str, status: str = "completed") -> list[str]:
    return [
        "on_run_step_created:message_creation",
        "on_message_created",
        "on_text_created",
        "on_text_delta*",
        f"on_text_done:{text}",
        f"on_message_done:{status}",
    ]


def dump(messages: list[Message]) -> list[dict[str, Any]]:
    return [message.model_dump() for message in messages]


def test_event_handler_sees_every_callback_in_order(sdk: openai.OpenAI, assistant_id: str) -> None:
    thread_id = thread_with(sdk, "Tell me a story")
    recorder = Recorder()
    with sdk.beta.threads.runs.stream(thread_id=thread_id, assistant_id=assistant_id, event_handler=recorder) as stream:
        stream.until_done()
        run = stream.get_final_run()
        final = stream.get_final_messages()
    assert collapsed(recorder.calls) == [
        *text_message_callbacks("You said: Tell me a story"),
        "on_run_step_done:message_creation:completed",
        "on_end",
    ]
    assert recorder.text == "You said: Tell me a story"
    assert run.status == "completed" and run.usage is not None
    assert dump(final) == dump(sdk.beta.threads.messages.list(thread_id, run_id=run.id).data)


def test_text_deltas_until_done_and_final_messages(sdk: openai.OpenAI, assistant_id: str) -> None:
    thread_id = thread_with(sdk, "Stream this answer please [[delay 5]]")
    with sdk.beta.threads.runs.stream(thread_id=thread_id, assistant_id=assistant_id) as stream:
        text = "".join(stream.text_deltas)
        stream.until_done()
        run = stream.get_final_run()
        final = stream.get_final_messages()
        steps = stream.get_final_run_steps()
    assert text == "You said: Stream this answer please"
    assert dump(final) == dump(sdk.beta.threads.messages.list(thread_id, run_id=run.id).data)
    # The SDK keeps a step's snapshot from its creation and deltas only: compare ids.
    listed = sdk.beta.threads.runs.steps.list(run.id, thread_id=thread_id).data
    assert [step.id for step in steps] == [step.id for step in listed]


def test_weather_flow_with_submit_tool_outputs_stream(sdk: openai.OpenAI, assistant_id: str) -> None:
    thread_id = thread_with(sdk, 'What is the weather in Tokyo? [[call get_weather {"city": "Tokyo"}]]')
    asking = Recorder()
    with sdk.beta.threads.runs.stream(thread_id=thread_id, assistant_id=assistant_id, event_handler=asking) as stream:
        stream.until_done()
        paused = stream.current_run
    assert collapsed(asking.calls) == [
        "on_run_step_created:tool_calls",
        "on_tool_call_created:get_weather",
        "on_tool_call_delta*",
        'on_tool_call_done:{"city": "Tokyo"}',
        "on_end",
    ]
    assert paused is not None and paused.status == "requires_action" and paused.required_action is not None
    call = paused.required_action.submit_tool_outputs.tool_calls[0]
    assert json.loads(call.function.arguments) == {"city": "Tokyo"}

    answering = Recorder()
    with sdk.beta.threads.runs.submit_tool_outputs_stream(
        thread_id=thread_id,
        run_id=paused.id,
        tool_outputs=[{"tool_call_id": call.id, "output": "sunny, 22 C"}],
        event_handler=answering,
    ) as stream:
        stream.until_done()
        run = stream.get_final_run()
        final = stream.get_final_messages()
    answer = "Tool results: get_weather -> sunny, 22 C"
    assert collapsed(answering.calls) == [
        "on_run_step_done:tool_calls:completed",
        *text_message_callbacks(answer),
        "on_run_step_done:message_creation:completed",
        "on_end",
    ]
    assert run.id == paused.id and run.status == "completed"
    assert dump(final) == dump(sdk.beta.threads.messages.list(thread_id, run_id=run.id).data)
    steps = sdk.beta.threads.runs.steps.list(run.id, thread_id=thread_id, order="asc").data
    assert steps[0].step_details.type == "tool_calls"
    assert steps[0].step_details.tool_calls[0].function.output == "sunny, 22 C"  # type: ignore[union-attr]


def test_create_and_run_stream(sdk: openai.OpenAI, assistant_id: str) -> None:
    recorder = Recorder()
    with sdk.beta.threads.create_and_run_stream(
        assistant_id=assistant_id,
        thread={"messages": [{"role": "user", "content": "Fresh thread"}]},
        event_handler=recorder,
    ) as stream:
        events = [event.event for event in stream]
        run = stream.get_final_run()
        final = stream.get_final_messages()
    assert events[:2] == ["thread.created", "thread.run.created"] and events[-1] == "thread.run.completed"
    assert collapsed(recorder.calls)[:-2] == text_message_callbacks("You said: Fresh thread")
    assert dump(final) == dump(sdk.beta.threads.messages.list(run.thread_id, run_id=run.id).data)


def typed(events: list[Any]) -> list[str]:
    """The events' SDK classes, each run of delta events shown once."""
    return collapsed([type(event).__name__.replace("Delta", "_delta") for event in events])


def test_raw_iteration_yields_typed_events(sdk: openai.OpenAI, assistant_id: str) -> None:
    thread_id = thread_with(sdk, "Typed [[call get_weather]]")
    events = list(sdk.beta.threads.runs.create(thread_id=thread_id, assistant_id=assistant_id, stream=True))
    assert typed(events) == [
        "ThreadRunCreated",
        "ThreadRunQueued",
        "ThreadRunInProgress",
        "ThreadRunStepCreated",
        "ThreadRunStepInProgress",
        "ThreadRunStep_delta*",
        "ThreadRunRequiresAction",
    ]
    run = events[-1].data
    assert isinstance(run, Run) and run.required_action is not None
    call = run.required_action.submit_tool_outputs.tool_calls[0]
    continuation = sdk.beta.threads.runs.submit_tool_outputs(
        thread_id=thread_id, run_id=run.id, tool_outputs=[{"tool_call_id": call.id, "output": "ok"}], stream=True
    )
    assert typed(list(continuation)) == [
        "ThreadRunStepCompleted",
        "ThreadRunQueued",
        "ThreadRunInProgress",
        "ThreadRunStepCreated",
        "ThreadRunStepInProgress",
        "ThreadMessageCreated",
        "ThreadMessageInProgress",
        "ThreadMessage_delta*",
        "ThreadMessageCompleted",
        "ThreadRunStepCompleted",
        "ThreadRunCompleted",
    ]
    created = list(
        sdk.beta.threads.create_and_run(
            assistant_id=assistant_id, thread={"messages": [{"role": "user", "content": "x"}]}, stream=True
        )
    )
    assert isinstance(created[0], ThreadCreated) and isinstance(created[1], ThreadRunCreated)
    assert created[1].data.thread_id == created[0].data.id


def test_a_failed_run_ends_the_helpers_quietly(sdk: openai.OpenAI, assistant_id: str) -> None:
    thread_id = thread_with(sdk, "one two three four [[fail rate_limit after 2]]")
    recorder = Recorder()
    with sdk.beta.threads.runs.stream(thread_id=thread_id, assistant_id=assistant_id, event_handler=recorder) as stream:
        stream.until_done()
        run = stream.get_final_run()
        final = stream.get_final_messages()
    assert run.status == "failed" and run.last_error is not None and run.last_error.code == "rate_limit_exceeded"
    assert collapsed(recorder.calls) == [
        "on_run_step_created:message_creation",
        "on_message_created",
        "on_text_created",
        "on_text_delta*",
        "on_run_step_done:message_creation:failed",
        "on_text_done:You said:",
        "on_message_done:incomplete",
        "on_end",
    ]
    assert dump(final) == dump(sdk.beta.threads.messages.list(thread_id, run_id=run.id).data)


class AsyncRecorder(AsyncAssistantEventHandler):
    def __init__(self) -> None:
        super().__init__()
        self.text = ""

    async def on_text_delta(self, delta: TextDelta, snapshot: Text) -> None:
        self.text += delta.value or ""


async def test_async_weather_flow(async_sdk: openai.AsyncOpenAI, assistant_id: str) -> None:
    thread = await async_sdk.beta.threads.create(
        messages=[{"role": "user", "content": 'Weather? [[call get_weather {"city": "Osaka"}]]'}]
    )
    async with async_sdk.beta.threads.runs.stream(thread_id=thread.id, assistant_id=assistant_id) as stream:
        await stream.until_done()
        paused = await stream.get_final_run()
    assert paused.status == "requires_action" and paused.required_action is not None
    call = paused.required_action.submit_tool_outputs.tool_calls[0]
    recorder = AsyncRecorder()
    async with async_sdk.beta.threads.runs.submit_tool_outputs_stream(
        thread_id=thread.id,
        run_id=paused.id,
        tool_outputs=[{"tool_call_id": call.id, "output": "rain"}],
        event_handler=recorder,
    ) as answering:
        await answering.until_done()
        final = await answering.get_final_messages()
    assert recorder.text == "Tool results: get_weather -> rain"
    listed = await async_sdk.beta.threads.messages.list(thread.id, run_id=paused.id)
    assert dump(final) == dump(listed.data)
