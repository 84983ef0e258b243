"""Chat completions, embeddings and models with a routing file (issue 12): a
provider model through litellm to a real OpenAI-compatible server on
loopback (tests/runner/fake_openai.py), the offline model beside it, and a
configured embedding model; and user-set parameters of a run reaching the
provider (never dropped by litellm's drop_params)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import openai
import pytest

from app.settings import Settings
from tests.runner.fake_openai import USAGE, FakeOpenAI

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def settings(database_url: str, tmp_path: Path, fake: FakeOpenAI) -> Settings:
    config = {
        "model_list": [
            {"model_name": "assistant-model", "litellm_params": {"model": "offline"}},
            {
                "model_name": "fake-*",
                "litellm_params": {
                    "model": "openai/fake-*",
                    "api_base": fake.api_base,
                    "api_key": "sk-f",
                    "max_retries": 0,
                },
            },
            {
                "model_name": "gpt-4",
                "litellm_params": {
                    "model": "openai/gpt-4",
                    "api_base": fake.api_base,
                    "api_key": "sk-f",
                    "max_retries": 0,
                },
            },
        ],
        "embedding_model": "hashing",
    }
    path = tmp_path / "models.yaml"
    path.write_text(json.dumps(config))
    return Settings(data_dir=tmp_path / "data", database_url=database_url, poll_after_ms=10, llm_config=path)


async def test_chat_goes_through_routing(client: openai.AsyncOpenAI, fake: FakeOpenAI) -> None:
    completion = await client.chat.completions.create(
        model="fake-chat",
        messages=[{"role": "user", "content": "weather?"}],
        stop=["END"],
        seed=7,
        temperature=0.3,
    )
    (choice,) = completion.choices
    assert choice.message.content == "Hello world" and choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls or []
    assert [(c.id, c.function.name, c.function.arguments) for c in calls] == [  # type: ignore[union-attr]
        ("call_fake1", "get_weather", '{"city": "Tokyo"}')
    ]
    assert completion.usage is not None and completion.usage.prompt_tokens == USAGE["prompt_tokens"]
    [sent] = fake.requests
    assert (sent["body"]["stop"], sent["body"]["seed"], sent["body"]["temperature"]) == (["END"], 7, 0.3)
    offline = await client.chat.completions.create(
        model="assistant-model", messages=[{"role": "user", "content": "hi"}]
    )
    assert offline.choices[0].message.content == "You said: hi"


async def test_unrouted_model_is_404(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        await client.chat.completions.create(model="nobody", messages=[{"role": "user", "content": "hi"}])
    assert missing.value.code == "model_not_found"
    assert "The model `nobody` does not exist" in missing.value.message
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("nobody")
    with pytest.raises(openai.NotFoundError):
        await client.embeddings.create(model="nobody", input="x")


async def test_provider_rejection_is_a_400_naming_the_parameter(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as rejected:
        await client.chat.completions.create(
            model="fake-no-format",
            messages=[{"role": "user", "content": "json"}],
            response_format={"type": "json_object"},
        )
    assert "response_format" in rejected.value.message


async def test_models_list_names_the_routing_file(client: openai.AsyncOpenAI) -> None:
    listed = await client.models.list()
    assert [model.id for model in listed.data] == ["assistant-model", "gpt-4"]
    assert (await client.models.retrieve("fake-anything")).id == "fake-anything"
    embedded = await client.embeddings.create(model="hashing", input=["a", "b"], encoding_format="float")
    assert len(embedded.data) == 2


async def test_a_runs_response_format_reaches_the_provider(client: openai.AsyncOpenAI, fake: FakeOpenAI) -> None:
    """litellm's table says gpt-4 lacks response_format; a user's run sets it
    explicitly, so it must reach the provider (issue 12)."""
    assistant = await client.beta.assistants.create(model="gpt-4", response_format={"type": "json_object"})
    thread = await client.beta.threads.create(messages=[{"role": "user", "content": "json please"}])
    run = await client.beta.threads.runs.create_and_poll(
        thread_id=thread.id, assistant_id=assistant.id, temperature=0.4, top_p=0.8
    )
    # The fake provider answers with a get_weather call, so the run waits for its output.
    assert run.status == "requires_action", run.last_error
    body: dict[str, Any] = fake.requests[-1]["body"]
    assert body["response_format"] == {"type": "json_object"}
    assert (body["temperature"], body["top_p"]) == (0.4, 0.8)


async def test_a_rejected_parameter_fails_the_run_naming_it(client: openai.AsyncOpenAI) -> None:
    assistant = await client.beta.assistants.create(model="fake-no-format", response_format={"type": "json_object"})
    thread = await client.beta.threads.create(messages=[{"role": "user", "content": "json please"}])
    run = await client.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant.id)
    assert run.status == "failed" and run.last_error is not None
    assert run.last_error.code == "invalid_prompt"
    assert "response_format" in run.last_error.message


async def test_the_model_is_told_the_code_interpreter_files(client: openai.AsyncOpenAI, fake: FakeOpenAI) -> None:
    data = await client.files.create(file=("sales.csv", b"month,total\njan,10\n"), purpose="assistants")
    assistant = await client.beta.assistants.create(
        model="fake-no-usage",
        tools=[{"type": "code_interpreter"}],
        tool_resources={"code_interpreter": {"file_ids": [data.id]}},
    )
    thread = await client.beta.threads.create(messages=[{"role": "user", "content": "Sum the totals"}])
    run = await client.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant.id)
    assert run.status == "completed", run.last_error
    system = [m["content"] for m in fake.requests[-1]["body"]["messages"] if m["role"] == "system"]
    assert "Files available to code_interpreter in /mnt/data:\n- /mnt/data/sales.csv (19 bytes)" in system
