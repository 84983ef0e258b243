"""The model-request log: every completion a run asked for, as sent (after
truncation, with the tools, tool_choice and response_format the model got)
and as answered (text, tool calls, finish reason, usage or error).

Tests read it to assert that their instructions and tool outputs reached the
model (admin API, pytest plugin); the console shows it per run.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app import orm
from app.llm import Exchange
from app.services import core_rows


def add(session: AsyncSession, exchange: Exchange) -> None:
    session.add(row(exchange))


def row(exchange: Exchange) -> orm.ModelRequest:
    """The log's row for ``exchange``, not added to any session (the executor
    inserts it with core_rows, issue 17), made as a record (core_rows.record)."""
    context = exchange.request.context
    return core_rows.record(
        orm.ModelRequest,
        run_id=context.run_id if context else None,
        created_at=exchange.created_at,
        duration_ms=exchange.duration_ms(),
        model=exchange.request.model,
        request=exchange.request_body(),
        response=exchange.response_body(),
    )


async def list_for_run(session: AsyncSession, run_id: str | None, limit: int = 100) -> list[dict[str, Any]]:
    """Oldest first; all runs' (the newest ``limit``) when ``run_id`` is None."""
    query = select(orm.ModelRequest)
    if run_id is not None:
        query = query.where(orm.ModelRequest.run_id == run_id).order_by(orm.ModelRequest.id)
        rows = list((await session.scalars(query)).all())
    else:
        query = query.order_by(orm.ModelRequest.id.desc()).limit(limit)
        rows = list(reversed((await session.scalars(query)).all()))
    return [to_wire(row) for row in rows]


def to_wire(row: orm.ModelRequest) -> dict[str, Any]:
    return {
        "object": "model.request",
        "id": row.id,
        "run_id": row.run_id,
        "created_at": row.created_at,
        "duration_ms": row.duration_ms,
        "model": row.model,
        "request": row.request,
        "response": row.response,
    }
