"""A value PostgreSQL refuses fails its run (server_error), the model asked
once; a failure of the database itself leaves the run to be resumed.

SQLAlchemy's asyncpg adapter raises a data exception (SQLSTATE class 22)
as a plain DBAPIError, which the worker took for a failure of the database:
the run stayed in_progress, was resumed and the model asked again, until the
run expired (app/runner/refused.py). SQLite's driver raises DataError or
IntegrityError for what it refuses, whose path test_instant_answer covers.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from app import llm
from app.runner.execute import RunExecution
from app.runner.refused import refused_data
from app.runtime import Runtime
from app.worker import Worker
from tests.runner.test_quick_answer import _USAGE, _provider, _run
from tests.runner.test_worker import _make_runs

pytestmark = pytest.mark.timeout(60)

postgres_only = pytest.mark.parametrize("database_url", ["postgres"], indirect=True)

# Statements PostgreSQL refuses for their data, as a turn's write would be.
_REFUSED = {
    "nul": ("SELECT CAST(:value AS text)", {"value": "a\x00b"}),  # 22021, as a NUL in a text column
    "out_of_range": ("SELECT CAST(:value AS integer) + 1", {"value": 2**31 - 1}),  # 22003
    "bad_datetime": ("SELECT CAST(:value AS timestamp)", {"value": "not a time"}),  # 22007
}


def _model_calls(runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A provider answering "hello" (streamed), each call counted."""
    calls: list[int] = []

    async def answer(_request: llm.ChatRequest) -> AsyncIterator[llm.Event]:
        calls.append(len(calls))
        yield llm.TextDelta("hello")
        yield llm.Finish("stop", _USAGE)

    _provider(runtime, monkeypatch, answer)
    return calls


def _turn_meets(
    monkeypatch: pytest.MonkeyPatch, statements: str, params: dict[str, Any], times: int
) -> list[BaseException]:
    """The first ``times`` turns' writes meet ``statements`` first, run one
    by one in one transaction (a prepared statement holds one command),
    raising what the database answers them; the list returned collects what
    was raised, for a test to check it met the error it means to."""
    real = RunExecution._after_turn
    met: list[int] = []
    raised: list[BaseException] = []

    async def after_turn(self: RunExecution, *args: Any) -> bool:
        if len(met) < times:
            met.append(1)
            try:
                async with self.runtime.transaction() as session:
                    for statement in statements.split("; "):
                        await session.execute(text(statement), params)
            except Exception as error:
                raised.append(error)
                raise
        return await real(self, *args)

    monkeypatch.setattr(RunExecution, "_after_turn", after_turn)
    return raised


def _sqlstate(error: BaseException) -> object:
    return getattr(getattr(error, "orig", None), "sqlstate", None)


@postgres_only
@pytest.mark.parametrize("refusal", sorted(_REFUSED))
async def test_a_run_whose_data_postgresql_refuses_fails_the_model_asked_once(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch, refusal: str
) -> None:
    calls = _model_calls(runtime, monkeypatch)
    raised = _turn_meets(monkeypatch, *_REFUSED[refusal], times=1_000)
    (run_id,) = await _make_runs(runtime, 1)
    async with asyncio.timeout(30):
        await Worker(runtime, concurrency=1).run_until_idle()
    run = await _run(runtime, run_id)
    assert run.status == "failed" and run.last_error is not None, (run.status, calls)
    assert run.last_error["code"] == "server_error"
    assert len(calls) == 1
    assert [str(_sqlstate(error))[:2] for error in raised] == ["22"]


@postgres_only
async def test_an_instant_answer_postgresql_refuses_fails_its_run_alone(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The offline model's instant answer, refused while the claim writes it
    (in a transaction of the hook's own, inside the claim: the same for the
    claim as a refusal in its own transaction): the claim's other runs complete, the refused one is taken
    the streamed way and fails there (as test_instant_answer's DataError
    on SQLite)."""
    doomed, *others = await _make_runs(runtime, 3)
    real = RunExecution._after_turn

    async def after_turn(self: RunExecution, *args: Any) -> bool:
        if self.run_id == doomed:
            async with self.runtime.transaction() as session:
                await session.execute(text(_REFUSED["nul"][0]), _REFUSED["nul"][1])
        return await real(self, *args)

    monkeypatch.setattr(RunExecution, "_after_turn", after_turn)
    worker = Worker(runtime, concurrency=4)
    async with asyncio.timeout(30):
        while (await _run(runtime, doomed)).status not in ("completed", "failed"):
            with contextlib.suppress(DBAPIError):  # the claim's, rolled back
                await worker.run_until_idle()
    assert (await _run(runtime, doomed)).status == "failed"
    assert {(await _run(runtime, run_id)).status for run_id in others} == {"completed"}


@postgres_only
async def test_a_run_whose_statement_postgresql_cancels_is_resumed(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A statement timeout (57014, not the data's fault) leaves the run to
    be resumed: the model is asked again and the run completes."""
    calls = _model_calls(runtime, monkeypatch)
    raised = _turn_meets(monkeypatch, "SET LOCAL statement_timeout = 1; SELECT pg_sleep(1)", {}, times=1)
    (run_id,) = await _make_runs(runtime, 1)
    async with asyncio.timeout(30):
        while (await _run(runtime, run_id)).status not in ("completed", "failed"):
            await Worker(runtime, concurrency=1).run_until_idle()
    assert (await _run(runtime, run_id)).status == "completed"
    assert len(calls) == 2
    assert [_sqlstate(error) for error in raised] == ["57014"]  # the timeout met, not another error


class _DriverError(Exception):
    def __init__(self, sqlstate: str | None) -> None:
        super().__init__(f"sqlstate {sqlstate}")
        self.sqlstate = sqlstate


@pytest.mark.parametrize(
    ("sqlstate", "refused"),
    [
        ("22021", True),
        ("22P05", True),
        ("22003", True),
        ("22000", True),  # what asyncpg itself refuses to bind (an int past int32, a lone surrogate)
        ("23505", True),
        ("08006", False),
        ("57P01", False),
        ("40001", False),
        ("55P03", False),
        ("53300", False),
        (None, False),
    ],
)
def test_refused_data_reads_the_sqlstate(sqlstate: str | None, refused: bool) -> None:
    error = DBAPIError("UPDATE runs", {}, _DriverError(sqlstate))
    assert refused_data(error) is refused
    assert refused_data(OperationalError("COMMIT", {}, _DriverError(sqlstate))) is refused
    assert refused_data(IntegrityError("INSERT", {}, Exception("constraint")))
    assert not refused_data(ValueError("not the database's"))
