"""vector stores: stores, files (the ingestion jobs), batches, chunks and their indexes

The keyword and vector indexes differ per engine: SQLite gets an FTS5 table
kept in step with the chunks by triggers, and embeddings as float32 blobs;
PostgreSQL gets a generated tsvector column with a GIN index and a pgvector
column with an HNSW index (for 384-dimension embeddings, the size of the
bundled local model; other sizes are searched exactly, without the index).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-21
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")

_SQLITE_FTS = (
    "CREATE VIRTUAL TABLE vector_store_chunks_fts USING fts5("
    "text, content='vector_store_chunks', content_rowid='id', tokenize='porter unicode61')",
    "CREATE TRIGGER vector_store_chunks_ai AFTER INSERT ON vector_store_chunks BEGIN "
    "INSERT INTO vector_store_chunks_fts(rowid, text) VALUES (new.id, new.text); END",
    "CREATE TRIGGER vector_store_chunks_ad AFTER DELETE ON vector_store_chunks BEGIN "
    "INSERT INTO vector_store_chunks_fts(vector_store_chunks_fts, rowid, text) "
    "VALUES ('delete', old.id, old.text); END",
)

_POSTGRES_INDEXES = (
    "CREATE EXTENSION IF NOT EXISTS vector",
    "ALTER TABLE vector_store_chunks ADD COLUMN tsv tsvector "
    "GENERATED ALWAYS AS (to_tsvector('english', text)) STORED",
    "CREATE INDEX ix_vector_store_chunks_tsv ON vector_store_chunks USING gin (tsv)",
    "ALTER TABLE vector_store_chunks ADD COLUMN embedding vector",
    "CREATE INDEX ix_vector_store_chunks_embedding ON vector_store_chunks "
    "USING hnsw ((embedding::vector(384)) vector_cosine_ops) WHERE vector_dims(embedding) = 384",
)


def _tables() -> None:
    op.create_table(
        "vector_stores",
        sa.Column("id", sa.String(length=64), primary_key=True),
        sa.Column("seq", sa.BigInteger(), nullable=False, index=True),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("name", sa.Text(), nullable=True),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("last_active_at", sa.BigInteger(), nullable=False),
        sa.Column("expires_after", _JSON, nullable=True),
        sa.Column("expires_at", sa.BigInteger(), nullable=True),
        sa.Column("metadata", _JSON, nullable=False),
    )
    op.create_table(
        "vector_store_file_batches",
        sa.Column("id", sa.String(length=64), primary_key=True),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column(
            "vector_store_id", sa.String(length=64),
            sa.ForeignKey("vector_stores.id", ondelete="CASCADE"), nullable=False, index=True,
        ),
        sa.Column("cancelled", sa.Boolean(), nullable=False),
    )
    op.create_table(
        "vector_store_files",
        sa.Column(
            "vector_store_id", sa.String(length=64),
            sa.ForeignKey("vector_stores.id", ondelete="CASCADE"), primary_key=True,
        ),
        sa.Column("file_id", sa.String(length=64), primary_key=True),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("filename", sa.Text(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("last_error", _JSON, nullable=True),
        sa.Column("usage_bytes", sa.BigInteger(), nullable=False),
        sa.Column("chunking_strategy", _JSON, nullable=False),
        sa.Column("attributes", _JSON, nullable=True),
        sa.Column("batch_id", sa.String(length=64), nullable=True),
        sa.Column("lease_owner", sa.String(length=64), nullable=True),
        sa.Column("lease_expires_at", sa.Float(), nullable=True),
    )
    op.create_index("ix_vector_store_files_store_seq", "vector_store_files", ["vector_store_id", "seq"])
    op.create_index("ix_vector_store_files_status", "vector_store_files", ["status"])
    op.create_index("ix_vector_store_files_batch", "vector_store_files", ["batch_id"])
    op.create_table(
        "vector_store_chunks",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("vector_store_id", sa.String(length=64), nullable=False),
        sa.Column("file_id", sa.String(length=64), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
    )
    op.create_index("ix_vector_store_chunks_store_file", "vector_store_chunks", ["vector_store_id", "file_id"])


def upgrade() -> None:
    _tables()
    if op.get_context().dialect.name == "postgresql":
        for statement in _POSTGRES_INDEXES:
            op.execute(statement)
    else:
        op.add_column("vector_store_chunks", sa.Column("embedding", sa.LargeBinary(), nullable=True))
        for statement in _SQLITE_FTS:
            op.execute(statement)


def downgrade() -> None:
    if op.get_context().dialect.name != "postgresql":
        op.execute("DROP TRIGGER IF EXISTS vector_store_chunks_ad")
        op.execute("DROP TRIGGER IF EXISTS vector_store_chunks_ai")
        op.execute("DROP TABLE IF EXISTS vector_store_chunks_fts")
    op.drop_table("vector_store_chunks")
    op.drop_table("vector_store_files")
    op.drop_table("vector_store_file_batches")
    op.drop_table("vector_stores")
