"""postings file: each keyword posting carries its file's seq, and the database removes postings

- ``file_seq``: the ``seq`` of the posting's file row (unique per file; 0
  for a chunk without a file row). A search with an attribute filter
  computes the passing files' seqs once and checks each posting read
  against that set, instead of looking up the posting's chunk and the
  chunk's file row per posting read (SQLite: the lookup was most of a
  filtered search; PostgreSQL: an index-only scan now answers it, the
  column is INCLUDEd in the lists index).
- Deletion by the database: deleting a chunk deletes its postings, and
  deleting a file's row in a store (or the store, whose file rows go by
  their foreign key) deletes the file's chunks. SQLite: row triggers through
  the (chunk_id, term) index; PostgreSQL: statement triggers over the
  deleted rows (transition tables), one DELETE per statement. Triggers
  rather than a foreign key: a foreign key is checked on every posting
  insert (~200 per chunk), a delete trigger costs the load nothing.

The table is rebuilt in its key order (compact pages) with the seq read
from the chunk's file row.

Revision ID: 0013_postings_file
Revises: 0012_keyword_postings
Create Date: 2026-11-30
"""

from __future__ import annotations

from alembic import op

revision = "0013_postings_file"
down_revision = "0012_keyword_postings"
branch_labels = None
depends_on = None

TABLE = "vector_store_keyword_postings"
# The posting's chunk, and its file row if any (a join: at 100k chunks the
# table holds ~20M postings).
_FROM = (
    f"FROM {TABLE} p JOIN vector_store_chunks c ON c.id = p.chunk_id "
    "LEFT JOIN vector_store_files f ON f.vector_store_id = c.vector_store_id AND f.file_id = c.file_id"
)

_SQLITE_UP = (
    f"CREATE TABLE {TABLE}_new (term TEXT NOT NULL, store_key INTEGER NOT NULL, impact INTEGER NOT NULL, "
    "chunk_id INTEGER NOT NULL, file_seq INTEGER NOT NULL, "
    "PRIMARY KEY (term, store_key, impact DESC, chunk_id)) WITHOUT ROWID",
    f"INSERT INTO {TABLE}_new (term, store_key, impact, chunk_id, file_seq) "  # noqa: S608 (constant fragments only)
    f"SELECT p.term, p.store_key, p.impact, p.chunk_id, coalesce(f.seq, 0) {_FROM} "
    "ORDER BY p.term, p.store_key, p.impact DESC, p.chunk_id",
    f"DROP TABLE {TABLE}",
    f"ALTER TABLE {TABLE}_new RENAME TO {TABLE}",
    f"CREATE INDEX ix_{TABLE}_chunk ON {TABLE} (chunk_id, term)",
    "CREATE TRIGGER vector_store_chunks_postings_ad AFTER DELETE ON vector_store_chunks BEGIN "
    f"DELETE FROM {TABLE} WHERE chunk_id = old.id; END",
    "CREATE TRIGGER vector_store_files_chunks_ad AFTER DELETE ON vector_store_files BEGIN "
    "DELETE FROM vector_store_chunks WHERE vector_store_id = old.vector_store_id AND file_id = old.file_id; END",
)
_SQLITE_DOWN = (
    "DROP TRIGGER IF EXISTS vector_store_files_chunks_ad",
    "DROP TRIGGER IF EXISTS vector_store_chunks_postings_ad",
    f"CREATE TABLE {TABLE}_old (term TEXT NOT NULL, store_key INTEGER NOT NULL, impact INTEGER NOT NULL, "
    "chunk_id INTEGER NOT NULL, PRIMARY KEY (term, store_key, impact DESC, chunk_id)) WITHOUT ROWID",
    f"INSERT INTO {TABLE}_old (term, store_key, impact, chunk_id) "  # noqa: S608 (constant fragments only)
    f"SELECT term, store_key, impact, chunk_id FROM {TABLE}",
    f"DROP TABLE {TABLE}",
    f"ALTER TABLE {TABLE}_old RENAME TO {TABLE}",
    f"CREATE INDEX ix_{TABLE}_chunk ON {TABLE} (chunk_id, term)",
)

_POSTGRES_UP = (
    f"CREATE TABLE {TABLE}_new (term text NOT NULL, store_key bigint NOT NULL, impact smallint NOT NULL, "
    "chunk_id bigint NOT NULL, file_seq bigint NOT NULL)",
    f"INSERT INTO {TABLE}_new (term, store_key, impact, chunk_id, file_seq) "  # noqa: S608 (constant fragments only)
    f"SELECT p.term, p.store_key, p.impact, p.chunk_id, coalesce(f.seq, 0) {_FROM}",
    f"DROP TABLE {TABLE}",
    f"ALTER TABLE {TABLE}_new RENAME TO {TABLE}",
    f"CREATE INDEX ix_{TABLE}_lists ON {TABLE} (term, store_key, impact DESC, chunk_id) INCLUDE (file_seq)",
    f"CREATE INDEX ix_{TABLE}_chunk ON {TABLE} (chunk_id, term) INCLUDE (impact)",
    "CREATE FUNCTION vector_store_chunks_postings_ad() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
    f"DELETE FROM {TABLE} WHERE chunk_id IN (SELECT id FROM gone); RETURN NULL; END $$",
    "CREATE TRIGGER vector_store_chunks_postings_ad AFTER DELETE ON vector_store_chunks "
    "REFERENCING OLD TABLE AS gone FOR EACH STATEMENT EXECUTE FUNCTION vector_store_chunks_postings_ad()",
    "CREATE FUNCTION vector_store_files_chunks_ad() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
    "DELETE FROM vector_store_chunks c USING gone g "
    "WHERE c.vector_store_id = g.vector_store_id AND c.file_id = g.file_id; RETURN NULL; END $$",
    "CREATE TRIGGER vector_store_files_chunks_ad AFTER DELETE ON vector_store_files "
    "REFERENCING OLD TABLE AS gone FOR EACH STATEMENT EXECUTE FUNCTION vector_store_files_chunks_ad()",
)
_POSTGRES_DOWN = (
    "DROP TRIGGER IF EXISTS vector_store_files_chunks_ad ON vector_store_files",
    "DROP FUNCTION IF EXISTS vector_store_files_chunks_ad()",
    "DROP TRIGGER IF EXISTS vector_store_chunks_postings_ad ON vector_store_chunks",
    "DROP FUNCTION IF EXISTS vector_store_chunks_postings_ad()",
    f"DROP INDEX IF EXISTS ix_{TABLE}_lists",
    f"ALTER TABLE {TABLE} DROP COLUMN file_seq",
    f"CREATE INDEX ix_{TABLE}_lists ON {TABLE} (term, store_key, impact DESC, chunk_id)",
)


def upgrade() -> None:
    for statement in _POSTGRES_UP if op.get_bind().dialect.name == "postgresql" else _SQLITE_UP:
        op.execute(statement)


def downgrade() -> None:
    for statement in _POSTGRES_DOWN if op.get_bind().dialect.name == "postgresql" else _SQLITE_DOWN:
        op.execute(statement)
