"""The chunk index, the one place that knows each engine's search SQL.

Keywords, both engines: BM25 from an impact-ordered postings table
(app.retrieval.keyword_postings), written with the chunks in the same
transaction and removed with them by the database (triggers, migration
0013); the engine's own tokenizer makes the terms (FTS5's porter on
SQLite, app.retrieval.sqlite_keywords; the
generated 'english' tsvector column on PostgreSQL,
app.retrieval.postgres_keywords). Embeddings: float32 blobs on SQLite
(app.retrieval.vectors), a pgvector column on PostgreSQL.

The engines' scores live on different scales, so a keyword score is relative
to the best match of the query, scaled by the share of query words that best
match contains (0..1): ``score_threshold`` means the same on both engines.
Chunks stay in BM25 order (re-sorting by word coverage ranked worse).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy import delete, text
from sqlalchemy.ext.asyncio import AsyncSession

from app import orm
from app.retrieval import passing_files, postgres_keywords, sqlite_keywords
from app.retrieval.filters import Compiled
from app.retrieval.passing_files import PassingFiles

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
    # The postings carry the file row's seq, read by the statement below: a
    # row added to the session but not yet written must be there.
    await session.flush()
    if postgres:
        await postgres_keywords.write_postings(session, vector_store_id, file_id)
    else:
        await sqlite_keywords.write_postings(session, vector_store_id, file_id)


async def remove_chunks(session: AsyncSession, vector_store_id: str, file_ids: Sequence[str] | None = None) -> None:
    """Chunks of these files (all files if None) leave the store's index;
    their postings go with them, by the database's own trigger (migration
    0013), as they do when a file's row or the store is deleted."""
    statement = delete(orm.VectorStoreChunk).where(orm.VectorStoreChunk.vector_store_id == vector_store_id)
    if file_ids is not None:
        statement = statement.where(orm.VectorStoreChunk.file_id.in_(file_ids))
    await session.execute(statement.execution_options(synchronize_session=False))


@dataclass
class Scope:
    """Where a search looks: these stores, optionally only chunks of files
    whose row passes ``condition`` (an attribute filter compiled to SQL over
    the file row aliased ``f``)."""

    store_ids: Sequence[str]
    condition: Compiled | None = None
    _passing: dict[str, PassingFiles] = field(default_factory=dict, repr=False)

    async def passing(self, session: AsyncSession, store_id: str) -> PassingFiles:
        """SQLite: the store's files that pass the filter, read once per
        search and shared by the keyword and the vector side and by every
        query (app.retrieval.passing_files: a temp table of their seqs, which
        each keyword list probes by its key, kept on the connection for the
        next search while the database is unchanged)."""
        assert self.condition is not None
        known = self._passing.get(store_id)
        if known is None:
            slot = list(dict.fromkeys(self.store_ids)).index(store_id)
            known = self._passing[store_id] = await passing_files.read(session, store_id, slot, self.condition)
        return known

    def sql(self) -> str:
        """The WHERE fragment for a chunk aliased ``c`` (bound: ``stores`` and the condition's names)."""
        where = "c.vector_store_id IN :stores"
        if self.condition is not None:
            where += (
                " AND EXISTS (SELECT 1 FROM vector_store_files f WHERE f.vector_store_id = c.vector_store_id "  # noqa: S608 (the condition is compiled with bound values)
                f"AND f.file_id = c.file_id AND f.status = 'completed' AND {self.condition.sql})"
            )
        return where

    def params(self) -> dict[str, object]:
        return {"stores": list(self.store_ids), **(self.condition.params if self.condition else {})}


async def keyword_search(session: AsyncSession, scope: Scope, query: str, limit: int) -> list[Hit]:
    """The ``limit`` best chunks by BM25 relevance to the query's words; the
    score is relative to the best match (0..1, the same meaning on both engines)."""
    words = terms(query)
    if not words or not scope.store_ids:
        return []
    if _is_postgres(session):
        rows = await postgres_keywords.search(session, scope.store_ids, scope.condition, words, limit)
    else:
        passing = None
        if scope.condition is not None:
            passing = {store_id: await scope.passing(session, store_id) for store_id in scope.store_ids}
        rows = await sqlite_keywords.search(session, scope.store_ids, passing, words, limit)
    if not rows:
        return []
    best = max(0.0, rows[0][4]) or 1.0
    # Monotone in BM25 (the order is the engine's): relative to the best
    # chunk, scaled by the share of the query's words that chunk contains, so
    # a query half of whose words occur nowhere never scores above 0.5.
    scale = _coverage(words, rows[0][3])
    return [
        Hit(c, store, file, body, max(1e-6, min(1.0, scale * max(0.0, score) / best)))
        for c, store, file, body, score in rows
    ]


def _coverage(words: Sequence[str], chunk: str) -> float:
    """Share of the words found in the chunk (a word counts when its first
    five letters occur, which tolerates inflections)."""
    lowered = chunk.lower()
    return sum(1 for word in words if word[:5] in lowered) / len(words)
