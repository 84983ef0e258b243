"""MarkerStream (app/runner/markers.py): however the model splits its text,
each marker goes out whole, in one piece carrying its annotation, and the
pieces join back to the text exactly."""

from __future__ import annotations

import pytest

from app.runner.markers import MarkerStream, Piece, Targets

pytestmark = pytest.mark.timeout(10)

TARGETS = Targets(
    citations={"【1:0†policy.txt】": "file-policy"},
    links={"out.csv": "file-out", "out.csv.gz": "file-gz"},
)


def _stream(fragments: list[str], targets: Targets = TARGETS) -> list[Piece]:
    stream = MarkerStream(lambda: targets)
    pieces = [piece for fragment in fragments for piece in stream.feed(fragment)]
    return pieces + stream.flush()


def _check(pieces: list[Piece], text: str) -> list[tuple[str, str | None]]:
    assert "".join(piece.text for piece in pieces) == text
    assert all(piece.text for piece in pieces)
    assert [piece.first for piece in pieces] == [True] + [False] * (len(pieces) - 1)
    annotated = []
    for number, piece in enumerate(p for p in pieces if p.annotation):
        annotation = piece.annotation
        assert annotation is not None and annotation["index"] == number
        assert text[annotation["start_index"] : annotation["end_index"]] == piece.text == annotation["text"]
        kind = annotation["type"]
        annotated.append((piece.text, annotation[kind]["file_id"]))  # type: ignore[literal-required]
    return annotated


def test_a_citation_split_over_fragments_is_one_piece() -> None:
    text = "See 【1:0†policy.txt】 for details."
    pieces = _stream(["See ", "【", "1:0†policy", ".txt", "】", " for details."])
    assert _check(pieces, text) == [("【1:0†policy.txt】", "file-policy")]


def test_every_split_of_a_text_gives_the_same_annotations() -> None:
    text = "A 【1:0†policy.txt】 and [t](sandbox:/mnt/data/out.csv). 【9:9†x】 sandbox:/mnt/data/other"
    expected = [("【1:0†policy.txt】", "file-policy"), ("sandbox:/mnt/data/out.csv", "file-out")]
    for size in range(1, len(text) + 1):
        fragments = [text[at : at + size] for at in range(0, len(text), size)]
        assert _check(_stream(fragments), text) == expected, size


def test_the_longest_known_name_wins() -> None:
    pieces = _stream(["get sandbox:/mnt/data/out.c", "sv.gz now"])
    assert _check(pieces, "get sandbox:/mnt/data/out.csv.gz now") == [("sandbox:/mnt/data/out.csv.gz", "file-gz")]
    at_end = _stream(["sandbox:/mnt/data/out.csv"])  # the text ends: out.csv it is
    assert _check(at_end, "sandbox:/mnt/data/out.csv") == [("sandbox:/mnt/data/out.csv", "file-out")]


def test_without_links_nothing_waits_for_a_link() -> None:
    stream = MarkerStream(lambda: Targets(citations=TARGETS.citations))
    assert [piece.text for piece in stream.feed("sandbox:/mnt/da")] == ["sandbox:/mnt/da"]


def test_an_unclosed_bracket_is_released() -> None:
    stream = MarkerStream(lambda: TARGETS)
    assert stream.feed("odd 【 bracket") == [Piece("odd ", first=True)]
    assert [piece.text for piece in stream.flush()] == ["【 bracket"]
    long = MarkerStream(lambda: TARGETS)
    assert "".join(piece.text for piece in long.feed("【" + "x" * 300)) == "【" + "x" * 300
