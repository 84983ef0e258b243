"""Cursor pagination shared by every list endpoint.

Cursors are object ids; the position is the sequence encoded in the id (see
app.ids), so a cursor whose object was deleted still pages correctly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import Select
from sqlalchemy.ext.asyncio import AsyncSession

from app import errors, ids
from app.wire.common import ListPage

MAX_SEQ = 2**63 - 1


@dataclass(frozen=True)
class PageParams:
    limit: int = 20
    order: Literal["asc", "desc"] = "desc"
    after: str | None = None
    before: str | None = None


def _cursor(name: str, value: str | None, prefix: str, positions: Mapping[str, int]) -> int | None:
    if value is None:
        return None
    if value in positions:
        return positions[value]
    seq = ids.seq_of(prefix, value)
    if seq is None or seq > MAX_SEQ:  # beyond BIGINT: not an id we could have issued
        raise errors.invalid_id(name, value, prefix)
    return seq


async def fetch_page(
    session: AsyncSession,
    query: Select[Any],
    seq_column: Any,
    params: PageParams,
    prefix: str,
    *,
    positions: Mapping[str, int] | None = None,
) -> tuple[list[Any], bool]:
    """One page of ``query`` (already filtered) and whether more items follow.
    ``positions``: cursors whose seq is not the one in their id."""
    after = _cursor("after", params.after, prefix, positions or {})
    before = _cursor("before", params.before, prefix, positions or {})
    ascending = params.order == "asc"
    if after is not None:
        query = query.where(seq_column > after if ascending else seq_column < after)
    if before is not None:
        query = query.where(seq_column < before if ascending else seq_column > before)
    # With only `before`, the page is the run of items just before the cursor:
    # read backwards from it, then put them back in the requested order.
    backwards = before is not None and after is None
    forward = ascending != backwards
    query = query.order_by(seq_column.asc() if forward else seq_column.desc()).limit(params.limit + 1)
    rows = list((await session.scalars(query)).all())
    has_more = len(rows) > params.limit
    rows = rows[: params.limit]
    if backwards:
        rows.reverse()
    return rows, has_more


def page(items: list[Any], has_more: bool) -> ListPage[Any]:
    """The wire list object for already-rendered items (each has an ``id``)."""
    return ListPage[Any](
        data=items,
        first_id=items[0].id if items else None,
        last_id=items[-1].id if items else None,
        has_more=has_more,
    )
