"""The run state machine: the one table of allowed moves and the one function
that changes a run's status (DOC-DD lifecycle, wire notes 2.5).

transition() is a compare-and-set UPDATE on (id, status): if another worker
or request moved the run first, it raises TransitionConflict instead of
overwriting. Timestamps are stamped here and nowhere else.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm.attributes import set_committed_value

from app import ids, orm

TERMINAL = frozenset({"cancelled", "failed", "completed", "incomplete", "expired"})
LIVE = frozenset({"queued", "in_progress", "requires_action", "cancelling"})
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
    """The run was not in the expected status any more (someone else moved it)."""


class InvalidTransition(Exception):
    pass


async def transition(session: AsyncSession, run: orm.Run, to: str, **fields: Any) -> str:
    """Move ``run`` to status ``to``; returns the event name to publish."""
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
    result = await session.execute(
        update(orm.Run)
        .where(orm.Run.id == run.id, orm.Run.status == source)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        raise TransitionConflict(f"{run.id} is no longer {source}")
    for key, value in values.items():
        set_committed_value(run, key, value)
    return f"thread.run.{to}"
