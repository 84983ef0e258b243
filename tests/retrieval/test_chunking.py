"""Token-based chunking with overlap."""

from __future__ import annotations

import itertools

from app.retrieval import chunking


def test_count_tokens_uses_cl100k() -> None:
    # cl100k_base: "hello world" is two tokens, so the real tokenizer is loaded offline.
    assert chunking.count_tokens("hello world") == 2
    # The ranks shipped in the package are cl100k_base's own (these ids are).
    assert chunking._encoding().encode("hello world") == [15339, 1917]


def test_windows_have_the_size_and_overlap_asked_for() -> None:
    text = " ".join(f"word{i}" for i in range(2000))
    pieces = chunking.chunk(text, max_tokens=200, overlap=50)
    sizes = [chunking.count_tokens(piece) for piece in pieces]
    assert all(size <= 201 for size in sizes) and max(sizes) >= 195
    # Consecutive chunks share text: the end of one starts the next.
    for before, after in itertools.pairwise(pieces):
        assert before[-30:].split()[-1] in after
    assert pieces[0].startswith("word0") and pieces[-1].endswith("word1999")


def test_short_text_is_one_chunk_and_empty_is_none() -> None:
    assert chunking.chunk("just a few words") == ["just a few words"]
    assert chunking.chunk("   ") == []


def test_auto_is_static_800_400() -> None:
    assert chunking.static() == {
        "type": "static",
        "static": {"max_chunk_size_tokens": 800, "chunk_overlap_tokens": 400},
    }
