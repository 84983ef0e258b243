"""The hand-off of a run created on an existing thread (SQLite): which
threads' runs are noted for it (runs.create reads the last messages only of
a thread short enough), and its compare-and-set on the thread's messages
(run_execution._build_hand_off)."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from app import orm
from app.runtime import Runtime
from app.services import run_execution
from app.worker import Worker
from tests.runner.test_hand_off import (
    _count_hand_offs,
    _create_on,
    _histories,
    _looping,
    _read_history,
    _row,
    _thread,
    bare_runtime,
    sqlite_runtime,
)
from tests.runner.test_worker import user_message

__all__ = ["bare_runtime", "sqlite_runtime"]  # (fixtures, by import)

pytestmark = pytest.mark.timeout(30)

_ON_SQLITE = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


async def _claimed(
    runtime: Runtime, worker: Worker, run: orm.Run, histories: dict[str, list[run_execution.EarlierMessage]]
) -> list[run_execution.EarlierMessage]:
    """``run``, not handed, claimed and completed by ``worker``: its prompt's
    history, checked to be its thread's messages as they are now."""
    await worker.run_until_idle()
    row = await _row(runtime, run.id)
    assert row.status == "completed"
    assert histories[run.id] == await _read_history(runtime, row)
    return histories[run.id]


@_ON_SQLITE
async def test_a_run_on_a_thread_longer_than_the_prefetch_reads_no_messages_and_is_claimed(
    sqlite_runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A thread of PREFETCH_MOST_MESSAGES + 1 messages (no additional ones):
    the create's read leaves its messages out (NULL, not an empty thread's
    array), its run is not handed, and the claim prompts it with them all."""
    runtime = sqlite_runtime
    worker = _looping(Worker(runtime))
    histories = _histories(monkeypatch)
    read: list[object] = []
    original = run_execution.note_read

    def noting(run: orm.Run, messages: list[list[object]] | None, added: object) -> None:
        read.append(messages)
        original(run, messages, added)  # type: ignore[arg-type]

    monkeypatch.setattr(run_execution, "note_read", noting)
    most = run_execution.PREFETCH_MOST_MESSAGES
    run = await _create_on(runtime, worker, await _thread(runtime, [f"m{i}" for i in range(most + 1)]))
    assert read == [None]
    assert not run_execution.handable(run) and not worker.hand(run)
    assert len(await _claimed(runtime, worker, run, histories)) == most + 1
    await worker.stop()


@_ON_SQLITE
async def test_a_hand_off_whose_thread_has_another_message_in_a_deleted_ones_place_is_claimed_instead(
    sqlite_runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After the create's commit, its thread's first message deleted (as the
    API allows while the run is queued) and another added between the
    remaining ones by a writer outside the API (the API refuses a message
    while the run is live): as many messages, the same last one, yet not
    those the create noted. The hand-off loses its compare-and-set; the
    claim reads the thread as it is."""
    runtime = sqlite_runtime
    worker = _looping(Worker(runtime))
    handed, histories = _count_hand_offs(monkeypatch), _histories(monkeypatch)
    thread_id = await _thread(runtime, ["first", "second", "third"])
    run = await _create_on(runtime, worker, thread_id)
    async with runtime.transaction() as session:
        first, second = (
            await session.execute(
                select(orm.Message.id, orm.Message.seq)
                .where(orm.Message.thread_id == thread_id)
                .order_by(orm.Message.seq)
                .limit(2)
            )
        ).all()
        await session.execute(orm.Message.__table__.delete().where(orm.Message.id == first.id))
        late = user_message(thread_id, [{"type": "text", "text": {"value": "late", "annotations": []}}])
        late.seq = second.seq - 1
        session.add(late)
    assert worker.hand(run)
    await worker._handed()
    assert not handed
    assert (await _row(runtime, run.id)).status == "queued"
    history = await _claimed(runtime, worker, run, histories)
    assert len(history) == 3 and history[0].content[0]["text"]["value"] == "late"  # in the deleted one's place
    await worker.stop()
