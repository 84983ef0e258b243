"""The run state machine: the one table of allowed moves and the one function
that changes a run's status (DOC-DD lifecycle, wire notes 2.5).

transition() is a compare-and-set UPDATE on (id, status), and for the
executor's moves on the executor's lease too: if another worker or request
moved the run first (or another worker took the run over), it raises
TransitionConflict, carrying the run as it is now, instead of overwriting. Timestamps are stamped here and nowhere
else. apply() is how a request changes a run: its rule is re-evaluated against
the fresh run when its transition loses a race (issue 10), so a request that
loses answers what it would have answered a moment later, never a 500.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar, cast

from sqlalchemy import Insert, Table, Update, bindparam, inspect, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm.attributes import set_committed_value

from app import db, errors, ids, orm

TERMINAL = frozenset({"cancelled", "failed", "completed", "incomplete", "expired"})
LIVE = frozenset(orm.LIVE_RUN_STATUSES)
CANCELLABLE = frozenset({"queued", "in_progress", "requires_action"})

ALLOWED: dict[str, frozenset[str]] = {
    "queued": frozenset({"in_progress", "cancelling", "failed", "expired"}),
    "in_progress": frozenset({"requires_action", "completed", "incomplete", "failed", "cancelling", "expired"}),
    "requires_action": frozenset({"queued", "cancelling", "failed", "expired"}),
    # A cancel can lose the race against the run's own ending.
    "cancelling": frozenset({"cancelled", "completed", "incomplete", "failed", "expired"}),
}

_STAMP = {
    "completed": "completed_at",
    "incomplete": "completed_at",
    "failed": "failed_at",
    "cancelled": "cancelled_at",
}


class TransitionConflict(Exception):
    """The run was not in the expected status any more (someone else moved it).

    ``current`` is the run re-read after the conflict (the same object,
    refreshed, when it was loaded by this session), or None if it is gone or
    the raiser did not re-read it.
    """

    def __init__(self, message: str, current: orm.Run | None = None) -> None:
        super().__init__(message)
        self.current = current


class InvalidTransition(Exception):
    pass


RUNS = cast(Table, orm.Run.__table__)
# Each mapped attribute of a run and its column (``metadata_`` is "metadata").
RUN_COLUMNS = {attr.key: attr.columns[0].name for attr in inspect(orm.Run).column_attrs}


@functools.cache
def _update(keys: tuple[str, ...], refresh: bool, leased: bool) -> Update:
    """The compare-and-set UPDATE setting the attributes ``keys``, as a Core
    statement built once per shape (issue 17: SQLAlchemy's ORM-enabled UPDATE
    and its RETURNING of ORM objects cost more CPU than the statement).
    ``leased``: it also requires the run's lease to be ``lease_holder``'s."""
    statement = (
        update(RUNS)
        .where(RUNS.c.id == bindparam("run_id"), RUNS.c.status == bindparam("source"))
        .values({RUN_COLUMNS[key]: bindparam(f"set_{key}") for key in keys})
    )
    if leased:
        statement = statement.where(RUNS.c.lease_owner == bindparam("lease_holder"))
    return statement.returning(*RUNS.c) if refresh else statement


def _update_with(
    run_id: str, source: str, lease_owner: str | None, values: dict[str, Any], writes: Sequence[Insert | Update]
) -> Update:
    """The refreshing compare-and-set with its values bound in, and
    ``writes`` as data-modifying CTEs (PostgreSQL; built per call: the
    writes carry their own bound values)."""
    statement = (
        update(RUNS)
        .where(RUNS.c.id == run_id, RUNS.c.status == source)
        .values({RUN_COLUMNS[key]: value for key, value in values.items()})
        .returning(*RUNS.c)
    )
    if lease_owner is not None:
        statement = statement.where(RUNS.c.lease_owner == lease_owner)
    for index, write in enumerate(writes):
        statement = statement.add_cte(write.cte(f"alongside_{index}"))
    return statement


# A compare-and-set whose caller knows it cannot miss: on SQLite it goes with
# the transaction's next statement or COMMIT, and fails the transaction if
# it changed no row after all.
_CANNOT_MISS = {**db.WRITE_BEHIND, db.EXPECT_ROWCOUNT: 1}


async def transition(
    session: AsyncSession,
    run: orm.Run,
    to: str,
    *,
    refresh: bool = False,
    locked: bool = False,
    alongside: Sequence[Insert | Update] = (),
    lease_owner: str | None = None,
    **fields: Any,
) -> str:
    """Move ``run`` to status ``to``; returns the event name to publish.
    With ``refresh`` the UPDATE also returns the whole row, so ``run`` is
    then as the database has it: a caller that did not read the run in this
    transaction still publishes it as it is. ``locked``: the caller read the
    run's status in this transaction, under the row's lock (the claim's
    UPDATE), so the compare-and-set cannot miss; on SQLite the UPDATE is
    then sent with the transaction's next statement (issue 17), and fails
    the transaction if it changed no row. ``alongside`` (PostgreSQL): writes
    of other tables sent in the same statement as data-modifying CTEs, done
    whether or not the run moves (issue 17: a round trip each fewer).
    ``lease_owner``: the executor making the move; the run moves only while
    that worker's lease is on it (a worker whose lease was taken over must
    not end the run its successor executes), else TransitionConflict. The
    API and the reaper move runs whoever holds the lease and pass None."""
    source = run.status
    if to not in ALLOWED.get(source, frozenset()):
        raise InvalidTransition(f"{run.id}: {source} -> {to}")
    now = ids.now()
    values: dict[str, Any] = {"status": to, **fields}
    if to == "in_progress" and run.started_at is None:
        values["started_at"] = now
    if to in _STAMP:
        values[_STAMP[to]] = now
    if to in TERMINAL or to == "requires_action":
        # Nobody executes the run any more; its lease is released.
        values.setdefault("lease_owner", None)
        values.setdefault("lease_expires_at", None)
    if to in TERMINAL and to != "expired":
        values["expires_at"] = None
    if to != "requires_action":
        values.setdefault("required_action", None)
    keys = tuple(values)
    params = {"run_id": run.id, "source": source, **{f"set_{key}": value for key, value in values.items()}}
    leased = lease_owner is not None
    if leased:
        params["lease_holder"] = lease_owner
    if session.new or session.dirty or session.deleted:
        await session.flush()  # what an ORM-enabled UPDATE would have flushed first
    assert refresh or not alongside, "the writes go with a refreshing UPDATE only"
    if refresh:
        if alongside:
            row = (await session.execute(_update_with(run.id, source, lease_owner, values, alongside))).first()
        else:
            row = (await session.execute(_update(keys, True, leased), params)).first()
        moved = 0 if row is None else 1
        if row is not None:
            for key, column in RUN_COLUMNS.items():
                set_committed_value(run, key, row._mapping[column])
    elif locked:
        result = await session.execute(_update(keys, False, leased), params, execution_options=_CANNOT_MISS)
        rowcount: int = result.rowcount  # type: ignore[attr-defined]
        moved = 1 if rowcount < 0 else rowcount  # held back (SQLite): the driver checks the count
    else:
        moved = (await session.execute(_update(keys, False, leased), params)).rowcount  # type: ignore[attr-defined]
    if moved != 1:
        # On PostgreSQL the winner has committed (the UPDATE waited for its
        # row lock), so this read sees the status it left.
        current = await session.get(orm.Run, run.id, populate_existing=True)
        raise TransitionConflict(f"{run.id} is no longer {source}", current)
    for key, value in values.items():
        set_committed_value(run, key, value)
    return f"thread.run.{to}"


T = TypeVar("T")

# Every retry follows a change someone else committed, and a run makes few
# moves before it ends (then rules answer 400 without a transition).
_ATTEMPTS = 10


async def apply(run: orm.Run, rule: Callable[[orm.Run], Awaitable[T]]) -> T:
    """Apply a request's ``rule`` to ``run``: the rule checks the status (an
    APIError if the request is not allowed in it) and transitions the run.

    When its transition loses a race (a worker started or ended the run, a
    second request got there first), the rule runs again against the run as
    it is now. So the rule must write nothing before its first transition;
    after it, on PostgreSQL the row stays locked by this transaction, and on
    SQLite no other writer runs until the commit.
    """
    for _ in range(_ATTEMPTS - 1):
        try:
            return await rule(run)
        except TransitionConflict as conflict:
            if conflict.current is None:
                raise errors.not_found("run", run.id) from conflict
            run = conflict.current
    return await rule(run)
