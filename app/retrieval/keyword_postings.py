"""Keyword ranking from an impact-ordered inverted table, on both engines.

``vector_store_keyword_postings`` (migration 0012) holds one row per (term,
chunk): the term as the engine's own tokenizer indexes it (FTS5's porter
stems on SQLite, the 'english' lexemes on PostgreSQL), the store's key, the
chunk id, and the chunk's *impact* for the term: BM25's term-frequency and
length part, ``tf (k1 + 1) / (tf + k1 (1 - b + b dl / avgdl))``, scaled to
an integer. The table's index orders each (term, store) list by impact, so
a search reads the best postings of each query word first instead of
scoring every chunk that holds a word (FTS5's bm25() walks each word's whole
posting list for its IDF; PostgreSQL decompressed one tsvector per
candidate: 10-25 us each).

The score is BM25: the sum over the query's terms of IDF (from the store's
document counts, cached per process) times impact. ``avgdl`` is a constant
per engine (the average chunk length of the default 800-token chunking), so
a row's impact never changes when other chunks come and go.

Top-k with a stopping rule (Fagin's threshold algorithm): read the best
``k`` postings of every term; a chunk not read at all scores at most the
sum of each term's IDF times the last impact read for it. The chunks read
are scored exactly (their missing impacts looked up through the chunk
index), and when the ``limit``-th exact score reaches that bound the answer
is exact BM25; otherwise ``k`` grows, up to ``MAX_DEPTH`` postings per term
(beyond it, the answer is the best of what was read: near-exact, bounded
work).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy import bindparam, text
from sqlalchemy.ext.asyncio import AsyncSession

TABLE = "vector_store_keyword_postings"
K1 = 1.2
B = 0.75
# Impacts are stored as integers (2 bytes): BM25's tf part times this.
IMPACT_SCALE = 1000
FIRST_DEPTH = 64
DEPTH_GROWTH = 4
MAX_DEPTH = 4096
# Chunks scored exactly per round at most (their missing impacts read by id).
RESCORED_PER_RESULT = 3
MIN_RESCORED = 100
COUNT_TTL_SECONDS = 60.0
_CACHED_COUNTS = 100_000


def store_key(vector_store_id: str) -> int:
    """A store's signed 64-bit key in the postings (8 bytes per row instead of the id's 30)."""
    digest = hashlib.blake2b(vector_store_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def impact_sql(tf: str, length: str, average_length: float) -> str:
    """SQL for a row's integer impact from its term frequency and chunk length expressions."""
    return (
        f"CAST(round({IMPACT_SCALE} * {tf} * {K1 + 1} / "
        f"({tf} + {K1} * ({1 - B} + {B} * {length} / {average_length:.1f}))) AS INTEGER)"
    )


def idf(documents: int, total: int) -> float:
    """BM25's IDF as FTS5's bm25() has it (Robertson / Sparck Jones): a term
    in half the chunks or more weighs next to nothing. On the development
    questions it kept the hybrid's MRR@10 (0.738 SQLite) where Lucene's
    always-positive ``log(1 + ...)`` lost 0.02 of it (and gained as much
    keyword-only)."""
    return max(1e-6, math.log((total - documents + 0.5) / (documents + 0.5)))


@dataclass
class _Counts:
    read_at: float
    value: int


_counts: dict[tuple[str, int, str], _Counts] = {}  # (database, store key, term) -> postings
_totals: dict[tuple[str, int], _Counts] = {}  # (database, store key) -> chunks


async def _document_counts(
    session: AsyncSession, database: str, keys: Sequence[int], terms: Sequence[str]
) -> dict[str, int]:
    """Chunks of these stores holding each term (cached ``COUNT_TTL_SECONDS``:
    counting a common term walks its list, ~5 ms at 100k chunks)."""
    now = time.monotonic()
    result = dict.fromkeys(terms, 0)
    for key in keys:
        stale = []
        for term in terms:
            cached = _counts.get((database, key, term))
            if cached is not None and now - cached.read_at < COUNT_TTL_SECONDS:
                result[term] += cached.value
            else:
                stale.append(term)
        if not stale:
            continue
        statement = text(
            f"SELECT term, count(*) AS n FROM {TABLE} WHERE store_key = :key AND term IN :terms GROUP BY term"  # noqa: S608 (constant table name)
        ).bindparams(bindparam("terms", expanding=True))
        read = {str(t): int(n) for t, n in (await session.execute(statement, {"key": key, "terms": stale})).all()}
        if len(_counts) > _CACHED_COUNTS:
            _counts.clear()
        for term in stale:
            _counts[(database, key, term)] = _Counts(now, read.get(term, 0))
            result[term] += read.get(term, 0)
    return result


async def _chunk_total(session: AsyncSession, database: str, store_ids: Sequence[str]) -> int:
    now = time.monotonic()
    total = 0
    for store_id in store_ids:
        cached = _totals.get((database, store_key(store_id)))
        if cached is None or now - cached.read_at >= COUNT_TTL_SECONDS:
            count = await session.execute(
                text("SELECT count(*) FROM vector_store_chunks WHERE vector_store_id = :store"), {"store": store_id}
            )
            cached = _totals[(database, store_key(store_id))] = _Counts(now, int(count.scalar_one()))
        total += cached.value
    return total


@dataclass
class _Lists:
    """What a round read: each chunk's known impacts, and per term the last
    impact read (0 once its lists are exhausted: an unread chunk then holds
    none of the term)."""

    impacts: dict[int, dict[str, int]] = field(default_factory=dict)
    floors: dict[str, int] = field(default_factory=dict)


def _list_sql(position: int, store: int, where: str | None, chunk_index_hint: str) -> str:
    """The best ``:depth`` postings of term ``position`` in store ``store``
    (numbered bind names), of chunks passing ``where`` when one is given."""
    select = f"SELECT p.chunk_id AS id, p.term AS term, p.impact AS impact, {store} AS store FROM {TABLE} p "  # noqa: S608 (constant fragments only; values are bound)
    condition = f"p.term = :term_{position} AND p.store_key = :key_{store}"
    if where is not None:
        select += f"JOIN vector_store_chunks c{chunk_index_hint} ON c.id = p.chunk_id "
        condition += f" AND {where}"
    return f"{select}WHERE {condition} ORDER BY p.impact DESC LIMIT :depth"


async def _read_lists(
    session: AsyncSession,
    terms: Sequence[str],
    keys: Sequence[int],
    depth: int,
    where: str | None,
    params: dict[str, object],
    chunk_index_hint: str,
) -> _Lists:
    bound: dict[str, object] = {**(params if where is not None else {}), "depth": depth}
    if session.get_bind().dialect.name == "postgresql":
        # One statement whatever the number of words (asyncpg prepares each
        # distinct text): a lateral top-k per (term, store).
        bound.update({"terms": list(terms), "keys": list(keys)})
        join = "" if where is None else "JOIN vector_store_chunks c ON c.id = p.chunk_id "
        statement = text(
            "SELECT l.id, l.term, l.impact, s.position - 1 AS store FROM unnest(CAST(:terms AS text[])) AS t(term) "  # noqa: S608 (constant fragments only; values are bound)
            "CROSS JOIN unnest(CAST(:keys AS bigint[])) WITH ORDINALITY AS s(key, position) "
            f"CROSS JOIN LATERAL (SELECT p.chunk_id AS id, p.term AS term, p.impact AS impact FROM {TABLE} p {join}"
            f"WHERE p.term = t.term AND p.store_key = s.key{'' if where is None else ' AND ' + where} "
            "ORDER BY p.impact DESC LIMIT :depth) l"
        )
    else:
        parts = []
        for position, term in enumerate(terms):
            bound[f"term_{position}"] = term
            for store, key in enumerate(keys):
                bound[f"key_{store}"] = key
                sql = _list_sql(position, store, where, chunk_index_hint)
                parts.append(f"SELECT * FROM ({sql}) AS l_{position}_{store}")  # noqa: S608 (constant fragments only)
        statement = text(" UNION ALL ".join(parts))
    if where is not None and "stores" in params:
        statement = statement.bindparams(bindparam("stores", expanding=True))
    lists = _Lists()
    read: dict[tuple[str, int], list[int]] = {}
    for chunk_id, term, impact, store in (await session.execute(statement, bound)).all():
        lists.impacts.setdefault(int(chunk_id), {})[str(term)] = int(impact)
        read.setdefault((str(term), int(store)), []).append(int(impact))
    for term in terms:
        floors = [read.get((term, store), []) for store in range(len(keys))]
        lists.floors[term] = max((min(got) for got in floors if len(got) >= depth), default=0)
    return lists


async def _fill_missing(session: AsyncSession, lists: _Lists, chunk_ids: Sequence[int], terms: Sequence[str]) -> None:
    """Impacts of these chunks for the terms the lists did not reach, by chunk id."""
    missing = [chunk for chunk in chunk_ids if len(lists.impacts[chunk]) < len(terms)]
    if not missing:
        return
    if session.get_bind().dialect.name == "postgresql":  # arrays: one prepared statement
        statement = text(
            f"SELECT chunk_id, term, impact FROM {TABLE} "  # noqa: S608 (constant table name)
            "WHERE chunk_id = ANY(CAST(:ids AS bigint[])) AND term = ANY(CAST(:terms AS text[]))"
        )
    else:
        statement = text(
            f"SELECT chunk_id, term, impact FROM {TABLE} WHERE chunk_id IN :ids AND term IN :terms"  # noqa: S608 (constant table name)
        ).bindparams(bindparam("ids", expanding=True), bindparam("terms", expanding=True))
    for chunk_id, term, impact in (await session.execute(statement, {"ids": missing, "terms": list(terms)})).all():
        lists.impacts[int(chunk_id)][str(term)] = int(impact)


async def top_chunks(
    session: AsyncSession,
    store_ids: Sequence[str],
    terms: Sequence[str],
    limit: int,
    *,
    where: str | None = None,
    params: dict[str, object] | None = None,
    chunk_index_hint: str = "",
) -> list[tuple[int, float]]:
    """(chunk id, BM25 score) of the best ``limit`` chunks of these stores for
    the (already tokenized) terms, best first. ``where`` restricts chunks
    aliased ``c`` (an attribute filter; None reads the lists without a join)."""
    terms = list(dict.fromkeys(terms))
    stores = list(dict.fromkeys(store_ids))
    if not terms or not stores or limit <= 0:
        return []
    database = str(session.get_bind().engine.url)
    keys = [store_key(store_id) for store_id in stores]
    counts = await _document_counts(session, database, keys, terms)
    terms = [term for term in terms if counts[term] > 0]
    if not terms:
        return []
    total = await _chunk_total(session, database, stores)
    # IDF per stored impact unit: known() below is the BM25 score itself.
    weights = {term: idf(counts[term], max(total, counts[term])) / IMPACT_SCALE for term in terms}
    depth = max(FIRST_DEPTH, 2 * limit)
    while True:
        lists = await _read_lists(session, terms, keys, depth, where, params or {}, chunk_index_hint)
        floors = {term: weights[term] * lists.floors[term] for term in terms}
        unseen_bound = sum(floors.values())
        # A chunk's bounds: what was read of it, plus the floors of the terms not read.
        known: dict[int, float] = {}
        upper: dict[int, float] = {}
        for chunk, impacts in lists.impacts.items():
            score = floor = 0.0
            for term, impact in impacts.items():
                score += weights[term] * impact
                floor += floors[term]
            known[chunk] = score
            upper[chunk] = score + unseen_bound - floor
        # Exact scores for the chunks that may still make the page (best
        # bound first, a bounded number: one lookup statement per round).
        lower = sorted(known.values(), reverse=True)
        cutoff = lower[limit - 1] if len(lower) >= limit else 0.0
        contenders = sorted((chunk for chunk in known if upper[chunk] >= cutoff), key=upper.__getitem__, reverse=True)
        contenders = contenders[: max(RESCORED_PER_RESULT * limit, MIN_RESCORED)]
        await _fill_missing(session, lists, contenders, terms)
        exact = {
            chunk: sum(weights[term] * impact for term, impact in lists.impacts[chunk].items()) for chunk in contenders
        }
        best = sorted(exact.items(), key=lambda pair: (-pair[1], pair[0]))[:limit]
        settled = len(best) >= limit and best[-1][1] >= unseen_bound
        if settled or unseen_bound == 0 or depth >= MAX_DEPTH:
            return best
        depth = min(depth * DEPTH_GROWTH, MAX_DEPTH)


async def with_texts(
    session: AsyncSession, store_ids: Sequence[str], ranked: Sequence[tuple[int, float]]
) -> list[tuple[int, str, str, str, float]]:
    """(chunk id, store id, file id, text, score) of the ranked chunks, in
    order; only the page's rows are read, and only chunks of these stores
    kept (a store key is a hash: this is the exact check)."""
    if not ranked:
        return []
    statement = text("SELECT id, vector_store_id, file_id, text FROM vector_store_chunks WHERE id IN :ids").bindparams(
        bindparam("ids", expanding=True)
    )
    rows = {int(r.id): r for r in (await session.execute(statement, {"ids": [chunk for chunk, _ in ranked]})).all()}
    wanted = set(store_ids)
    return [
        (chunk, str(row.vector_store_id), str(row.file_id), str(row.text), score)
        for chunk, score in ranked
        if (row := rows.get(chunk)) is not None and row.vector_store_id in wanted
    ]
