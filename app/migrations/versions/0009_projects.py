"""projects and their API keys; every top-level object belongs to a project

Existing rows join the default project (``proj_default``), which the keys
of ASSISTANTS_API_KEYS also belong to. Messages, runs, run steps, vector
store files, batches and chunks belong to their parent's project, so only
the top-level tables get a ``project_id`` (with an index that lists use).

Revision ID: 0009_projects
Revises: 0007_model_requests
Create Date: 2026-11-29
"""

from __future__ import annotations

import time

import sqlalchemy as sa
from alembic import op

revision = "0009_projects"
down_revision = "0007_model_requests"
branch_labels = None
depends_on = None

DEFAULT_PROJECT_ID = "proj_default"
DEFAULT_PROJECT_NAME = "default"
_OWNED = ("assistants", "threads", "files", "vector_stores")


def upgrade() -> None:
    projects = op.create_table(
        "projects",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("name", sa.Text(), nullable=False, unique=True),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("project_id", sa.String(64), sa.ForeignKey("projects.id"), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("prefix", sa.String(32), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("revoked_at", sa.BigInteger(), nullable=True),
    )
    op.create_index("ix_api_keys_project_id", "api_keys", ["project_id"])
    op.bulk_insert(projects, [{"id": DEFAULT_PROJECT_ID, "name": DEFAULT_PROJECT_NAME, "created_at": int(time.time())}])
    for table in _OWNED:
        # The server default puts every existing row in the default project at once.
        op.add_column(
            table, sa.Column("project_id", sa.String(64), nullable=False, server_default=DEFAULT_PROJECT_ID)
        )
        op.create_index(f"ix_{table}_project_seq", table, ["project_id", "seq"])


def downgrade() -> None:
    for table in _OWNED:
        op.drop_index(f"ix_{table}_project_seq", table_name=table)
        op.drop_column(table, "project_id")
    op.drop_index("ix_api_keys_project_id", table_name="api_keys")
    op.drop_table("api_keys")
    op.drop_table("projects")
