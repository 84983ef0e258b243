"""store file seq: a file's seq is unique within its vector store

A store file's ``seq`` is its file's (the id's sequence: a nanosecond clock
per process), so two processes (``serve --workers N``) that create files in
the same nanosecond give them one seq; in one store a filtered search, which
knows a posting's file by its seq (migration 0013), would then treat the two
files as one. The index on (vector_store_id, seq) becomes unique (the
service picks the next free seq on a conflict,
app.services.vector_store_files); a store already holding such a pair keeps
the first file's seq and gives the others the next free values, with their
postings.

Revision ID: 0014_store_file_seq
Revises: 0013_postings_file
Create Date: 2026-11-30
"""

from __future__ import annotations

from alembic import op
from sqlalchemy import text

revision = "0014_store_file_seq"
down_revision = "0013_postings_file"
branch_labels = None
depends_on = None

INDEX = "ix_vector_store_files_store_seq"
TABLE = "vector_store_files"


def _separate_shared_seqs() -> None:
    bind = op.get_bind()
    shared = bind.execute(
        text(f"SELECT vector_store_id, seq FROM {TABLE} GROUP BY vector_store_id, seq HAVING count(*) > 1")  # noqa: S608 (constant table name)
    ).all()
    for store_id, seq in shared:
        files = bind.execute(
            text(f"SELECT file_id FROM {TABLE} WHERE vector_store_id = :store AND seq = :seq ORDER BY file_id"),  # noqa: S608 (constant table name)
            {"store": store_id, "seq": seq},
        ).scalars()
        for file_id in list(files)[1:]:
            free = seq + 1
            while bind.execute(
                text(f"SELECT 1 FROM {TABLE} WHERE vector_store_id = :store AND seq = :seq"),  # noqa: S608 (constant table name)
                {"store": store_id, "seq": free},
            ).first():
                free += 1
            where = {"store": store_id, "file": file_id, "seq": free}
            bind.execute(
                text(f"UPDATE {TABLE} SET seq = :seq WHERE vector_store_id = :store AND file_id = :file"),  # noqa: S608 (constant table name)
                where,
            )
            bind.execute(
                text(
                    "UPDATE vector_store_keyword_postings SET file_seq = :seq WHERE chunk_id IN "
                    "(SELECT id FROM vector_store_chunks WHERE vector_store_id = :store AND file_id = :file)"
                ),
                where,
            )


def upgrade() -> None:
    _separate_shared_seqs()
    op.drop_index(INDEX, table_name=TABLE)
    op.create_index(INDEX, TABLE, ["vector_store_id", "seq"], unique=True)


def downgrade() -> None:
    op.drop_index(INDEX, table_name=TABLE)
    op.create_index(INDEX, TABLE, ["vector_store_id", "seq"])
