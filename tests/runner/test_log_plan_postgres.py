"""The run log's inserts on PostgreSQL keep a generic plan (issue 17): a
batch of fewer events than PostgreSQL's default guess for an array (a
create's 3) must not make every plan made with the values look cheaper,
or PostgreSQL plans the statement again at each execution."""

from __future__ import annotations

from typing import Any

import openai
import pytest
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from app import orm
from app.runtime import Runtime
from app.services import core_rows, run_events
from app.wire.events import Event
from tests.runner.test_held_back import _RUN, _THREAD

pytestmark = [pytest.mark.timeout(60), pytest.mark.parametrize("database_url", ["postgres"], indirect=True)]

# PostgreSQL plans a prepared statement with its values 5 times, then
# weighs the generic plan against them; 8 leaves room for the decision.
EXECUTIONS = 8
EVENTS = [Event("thread.run.created", {"id": "run_plan"}), Event("thread.run.queued", {"id": "run_plan"})]


async def _plans(connection: AsyncConnection, fragment: str) -> tuple[int, int]:
    """(generic, custom) plans so far of this connection's prepared
    statements whose text holds ``fragment``."""
    raw = (await connection.get_raw_connection()).driver_connection
    assert raw is not None
    row = await raw.fetchrow(
        "SELECT coalesce(sum(generic_plans), 0), coalesce(sum(custom_plans), 0) FROM pg_prepared_statements "
        "WHERE statement LIKE '%' || $1 || '%'",
        fragment,
    )
    assert row is not None
    return int(row[0]), int(row[1])


async def _with_a_run(runtime: Runtime) -> None:
    async with runtime.transaction() as session:
        await core_rows.insert_row(session, core_rows.record(orm.Thread, **_THREAD))
        await core_rows.insert_row(session, core_rows.record(orm.Run, id="run_plan", **_RUN))


async def test_a_short_batchs_insert_keeps_the_generic_plan(runtime: Runtime) -> None:
    await _with_a_run(runtime)
    async with runtime.engine.connect() as connection:
        statement = run_events._insert_postgres_statement(False, False)
        for _ in range(EXECUTIONS):
            parameters: dict[str, Any] = {
                "run_ids": ["run_plan"] * len(EVENTS),
                "ns": list(range(1, len(EVENTS) + 1)),
                "names": [event.name for event in EVENTS],
                "datas": [run_events.logged_text(event) for event in EVENTS],
                "now": 1.0,
            }
            await connection.execute(statement, parameters)
        generic, custom = await _plans(connection, "unnest(")
        await connection.rollback()
    assert custom == 5 and generic == EXECUTIONS - custom


async def test_the_logged_insert_other_statements_carry_keeps_the_generic_plan(runtime: Runtime) -> None:
    await _with_a_run(runtime)
    async with runtime.engine.connect() as connection:
        statement = text(run_events._logged_sql(False))  # the create's and the end's CTE, alone
        for _ in range(EXECUTIONS):
            await connection.execute(statement, run_events._logged_params("run_plan", EVENTS))
        generic, custom = await _plans(connection, "unnest(")
        await connection.rollback()
    assert custom == 5 and generic == EXECUTIONS - custom


async def test_the_api_create_keeps_the_generic_plan(client: openai.AsyncOpenAI, app: FastAPI) -> None:
    """The statement the plan was re-made for at each execution: the
    create's own (its run row, its log's insert carried in its CTEs), sent
    by real creates. Every pooled connection that ran it more than
    PostgreSQL's five custom plans must have settled on the generic one."""
    assistant = await client.beta.assistants.create(model="gpt-4o")
    for _ in range(EXECUTIONS + 4):
        await client.beta.threads.create_and_run_poll(
            assistant_id=assistant.id, thread={"messages": [{"role": "user", "content": "hi"}]}
        )
    engine = app.state.runtime.engine
    connections = [await engine.connect() for _ in range(engine.pool.checkedin())]  # type: ignore[attr-defined]
    try:
        plans = [await _plans(connection, "INSERT INTO runs") for connection in connections]
    finally:
        for connection in connections:
            await connection.close()
    settled = [(generic, custom) for generic, custom in plans if generic + custom > 5]
    assert settled, f"no connection ran the create more than 5 times: {plans}"
    assert all(generic > 0 for generic, _ in settled), plans


# Events enough that reading the run's end once per event (each read
# walking back over the rows this statement inserted before it) would show.
MANY = 40


def _end_reads(plan: Any) -> int:
    """How many times the plan's nodes read the log's end (the scans of
    ``run_events`` aliased ``e``, loops summed)."""
    if isinstance(plan, list):
        return sum(_end_reads(item) for item in plan)
    if not isinstance(plan, dict):
        return 0
    own = int(plan["Actual Loops"]) if plan.get("Relation Name") == "run_events" and plan.get("Alias") == "e" else 0
    return own + sum(_end_reads(value) for value in plan.values() if isinstance(value, list | dict))


async def _explained(connection: AsyncConnection, sql: str, parameters: dict[str, Any]) -> Any:
    return (await connection.execute(text("EXPLAIN (ANALYZE, FORMAT JSON) " + sql), parameters)).scalar_one()


async def test_a_batch_reads_each_runs_end_once_not_once_per_event(runtime: Runtime) -> None:
    """The numbering reads each run's last seq once per statement: per
    event, every read walked back over the entries the statement had
    inserted before it (not in its snapshot), quadratic in a batch's
    events (issue 17: an end's 12 events, ~70 of its ~210 buffers)."""
    await _with_a_run(runtime)
    async with runtime.transaction() as session:
        await core_rows.insert_row(session, core_rows.record(orm.Run, id="run_plan_2", **_RUN))
    events = [Event("thread.message.delta", {"n": n}) for n in range(MANY)]
    async with runtime.engine.connect() as connection:
        run_ids = ["run_plan"] * MANY + ["run_plan_2"] * MANY
        parameters: dict[str, Any] = {
            "run_ids": run_ids,
            "ns": list(range(1, MANY + 1)) * 2,
            "names": [event.name for event in events] * 2,
            "datas": [run_events.logged_text(event) for event in events] * 2,
            "now": 1.0,
        }
        batch = str(run_events._insert_postgres_statement(False, False))
        batch_reads = _end_reads(await _explained(connection, batch, parameters))
        carried = run_events._logged_sql(False)  # the create's and the end's CTE, alone
        carried_reads = _end_reads(await _explained(connection, carried, run_events._logged_params("run_plan", events)))
        await connection.rollback()
    # Once per run (2, 1; the old per-event read made it 80, 40). At most,
    # not exactly: a planner that turned the read into a join would read
    # it fewer times, still once per run at most.
    assert 0 < batch_reads <= 2 and 0 < carried_reads <= 1, (batch_reads, carried_reads)


async def test_the_numbering_follows_each_runs_logged_end(runtime: Runtime) -> None:
    """Read once per run, the end still numbers every run's events after
    its own last one, in the order given."""
    await _with_a_run(runtime)
    async with runtime.transaction() as session:
        await core_rows.insert_row(session, core_rows.record(orm.Run, id="run_plan_2", **_RUN))
    async with runtime.transaction() as session:
        await run_events.insert(session, {"run_plan": EVENTS})
    async with runtime.transaction() as session:
        firsts = await run_events.insert(session, {"run_plan": EVENTS * 2, "run_plan_2": EVENTS})
    async with runtime.engine.connect() as connection:
        rows = (await connection.execute(text("SELECT run_id, seq FROM run_events ORDER BY run_id, seq"))).all()
    assert firsts == {"run_plan": 3, "run_plan_2": 1}
    assert [tuple(row) for row in rows] == [("run_plan", seq) for seq in range(1, 7)] + [
        ("run_plan_2", 1),
        ("run_plan_2", 2),
    ]
