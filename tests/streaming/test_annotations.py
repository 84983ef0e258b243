"""Annotations of built-in tools in the stream, the way OpenAI sent them
(wire notes 3.3, issue 12): a file_search citation marker and a
code_interpreter ``sandbox:/mnt/data/...`` link each arrive as ONE text delta
whose ``value`` is the whole marker and which carries its annotation; no text
delta lacks ``value``. Checked on the raw stream (tests/streaming/rules.py)
and the way framework stream consumers read it: OpenAI's quickstart and
agency-swarm concatenate ``delta.value`` in an AssistantEventHandler,
Semantic Kernel reads annotations only inside ``if delta.text.value``."""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, field
from typing import Any

import httpx2
import openai
import pytest
from openai.lib.streaming import AssistantEventHandler
from openai.types.beta.threads import Text, TextDelta
from typing_extensions import override

from tests.streaming import rules
from tests.streaming.support import thread_with

pytestmark = pytest.mark.timeout(90)

POLICY = b"Our refund policy: refunds are accepted within 30 days of purchase with a receipt."
CITE = '[[call file_search {"query": "refund policy"}]] [[then reply See 【1:0†policy.txt】 for details.]]'
CODE = "open('/mnt/data/out.csv', 'w').write('a,b')"
LINK = (
    f'[[call code_interpreter {{"code": "{CODE}"}}]] '
    "[[then reply Download [the table](sandbox:/mnt/data/out.csv) now.]]"
)


def _vector_store(sdk: openai.OpenAI) -> str:
    upload = sdk.files.create(file=("policy.txt", io.BytesIO(POLICY), "text/plain"), purpose="assistants")
    store = sdk.vector_stores.create(name="policies", file_ids=[upload.id])
    deadline = time.monotonic() + 30
    while store.file_counts.completed < 1:
        assert store.file_counts.failed == 0 and time.monotonic() < deadline, store.file_counts
        time.sleep(0.05)
        store = sdk.vector_stores.retrieve(store.id)
    return store.id


def _search_assistant(sdk: openai.OpenAI) -> str:
    return sdk.beta.assistants.create(
        model="gpt-4o",
        tools=[{"type": "file_search"}],
        tool_resources={"file_search": {"vector_store_ids": [_vector_store(sdk)]}},
    ).id


def _code_assistant(sdk: openai.OpenAI) -> str:
    return sdk.beta.assistants.create(model="gpt-4o", tools=[{"type": "code_interpreter"}]).id


def _raw_stream(raw: httpx2.Client, thread_id: str, assistant_id: str) -> rules.StreamRules:
    checker = rules.StreamRules()
    with raw.stream("POST", f"/threads/{thread_id}/runs", json={"assistant_id": assistant_id, "stream": True}) as r:
        for item in rules.frames(r.iter_raw()):
            if isinstance(item, rules.SSE):
                checker.feed(item)
    checker.finish()
    return checker


def _final_text(checker: rules.StreamRules) -> dict[str, Any]:
    final = [event.data for event in checker.events if event.event == "thread.message.completed"][-1]
    text: dict[str, Any] = final["content"][-1]["text"]
    return text


def _without_index(annotations: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in a.items() if k != "index"} for a in annotations]


@pytest.mark.parametrize("kind", ["file_citation", "file_path"])
def test_a_marker_is_one_delta_with_its_annotation(raw: httpx2.Client, sdk: openai.OpenAI, kind: str) -> None:
    assistant_id, script = (_search_assistant(sdk), CITE) if kind == "file_citation" else (_code_assistant(sdk), LINK)
    checker = _raw_stream(raw, thread_with(sdk, script), assistant_id)
    final = _final_text(checker)
    (annotation,) = final["annotations"]
    assert annotation["type"] == kind
    expected = "【1:0†policy.txt】" if kind == "file_citation" else "sandbox:/mnt/data/out.csv"
    assert annotation["text"] == expected == final["value"][annotation["start_index"] : annotation["end_index"]]
    # rules.StreamRules checked each annotated delta's value is its marker.
    message = [m for m in checker.messages.values() if any(m.annotations)][-1]
    streamed = next(part for part in message.annotations if part)
    assert _without_index(streamed) == final["annotations"]


@dataclass
class _QuickstartHandler(AssistantEventHandler):
    """What OpenAI's quickstart and agency-swarm do: ``text += delta.value``,
    annotations collected from the deltas."""

    text: str = ""
    annotations: list[dict[str, Any]] = field(default_factory=list)
    done: list[Text] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__()

    @override
    def on_text_delta(self, delta: TextDelta, snapshot: Text) -> None:
        self.text += delta.value  # type: ignore[operator]  # a TypeError if value were None
        for annotation in delta.annotations or []:
            self.annotations.append(annotation.model_dump(exclude_none=True))

    @override
    def on_text_done(self, text: Text) -> None:
        self.done.append(text)


@pytest.mark.parametrize("kind", ["file_citation", "file_path"])
def test_quickstart_handler_concatenates_values(sdk: openai.OpenAI, kind: str) -> None:
    assistant_id, script = (_search_assistant(sdk), CITE) if kind == "file_citation" else (_code_assistant(sdk), LINK)
    thread_id = thread_with(sdk, script)
    handler = _QuickstartHandler()
    with sdk.beta.threads.runs.stream(thread_id=thread_id, assistant_id=assistant_id, event_handler=handler) as s:
        s.until_done()
    (message,) = sdk.beta.threads.messages.list(thread_id, order="desc", limit=1).data
    text = message.content[-1]
    assert text.type == "text"
    assert handler.text == text.text.value
    final = [a.model_dump(exclude_none=True) for a in text.text.annotations]
    assert _without_index(handler.annotations) == final and len(final) == 1
    assert final[0]["type"] == kind
    for annotation in handler.annotations:  # the marker is in the text where the annotation says
        assert handler.text[annotation["start_index"] : annotation["end_index"]] == annotation["text"]


def test_semantic_kernel_style_consumer_sees_citations(sdk: openai.OpenAI) -> None:
    """Semantic Kernel's invoke_stream reads a delta's annotations only when
    the same delta has text (``if delta.text.value:``)."""
    thread_id = thread_with(sdk, CITE)
    text, cited = "", []
    with sdk.beta.threads.runs.stream(thread_id=thread_id, assistant_id=_search_assistant(sdk)) as stream:
        for event in stream:
            if event.event != "thread.message.delta":
                continue
            for part in event.data.delta.content or []:
                if part.type == "text" and part.text and part.text.value:
                    text += part.text.value
                    cited += [(a.text, a.file_citation.file_id) for a in part.text.annotations or [] if a.file_citation]
    assert text.startswith("See 【1:0†policy.txt】")
    ((marker, file_id),) = cited
    assert marker == "【1:0†policy.txt】" and file_id.startswith("file-")
