"""The chunk index, the one place that knows each engine's search SQL.

SQLite: an FTS5 table (kept in step with vector_store_chunks by triggers)
ranked by bm25(); embeddings as float32 blobs (app.retrieval.vectors).
PostgreSQL: a generated tsvector column with a GIN index ranked by ts_rank()
normalised by document length; embeddings in a pgvector column.

bm25 and ts_rank live on different scales (and bm25's IDF vanishes in tiny
stores), so a keyword score is relative to the best match of the query times
the share of query words the chunk contains: 0..1, and ``score_threshold``
means the same on both engines.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import BindParameter, bindparam, delete, text
from sqlalchemy.ext.asyncio import AsyncSession

from app import orm

MAX_QUERY_TERMS = 64
_TERM = re.compile(r"\w+", re.UNICODE)


@dataclass
class Hit:
    chunk_id: int
    vector_store_id: str
    file_id: str
    text: str
    score: float


def _is_postgres(session: AsyncSession) -> bool:
    return session.get_bind().dialect.name == "postgresql"


# Words too common to tell chunks apart. Matching them would rank nearly
# every chunk (slow, and no better); PostgreSQL's 'english' config drops them
# itself, this list does the same for FTS5.
STOPWORDS = frozenset(
    [
        "a",
        "an",
        "and",
        "are",
        "as",
        "at",
        "be",
        "but",
        "by",
        "can",
        "do",
        "does",
        "for",
        "from",
        "how",
        "i",
        "if",
        "in",
        "into",
        "is",
        "it",
        "its",
        "of",
        "on",
        "or",
        "such",
        "that",
        "the",
        "their",
        "then",
        "there",
        "these",
        "they",
        "this",
        "to",
        "was",
        "what",
        "when",
        "where",
        "which",
        "who",
        "why",
        "will",
        "with",
        "you",
        "your",
    ]
)


def terms(query: str) -> list[str]:
    """The query's words, deduplicated, in order (operators and punctuation
    dropped); stopwords only when the query has nothing else."""
    seen: dict[str, None] = {}
    for term in _TERM.findall(query.lower()):
        seen.setdefault(term, None)
    words = [word for word in seen if word not in STOPWORDS] or list(seen)
    return words[:MAX_QUERY_TERMS]


def _vector_literal(vector: Sequence[float]) -> str:
    return "[" + ",".join(f"{value:.7g}" for value in vector) + "]"


def pack(vector: Sequence[float]) -> bytes:
    return struct.pack(f"<{len(vector)}f", *vector)


async def add_chunks(
    session: AsyncSession,
    vector_store_id: str,
    file_id: str,
    pieces: Sequence[str],
    embeddings: Sequence[Sequence[float]] | None,
) -> None:
    if not pieces:
        return
    postgres = _is_postgres(session)
    value = "CAST(:embedding AS vector)" if postgres else ":embedding"
    # Only constant fragments are interpolated; values are bound parameters.
    statement = text(
        "INSERT INTO vector_store_chunks (vector_store_id, file_id, position, text, embedding) "  # noqa: S608 (constant fragments only; values are bound)
        f"VALUES (:store, :file, :position, :text, {value})"
    )
    rows = []
    for position, piece in enumerate(pieces):
        vector = embeddings[position] if embeddings is not None else None
        encoded = None if vector is None else (_vector_literal(vector) if postgres else pack(vector))
        rows.append(
            {"store": vector_store_id, "file": file_id, "position": position, "text": piece, "embedding": encoded}
        )
    await session.execute(statement, rows)


async def remove_chunks(session: AsyncSession, vector_store_id: str, file_ids: Sequence[str] | None = None) -> None:
    """Chunks of these files (all files if None) leave the store's index."""
    statement = delete(orm.VectorStoreChunk).where(orm.VectorStoreChunk.vector_store_id == vector_store_id)
    if file_ids is not None:
        statement = statement.where(orm.VectorStoreChunk.file_id.in_(file_ids))
    await session.execute(statement.execution_options(synchronize_session=False))


async def keyword_search(
    session: AsyncSession, store_ids: Sequence[str], query: str, limit: int, file_ids: Sequence[str] | None = None
) -> list[Hit]:
    """Best chunks by BM25-like relevance to any of the query's words."""
    words = terms(query)
    if not words or not store_ids or (file_ids is not None and not file_ids):
        return []
    if _is_postgres(session):
        sql = (
            "SELECT c.id, c.vector_store_id, c.file_id, c.text, ts_rank(c.tsv, q, 1) AS score "
            "FROM vector_store_chunks c, to_tsquery('english', :query) q "
            "WHERE c.tsv @@ q AND c.vector_store_id IN :stores {files} ORDER BY score DESC LIMIT :limit"
        )
        match = " | ".join(words)
    else:
        sql = (
            "SELECT c.id, c.vector_store_id, c.file_id, c.text, -bm25(vector_store_chunks_fts) AS score "
            "FROM vector_store_chunks_fts JOIN vector_store_chunks c ON c.id = vector_store_chunks_fts.rowid "
            "WHERE vector_store_chunks_fts MATCH :query AND c.vector_store_id IN :stores {files} "
            "ORDER BY bm25(vector_store_chunks_fts) LIMIT :limit"
        )
        match = " OR ".join(f'"{word}"' for word in words)
    params: dict[str, object] = {"query": match, "stores": list(store_ids), "limit": limit}
    binds: list[BindParameter[Any]] = [bindparam("stores", expanding=True)]
    if file_ids is not None:
        params["files"] = list(file_ids)
        binds.append(bindparam("files", expanding=True))
    statement = text(sql.format(files="AND c.file_id IN :files" if file_ids is not None else "")).bindparams(*binds)
    rows = (await session.execute(statement, params)).all()
    best = max((max(0.0, float(row.score)) for row in rows), default=0.0) or 1.0
    return [
        Hit(
            row.id,
            row.vector_store_id,
            row.file_id,
            row.text,
            _score(max(0.0, float(row.score)) / best, words, row.text),
        )
        for row in rows
    ]


def _score(relative: float, words: Sequence[str], chunk: str) -> float:
    """Engine-independent 0..1: the rank score relative to the best match,
    times the share of query words the chunk contains (a word counts when
    its first five letters occur, which tolerates inflections)."""
    lowered = chunk.lower()
    covered = sum(1 for word in words if word[:5] in lowered) / len(words)
    return max(1e-6, min(1.0, relative * covered))
