"""The claim leaves out the runs its worker still executes, whatever their
lease says (services/run_execution.py), with those runs bound as ONE
parameter: the claim is one statement whatever their number (PostgreSQL
prepares it once per connection; an expanding list was another statement,
prepared again, for every length)."""

from __future__ import annotations

import time
from contextlib import AbstractContextManager
from typing import Any

from sqlalchemy import update

from app import orm
from app.runtime import Runtime
from app.services import run_execution
from tests.runner.helpers import statements_sent
from tests.runner.test_worker import _make_runs

OWNER = "this-worker"


def claim_statements(runtime: Runtime) -> AbstractContextManager[list[str]]:
    """The SQL of each claim sent while inside."""

    def claim(statement: str, _parameters: Any) -> str | None:
        return statement if "lease_owner=" in statement.replace(" ", "") and "candidates" in statement else None

    return statements_sent(runtime, claim)


async def _lapse(runtime: Runtime, run_ids: list[str]) -> None:
    """In this worker's lease, lapsed (renewals too late), as executing runs can be."""
    async with runtime.transaction() as session:
        lapsed = (
            update(orm.Run).where(orm.Run.id.in_(run_ids)).values(lease_owner=OWNER, lease_expires_at=time.time() - 1)
        )
        await session.execute(lapsed)


async def test_a_claim_leaves_out_the_executing_runs_in_one_statement_whatever_their_number(runtime: Runtime) -> None:
    run_ids = await _make_runs(runtime, 6, status="in_progress")
    await _lapse(runtime, run_ids)
    claimed: list[list[str]] = []
    with claim_statements(runtime) as statements:
        for executing in (run_ids[:5], run_ids[:4], run_ids[:1], []):
            async with runtime.transaction() as session:
                claimed.append(await run_execution.claim(session, OWNER, 10, 60.0, executing))
            await _lapse(runtime, run_ids)
        async with runtime.transaction() as session:  # the worker's claim, with the runs and their messages
            runs = await run_execution.claim_runs(session, OWNER, 10, 60.0, run_ids[1:])
    assert [sorted(batch) for batch in claimed] == [
        run_ids[5:],
        sorted(run_ids[4:]),
        sorted(run_ids[1:]),
        sorted(run_ids),
    ]
    assert [run.id for run in runs] == run_ids[:1]
    assert len(statements) == 5
    assert len(set(statements[:4])) == 1  # one statement for every number of executing runs
