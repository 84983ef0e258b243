"""Run steps: rows the executor creates, and retrieve/list for the API."""

from __future__ import annotations

import copy
from typing import Any

from sqlalchemy import bindparam, inspect, select
from sqlalchemy.ext.asyncio import AsyncSession

from app import errors, ids, orm
from app.services import core_rows, pagination, row_reads
from app.services.common import require_id
from app.wire.common import ListPage
from app.wire.runs import FILE_SEARCH_CONTENT_INCLUDE, RunStep


def new(run: orm.Run, step_type: str, step_details: dict[str, Any]) -> orm.RunStep:
    """A new step of ``run``, a record (core_rows.record: without the mapped
    constructor's attribute events, issue 17) that the executor inserts."""
    seq = ids.next_seq()
    return core_rows.record(
        orm.RunStep,
        id=ids.new_id(ids.STEP, seq),
        seq=seq,
        created_at=ids.seconds(seq),
        run_id=run.id,
        thread_id=run.thread_id,
        assistant_id=run.assistant_id,
        type=step_type,
        status="in_progress",
        step_details=step_details,
        last_error=None,
        metadata_={},
        usage=None,
    )


# A run's steps, in order; built once with a bound run id (issue 17: built
# per call, building the statement was most of its read's loop time, py-spy,
# on every submit_tool_outputs and every prompt of a run with tool calls).
_OF_RUN = select(orm.RunStep).where(orm.RunStep.run_id == bindparam("run_id")).order_by(orm.RunStep.seq)
_IN_PROGRESS = (
    select(orm.RunStep)
    .where(orm.RunStep.run_id == bindparam("run_id"), orm.RunStep.status == "in_progress")
    .order_by(orm.RunStep.seq)
)


async def in_progress(session: AsyncSession, run_id: str) -> list[orm.RunStep]:
    return list((await session.scalars(_IN_PROGRESS, {"run_id": run_id})).all())


async def of_run(session: AsyncSession, run_id: str) -> list[orm.RunStep]:
    return list((await session.scalars(_OF_RUN, {"run_id": run_id})).all())


# Every column of a step, labelled with its attribute name (``metadata_``):
# its rows read as records (core_rows.record), with no ORM instance loaded
# into the session, its identity map or its flush: the submit's read of the
# waiting steps, the resumed run's prompt (issue 17: with the submit's run
# read so too, a function call's answer 0.2 ms faster at the client and
# 0.3-0.4 ms of server CPU less, on both databases; bench/README).
_COLUMNS = [attr.columns[0].label(attr.key) for attr in inspect(orm.RunStep).column_attrs]
_RECORDS_OF_RUN = select(*_COLUMNS).where(orm.RunStep.run_id == bindparam("run_id")).order_by(orm.RunStep.seq)
_RECORDS_IN_PROGRESS = _RECORDS_OF_RUN.where(orm.RunStep.status == "in_progress")


async def records_of_run(session: AsyncSession, run_id: str) -> list[orm.RunStep]:
    """of_run() as records: nothing is loaded into the session, and a change
    to one is not flushed (the reader's to write: core_rows.update_row)."""
    return await _records(session, _RECORDS_OF_RUN, run_id)


async def records_in_progress(session: AsyncSession, run_id: str) -> list[orm.RunStep]:
    """in_progress() as records, as records_of_run()."""
    return await _records(session, _RECORDS_IN_PROGRESS, run_id)


async def _records(session: AsyncSession, statement: Any, run_id: str) -> list[orm.RunStep]:
    rows = await session.execute(statement, {"run_id": run_id})
    return [core_rows.record(orm.RunStep, **row._mapping) for row in rows]


async def get(session: AsyncSession, run: orm.Run, step_id: str, include: list[str]) -> RunStep:
    require_id("step_id", step_id, ids.STEP)
    row = await session.get(orm.RunStep, step_id)
    if row is None or row.run_id != run.id:
        raise errors.not_found("run step", step_id)
    return to_wire(row, include)


async def list_(
    session: AsyncSession, run: orm.Run, params: pagination.PageParams, include: list[str]
) -> ListPage[Any]:
    query = select(orm.RunStep).where(orm.RunStep.run_id == run.id)
    rows, has_more = await pagination.fetch_page(session, query, orm.RunStep.seq, params, ids.STEP)
    return pagination.page([to_wire(row, include) for row in rows], has_more)


def check_include(include: list[str]) -> list[str]:
    for value in include:
        if value != FILE_SEARCH_CONTENT_INCLUDE:
            raise errors.invalid(
                f"Invalid value: '{value}'. Supported values are: '{FILE_SEARCH_CONTENT_INCLUDE}'.",
                param="include",
                code="invalid_value",
            )
    return include


def _without_result_content(details: dict[str, Any]) -> dict[str, Any]:
    """file_search result content is only sent when asked for with include[]."""
    details = copy.deepcopy(details)
    for call in details.get("tool_calls", []):
        for result in (call.get("file_search") or {}).get("results") or []:
            result.pop("content", None)
    return details


_STEP_FIELDS = row_reads.fields(RunStep.model_fields)


def to_wire(row: orm.RunStep, include: list[str] | None = None) -> RunStep:
    found = row_reads.values(row, _STEP_FIELDS)
    if FILE_SEARCH_CONTENT_INCLUDE not in (include or []) and found["type"] == "tool_calls":
        found["step_details"] = _without_result_content(found["step_details"])
    if found["metadata"] is None:
        found["metadata"] = {}
    return RunStep.model_validate(found)
