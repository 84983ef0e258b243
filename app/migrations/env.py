"""Alembic environment. The server calls it through app.db.migrate() with a
connection in ``config.attributes``; ``python -m app migrate`` does the same."""

from __future__ import annotations

from alembic import context
from sqlalchemy import text
from sqlalchemy.schema import SchemaItem

from app.orm import Base

target_metadata = Base.metadata

# Any constant works; it only has to be the same for every server process.
_MIGRATION_LOCK_ID = 7_410_431_022


def _include_object(
    item: SchemaItem, name: str | None, type_: str, reflected: bool, compare_to: SchemaItem | None
) -> bool:
    """What a schema comparison (autogenerate) weighs: Alembic ignores
    ddl_if, so without this it would read SQLite's own status index
    (orm.Run, migration 0015) as missing on PostgreSQL and put it back."""
    if type_ == "index" and name == "ix_runs_status":  # (index names are the schema's: one table's)
        return context.get_bind().dialect.name == "sqlite"
    return True


def run_migrations_online() -> None:
    connection = context.config.attributes.get("connection")
    if connection is None:
        raise RuntimeError("run migrations with `python -m app migrate`")
    if connection.dialect.name == "postgresql":
        # Several replicas may start at once; only one migrates at a time.
        connection.execute(text(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK_ID})"))
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        include_object=_include_object,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise RuntimeError("offline (SQL script) migrations are not supported")
run_migrations_online()
