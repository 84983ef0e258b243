"""A model's text made valid Unicode as it enters the server
(app/llm/unicode_text.py): pairs split across deltas joined, lone halves
U+FFFD, in a message's text, its refusal and each tool call's arguments apart. The
run through the API, on both databases: tests/api/test_provider_nul.py."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from app.llm import LLM
from app.llm.interface import ChatRequest, Event, Exchange, Finish, RefusalDelta, TextDelta, ToolCallDelta, Usage
from app.llm.routing import Router
from app.llm.unicode_text import StreamMender, mended
from app.llm.whole_text import whole

pytestmark = pytest.mark.timeout(10)

FINISH = Finish("stop", Usage(1, 1))
SMILE = "\U0001f600"  # "\ud83d\ude00" in UTF-16


def _through(events: list[Event]) -> list[Event]:
    mender = StreamMender()
    return [each for event in events for each in ((event,) if mender.clean(event) else mender.mend(event))]


def test_a_delta_without_surrogates_passes_as_the_same_object() -> None:
    delta = TextDelta("plain text, é and \U0001f600 alike")
    call = ToolCallDelta(0, "call_1", "get_weather", '{"city": "Tokyo"}')
    assert _through([delta, call, FINISH]) == [delta, call, FINISH]
    assert _through([delta])[0] is delta


def test_whole_joins_pairs_and_replaces_lone_halves() -> None:
    assert whole("a\ud83d\ude00b") == f"a{SMILE}b"
    assert whole("\ude00\ud83d") == "\ufffd\ufffd"  # low before high is no pair
    assert whole("x\ud83dy") == "x\ufffdy"


def test_a_pair_split_across_text_deltas_is_its_character() -> None:
    out = _through([TextDelta("smile \ud83d"), TextDelta("\ude00!"), FINISH])
    assert out == [TextDelta("smile "), TextDelta(f"{SMILE}!"), FINISH]


def test_a_high_half_alone_in_a_delta_waits_for_the_next() -> None:
    out = _through([TextDelta("a"), TextDelta("\ud83d"), TextDelta("\ude00"), FINISH])
    assert "".join(event.text for event in out if isinstance(event, TextDelta)) == f"a{SMILE}"


def test_a_high_half_at_the_streams_end_comes_before_the_finish_as_u_fffd() -> None:
    assert _through([TextDelta("end \ud83d"), FINISH]) == [TextDelta("end "), TextDelta("\ufffd"), FINISH]


def test_a_held_text_half_is_released_before_a_tool_call() -> None:
    call = ToolCallDelta(0, "call_1", "f", "")
    assert _through([TextDelta("x\ud83d"), call, FINISH]) == [TextDelta("x"), TextDelta("\ufffd"), call, FINISH]


def test_a_refusals_high_half_is_u_fffd_at_its_end() -> None:
    """A refusal is its own channel: a high half ending it becomes U+FFFD as
    a refusal piece, at the stream's end or before the text that follows."""
    assert _through([RefusalDelta("no \ud83d"), FINISH]) == [RefusalDelta("no "), RefusalDelta("\ufffd"), FINISH]
    assert _through([RefusalDelta("no \ud83d"), TextDelta("\ude00 ok")]) == [
        RefusalDelta("no "),
        RefusalDelta("\ufffd"),
        TextDelta("\ufffd ok"),
    ]


def test_tool_call_arguments_are_mended_per_call() -> None:
    events: list[Event] = [
        ToolCallDelta(0, "call_1", "f", '{"a": "\ud83d'),
        ToolCallDelta(0, arguments='\ude00"}'),
        ToolCallDelta(1, "call_2", "g", '{"b": "\ud83d'),
        ToolCallDelta(2, "call_3", "h\udc00", "{}"),  # a half of call 1 is not call 2's
        FINISH,
    ]
    out = _through(events)
    assert out == [
        ToolCallDelta(0, "call_1", "f", '{"a": "'),
        ToolCallDelta(0, None, None, f'{SMILE}"}}'),
        ToolCallDelta(1, "call_2", "g", '{"b": "'),
        ToolCallDelta(1, arguments="\ufffd"),
        ToolCallDelta(2, "call_3", "h\ufffd", "{}"),
        FINISH,
    ]


def test_arguments_ending_on_a_high_half_get_u_fffd_before_the_finish() -> None:
    out = _through([ToolCallDelta(0, "call_1", "f", "{\ud83d"), FINISH])
    assert out == [ToolCallDelta(0, "call_1", "f", "{"), ToolCallDelta(0, arguments="\ufffd"), FINISH]


def test_a_whole_answer_is_mended_and_a_clean_one_kept() -> None:
    clean: list[Event] = [TextDelta("fine"), FINISH]
    assert mended(clean) is clean
    assert mended([TextDelta("a\ud83d"), TextDelta("\ude00"), FINISH]) == [TextDelta("a"), TextDelta(SMILE), FINISH]


async def test_the_facade_passes_on_and_logs_the_mended_events(monkeypatch: pytest.MonkeyPatch) -> None:
    """LLM.stream: what its consumers and the model-request log see."""
    given: list[Event] = [
        TextDelta("a\ud83d"),  # held, then released before the call
        ToolCallDelta(0, "call_1", "f", "{\ud83d"),
        ToolCallDelta(0, arguments="\ude00}"),
        TextDelta("\ud83d"),  # held alone, then released at the Finish
        FINISH,
    ]

    async def source(_request: ChatRequest, _prompt_tokens: int) -> AsyncIterator[Event]:
        for event in given:
            yield event

    model = LLM(Router.build(None))
    monkeypatch.setattr(model._offline, "stream", source)
    logged: list[Exchange] = []

    async def log(exchange: Exchange) -> None:
        logged.append(exchange)

    model.observer = log
    request = ChatRequest(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    out = [event async for event in model.stream(request)]
    assert out == [
        TextDelta("a"),
        TextDelta("\ufffd"),
        ToolCallDelta(0, "call_1", "f", "{"),
        ToolCallDelta(0, None, None, f"{SMILE}}}"),
        TextDelta("\ufffd"),
        FINISH,
    ]
    (exchange,) = logged
    body = exchange.response_body()
    assert body["text"] == "a\ufffd\ufffd"
    assert body["tool_calls"] == [{"id": "call_1", "name": "f", "arguments": f"{{{SMILE}}}"}]
