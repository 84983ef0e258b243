"""Cassettes without a server: keys ignore generated ids, misses name the
first difference, secrets are redacted, embeddings record and replay."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from app import cassettes

pytestmark = pytest.mark.timeout(10)


def body(question: str, thread: str = "thread_28faPPwXuzUG2fmhlBjpSEqf") -> dict[str, object]:
    return {"model": "gpt-4o", "messages": [{"role": "user", "content": f"{question} (see {thread})"}]}


def test_generated_ids_do_not_change_the_key() -> None:
    one = cassettes.request_key(cassettes.normalise(body("hi", "thread_28faPPwXuzUG2fmhlBjpSEqf")))
    two = cassettes.request_key(cassettes.normalise(body("hi", "thread_99zzQQwXuzUG2fmhlBjpABCD")))
    assert one == two
    assert one != cassettes.request_key(cassettes.normalise(body("hello")))


def test_a_miss_names_the_closest_recording_and_where_it_differs(tmp_path: Path) -> None:
    book = cassettes.Cassettes(tmp_path, "record")
    book.save("gpt-4o", body("Where is A-1001?"), [{"text": "Shipped."}])
    book.save("gpt-4o", {"model": "gpt-4o", "messages": [{"role": "system", "content": "x"}]}, [{"text": "x"}])
    replay = cassettes.Cassettes(tmp_path, "replay")
    events, why = replay.lookup("gpt-4o", body("Where is A-1001?"))
    assert events == [{"text": "Shipped."}] and why == ""
    events, why = replay.lookup("gpt-4o", body("Where is A-1002?"))
    assert events is None
    assert "differs at messages[0].content: recorded " in why
    assert '"Where is A-1001? (see thread_<id>)", now "Where is A-1002? (see thread_<id>)"' in why


def test_secrets_from_the_environment_are_redacted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_SERVICE_TOKEN", "tok-0123456789")
    cassettes.Cassettes(tmp_path, "record").save("m", body("use tok-0123456789"), [{"text": "ok"}])
    (saved,) = tmp_path.glob("*.json")
    assert "tok-0123456789" not in saved.read_text() and "<redacted:MY_SERVICE_TOKEN>" in saved.read_text()


class Counting:
    name = "text-embedding-3-small"

    def __init__(self) -> None:
        self.calls = 0

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        self.calls += 1
        return [[float(len(text)), 1.0] for text in texts]


async def test_embeddings_record_then_replay_then_miss(tmp_path: Path) -> None:
    provider = Counting()
    recorder = cassettes.RecordedEmbedder(provider, cassettes.Cassettes(tmp_path, "record"))
    assert await recorder.embed(["ab", "abc"]) == [[2.0, 1.0], [3.0, 1.0]]
    book = cassettes.Cassettes(tmp_path, "replay")
    replayer = cassettes.RecordedEmbedder(provider, book)
    assert await replayer.embed(["ab", "abc"]) == [[2.0, 1.0], [3.0, 1.0]]
    assert provider.calls == 1
    with pytest.raises(RuntimeError, match="No recorded embeddings for these 1 texts"):
        await replayer.embed(["new"])
    assert len(book.misses) == 1


def test_a_recording_answers_its_request_whichever_way_a_whole_number_is_written(tmp_path: Path) -> None:
    """1 and 1.0 are one JSON number: a server before 2026-12-01 sent a
    SQLite run's default temperature as 1 when a tick claimed it, as 1.0
    otherwise (run_execution._as_floats); its recordings still answer."""
    book = cassettes.Cassettes(tmp_path, "record")
    book.save("gpt-4o", {**body("claimed"), "temperature": 1, "top_p": 1}, [{"text": "from 1"}])
    book.save("gpt-4o", {**body("handed"), "temperature": 1.0, "top_p": 0.5}, [{"text": "from 1.0"}])
    replay = cassettes.Cassettes(tmp_path, "replay")
    assert replay.lookup("gpt-4o", {**body("claimed"), "temperature": 1.0, "top_p": 1.0}) == ([{"text": "from 1"}], "")
    assert replay.lookup("gpt-4o", {**body("handed"), "temperature": 1, "top_p": 0.5}) == ([{"text": "from 1.0"}], "")
    events, why = replay.lookup("gpt-4o", {**body("handed"), "temperature": 1, "top_p": 0.7})
    assert events is None and "differs at top_p: recorded 0.5, now 0.7" in why


def test_a_miss_names_its_difference_past_a_redacted_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The recording has the secret redacted, the request has it: not the
    difference named (CI named messages[0].content for a request that
    differed in its temperature's 1 against 1.0, a text the key told apart)."""
    monkeypatch.setenv("MY_SERVICE_TOKEN", "tok-0123456789")
    question = {**body("use tok-0123456789"), "temperature": 0.5}
    cassettes.Cassettes(tmp_path, "record").save("m", question, [{"text": "ok"}])
    events, why = cassettes.Cassettes(tmp_path, "replay").lookup("m", {**question, "temperature": 0.7})
    assert events is None and "differs at temperature: recorded 0.5, now 0.7" in why


def test_a_miss_tells_a_number_from_a_boolean(tmp_path: Path) -> None:
    cassettes.Cassettes(tmp_path, "record").save("m", {**body("x"), "n": 1}, [{"text": "ok"}])
    events, why = cassettes.Cassettes(tmp_path, "replay").lookup("m", {**body("x"), "n": True})
    assert events is None and "differs at n: recorded 1, now true" in why
