"""All tables. Nested OpenAI structures live in JSON columns; real columns only
for what is filtered, sorted, joined or locked.

``seq`` is the monotonic sequence encoded in the id (see app.ids); lists order
by it. This module imports nothing from the app.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Float, ForeignKey, Index, Integer, String, Text, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# JSON as text on both databases: SQLite's JSON is text, PostgreSQL's json
# keeps the text as written (each object's key order and numbers as given,
# as OpenAI keeps them; jsonb sorted the keys: migration 0016_pgjson).
JSONType = JSON()


class Base(DeclarativeBase):
    pass


# Rows written before projects existed (and by an older server during a
# rolling upgrade) belong to the default project: migration 0009_projects
# gives the column this server default. Not declared here, so that the ORM
# neither relies on it (every insert names its project) nor reads it back.
DEFAULT_PROJECT_ID = "proj_default"


class Project(Base):
    """An isolation boundary (OpenAI's projects): every top-level object
    belongs to one, and a key of one project sees nothing of another."""

    __tablename__ = "projects"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(Text, unique=True)
    created_at: Mapped[int] = mapped_column(BigInteger)


class ApiKey(Base):
    """A key made with ``assistants-server keys create``: only its SHA-256 is
    stored, with a short visible prefix to recognise it in listings."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[int] = mapped_column(BigInteger)
    revoked_at: Mapped[int | None] = mapped_column(BigInteger)


def _project_column() -> Mapped[str]:
    # No foreign key: SQLite cannot add a referencing NOT NULL column to a
    # table that has rows; projects are never deleted.
    return mapped_column(String(64))


class Assistant(Base):
    __tablename__ = "assistants"
    __table_args__ = (Index("ix_assistants_project_seq", "project_id", "seq"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    project_id: Mapped[str] = _project_column()
    seq: Mapped[int] = mapped_column(BigInteger, index=True)
    created_at: Mapped[int] = mapped_column(BigInteger)
    model: Mapped[str] = mapped_column(Text)
    name: Mapped[str | None] = mapped_column(Text)
    description: Mapped[str | None] = mapped_column(Text)
    instructions: Mapped[str | None] = mapped_column(Text)
    reasoning_effort: Mapped[str | None] = mapped_column(String(16))
    tools: Mapped[list[Any]] = mapped_column(JSONType)
    tool_resources: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JSONType)
    temperature: Mapped[float | None] = mapped_column(Float)
    top_p: Mapped[float | None] = mapped_column(Float)
    response_format: Mapped[Any] = mapped_column(JSONType, nullable=True)


class Thread(Base):
    __tablename__ = "threads"
    __table_args__ = (Index("ix_threads_project_seq", "project_id", "seq"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    project_id: Mapped[str] = _project_column()
    seq: Mapped[int] = mapped_column(BigInteger, index=True)
    created_at: Mapped[int] = mapped_column(BigInteger)
    tool_resources: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JSONType)


class Message(Base):
    __tablename__ = "messages"
    __table_args__ = (Index("ix_messages_thread_seq", "thread_id", "seq"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[int] = mapped_column(BigInteger)
    thread_id: Mapped[str] = mapped_column(ForeignKey("threads.id", ondelete="CASCADE"))
    role: Mapped[str] = mapped_column(String(16))
    content: Mapped[list[Any]] = mapped_column(JSONType)
    status: Mapped[str] = mapped_column(String(16))
    incomplete_details: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    completed_at: Mapped[int | None] = mapped_column(BigInteger)
    incomplete_at: Mapped[int | None] = mapped_column(BigInteger)
    assistant_id: Mapped[str | None] = mapped_column(String(64))
    run_id: Mapped[str | None] = mapped_column(String(64), index=True)
    attachments: Mapped[list[Any] | None] = mapped_column(JSONType)
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JSONType)


# A live run owns its thread: no second run, no new message, until it ends.
# requires_action counts: the run still owns the thread until outputs arrive.
LIVE_RUN_STATUSES = ("queued", "in_progress", "requires_action", "cancelling")
# The live-run index's predicate, which an ON CONFLICT (thread_id) WHERE ...
# repeats for PostgreSQL to infer the index (services.runs). Migration 0005
# keeps its own copy (_LIVE): the two must stay the same text, or every run
# created on an existing thread on PostgreSQL fails to find its conflict target.
LIVE_RUN = text("status IN ('queued', 'in_progress', 'requires_action', 'cancelling')")


class Run(Base):
    __tablename__ = "runs"
    __table_args__ = (
        Index("ix_runs_thread_seq", "thread_id", "seq"),
        # SQLite's only: PostgreSQL's status filters read ux_runs_live_thread (migration 0015).
        Index("ix_runs_status", "status").ddl_if(dialect="sqlite"),
        # The database itself keeps "one live run per thread" (issue 10),
        # whatever a check before the insert saw.
        Index(
            "ux_runs_live_thread",
            "thread_id",
            unique=True,
            sqlite_where=LIVE_RUN,
            postgresql_where=LIVE_RUN,
        ),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[int] = mapped_column(BigInteger)
    thread_id: Mapped[str] = mapped_column(ForeignKey("threads.id", ondelete="CASCADE"))
    assistant_id: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))
    required_action: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    last_error: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    expires_at: Mapped[int | None] = mapped_column(BigInteger)
    started_at: Mapped[int | None] = mapped_column(BigInteger)
    cancelled_at: Mapped[int | None] = mapped_column(BigInteger)
    failed_at: Mapped[int | None] = mapped_column(BigInteger)
    completed_at: Mapped[int | None] = mapped_column(BigInteger)
    incomplete_details: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    model: Mapped[str] = mapped_column(Text)
    instructions: Mapped[str] = mapped_column(Text)
    tools: Mapped[list[Any]] = mapped_column(JSONType)
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JSONType)
    usage: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    temperature: Mapped[float | None] = mapped_column(Float)
    top_p: Mapped[float | None] = mapped_column(Float)
    max_prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    max_completion_tokens: Mapped[int | None] = mapped_column(Integer)
    truncation_strategy: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    tool_choice: Mapped[Any] = mapped_column(JSONType, nullable=True)
    parallel_tool_calls: Mapped[bool] = mapped_column(Boolean, default=True)
    response_format: Mapped[Any] = mapped_column(JSONType, nullable=True)
    reasoning_effort: Mapped[str | None] = mapped_column(String(16))
    # Engine columns (not on the wire). tool_resources: the override given to
    # POST /threads/runs. The lease says which worker executes the run and
    # until when; a lapsed lease means that worker died (see app/worker.py).
    tool_resources: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_expires_at: Mapped[float | None] = mapped_column(Float)


class RunStep(Base):
    __tablename__ = "run_steps"
    __table_args__ = (Index("ix_run_steps_run_seq", "run_id", "seq"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[int] = mapped_column(BigInteger)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    thread_id: Mapped[str] = mapped_column(String(64))
    assistant_id: Mapped[str] = mapped_column(String(64))
    type: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16))
    step_details: Mapped[dict[str, Any]] = mapped_column(JSONType)
    last_error: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    expired_at: Mapped[int | None] = mapped_column(BigInteger)
    cancelled_at: Mapped[int | None] = mapped_column(BigInteger)
    failed_at: Mapped[int | None] = mapped_column(BigInteger)
    completed_at: Mapped[int | None] = mapped_column(BigInteger)
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSONType)
    usage: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    # Not on the wire: per built-in tool call, the arguments the model sent and
    # the output it was shown ({call_id: {"arguments", "output"}}), so later
    # model calls of the run can be given the same history.
    internal: Mapped[dict[str, Any] | None] = mapped_column(JSONType)


class File(Base):
    __tablename__ = "files"
    __table_args__ = (
        Index("ix_files_project_seq", "project_id", "seq"),
        Index("ix_files_purpose_seq", "purpose", "seq"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    project_id: Mapped[str] = _project_column()
    seq: Mapped[int] = mapped_column(BigInteger, index=True)
    created_at: Mapped[int] = mapped_column(BigInteger)
    bytes: Mapped[int] = mapped_column(BigInteger)
    filename: Mapped[str] = mapped_column(Text)
    purpose: Mapped[str] = mapped_column(String(32))
    expires_at: Mapped[int | None] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16), default="processed")
    status_details: Mapped[str | None] = mapped_column(Text)


class VectorStore(Base):
    """A vector store. ``file_counts``, ``usage_bytes`` and ``status`` are not
    stored: they are counted from vector_store_files on every read, so they
    are exact (the SDK's batch poller relies on ``in_progress``)."""

    __tablename__ = "vector_stores"
    __table_args__ = (Index("ix_vector_stores_project_seq", "project_id", "seq"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    project_id: Mapped[str] = _project_column()
    seq: Mapped[int] = mapped_column(BigInteger, index=True)
    created_at: Mapped[int] = mapped_column(BigInteger)
    name: Mapped[str | None] = mapped_column(Text)
    description: Mapped[str | None] = mapped_column(Text)
    last_active_at: Mapped[int] = mapped_column(BigInteger)
    # {"anchor": "last_active_at", "days": n}; expires_at follows last_active_at.
    expires_after: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    expires_at: Mapped[int | None] = mapped_column(BigInteger)
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JSONType)


class VectorStoreFileBatch(Base):
    __tablename__ = "vector_store_file_batches"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[int] = mapped_column(BigInteger)
    vector_store_id: Mapped[str] = mapped_column(ForeignKey("vector_stores.id", ondelete="CASCADE"), index=True)
    # Only "cancelled" is ever stored; otherwise the status follows the files.
    cancelled: Mapped[bool] = mapped_column(Boolean, default=False)


class VectorStoreFile(Base):
    """A file in a store; also the ingestion job (claimed with a lease while
    ``in_progress``, like runs). ``seq`` is the file id's sequence, so the
    file id works as a page cursor."""

    __tablename__ = "vector_store_files"
    __table_args__ = (
        # Unique (migration 0014): a filtered search knows a file by its seq.
        Index("ix_vector_store_files_store_seq", "vector_store_id", "seq", unique=True),
        Index("ix_vector_store_files_status", "status"),
        Index("ix_vector_store_files_batch", "batch_id"),
    )

    vector_store_id: Mapped[str] = mapped_column(ForeignKey("vector_stores.id", ondelete="CASCADE"), primary_key=True)
    file_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[int] = mapped_column(BigInteger)
    filename: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))
    last_error: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    usage_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    chunking_strategy: Mapped[dict[str, Any]] = mapped_column(JSONType)
    attributes: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    batch_id: Mapped[str | None] = mapped_column(String(64))
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_expires_at: Mapped[float | None] = mapped_column(Float)


class VectorStoreChunk(Base):
    """One chunk of a file's text. The keyword index (SQLite FTS5 table /
    PostgreSQL tsvector column) and the embedding column are created by the
    migration per dialect and reached through app.retrieval.index only."""

    __tablename__ = "vector_store_chunks"
    __table_args__ = (Index("ix_vector_store_chunks_store_file", "vector_store_id", "file_id"),)

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
    )
    vector_store_id: Mapped[str] = mapped_column(String(64))
    file_id: Mapped[str] = mapped_column(String(64))
    position: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)


class ModelRequest(Base):
    """One completion the server asked of a model, as sent and as answered:
    what a test (or the console) reads to see what the model saw. Written
    after the call, never during it."""

    __tablename__ = "model_requests"
    __table_args__ = (Index("ix_model_requests_run", "run_id", "id"),)

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
    )
    run_id: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[int] = mapped_column(BigInteger)
    duration_ms: Mapped[int] = mapped_column(Integer)
    model: Mapped[str] = mapped_column(Text)
    request: Mapped[dict[str, Any]] = mapped_column(JSONType)
    response: Mapped[dict[str, Any]] = mapped_column(JSONType)


class RunEvent(Base):
    """One stream event of a run, in order (issue 11): what SSE serves, on
    any replica, from any sequence number. ``seq`` counts from 1 per run;
    ``data`` is the event's payload as sent on the wire. Pruned some time
    after the run ends (app/services/run_events.py)."""

    __tablename__ = "run_events"
    __table_args__ = (Index("ix_run_events_created_at", "created_at"),)

    # On SQLite only: PostgreSQL's table has no foreign key (migration 0018,
    # its check a trigger query per event row; threads.delete deletes a
    # thread's run logs itself).
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    event: Mapped[str] = mapped_column(String(48))
    data: Mapped[dict[str, Any]] = mapped_column(JSONType)
    created_at: Mapped[float] = mapped_column(Float)
