"""A provider run is started by its create (Worker.prepare's fold) whatever
else its worker has under way (issue 17): other runs executing, another
run reserved, other folded runs' hand-offs. The fold sends no statement of
its own, so the lone-run rule, which keeps hand-offs that do from costing a
transaction each under load, does not apply to it: under 16 clients every
such run is now started by its create instead of waiting for a tick's claim
(its statement, the starts' statement and their commit). Each folded run's
hand-off still takes its worker's slot after a claim has counted the
reservations anew (Worker.reservation)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from app.runner import execute
from app.runtime import Runtime
from app.settings import Settings
from app.wire.events import Event
from tests.runner.helpers import DEADLINE
from tests.runner.test_hand_off import _assistant, _row
from tests.runner.test_hand_off_early import _worker, handing_runtime
from tests.runner.test_start_folded import _executed, _never_at_once, _noting, _queue

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
async def runtime(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Runtime]:
    """test_start_folded's runtime: a worker attached as the server's, its
    loop not started, the model taken for a provider's (streamed, never
    answered at once)."""
    async with handing_runtime(settings) as rt:
        monkeypatch.setattr(rt.llm, "streams", lambda _model: True)
        monkeypatch.setattr(rt.llm, "answer_at_once", _never_at_once)
        yield rt


def _first_run_held(monkeypatch: pytest.MonkeyPatch) -> asyncio.Event:
    """The first run the worker executes waits, in its task, until the
    event returned is set; any other goes on at once."""
    release = asyncio.Event()
    held: list[str] = []
    real_run = execute.run

    async def run(execution: execute.RunExecution) -> None:
        if not held:
            held.append(execution.run_id)
            await release.wait()
        await real_run(execution)

    monkeypatch.setattr(execute, "run", run)
    return release


async def test_a_provider_run_created_while_another_executes_is_started_by_its_create(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    assistant = await _assistant(runtime)
    worker = _worker(runtime)
    release = _first_run_held(monkeypatch)
    first, _response = await _queue(runtime, assistant)
    await asyncio.wait_for(worker._handed(), DEADLINE)
    assert list(worker._tasks) == [first.id]  # executing, held
    # Another create under way has its reservation too (the lone-run rule's
    # "another run reserved since the last claim").
    other = runtime.run_reservation()
    assert other is not None
    order = _noting(runtime, monkeypatch)
    second, _response = await _queue(runtime, assistant)
    await asyncio.wait_for(worker._handed(), DEADLINE)
    # Its create's statement, then its task at once: no claim, no statement between.
    assert order[order.index("create sent") :][:3] == ["create sent", "created", "executing"], order
    assert "claimed" not in order
    release.set()
    await _executed(runtime)
    for run in (first, second):
        assert (await _row(runtime, run.id)).status == "completed"
    worker.release(other)
    assert worker._reserved == 0 and not worker._handing and not worker._handing_since


async def test_a_folded_runs_hand_off_takes_its_slot_after_a_claim_has_counted_the_reservations_anew(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A claim sets the worker's reserved count back to nothing (its claim
    takes the runs reserved so far); a folded run's hand-off in flight then
    is in no count of reservation()'s but its own, and a run reserved past
    the worker's concurrency would be started beside it."""
    assistant = await _assistant(runtime)
    worker = _worker(runtime)
    worker.concurrency = 2
    release = _first_run_held(monkeypatch)
    first, _response = await _queue(runtime, assistant)
    await asyncio.wait_for(worker._handed(), DEADLINE)
    assert list(worker._tasks) == [first.id]
    seen: list[bool] = []

    async def then(session: Any, run_id: str, events: list[Event], append: Any, **kwargs: Any) -> Any:
        # The second run's hand-off is in flight (prepare() has begun it),
        # its create's statement about to go: no slot is left.
        assert run_id in worker._handing
        seen.append(worker.reservation() is None)
        # What a claim does to the counts (Worker._tick), as one in a tick
        # between here and the hand-off's end would.
        worker._claims += 1
        worker._reserved = 0
        seen.append(worker.reservation() is None)
        return await append(session, run_id, events, **kwargs)

    _noting(runtime, monkeypatch, then)
    second, _response = await _queue(runtime, assistant)
    await asyncio.wait_for(worker._handed(), DEADLINE)
    assert seen == [True, True]
    assert sorted(worker._tasks) == sorted([first.id, second.id])
    release.set()
    await _executed(runtime)
    assert (await _row(runtime, second.id)).status == "completed"
    assert not worker._handing_since
