"""SQLite: the files of a store that pass a search's attribute filter, kept
between searches on the same connection while the database is unchanged.

A filtered search needs the set twice: each keyword list probes it by seq
(app.retrieval.keyword_postings) and the vector side masks its cached matrix
by file (app.retrieval.vectors). Evaluating the filter is one pass over the
store's file rows: at 100k chunks (11k files) ~4 ms of SQLite's time, most
of it JSON tests of the attributes, the largest part of a filtered search's
extra cost. So the passing seqs stay in a temp table of the connection, and
a small temp table of *fills* notes, per slot (the store's place in the
search), which (store, filter) the table holds and the connection's
``PRAGMA data_version`` when it was filled. A later search on the same
connection with the same store and filter uses the table as it is when the
database's data_version is still the same.

Why that is exact: data_version changes whenever any other connection (of
this process or another) commits to the database, and inside a transaction
it is that of the transaction's snapshot: equal values, the same database,
hence the same passing files. A connection's own commits leave its
data_version as it was, so only the read-only connections of searches
(Runtime.reading) keep the set; on one that writes (an in-memory database,
a search inside a write transaction) the filter is evaluated every time.
The fills row lives in the same temp schema as the table it describes and
is written in the same transaction, so a search rolled back after filling
(a cancelled run) takes both back together and the next one fills again.
The cost: one small statement per filtered search when nothing was
written since; otherwise six with the filter's pass (four before), so a
database under constant writes gains nothing here (the vector side's mask
still does) and loses a few tenths of a millisecond.

The set is a table keyed by seq because each keyword list probes it by its
key (an ``IN`` over a CTE made SQLite index the set again for each of a
query's ~12 lists: 7.0 -> 3.8 ms at 100k chunks); its seq range, and whether
every file of the store in the range passes, let the lists test a range
instead when the passing files are consecutive in upload order.
"""

from __future__ import annotations

import itertools
import json
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, event, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from app.retrieval.filters import Compiled

_FILLS = "search_passing_fills"
_FILLS_TABLE = (
    f"CREATE TEMP TABLE IF NOT EXISTS {_FILLS} (slot INTEGER PRIMARY KEY, "
    "filled_for TEXT NOT NULL, data_version INTEGER NOT NULL, token INTEGER NOT NULL)"
)
# Passing sets remembered in Python (their file ids, about 1.4 MB for 11k
# files), by fill: the newest few; a fill a connection replaced is dropped
# at once. One forgotten is read back from its table.
_REMEMBERED = 16
_tokens = itertools.count(1)
# The (sync) engines whose connections keep passing sets: keep_sets_on.
_keeping: weakref.WeakSet[Engine] = weakref.WeakSet()


@dataclass(frozen=True)
class PassingFiles:
    """The completed files of one store whose row passes a search's filter."""

    # A temp table of the search's connection holding their seqs as its key
    # (probed by every keyword list: app.retrieval.keyword_postings).
    table: str
    file_ids: frozenset[str]
    # This process's number for the fill that made the table: equal tokens,
    # equal sets (the vector side keys its per-matrix masks by it).
    token: int
    # The smallest and largest passing seq (0, 0 when none passes), and
    # whether every file of the store in that range passes (in any status:
    # then a posting passes exactly when its seq is in the range, and the
    # keyword lists test that instead of probing the table).
    lowest: int
    highest: int
    contiguous: bool


_remembered: OrderedDict[int, PassingFiles] = OrderedDict()


def _key(store_id: str, condition: Compiled) -> str:
    """What a fill was made for: the store, the filter's SQL and its values."""
    return json.dumps([store_id, condition.sql, sorted(condition.params.items())], default=str)


async def read(session: AsyncSession, store_id: str, slot: int, condition: Compiled) -> PassingFiles:
    """The store's passing files in the temp table of ``slot``, filled anew
    unless it already holds them for an unchanged database."""
    table = f"search_passing_{slot}"
    if not _read_only(session):
        return await _fill(session, store_id, table, condition)
    key = _key(store_id, condition)
    row = (
        await session.execute(
            text(
                "SELECT f.filled_for, f.token, f.data_version = d.data_version "  # noqa: S608 (constant fragments only)
                f"FROM pragma_data_version() AS d LEFT JOIN temp.{_FILLS} AS f ON f.slot = :slot"
            ),
            {"slot": slot},
        )
    ).one()
    if row[0] == key and row[2]:
        known = _remembered.get(int(row[1]))
        if known is not None:
            _remembered.move_to_end(known.token)
            return known
        # The table is current but this process forgot its file ids (more
        # fills since than it remembers): read them back.
        return _remember(await _summary(session, store_id, table, int(row[1])))
    if row[1] is not None:  # replaced below: no search can ask for it again
        _remembered.pop(int(row[1]), None)
    passing = await _fill(session, store_id, table, condition)
    await session.execute(
        text(
            f"INSERT INTO temp.{_FILLS} (slot, filled_for, data_version, token) "  # noqa: S608 (constant fragments only)
            "SELECT :slot, :key, data_version, :token FROM pragma_data_version() WHERE true "
            "ON CONFLICT (slot) DO UPDATE SET filled_for = excluded.filled_for, "
            "data_version = excluded.data_version, token = excluded.token"
        ),
        {"slot": slot, "key": key, "token": passing.token},
    )
    return _remember(passing)


def keep_sets_on(engine: AsyncEngine) -> None:
    """Searches on this engine keep their passing sets, if it is a read-only
    SQLite one (db.create_read_engine: ``mode=ro``; the Runtime's). A
    connection that writes does not see its own commits in its data_version
    (an in-memory database's, a search inside a write transaction): there
    the set is evaluated every time. Each new connection gets the fills
    table at once, outside any transaction (no rollback takes it away), so
    a search asks for no CREATE."""
    sync = engine.sync_engine
    if sync.dialect.name != "sqlite" or sync.url.query.get("mode") != "ro" or sync in _keeping:
        return
    event.listen(sync, "connect", _create_fills)
    _keeping.add(sync)


def _create_fills(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute(_FILLS_TABLE)
    cursor.close()


def _read_only(session: AsyncSession) -> bool:
    """Whether the session's connections keep passing sets (keep_sets_on)."""
    return session.get_bind().engine in _keeping


async def _fill(session: AsyncSession, store_id: str, table: str, condition: Compiled) -> PassingFiles:
    """The temp table of passing seqs evaluated anew (one pass over the store's file rows)."""
    await session.execute(text(f"CREATE TEMP TABLE IF NOT EXISTS {table} (seq INTEGER PRIMARY KEY, file_id TEXT)"))
    await session.execute(text(f"DELETE FROM temp.{table}"))  # noqa: S608 (constant fragments only)
    # ``+f.status``: the store's index, not the status one, which holds every store's files.
    await session.execute(
        text(
            f"INSERT INTO temp.{table} (seq, file_id) SELECT f.seq, f.file_id FROM vector_store_files f "  # noqa: S608 (the condition is compiled with bound values)
            f"WHERE f.vector_store_id = :store AND +f.status = 'completed' AND {condition.sql}"
        ),
        {"store": store_id, **condition.params},
    )
    return await _summary(session, store_id, table, next(_tokens))


async def _summary(session: AsyncSession, store_id: str, table: str, token: int) -> PassingFiles:
    """The filled table's file ids (one string rather than thousands of rows:
    file ids hold no comma), its seq range, and whether the store has files
    in that range that do not pass (its seq index alone: a fraction of a
    millisecond, once per fill)."""
    row = (
        await session.execute(
            text(
                "SELECT t.joined, t.lowest, t.highest, t.passing, (SELECT count(*) FROM vector_store_files AS in_range "  # noqa: S608 (constant fragments only)
                "WHERE in_range.vector_store_id = :store AND in_range.seq BETWEEN t.lowest AND t.highest) "
                "FROM (SELECT group_concat(file_id, ',') AS joined, coalesce(min(seq), 0) AS lowest, "
                f"coalesce(max(seq), 0) AS highest, count(*) AS passing FROM temp.{table}) AS t"
            ),
            {"store": store_id},
        )
    ).one()
    joined, lowest, highest, passing, in_range = row
    return PassingFiles(
        f"temp.{table}",
        frozenset(str(joined).split(",")) if joined else frozenset(),
        token,
        int(lowest),
        int(highest),
        int(passing) > 0 and int(passing) == int(in_range),
    )


def _remember(passing: PassingFiles) -> PassingFiles:
    _remembered[passing.token] = passing
    while len(_remembered) > _REMEMBERED:
        _remembered.popitem(last=False)
    return passing
