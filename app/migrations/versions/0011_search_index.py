"""search index (SQLite): a narrow covering index for the keyword search's
store check, and a per-store chunk version for the vector cache

- FTS5 ranks chunk ids; each candidate must then be checked against the
  searched stores (and the filter's file row). Through the chunk table's own
  B-tree that check reads one wide row (text, embedding) per candidate, about
  20 ms per query at 100k chunks; ix_vector_store_chunks_id_store_file holds
  only what the check reads, and app.retrieval.sqlite_keywords names it.
- The vector search keeps each store's matrix in memory and must know when
  the store's chunks changed, also by another process (the worker):
  vector_store_chunk_versions holds a number that triggers bump in the same
  transaction as every chunk insert, update and delete (one indexed row to
  read instead of an aggregate over the store's chunks).

PostgreSQL reads each candidate's tsvector from the row anyway and searches
vectors through pgvector, so it gets neither.

Revision ID: 0011_search_index
Revises: 0009_projects
Create Date: 2026-11-29
"""

from __future__ import annotations

from alembic import op

revision = "0011_search_index"
down_revision = "0009_projects"
branch_labels = None
depends_on = None

INDEX = "ix_vector_store_chunks_id_store_file"

_BUMP = (
    "INSERT INTO vector_store_chunk_versions (vector_store_id, version) VALUES ({row}.vector_store_id, 1) "
    "ON CONFLICT (vector_store_id) DO UPDATE SET version = version + 1;"
)

_SQLITE_UP = (
    f"CREATE INDEX {INDEX} ON vector_store_chunks (id, vector_store_id, file_id)",
    "CREATE TABLE vector_store_chunk_versions ("
    "vector_store_id VARCHAR(64) NOT NULL PRIMARY KEY, version INTEGER NOT NULL)",
    "INSERT INTO vector_store_chunk_versions (vector_store_id, version) "
    "SELECT vector_store_id, count(*) FROM vector_store_chunks GROUP BY vector_store_id",
    "CREATE TRIGGER vector_store_chunks_version_ai AFTER INSERT ON vector_store_chunks BEGIN "
    + _BUMP.format(row="new")
    + " END",
    "CREATE TRIGGER vector_store_chunks_version_ad AFTER DELETE ON vector_store_chunks BEGIN "
    + _BUMP.format(row="old")
    + " END",
    "CREATE TRIGGER vector_store_chunks_version_au AFTER UPDATE ON vector_store_chunks BEGIN "
    + _BUMP.format(row="old")
    + " "
    + _BUMP.format(row="new")
    + " END",
)

_SQLITE_DOWN = (
    "DROP TRIGGER IF EXISTS vector_store_chunks_version_au",
    "DROP TRIGGER IF EXISTS vector_store_chunks_version_ad",
    "DROP TRIGGER IF EXISTS vector_store_chunks_version_ai",
    "DROP TABLE IF EXISTS vector_store_chunk_versions",
    f"DROP INDEX IF EXISTS {INDEX}",
)


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        for statement in _SQLITE_UP:
            op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        for statement in _SQLITE_DOWN:
            op.execute(statement)
