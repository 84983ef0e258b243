"""Seed 001's flow exactly as written for ``AzureOpenAI(api_version=
"2024-02-15-preview")`` on the SDK of its time (openai 1.12.0, which sends
``OpenAI-Beta: assistants=v1``), in its own virtual environment, against a
real server process; then retrieval with ``file_ids`` and the v1 file
endpoints through that SDK."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.testing.server import ServerProcess

pytestmark = pytest.mark.timeout(300)
# httpx as of then too: openai 1.12 passes `proxies`, which httpx 0.28 removed.
SEED_SDK = ("openai==1.12.0", "httpx==0.27.2")

SCRIPT = r"""
import os, sys, time
from openai import AzureOpenAI

client = AzureOpenAI(
    api_key=os.environ["AZURE_OPENAI_KEY"],
    api_version="2024-02-15-preview",
    azure_endpoint=os.environ["AZURE_OPENAI_ENDPOINT"],
)

def wait(thread_id, run_id):
    deadline = time.monotonic() + 60
    while True:
        run = client.beta.threads.runs.retrieve(thread_id=thread_id, run_id=run_id)
        if run.status not in ("queued", "in_progress"):
            return run
        assert time.monotonic() < deadline, run.status
        time.sleep(0.05)

# --- seed 001, as the article writes it ---
assistant = client.beta.assistants.create(
    instructions="You are an AI assistant that can write code to help answer math questions",
    model="gpt-35-turbo",
    tools=[{"type": "code_interpreter"}],
)
assert assistant.file_ids == [] and assistant.tools[0].type == "code_interpreter"
thread = client.beta.threads.create()
message = client.beta.threads.messages.create(
    thread_id=thread.id, role="user", content="I need to solve the equation `3x + 11 = 14`. Can you help me?"
)
assert message.file_ids == []
run = client.beta.threads.runs.create(
    thread_id=thread.id,
    assistant_id=assistant.id,
    instructions="Please address the user as Jane Doe. The user has a premium account.",
)
run = wait(thread.id, run.id)
assert run.status == "completed", run.last_error
assert run.file_ids == []
messages = client.beta.threads.messages.list(thread_id=thread.id)
assert [m.role for m in messages.data] == ["assistant", "user"], messages
answer = messages.data[0].content[0].text.value
assert answer == "You said: I need to solve the equation `3x + 11 = 14`. Can you help me?", answer

# --- retrieval with file_ids, the v1 way ---
zebras = b"# Zebras\n\nZebras sleep standing up in the savanna.\n"
doc = client.files.create(file=("zebras.md", zebras), purpose="assistants")
librarian = client.beta.assistants.create(model="gpt-4", tools=[{"type": "retrieval"}], file_ids=[doc.id])
assert librarian.file_ids == [doc.id] and librarian.tools[0].type == "retrieval"
thread = client.beta.threads.create(
    messages=[
        {"role": "user", "content": '[[call file_search {"query": "how do zebras sleep"}]]', "file_ids": [doc.id]}
    ]
)
run = wait(thread.id, client.beta.threads.runs.create(thread_id=thread.id, assistant_id=librarian.id).id)
assert run.status == "completed", run.last_error
steps = client.beta.threads.runs.steps.list(thread_id=thread.id, run_id=run.id)
kinds = [call.type for step in steps.data if step.type == "tool_calls" for call in step.step_details.tool_calls]
assert kinds == ["retrieval"], kinds
answer = client.beta.threads.messages.list(thread_id=thread.id).data[0]
notes = answer.content[0].text.annotations
assert notes and notes[0].type == "file_citation" and notes[0].file_citation.file_id == doc.id, notes

# --- assistant files and message files ---
other = client.files.create(file=("notes.txt", b"notes"), purpose="assistants")
attached = client.beta.assistants.files.create(assistant_id=librarian.id, file_id=other.id)
assert attached.assistant_id == librarian.id
listed = client.beta.assistants.files.list(assistant_id=librarian.id).data
assert sorted(f.id for f in listed) == sorted([doc.id, other.id])
assert client.beta.assistants.files.retrieve(assistant_id=librarian.id, file_id=other.id).id == other.id
assert client.beta.assistants.files.delete(assistant_id=librarian.id, file_id=other.id).deleted
assert client.beta.assistants.retrieve(librarian.id).file_ids == [doc.id]
first = client.beta.threads.messages.list(thread_id=thread.id, order="asc").data[0]
message_files = client.beta.threads.messages.files.list(thread_id=thread.id, message_id=first.id).data
assert [f.id for f in message_files] == [doc.id]
print("seed flow ok")
"""


@pytest.fixture(scope="module")
def seed_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtual environment with the SDK of early 2024 (and nothing of ours)."""
    home = tmp_path_factory.mktemp("seed-sdk")
    venv.EnvBuilder(with_pip=True).create(home)
    python = home / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *SEED_SDK],
        check=True,
        timeout=240,
    )
    return python


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    process = ServerProcess.start(env={"LITELLM_LOCAL_MODEL_COST_MAP": "True", "ASSISTANTS_API_KEYS": "sk-seed"})
    try:
        yield process
    finally:
        process.stop()


def test_seed_001_on_the_sdk_of_its_time(seed_python: Path, server: ServerProcess, tmp_path: Path) -> None:
    script = tmp_path / "seed.py"
    script.write_text(SCRIPT)
    origin = server.base_url.removesuffix("/v1")
    env = {**os.environ, "AZURE_OPENAI_KEY": server.api_key, "AZURE_OPENAI_ENDPOINT": origin}
    env.pop("OPENAI_BASE_URL", None)
    result = subprocess.run(
        [str(seed_python), "-W", "ignore", str(script)], capture_output=True, text=True, env=env, timeout=180
    )
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n--- server log ---\n{server.log_tail(60)}"
    assert "seed flow ok" in result.stdout
    assert sys.executable != str(seed_python)
