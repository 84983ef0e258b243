"""A stream's life against a run's: the client leaving (the run goes on),
a cancel from elsewhere (the stream ends with the cancel), many streams at
once, and the server shutting down (an error event, then done)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2
import openai
import pytest

from tests.streaming import rules
from tests.streaming.support import poll_run, thread_with

pytestmark = pytest.mark.timeout(60)
ROOT = Path(__file__).resolve().parents[2]


def test_a_client_that_leaves_does_not_stop_the_run(sdk: openai.OpenAI, assistant_id: str) -> None:
    thread_id = thread_with(sdk, "[[tokens 20]] [[delay 50]]")
    stream = sdk.beta.threads.runs.create(thread_id=thread_id, assistant_id=assistant_id, stream=True)
    run_id = None
    for event in stream:
        if event.event == "thread.run.created":
            run_id = event.data.id
        if event.event == "thread.message.delta":
            break
    stream.close()  # hang up mid-answer
    assert run_id is not None
    run = poll_run(sdk, thread_id, run_id)
    assert run.status == "completed"
    (message,) = sdk.beta.threads.messages.list(thread_id, run_id=run_id).data
    assert message.status == "completed"
    assert len(message.content[0].text.value.split()) == 20  # type: ignore[union-attr]


def _read_until(events: Iterator[rules.SSE | object], checker: rules.StreamRules, name: str) -> None:
    for item in events:
        if isinstance(item, rules.SSE):
            checker.feed(item)
            if item.event == name:
                return
    raise AssertionError(f"the stream ended before {name}")


def test_cancel_during_a_stream_ends_it_with_the_cancel(
    raw: httpx2.Client, sdk: openai.OpenAI, assistant_id: str
) -> None:
    thread_id = thread_with(sdk, "Wait for it [[hang]]")
    checker = rules.StreamRules()
    with raw.stream(
        "POST", f"/threads/{thread_id}/runs", json={"assistant_id": assistant_id, "stream": True}
    ) as response:
        events = rules.frames(response.iter_raw())
        _read_until(events, checker, "thread.message.delta")
        run_id = checker.run_id
        assert run_id is not None
        assert sdk.beta.threads.runs.cancel(run_id, thread_id=thread_id).status == "cancelling"
        for item in events:
            if isinstance(item, rules.SSE):
                checker.feed(item)
    checker.finish()
    tail = rules.names(checker.events)[-5:]
    assert tail == [
        "thread.run.cancelling",
        "thread.run.step.cancelled",
        "thread.message.incomplete",
        "thread.run.cancelled",
        "done",
    ]
    message = next(event.data for event in checker.events if event.event == "thread.message.incomplete")
    assert message["incomplete_details"] == {"reason": "run_cancelled"}
    assert poll_run(sdk, thread_id, run_id).status == "cancelled"


async def _stream_one(client: openai.AsyncOpenAI, assistant_id: str, word: str) -> tuple[str, str]:
    thread = await client.beta.threads.create(messages=[{"role": "user", "content": f"{word} [[delay 20]]"}])
    async with client.beta.threads.runs.stream(thread_id=thread.id, assistant_id=assistant_id) as stream:
        text = "".join([delta async for delta in stream.text_deltas])
        run = await stream.get_final_run()
    assert run.status == "completed"
    return word, text


async def test_many_streams_at_once(async_sdk: openai.AsyncOpenAI, assistant_id: str) -> None:
    words = [f"word{index}" for index in range(24)]
    results = await asyncio.gather(*(_stream_one(async_sdk, assistant_id, word) for word in words))
    assert dict(results) == {word: f"You said: {word}" for word in words}


# The server as a process, for what only a process does: SIGTERM.


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def served(database_url: str, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """``python -m app serve`` on a free port, ready for requests."""
    port = _free_port()
    command = [sys.executable, "-m", "app", "serve", "--port", str(port), "--data-dir", str(tmp_path / "data")]
    command += ["--database-url", database_url, "--log-level", "warning"]
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        _wait_until_up(process, base_url)
        yield process, base_url
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
        assert process.stdout is not None
        process.stdout.close()


def _wait_until_up(process: subprocess.Popen[bytes], base_url: str) -> None:
    deadline = time.monotonic() + 45
    while time.monotonic() < deadline:
        assert process.poll() is None, "the server exited during start-up"
        try:
            if httpx2.get(base_url + "/models", timeout=1).status_code:
                return
        except httpx2.TransportError:
            time.sleep(0.05)
    raise AssertionError("the server did not start in time")


def test_shutdown_ends_open_streams_with_an_error_event(served: tuple[subprocess.Popen[bytes], str]) -> None:
    process, base_url = served
    with openai.OpenAI(base_url=base_url, api_key="sk-test", max_retries=0, timeout=30) as sdk:
        assistant = sdk.beta.assistants.create(model="gpt-4o")
        thread_id = thread_with(sdk, "Never done [[hang]]")
        with sdk.beta.threads.runs.stream(thread_id=thread_id, assistant_id=assistant.id) as stream:
            seen = []
            with pytest.raises(openai.APIError) as raised:
                for event in stream:
                    seen.append(event.event)
                    if event.event == "thread.message.delta" and seen.count(event.event) == 1:
                        process.send_signal(signal.SIGTERM)
    assert "shutting down" in raised.value.message
    assert raised.value.body is not None and raised.value.body["type"] == "server_error"  # type: ignore[index]
    assert "thread.message.delta" in seen
    assert process.wait(timeout=20) == 0
