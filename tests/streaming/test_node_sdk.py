"""The official Node SDK's AssistantStream against the live server: a text
run and the weather flow with submitToolOutputsStream, through finalRun()
and finalMessages(). Two releases from the npm registry (pinned in
node/package-lock.json): 6.x, the last to declare Node 20 support, and 7.x,
whose stream checks are the strictest (one active message and one active
run step at a time)."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.streaming.conftest import LiveServer

pytestmark = pytest.mark.timeout(240)

NODE_DIR = Path(__file__).parent / "node"


@pytest.fixture(scope="session")
def node_project() -> Path:
    """node/, with the pinned SDKs that scripts/bootstrap installed from the
    lockfile (``npm ci``). Missing Node is a failure, not a skip: CI must prove
    this leg ran."""
    assert shutil.which("node"), "Node.js is needed for the Node SDK tests: apt-get install nodejs npm"
    lock = hashlib.sha256((NODE_DIR / "package-lock.json").read_bytes()).hexdigest()[:16]
    stamp = NODE_DIR / "node_modules" / f".bootstrap-{lock}"
    assert stamp.is_file(), "the Node SDK test packages are missing or stale: run scripts/bootstrap"
    return NODE_DIR


def _run_script(project: Path, live: LiveServer, package: str, script: str = "stream_run.mjs") -> dict[str, Any]:
    node = shutil.which("node")
    assert node is not None
    command = [node, script, live.base_url, package]
    done = subprocess.run(command, cwd=project, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _texts(messages: list[dict[str, Any]]) -> list[tuple[str, list[str]]]:
    # Not the status: 6.x keeps the snapshot its deltas built (in_progress).
    return [(m["id"], [part["text"]["value"] for part in m["content"]]) for m in messages]


def text_events(text: str, words: list[str]) -> list[str]:
    return [
        "runStepCreated:message_creation",
        "messageCreated",
        "textCreated",
        *[f"textDelta:{word}" for word in words],
        f"textDone:{text}",
        "messageDone",
        "runStepDone:message_creation",
    ]


@pytest.mark.parametrize("package", ["openai6", "openai7"])
def test_node_assistant_stream(node_project: Path, live: LiveServer, package: str) -> None:
    result = _run_script(node_project, live, package)

    text = result["text"]
    assert text["run"]["status"] == "completed"
    assert text["seen"] == text_events("You said: Hello from Node", ["You", " said:", " Hello", " from", " Node"])
    (listed,) = text["listed"]
    assert listed["run_id"] == text["run"]["id"] and listed["status"] == "completed"
    assert _texts(text["messages"]) == [(listed["id"], ["You said: Hello from Node"])]

    weather = result["weather"]
    assert weather["paused"]["status"] == "requires_action"
    assert weather["run"]["id"] == weather["paused"]["id"] and weather["run"]["status"] == "completed"
    answer = 'Tool results: get_weather -> {"temp": 22}'
    assert weather["seen"] == [
        "runStepCreated:tool_calls",
        "toolCallCreated:get_weather",
        'toolCallDelta:{"city":',
        'toolCallDelta: "Tokyo"}',
        'toolCallDone:{"city": "Tokyo"}',
        "runStepDone:tool_calls",
        *text_events(answer, ["Tool", " results:", " get_weather", " ->", ' {"temp":', " 22}"]),
    ]
    assert [m["content"][0]["text"]["value"] for m in weather["messages"]] == [answer]


@pytest.mark.parametrize("package", ["openai6", "openai7"])
def test_node_textdelta_carries_whole_markers(node_project: Path, live: LiveServer, package: str) -> None:
    """A Node client concatenating textDelta values and collecting their
    annotations gets the final text and every annotation, each on the delta
    whose value is its marker (issue 12)."""
    result = _run_script(node_project, live, package, "annotations.mjs")
    for kind, marker in (("citation", "【1:0†policy.txt】"), ("link", "sandbox:/mnt/data/out.csv")):
        seen = result[kind]
        assert seen["status"] == "completed"
        assert seen["text"] == seen["final"]["value"]
        (annotation,) = seen["annotations"]
        assert annotation["value"] == annotation["text"] == marker
        (final,) = seen["final"]["annotations"]
        assert {k: v for k, v in annotation.items() if k not in ("value", "index")} == {
            k: v for k, v in final.items() if k != "index"
        }


@pytest.mark.parametrize("package", ["openai6", "openai7"])
def test_node_chat_embeddings_and_models(node_project: Path, live: LiveServer, package: str) -> None:
    """Issue 12: the calls frameworks make beside the Assistants API."""
    result = _run_script(node_project, live, package, "chat.mjs")
    assert result["completion"] == "You said: Hello from Node"
    assert result["streamed"] == "You said: Streamed from Node"
    assert result["usage"]["completion_tokens"] == 5
    (call,) = result["toolCalls"]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
    assert result["dimensions"] == 384
    assert result["models"] == ["offline"]
