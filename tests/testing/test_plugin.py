"""The pytest plugin as a user's project runs it: pytester runs small test
files in a subprocess, where the plugin (loaded by its pytest11 entry point)
starts a real ephemeral server."""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.testing.server import ServerProcess
from tests.runner.fake_openai import FakeOpenAI

pytestmark = pytest.mark.timeout(120)

HEADER = """
import openai
import pytest

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


def run(client, assistant_id, text, **options):
    thread = client.beta.threads.create(**options)
    client.beta.threads.messages.create(thread.id, role="user", content=text)
    return client.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant_id, poll_interval_ms=20)


def answer(client, run):
    messages = client.beta.threads.messages.list(run.thread_id, order="desc", limit=1)
    return messages.data[0].content[0].text.value
"""


@pytest.fixture
def project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    pytester.makeini("[pytest]\nfilterwarnings =\n    ignore::DeprecationWarning\n")
    # The inner pytest and the server it starts import this working tree's
    # app, not the one the venv's editable install points at (a worktree's).
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[2]), prepend=os.pathsep)
    return pytester


def test_scripted_answers_tool_rounds_and_what_the_model_saw(project: pytest.Pytester) -> None:
    project.makepyfile(
        HEADER
        + """
def test_weather(assistants):
    client = openai.OpenAI()  # OPENAI_BASE_URL / OPENAI_API_KEY point at the server
    assistant = client.beta.assistants.create(model="gpt-4o", instructions="Be brief.", tools=[WEATHER])
    assistants.script(
        assistant_id=assistant.id,
        rounds=[{"tool_calls": [{"function": "get_weather", "arguments": {"city": "Tokyo"}}]}, "Sunny in Tokyo."],
    )
    result = run(client, assistant.id, "What is the weather?")
    assert result.status == "requires_action"
    call = result.required_action.submit_tool_outputs.tool_calls[0]
    assert (call.function.name, call.function.arguments) == ("get_weather", '{"city": "Tokyo"}')
    result = client.beta.threads.runs.submit_tool_outputs_and_poll(
        thread_id=result.thread_id, run_id=result.id, tool_outputs=[{"tool_call_id": call.id, "output": "22C"}],
        poll_interval_ms=20,
    )
    assert result.status == "completed"
    assert answer(client, result) == "Sunny in Tokyo."
    sent = assistants.model_requests(result.id)
    assert len(sent) == 2
    assert sent[0]["request"]["messages"][0] == {"role": "system", "content": "Be brief."}
    assert sent[1]["request"]["messages"][-1]["content"] == "22C"
    assert sent[1]["response"]["text"] == "Sunny in Tokyo."


def test_rules_match_thread_metadata_and_message(assistants):
    client = assistants.openai_client()
    assistant = client.beta.assistants.create(model="gpt-4o")
    assistants.script("For the VIP.", thread_metadata={"tier": "vip"})
    assistants.script({"fail": "rate_limit"}, message="(?i)refund")
    assert answer(client, run(client, assistant.id, "hello", metadata={"tier": "vip"})) == "For the VIP."
    assert answer(client, run(client, assistant.id, "hello")) == "You said: hello"
    failed = run(client, assistant.id, "I want a REFUND")
    assert (failed.status, failed.last_error.code) == ("failed", "rate_limit_exceeded")


def test_each_test_sees_only_its_own_objects(assistants):
    client = assistants.openai_client()
    assert client.beta.assistants.list().data == []
    assert assistants.rules() == []
"""
    )
    result = project.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)


def test_a_failing_test_reports_the_server_log(project: pytest.Pytester) -> None:
    project.makepyfile(
        HEADER
        + """
def test_fails(assistants):
    client = assistants.openai_client()
    client.beta.assistants.create(model="gpt-4o", name="marker-for-the-log")
    assert False, "on purpose"
"""
    )
    result = project.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*assistants-server log (call)*", "*POST /v1/assistants*"])


def test_points_at_a_running_server(project: pytest.Pytester, tmp_path: Path) -> None:
    server = ServerProcess.start(env={"LITELLM_LOCAL_MODEL_COST_MAP": "True"})
    try:
        client_check = project.makepyfile(
            HEADER
            + f"""
def test_uses_it(assistants):
    assert assistants.base_url == {server.base_url!r}
    client = assistants.openai_client()
    assert answer(client, run(client, client.beta.assistants.create(model="m").id, "ping")) == "You said: ping"
"""
        )
        result = project.runpytest_subprocess(
            "-p", "no:cacheprovider", f"--assistants-server-url={server.base_url}", str(client_check)
        )
        result.assert_outcomes(passed=1)
    finally:
        server.stop()


@pytest.fixture
def provider() -> Iterator[FakeOpenAI]:
    """The loopback OpenAI-compatible stub, on its own event loop thread (the
    server that calls it is another process)."""
    loop = asyncio.new_event_loop()
    fake = FakeOpenAI()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(fake.start(), loop).result(10)
    try:
        yield fake
    finally:
        asyncio.run_coroutine_threadsafe(fake.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@pytest.mark.parametrize("database_url", ["sqlite", "postgres"], indirect=True)
def test_record_then_replay_offline(
    project: pytest.Pytester,
    provider: FakeOpenAI,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    database_url: str,
) -> None:
    """On PostgreSQL too (issue 17): a provider's run there is handed to the
    worker or claimed by its tick, and its request, a cassette's key, is the
    same either way (tests/runner/test_hand_off_alike.py)."""
    if not database_url.startswith("sqlite"):  # (SQLite: the server's own file, as a user's would be)
        monkeypatch.setenv("ASSISTANTS_DATABASE_URL", database_url)
    secret = "sk-very-secret-provider-key-123"  # noqa: S105 (a made-up key the cassette must not contain)
    monkeypatch.setenv("FAKE_PROVIDER_KEY", secret)
    routing = tmp_path / "models.yaml"
    entry = {"model": "openai/*", "api_base": provider.api_base, "api_key": "os.environ/FAKE_PROVIDER_KEY"}
    routing.write_text(json.dumps({"model_list": [{"model_name": "*", "litellm_params": {**entry, "max_retries": 0}}]}))
    cassettes = tmp_path / "cassettes"
    project.makepyfile(
        HEADER
        + """
import os

def test_real_model(assistants):
    client = assistants.openai_client()
    assistant = client.beta.assistants.create(model="fake-no-usage")
    result = run(client, assistant.id, os.environ.get("QUESTION", "Tell me about " + os.environ["FAKE_PROVIDER_KEY"]))
    assert result.status == "completed", result.last_error
    assert answer(client, result) == "Plain answer"
"""
    )
    recorded = project.runpytest_subprocess(
        "-p", "no:cacheprovider", f"--assistants-server-config={routing}", f"--llm-record={cassettes}"
    )
    recorded.assert_outcomes(passed=1)
    assert len(provider.requests) == 1
    files = list(cassettes.glob("*.json"))
    assert len(files) == 1
    text = files[0].read_text()
    assert secret not in text and "<redacted:FAKE_PROVIDER_KEY>" in text

    # Offline now: the same test passes from the cassette, the provider is not called.
    replayed = project.runpytest_subprocess(
        "-p", "no:cacheprovider", f"--assistants-server-config={routing}", f"--llm-replay={cassettes}"
    )
    replayed.assert_outcomes(passed=1)
    assert len(provider.requests) == 1

    # A request that was never recorded fails the test, naming what differs.
    monkeypatch.setenv("QUESTION", "Something else entirely")
    missed = project.runpytest_subprocess(
        "-p", "no:cacheprovider", f"--assistants-server-config={routing}", f"--llm-replay={cassettes}"
    )
    missed.assert_outcomes(failed=1, errors=1)  # the run fails, then the plugin fails the test
    missed.stdout.fnmatch_lines(["*No recorded answer for this fake-no-usage request*messages[[]0[]].content*"])
    assert len(provider.requests) == 1
