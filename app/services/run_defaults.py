"""What a new run takes from its assistant: read, or remembered from an
earlier run and checked by the run's own INSERT (issue 17).

A POST /threads/runs is then one round trip fewer: the run's row is written
as ``INSERT INTO runs ... SELECT <the run's values> WHERE EXISTS (<the
assistant, of this project, with exactly the remembered values>)``. If the
assistant was changed or deleted since (by this process or another one
sharing the database), the insert adds none and the create fails with
nothing written (is_stale()): the caller makes it again from a fresh read.
The check runs in the statement that inserts the run, so it compares with
what a read there would have returned: the run is the same either way.

SQLite holds that INSERT back to the COMMIT (one thread hop for the whole
create), required to add one row (db.EXPECT_ROWCOUNT; under the write lock).
PostgreSQL sends it as the run's CTE in the statement that inserts the
thread, its messages and the opening events (new_rows.OnlyIf: every other
row of it goes in only with the run, so a changed assistant is no row, not
a half-written create), or, on an existing thread, with ON CONFLICT on the
live-run index (runs._insert_live_postgres).
"""

from __future__ import annotations

import functools
import json
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import JSON, Insert, Table, Text, bindparam, cast, exists, insert, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from app import db, errors, ids, orm, sqlite_driver
from app.services import core_rows, new_rows
from app.services.common import require_id
from app.services.projects import Project

# What a new run takes from its assistant: these columns of its row, each a
# field of AssistantDefaults of the same name, in this order. The one list
# the read, the remembered path's check and AssistantDefaults are built from
# (tests/api/test_runs.py checks each is caught when changed).
RUN_TAKES = ("model", "instructions", "tools", "temperature", "top_p", "response_format", "reasoning_effort")


@dataclass(frozen=True)
class AssistantDefaults:
    """What a new run takes from its assistant (RUN_TAKES), and the
    assistant's row as stored (``stored``, the values the remembered path
    checks: its project, then each of RUN_TAKES, JSON columns as their
    stored text)."""

    id: str
    model: str
    instructions: str | None
    tools: list[Any]
    temperature: float | None
    top_p: float | None
    response_format: Any
    reasoning_effort: str | None
    stored: tuple[Any, ...]
    # The hearing's epoch (_Hearing) during which these were read, if no
    # change of any assistant was heard while they were: vouch() for as
    # long as that epoch lasts and they are remembered. None: not vouched.
    vouched_epoch: int | None = field(default=None, compare=False)


_ASSISTANTS = orm.Assistant.__table__.c
_TAKEN = tuple(_ASSISTANTS[name] for name in RUN_TAKES)
_JSON_TAKEN = frozenset(column.name for column in _TAKEN if isinstance(column.type, JSON))
# The checked columns, in ``stored`` order: the assistant's project, then
# RUN_TAKES; JSON columns as their stored text (on both databases the text
# as written: migration 0016_pgjson), so the check compares them exactly
# (decoded here as SQLAlchemy would). Each labelled with its column's name.
_CHECKED = (
    _ASSISTANTS.project_id,
    *(cast(column, Text).label(column.name) if column.name in _JSON_TAKEN else column for column in _TAKEN),
)
# Built once with bound parameters: a Core statement, no ORM instance or
# identity map, its cache key memoized on the statement.
_READ_STORED = select(*_CHECKED).where(_ASSISTANTS.id == bindparam("assistant_id"))
_GUARD_PARAMS = tuple(f"assistant_{index}" for index in range(len(_CHECKED)))
_UNCHANGED = exists().where(
    _ASSISTANTS.id == bindparam("assistant_id", type_=Text),
    *(
        column.is_not_distinct_from(bindparam(name, type_=column.type))
        for column, name in zip(_CHECKED, _GUARD_PARAMS, strict=True)
    ),
)
# The same check, as the condition of a statement of new rows (new_rows.OnlyIf).
UNCHANGED = new_rows.Condition(_UNCHANGED)


def _decoded(stored: str | None) -> Any:
    return None if stored is None else json.loads(stored)


async def read(session: AsyncSession, project: Project, assistant_id: str) -> AssistantDefaults:
    """The assistant's run defaults; missing for another project's assistant
    as for none at all, as assistants.get answers. Remembered for the next
    run."""
    require_id("assistant_id", assistant_id, ids.ASSISTANT)
    heard_before = _HEARING.heard()
    row = (await session.execute(_READ_STORED, {"assistant_id": assistant_id})).first()
    if row is None or row[0] != project.id:
        raise errors.not_found("assistant", assistant_id)
    taken = dict(zip(RUN_TAKES, row[1:], strict=True))
    taken.update({name: _decoded(taken[name]) for name in _JSON_TAKEN})
    vouched_epoch = _HEARING.epoch if _HEARING.listening and _HEARING.heard() == heard_before else None
    defaults = AssistantDefaults(id=assistant_id, stored=tuple(row), vouched_epoch=vouched_epoch, **taken)
    _remember(defaults)
    return defaults


# PostgreSQL: an assistant's update or delete announces its id on this
# channel, in the transaction that changes it (announce_change(), heard at
# its COMMIT by every process, this one too), and each process forgets the
# defaults it remembers (heard_change()). A run made from remembered
# defaults is checked by its INSERT all the same (only_if()); what hearing
# adds is vouch(): whether a check about to be made can still find them
# stale only through a change that has committed and not yet been heard
# (well under a millisecond here), a create that raced the change.
CHANGES_CHANNEL = "assistants_changed"


@dataclass
class _Hearing:
    """This process's hearing of CHANGES_CHANNEL: ``listening``, the
    listening connections open (the Runtime's run-events listener carries
    the channel: run_log.listen); ``epoch``, bumped each time one opens
    (changes sent while none was open were not heard); ``changes``, the
    changes heard."""

    listening: int = 0
    epoch: int = 0
    changes: int = 0

    def heard(self) -> tuple[int, int]:
        return self.epoch, self.changes


_HEARING = _Hearing()


def listening(now: bool) -> None:
    """The listening connection opened (``now``) or closed (run_log.listen's
    on_listening): what was remembered before it opened is no longer vouched for."""
    if now:
        _HEARING.listening += 1
        _HEARING.epoch += 1
    else:
        _HEARING.listening = max(0, _HEARING.listening - 1)


def listener_hearing() -> Callable[[bool], None]:
    """One listening connection's ``on_listening`` (the Runtime's run-events
    listener, run_log.listen): listening(), and each time it opens again
    after its first opening, forget_all(): changes sent while it was closed
    were not heard, and what was remembered before would otherwise stay
    remembered unvouched (vouch()), each run made from it waiting for its
    create's commit before its first call, until the assistant changes
    again. Its next run reads it afresh, vouched for then (one read an
    assistant, once)."""
    opened = 0

    def hearing(now: bool) -> None:
        nonlocal opened
        if now:
            opened += 1
            if opened > 1:
                forget_all()
        listening(now)

    return hearing


# The payload of a change of every assistant (admin.reset).
EVERY_ASSISTANT = "*"


def heard_change(assistant_id: str) -> None:
    """A NOTIFY on CHANGES_CHANNEL: the assistant was changed or deleted
    (EVERY_ASSISTANT: all were)."""
    _HEARING.changes += 1
    if assistant_id == EVERY_ASSISTANT:
        forget_all()
    else:
        forget(assistant_id)


async def announce_change(session: AsyncSession, assistant_id: str) -> None:
    """PostgreSQL: CHANGES_CHANNEL told of ``assistant_id``'s change at this
    session's COMMIT (SQLite: nothing; no process there vouches)."""
    if session.get_bind().dialect.name == "postgresql":
        await session.execute(_ANNOUNCE, {"channel": CHANGES_CHANNEL, "assistant_id": assistant_id})


_ANNOUNCE = text("SELECT pg_notify(:channel, :assistant_id)")


@dataclass(frozen=True)
class Vouch:
    """vouch()'s answer: the assistant, and the hearing as it was then."""

    assistant_id: str
    heard: tuple[int, int]


def vouch(assistant_id: str) -> Vouch | None:
    """Whether a run just made from this process's remembered (or just
    read) defaults of ``assistant_id`` can be refused by its check only
    through a change not heard yet: they were read while this process
    heard CHANGES_CHANNEL, and no change of any assistant has been heard
    since. None: not so. Worker.prepare asks, as the create's statement
    is about to go (its fold sends a provider's first call before that
    statement has committed only then: execute.take_started)."""
    defaults = _REMEMBERED.get(assistant_id)
    if (
        defaults is None
        or _HEARING.listening == 0
        or defaults.vouched_epoch is None
        or defaults.vouched_epoch != _HEARING.epoch
    ):
        return None
    return Vouch(assistant_id, _HEARING.heard())


def still_vouched(vouched: Vouch | None) -> bool:
    """Whether vouch()'s answer holds still: nothing heard since, and the
    assistant's defaults still remembered."""
    return (
        vouched is not None
        and _HEARING.listening > 0
        and _HEARING.heard() == vouched.heard
        and vouched.assistant_id in _REMEMBERED
    )


# The assistants whose defaults this process remembers (most recently read
# last), at most this many, and none whose stored text is larger than
# REMEMBERED_MAX_CHARS (instructions may be 256k characters, tools' schemas
# as large): 1,024 such would keep gigabytes resident, decoded. A larger
# assistant is read for each run, which costs one thread hop more.
REMEMBERED_ASSISTANTS = 1024
REMEMBERED_MAX_CHARS = 64 * 1024
_REMEMBERED: OrderedDict[str, AssistantDefaults] = OrderedDict()


# What a JSON container costs decoded beyond its characters (a list or a
# dict object each, ~60 bytes): "[{}, {}, ...]" is 4 characters an item
# and ~70 bytes decoded.
_CONTAINER_CHARS = 64


def _stored_chars(defaults: AssistantDefaults) -> int:
    """The remembered values' size in characters, a container of a JSON
    value (tools, response_format; not the instructions' text) counted as
    _CONTAINER_CHARS: what they keep resident, decoded."""
    return sum(
        len(value) + (_CONTAINER_CHARS * (value.count("[") + value.count("{")) if value[:1] in "[{" else 0)
        for value in defaults.stored
        if isinstance(value, str)
    )


def _remember(defaults: AssistantDefaults) -> None:
    if _stored_chars(defaults) > REMEMBERED_MAX_CHARS:
        _REMEMBERED.pop(defaults.id, None)
        return
    _REMEMBERED[defaults.id] = defaults
    _REMEMBERED.move_to_end(defaults.id)
    while len(_REMEMBERED) > REMEMBERED_ASSISTANTS:
        _REMEMBERED.popitem(last=False)


def remembered(project: Project, assistant_id: str) -> AssistantDefaults | None:
    """The defaults read for an earlier run of this project, to be checked
    by the run's INSERT (insert_checked(), only_if()); None: read() them."""
    defaults = _REMEMBERED.get(assistant_id)
    if defaults is None or defaults.stored[0] != project.id:
        return None
    return defaults


def forget_all() -> None:
    _REMEMBERED.clear()


def forget(assistant_id: str) -> None:
    """The assistant changed here: its next run reads it (the check would
    catch it, at the price of a failed attempt)."""
    _REMEMBERED.pop(assistant_id, None)


@functools.cache
def _checked_insert(columns: tuple[str, ...]) -> Insert:
    """The run's INSERT for these columns, adding its row only while the
    assistant is unchanged: built once per set of columns (a handful)."""
    table = orm.Run.__table__
    assert isinstance(table, Table)
    values = select(*(bindparam(column, type_=table.c[column].type) for column in columns)).where(_UNCHANGED)
    return insert(table).from_select(list(columns), values)


def guard_parameters(defaults: AssistantDefaults) -> dict[str, Any]:
    """The parameters of the check that the assistant still has ``defaults``."""
    return {"assistant_id": defaults.id, **dict(zip(_GUARD_PARAMS, defaults.stored, strict=True))}


def only_if(defaults: AssistantDefaults) -> new_rows.OnlyIf:
    """PostgreSQL: the new rows of a run made from remembered ``defaults``
    go in only while the assistant has them; else StaleDefaults, nothing
    written (run_events.insert_with_rows)."""

    async def refused(_session: AsyncSession) -> Exception:
        return StaleDefaults(defaults.id)

    return new_rows.OnlyIf(UNCHANGED, guard_parameters(defaults), refused)


def _checked(run: orm.Run, defaults: AssistantDefaults) -> tuple[Insert, dict[str, Any]]:
    """The checked INSERT of ``run`` and its parameters (the guard's too)."""
    values = core_rows.values(run)
    return _checked_insert(tuple(values)), {**values, **guard_parameters(defaults)}


async def insert_checked(session: AsyncSession, run: orm.Run, defaults: AssistantDefaults) -> None:
    """Insert ``run``, made from remembered ``defaults``, with the COMMIT
    (SQLite), which fails (is_stale()) if the assistant no longer has them."""
    statement, parameters = _checked(run, defaults)
    options = {**db.WRITE_BEHIND, db.EXPECT_ROWCOUNT: 1, db.ROWCOUNT_MISMATCH: AssistantChanged}
    await db.write_behind(session, statement, parameters, options)


class AssistantChanged(sqlite_driver.RoutineMismatch):
    """insert_checked()'s run was not inserted at the COMMIT: the assistant
    no longer has the remembered defaults."""


class StaleDefaults(Exception):
    """The run's checked INSERT (only_if(), the live
    insert on PostgreSQL) found the assistant changed: nothing was inserted."""


def is_stale(error: BaseException) -> bool:
    """Whether ``error`` (from a transaction's COMMIT) is insert_checked()
    finding the assistant changed (the caller forgets it and reads again)."""
    return sqlite_driver.raised_within(error, (StaleDefaults, AssistantChanged))
