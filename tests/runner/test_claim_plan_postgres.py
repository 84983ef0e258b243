"""The PostgreSQL claim's generic plan (issue 17): with the statuses written
into the statement, the plan PostgreSQL keeps for the prepared claim reads
the live runs' partial index, never the whole runs table (with bound
statuses it scanned it, so PostgreSQL planned every claim again)."""

from __future__ import annotations

from typing import Any

import pytest

from app import held_back, orm
from app.runtime import Runtime
from app.services import core_rows, run_execution
from tests.runner.test_held_back import _RUN, _THREAD

pytestmark = [pytest.mark.timeout(30), pytest.mark.parametrize("database_url", ["postgres"], indirect=True)]


async def test_the_claims_generic_plan_reads_the_live_runs_index(runtime: Runtime) -> None:
    async with runtime.transaction() as session:  # ended runs, as a server keeps them
        await core_rows.insert_row(session, core_rows.record(orm.Thread, **_THREAD))
        for seq in range(2, 202):
            await core_rows.insert_row(session, core_rows.record(orm.Run, id=f"run_plan_{seq}", **{**_RUN, "seq": seq}))
    for prefetch in (True, False):
        statement = run_execution._CLAIMS["postgresql", prefetch]
        parameters = run_execution._claim_parameters("postgresql", "w", 5, 30.0, ["run_x"])
        shape = held_back._shape(runtime.engine.dialect, statement, tuple(parameters))
        assert shape is not None
        values = ", ".join(_literal(value) for value in held_back._parameters(shape, parameters))
        async with runtime.engine.connect() as connection:
            raw = (await connection.get_raw_connection()).driver_connection
            assert raw is not None
            await raw.execute("ANALYZE runs")
            # The plan PostgreSQL keeps for the prepared claim, whatever the values.
            await raw.execute("SET plan_cache_mode = force_generic_plan")
            await raw.execute(f"PREPARE claim AS {shape.sql}")
            plan = "\n".join(row[0] for row in await raw.fetch(f"EXPLAIN EXECUTE claim({values})"))
            await raw.execute("DEALLOCATE claim")
            await raw.execute("RESET plan_cache_mode")
            await connection.rollback()
        assert "ux_runs_live_thread" in plan, plan
        assert "Seq Scan on runs" not in plan, plan


def _literal(value: Any) -> str:
    """A parameter's value as an EXECUTE's argument (text, which PostgreSQL
    casts to the parameter's type)."""
    if isinstance(value, (list, tuple)):
        value = "{" + ",".join(value) + "}"
    return "'" + str(value).replace("'", "''") + "'"
