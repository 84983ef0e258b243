"""Annotations of built-in tools in the stream: a file_search citation and a
code_interpreter file path reach a streaming client as annotation deltas
(wire notes 3.3) that accumulate to the final message's annotations."""

from __future__ import annotations

import io
import time

import httpx2
import openai
import pytest

from tests.streaming import rules
from tests.streaming.support import thread_with

pytestmark = pytest.mark.timeout(90)


def _vector_store(sdk: openai.OpenAI) -> str:
    text = b"Our refund policy: refunds are accepted within 30 days of purchase with a receipt."
    upload = sdk.files.create(file=("policy.txt", io.BytesIO(text), "text/plain"), purpose="assistants")
    store = sdk.vector_stores.create(name="policies", file_ids=[upload.id])
    deadline = time.monotonic() + 30
    while store.file_counts.completed < 1:
        assert store.file_counts.failed == 0 and time.monotonic() < deadline, store.file_counts
        time.sleep(0.05)
        store = sdk.vector_stores.retrieve(store.id)
    return store.id


def _streamed_and_final(raw: httpx2.Client, thread_id: str, assistant_id: str) -> tuple[list[object], list[object]]:
    checker = rules.StreamRules()
    with raw.stream("POST", f"/threads/{thread_id}/runs", json={"assistant_id": assistant_id, "stream": True}) as r:
        for item in rules.frames(r.iter_raw()):
            if isinstance(item, rules.SSE):
                checker.feed(item)
    checker.finish()
    (message,) = checker.messages.values()
    final = [event.data for event in checker.events if event.event == "thread.message.completed"][-1]
    annotations = final["content"][0]["text"]["annotations"]
    assert annotations, "the final message should carry the tool's annotation"
    streamed = [{k: v for k, v in a.items() if k != "index"} for a in message.annotations[0]]
    return streamed, annotations


def test_file_search_citations_are_streamed(raw: httpx2.Client, sdk: openai.OpenAI) -> None:
    store_id = _vector_store(sdk)
    assistant = sdk.beta.assistants.create(
        model="gpt-4o",
        tools=[{"type": "file_search"}],
        tool_resources={"file_search": {"vector_store_ids": [store_id]}},
    )
    thread_id = thread_with(sdk, '[[call file_search {"query": "refund policy"}]]')
    streamed, final = _streamed_and_final(raw, thread_id, assistant.id)
    assert streamed == final


def test_code_interpreter_file_paths_are_streamed(raw: httpx2.Client, sdk: openai.OpenAI) -> None:
    assistant = sdk.beta.assistants.create(model="gpt-4o", tools=[{"type": "code_interpreter"}])
    code = "open('/mnt/data/out.csv', 'w').write('a,b')"
    thread_id = thread_with(sdk, f'[[call code_interpreter {{"code": "{code}"}}]]')
    streamed, final = _streamed_and_final(raw, thread_id, assistant.id)
    assert streamed == final
