"""keyword postings: an impact-ordered inverted table for BM25 on both engines

vector_store_keyword_postings holds one row per (term, chunk): the term as
the engine's tokenizer indexes it, the store's 64-bit key (a hash of its
id), the chunk's BM25 term-frequency/length part as an integer ("impact")
and the chunk id. Its primary index orders each (term, store) list by
impact, so a search reads a bounded number of postings per query word
(app.retrieval.keyword_postings); the (chunk_id, term) index serves exact
re-scoring and deletes.

It replaces, as the keyword index, SQLite's FTS5 table (dropped with its
triggers; FTS5 remains the tokenizer, in temp tables) and PostgreSQL's GIN
index over the tsv column (the column stays: it is the tokenizer's output).
Existing chunks are indexed here; the formulas below are this revision's
copy of app.retrieval's (k1 1.2, b 0.75, impact x1000, avgdl 540 FTS5
tokens / 333 lexemes).

Revision ID: 0012_keyword_postings
Revises: 0008_run_events
Create Date: 2026-11-29
"""

from __future__ import annotations

import hashlib

from alembic import op
from sqlalchemy import text

revision = "0012_keyword_postings"
down_revision = "0008_run_events"
branch_labels = None
depends_on = None

TABLE = "vector_store_keyword_postings"


def _impact(tf: str, length: str, average: float) -> str:
    return f"CAST(round(1000 * {tf} * 2.2 / ({tf} + 1.2 * (0.25 + 0.75 * {length} / {average}))) AS INTEGER)"


def _store_key(vector_store_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(vector_store_id.encode(), digest_size=8).digest(), "big", signed=True)


_SQLITE_UP = (
    f"CREATE TABLE {TABLE} (term TEXT NOT NULL, store_key INTEGER NOT NULL, impact INTEGER NOT NULL, "
    "chunk_id INTEGER NOT NULL, PRIMARY KEY (term, store_key, impact DESC, chunk_id)) WITHOUT ROWID",
    f"CREATE INDEX ix_{TABLE}_chunk ON {TABLE} (chunk_id, term)",
    "DROP TRIGGER IF EXISTS vector_store_chunks_ad",
    "DROP TRIGGER IF EXISTS vector_store_chunks_ai",
    "DROP TABLE IF EXISTS vector_store_chunks_fts",
)
_SQLITE_SCRATCH = (
    "CREATE VIRTUAL TABLE IF NOT EXISTS temp.chunk_words USING fts5(text, tokenize='porter unicode61')",
    "CREATE VIRTUAL TABLE IF NOT EXISTS temp.chunk_words_vocab USING fts5vocab(temp, chunk_words, instance)",
)
_SQLITE_BACKFILL = (
    f"INSERT INTO {TABLE} (term, store_key, impact, chunk_id) "  # noqa: S608 (constant fragments only)
    f"SELECT w.term, :key, {_impact('w.tf', 'l.dl', 540.0)}, w.doc FROM "
    "(SELECT doc, term, count(*) AS tf FROM temp.chunk_words_vocab GROUP BY doc, term) w "
    "JOIN (SELECT doc, count(*) AS dl FROM temp.chunk_words_vocab GROUP BY doc) l ON l.doc = w.doc"
)
_SQLITE_DOWN = (
    f"DROP TABLE IF EXISTS {TABLE}",
    "CREATE VIRTUAL TABLE vector_store_chunks_fts USING fts5("
    "text, content='vector_store_chunks', content_rowid='id', tokenize='porter unicode61')",
    "CREATE TRIGGER vector_store_chunks_ai AFTER INSERT ON vector_store_chunks BEGIN "
    "INSERT INTO vector_store_chunks_fts(rowid, text) VALUES (new.id, new.text); END",
    "CREATE TRIGGER vector_store_chunks_ad AFTER DELETE ON vector_store_chunks BEGIN "
    "INSERT INTO vector_store_chunks_fts(vector_store_chunks_fts, rowid, text) "
    "VALUES ('delete', old.id, old.text); END",
    "INSERT INTO vector_store_chunks_fts(vector_store_chunks_fts) VALUES ('rebuild')",
)

_POSTGRES_UP = (
    f"CREATE TABLE {TABLE} (term text NOT NULL, store_key bigint NOT NULL, impact smallint NOT NULL, "
    "chunk_id bigint NOT NULL)",
    f"CREATE INDEX ix_{TABLE}_lists ON {TABLE} (term, store_key, impact DESC, chunk_id)",
    f"CREATE INDEX ix_{TABLE}_chunk ON {TABLE} (chunk_id, term) INCLUDE (impact)",
    "DROP INDEX IF EXISTS ix_vector_store_chunks_tsv",
)
_POSTGRES_BACKFILL = (
    f"INSERT INTO {TABLE} (term, store_key, impact, chunk_id) "  # noqa: S608 (constant fragments only)
    f"SELECT w.lexeme, :key, {_impact('w.tf', 'l.dl', 333.0)}, c.id FROM vector_store_chunks c "
    "CROSS JOIN LATERAL (SELECT lexeme, coalesce(array_length(positions, 1), 1) AS tf FROM unnest(c.tsv)) w "
    "CROSS JOIN LATERAL (SELECT sum(coalesce(array_length(positions, 1), 1)) AS dl FROM unnest(c.tsv)) l "
    "WHERE c.vector_store_id = :store"
)
_POSTGRES_DOWN = (
    f"DROP TABLE IF EXISTS {TABLE}",
    "CREATE INDEX IF NOT EXISTS ix_vector_store_chunks_tsv ON vector_store_chunks USING gin (tsv)",
)

_BATCH = 2000


def upgrade() -> None:
    bind = op.get_bind()
    postgres = bind.dialect.name == "postgresql"
    for statement in _POSTGRES_UP if postgres else _SQLITE_UP:
        op.execute(statement)
    stores = [str(row[0]) for row in bind.execute(text("SELECT DISTINCT vector_store_id FROM vector_store_chunks"))]
    if postgres:
        for store in stores:
            bind.execute(text(_POSTGRES_BACKFILL), {"key": _store_key(store), "store": store})
        return
    for statement in _SQLITE_SCRATCH:
        op.execute(statement)
    for store in stores:
        last = -1
        while True:
            ids = [
                int(row[0])
                for row in bind.execute(
                    text(
                        "SELECT id FROM vector_store_chunks WHERE vector_store_id = :store AND id > :last "
                        "ORDER BY id LIMIT :batch"
                    ),
                    {"store": store, "last": last, "batch": _BATCH},
                )
            ]
            if not ids:
                break
            bind.execute(
                text(
                    "INSERT INTO temp.chunk_words (rowid, text) SELECT id, text FROM main.vector_store_chunks "
                    "WHERE vector_store_id = :store AND id BETWEEN :first AND :last"
                ),
                {"store": store, "first": ids[0], "last": ids[-1]},
            )
            bind.execute(text(_SQLITE_BACKFILL), {"key": _store_key(store)})
            bind.execute(text("DELETE FROM temp.chunk_words"))
            last = ids[-1]


def downgrade() -> None:
    for statement in _POSTGRES_DOWN if op.get_bind().dialect.name == "postgresql" else _SQLITE_DOWN:
        op.execute(statement)
