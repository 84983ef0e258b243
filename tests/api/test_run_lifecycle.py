"""Run lifecycle through the official SDK: every cancel path, expiry,
provider failures, token limits and truncation, overrides, images, and a real
OpenAI-compatible backend on loopback through litellm."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import openai
import pytest
from fastapi import FastAPI
from sqlalchemy import update

from app import orm
from app.settings import Settings
from app.worker import Worker
from tests.runner.fake_openai import FakeOpenAI

FUNCTION_F = {"type": "function", "function": {"name": "f"}}


@pytest.fixture
def no_worker(settings: Settings) -> Settings:
    """The test drives the worker itself (request this before `client`)."""
    settings.embedded_worker = False
    return settings


async def _thread_and_assistant(client: openai.AsyncOpenAI, text: str, **assistant: Any) -> tuple[str, str]:
    created = await client.beta.assistants.create(model="gpt-4o", **assistant)
    thread = await client.beta.threads.create(messages=[{"role": "user", "content": text}])
    return thread.id, created.id


async def _wait_for(client: openai.AsyncOpenAI, thread_id: str, run_id: str, status: str) -> Any:
    """Poll until the run reaches `status` (bounded by the test timeout)."""
    while True:
        run = await client.beta.threads.runs.retrieve(run_id, thread_id=thread_id)
        if run.status == status:
            return run
        await asyncio.sleep(0.01)


async def test_cancel_queued_run(no_worker: Settings, client: openai.AsyncOpenAI, app: FastAPI) -> None:
    thread_id, assistant_id = await _thread_and_assistant(client, "hello")
    run = await client.beta.threads.runs.create(thread_id=thread_id, assistant_id=assistant_id)
    assert run.status == "queued"
    cancelling = await client.beta.threads.runs.cancel(run.id, thread_id=thread_id)
    assert cancelling.status == "cancelling"
    await Worker(app.state.runtime).run_until_idle()
    final = await client.beta.threads.runs.retrieve(run.id, thread_id=thread_id)
    assert final.status == "cancelled" and final.cancelled_at is not None and final.started_at is None
    assert (await client.beta.threads.runs.steps.list(run.id, thread_id=thread_id)).data == []


async def test_cancel_in_progress_run(client: openai.AsyncOpenAI) -> None:
    thread_id, assistant_id = await _thread_and_assistant(client, "[[reply partial answer]] [[hang]]")
    run = await client.beta.threads.runs.create(thread_id=thread_id, assistant_id=assistant_id)
    await _wait_for(client, thread_id, run.id, "in_progress")
    # wait until the partial answer has started (its message exists)
    while not (await client.beta.threads.messages.list(thread_id, run_id=run.id)).data:  # noqa: ASYNC110 - polling the API
        await asyncio.sleep(0.01)
    await client.beta.threads.runs.cancel(run.id, thread_id=thread_id)
    final = await client.beta.threads.runs.poll(run.id, thread_id=thread_id)
    assert final.status == "cancelled"
    message = (await client.beta.threads.messages.list(thread_id, run_id=run.id)).data[0]
    assert message.status == "incomplete"
    assert message.incomplete_details is not None and message.incomplete_details.reason == "run_cancelled"
    assert message.content[0].text.value.startswith("partial")  # type: ignore[union-attr]
    step = (await client.beta.threads.runs.steps.list(run.id, thread_id=thread_id)).data[0]
    assert step.status == "cancelled"


async def test_requires_action_expires(client: openai.AsyncOpenAI, app: FastAPI) -> None:
    thread_id, assistant_id = await _thread_and_assistant(client, "[[call f]]", tools=[FUNCTION_F])
    run = await client.beta.threads.runs.create_and_poll(thread_id=thread_id, assistant_id=assistant_id)
    assert run.status == "requires_action"
    async with app.state.runtime.transaction() as session:  # time passes: the deadline is now behind us
        await session.execute(update(orm.Run).where(orm.Run.id == run.id).values(expires_at=run.created_at - 1))
    call_id = run.required_action.submit_tool_outputs.tool_calls[0].id  # type: ignore[union-attr]
    with pytest.raises(openai.BadRequestError) as exc:
        await client.beta.threads.runs.submit_tool_outputs(
            run.id, thread_id=thread_id, tool_outputs=[{"tool_call_id": call_id, "output": "late"}]
        )
    assert exc.value.body["message"] == 'Runs in status "expired" do not accept tool outputs.'  # type: ignore[index]
    await Worker(app.state.runtime).tick()
    final = await client.beta.threads.runs.retrieve(run.id, thread_id=thread_id)
    assert final.status == "expired"
    step = (await client.beta.threads.runs.steps.list(run.id, thread_id=thread_id)).data[0]
    assert step.status == "expired" and step.expired_at is not None


@pytest.mark.parametrize(
    ("directive", "code"),
    [
        ("[[fail rate_limit]]", "rate_limit_exceeded"),
        ("[[fail server_error]]", "server_error"),
        ("[[fail invalid_prompt]]", "invalid_prompt"),
    ],
)
async def test_provider_failure_fails_the_run(client: openai.AsyncOpenAI, directive: str, code: str) -> None:
    thread_id, assistant_id = await _thread_and_assistant(client, directive)
    run = await client.beta.threads.runs.create_and_poll(thread_id=thread_id, assistant_id=assistant_id)
    assert run.status == "failed" and run.failed_at is not None
    assert run.last_error is not None and run.last_error.code == code and run.last_error.message


async def test_failure_mid_answer_keeps_partial_text(client: openai.AsyncOpenAI) -> None:
    thread_id, assistant_id = await _thread_and_assistant(
        client, "[[reply one two three four five]] [[fail server_error after 3]]"
    )
    run = await client.beta.threads.runs.create_and_poll(thread_id=thread_id, assistant_id=assistant_id)
    assert run.status == "failed"
    message = (await client.beta.threads.messages.list(thread_id, run_id=run.id)).data[0]
    assert message.status == "incomplete" and message.incomplete_details.reason == "run_failed"  # type: ignore[union-attr]
    assert message.content[0].text.value == "one two three"  # type: ignore[union-attr]
    step = (await client.beta.threads.runs.steps.list(run.id, thread_id=thread_id)).data[0]
    assert step.status == "failed" and step.last_error is not None


async def test_max_completion_tokens_ends_incomplete(client: openai.AsyncOpenAI) -> None:
    thread_id, assistant_id = await _thread_and_assistant(client, "[[tokens 400]]")
    run = await client.beta.threads.runs.create_and_poll(
        thread_id=thread_id, assistant_id=assistant_id, max_completion_tokens=256
    )
    assert run.status == "incomplete"
    assert run.incomplete_details is not None and run.incomplete_details.reason == "max_completion_tokens"
    assert run.usage is not None and run.usage.completion_tokens == 256
    message = (await client.beta.threads.messages.list(thread_id, run_id=run.id)).data[0]
    assert message.status == "incomplete" and message.incomplete_details.reason == "max_tokens"  # type: ignore[union-attr]


async def test_completion_tokens_count_across_tool_rounds(client: openai.AsyncOpenAI) -> None:
    thread_id, assistant_id = await _thread_and_assistant(
        client, "[[tokens 200]] [[call f]] [[then]] [[tokens 200]]", tools=[FUNCTION_F]
    )
    run = await client.beta.threads.runs.create_and_poll(
        thread_id=thread_id, assistant_id=assistant_id, max_completion_tokens=300
    )
    assert run.status == "requires_action"
    call_id = run.required_action.submit_tool_outputs.tool_calls[0].id  # type: ignore[union-attr]
    run = await client.beta.threads.runs.submit_tool_outputs_and_poll(
        run_id=run.id, thread_id=thread_id, tool_outputs=[{"tool_call_id": call_id, "output": "ok"}]
    )
    assert run.status == "incomplete"
    assert run.incomplete_details.reason == "max_completion_tokens"  # type: ignore[union-attr]
    assert run.usage.completion_tokens <= 300  # type: ignore[union-attr]


async def test_max_prompt_tokens_ends_incomplete(client: openai.AsyncOpenAI) -> None:
    thread_id, assistant_id = await _thread_and_assistant(client, "word " * 600)
    run = await client.beta.threads.runs.create_and_poll(
        thread_id=thread_id, assistant_id=assistant_id, max_prompt_tokens=256
    )
    assert run.status == "incomplete"
    assert run.incomplete_details.reason == "max_prompt_tokens"  # type: ignore[union-attr]


async def test_text_before_tool_call_is_kept(client: openai.AsyncOpenAI) -> None:
    thread_id, assistant_id = await _thread_and_assistant(
        client, "[[reply Let me check.]] [[call f]]", tools=[FUNCTION_F]
    )
    run = await client.beta.threads.runs.create_and_poll(thread_id=thread_id, assistant_id=assistant_id)
    assert run.status == "requires_action"
    steps = (await client.beta.threads.runs.steps.list(run.id, thread_id=thread_id, order="asc")).data
    assert [(s.type, s.status) for s in steps] == [("message_creation", "completed"), ("tool_calls", "in_progress")]
    message = (await client.beta.threads.messages.list(thread_id, run_id=run.id)).data[0]
    assert message.content[0].text.value == "Let me check."  # type: ignore[union-attr]


async def test_overrides_are_applied_and_reported(client: openai.AsyncOpenAI) -> None:
    thread_id, assistant_id = await _thread_and_assistant(client, "first", instructions="Be brief.", tools=[FUNCTION_F])
    run = await client.beta.threads.runs.create_and_poll(
        thread_id=thread_id,
        assistant_id=assistant_id,
        model="other-model",
        additional_instructions="Answer in JSON.",
        additional_messages=[{"role": "user", "content": "second [[json]]"}],
        tools=[],
        temperature=0.2,
        top_p=0.9,
        metadata={"k": "v"},
        response_format={"type": "json_object"},
        truncation_strategy={"type": "last_messages", "last_messages": 5},
        parallel_tool_calls=False,
    )
    assert run.status == "completed"
    assert run.model == "other-model" and run.instructions == "Be brief.\n\nAnswer in JSON."
    assert run.tools == [] and run.temperature == 0.2 and run.top_p == 0.9 and run.metadata == {"k": "v"}
    assert run.truncation_strategy.type == "last_messages" and run.parallel_tool_calls is False  # type: ignore[union-attr]
    answer = (await client.beta.threads.messages.list(thread_id)).data[0]
    assert json.loads(answer.content[0].text.value) == {"message": "You said: second"}  # type: ignore[union-attr]
    assert [m.role for m in (await client.beta.threads.messages.list(thread_id, order="asc")).data] == [
        "user",
        "user",
        "assistant",
    ]


async def test_tool_choice(client: openai.AsyncOpenAI) -> None:
    tools = [FUNCTION_F, {"type": "function", "function": {"name": "g"}}]
    thread_id, assistant_id = await _thread_and_assistant(client, "no directives here", tools=tools)
    run = await client.beta.threads.runs.create_and_poll(
        thread_id=thread_id, assistant_id=assistant_id, tool_choice="required"
    )
    assert run.status == "requires_action"
    await client.beta.threads.runs.cancel(run.id, thread_id=thread_id)
    await client.beta.threads.runs.poll(run.id, thread_id=thread_id)
    run = await client.beta.threads.runs.create_and_poll(
        thread_id=thread_id, assistant_id=assistant_id, tool_choice={"type": "function", "function": {"name": "g"}}
    )
    assert run.required_action.submit_tool_outputs.tool_calls[0].function.name == "g"  # type: ignore[union-attr]
    await client.beta.threads.runs.cancel(run.id, thread_id=thread_id)
    await client.beta.threads.runs.poll(run.id, thread_id=thread_id)
    await client.beta.threads.messages.create(thread_id, role="user", content="[[call f]]")
    run = await client.beta.threads.runs.create_and_poll(
        thread_id=thread_id, assistant_id=assistant_id, tool_choice="none"
    )
    assert run.status == "completed"
    with pytest.raises(openai.BadRequestError):
        await client.beta.threads.runs.create(
            thread_id=thread_id,
            assistant_id=assistant_id,
            tool_choice={"type": "function", "function": {"name": "nope"}},
        )


async def test_images_reach_the_model(client: openai.AsyncOpenAI) -> None:
    png = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000") + b"\0" * 20
    image = await client.files.create(file=("dot.png", png), purpose="vision")
    thread = await client.beta.threads.create(
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_file", "image_file": {"file_id": image.id}},
                    {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
                ],
            }
        ]
    )
    assistant = await client.beta.assistants.create(model="gpt-4o")
    run = await client.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant.id)
    answer = (await client.beta.threads.messages.list(thread.id)).data[0].content[0].text.value  # type: ignore[union-attr]
    assert run.status == "completed"
    assert f"[image: image/png, {len(png)} bytes]" in answer and "https://example.com/cat.png" in answer


async def test_run_bad_input(client: openai.AsyncOpenAI) -> None:
    thread_id, assistant_id = await _thread_and_assistant(client, "hi")
    for kwargs in ({"max_completion_tokens": 10}, {"temperature": 3}, {"truncation_strategy": {"type": "bogus"}}):
        with pytest.raises(openai.BadRequestError):
            await client.beta.threads.runs.create(thread_id=thread_id, assistant_id=assistant_id, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(openai.NotFoundError):
        await client.beta.threads.runs.create(thread_id=thread_id, assistant_id="asst_missing")
    with pytest.raises(openai.BadRequestError):
        await client.beta.threads.runs.create(thread_id=thread_id, assistant_id="thread_wrong")
    assert (await client.beta.threads.runs.list(thread_id)).data == []


@pytest.fixture
def routed_settings(request: pytest.FixtureRequest, settings: Settings, fake: FakeOpenAI, tmp_path: Path) -> Settings:
    """Every model to the fake backend: by our own HTTP request (the default for
    an openai/ route with an api_base), or through litellm when a test
    parametrizes this fixture with "litellm"."""
    config = {
        "model_list": [
            {
                "model_name": "*",
                "litellm_params": {
                    "model": "openai/*",
                    "api_base": fake.api_base,
                    "api_key": "sk-fake",
                    "max_retries": 0,
                },
                "model_info": {"max_input_tokens": 60},
                "direct": getattr(request, "param", "direct") == "direct",
            }
        ]
    }
    path = tmp_path / "models.json"
    path.write_text(json.dumps(config))
    settings.llm_config = path
    return settings


@pytest.mark.parametrize("routed_settings", ["direct", "litellm"], indirect=True)
async def test_real_backend_direct_and_through_litellm(
    routed_settings: Settings, client: openai.AsyncOpenAI, fake: FakeOpenAI
) -> None:
    tools = [
        {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}
    ]
    thread_id, assistant_id = await _thread_and_assistant(
        client, "Weather in Tokyo?", tools=tools, instructions="Be helpful."
    )
    run = await client.beta.threads.runs.create_and_poll(thread_id=thread_id, assistant_id=assistant_id)
    assert run.status == "requires_action", run.last_error
    call = run.required_action.submit_tool_outputs.tool_calls[0]  # type: ignore[union-attr]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments)
    steps = (await client.beta.threads.runs.steps.list(run.id, thread_id=thread_id, order="asc")).data
    assert steps[0].type == "message_creation"  # "Hello world" came before the call
    sent = fake.requests[-1]["body"]
    assert sent["model"] == "gpt-4o"
    assert sent["messages"] == [
        {"role": "system", "content": "Be helpful."},
        {"role": "user", "content": "Weather in Tokyo?"},
    ]
    assert sent["tools"][0]["function"]["name"] == "get_weather"


async def test_auto_truncation_drops_oldest_messages(
    routed_settings: Settings, client: openai.AsyncOpenAI, fake: FakeOpenAI
) -> None:
    assistant = await client.beta.assistants.create(model="fake-no-usage")
    thread = await client.beta.threads.create(
        messages=[{"role": "user", "content": f"message number {i} " + "pad " * 10} for i in range(12)]
    )
    run = await client.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant.id)
    assert run.status == "completed", run.last_error
    sent = fake.requests[-1]["body"]["messages"]
    assert 0 < len(sent) < 12
    assert "message number 11" in sent[-1]["content"]  # the newest survive, the oldest go


async def test_provider_http_errors(routed_settings: Settings, client: openai.AsyncOpenAI) -> None:
    for model, code in (("fake-429", "rate_limit_exceeded"), ("fake-500", "server_error")):
        assistant = await client.beta.assistants.create(model=model)
        thread = await client.beta.threads.create(messages=[{"role": "user", "content": "hi"}])
        run = await client.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant.id)
        assert run.status == "failed" and run.last_error is not None and run.last_error.code == code
