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

A search reads the best ``DEPTH`` postings of each query word (a bounded
amount of work whatever the store's size), sums them per chunk in the
database (a partial BM25: a word whose list was cut contributes nothing to
a chunk below the cut), and scores the best ``RESCORED_PER_RESULT x limit``
of those chunks exactly, their missing impacts read through the (chunk,
term) index. Lists shorter than the depth are read whole, so a store whose
words each fall in fewer than ``DEPTH`` chunks is ranked exactly; in larger
ones a chunk that is middling on every word can be missed (the bench
measures the overlap with exact BM25 at 100k chunks).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from sqlalchemy import bindparam, text
from sqlalchemy.ext.asyncio import AsyncSession

from app.retrieval.filters import Compiled
from app.retrieval.passing_files import PassingFiles

TABLE = "vector_store_keyword_postings"
K1 = 1.2
B = 0.75
# Impacts are stored as integers (2 bytes): BM25's tf part times this.
IMPACT_SCALE = 1000
# Postings read per query word (and store): the work per search is bounded
# by this whatever the store's size.
DEPTH = 512
# Candidates scored exactly (their missing impacts read by id).
RESCORED_PER_RESULT = 3
MIN_RESCORED = 100
COUNT_TTL_SECONDS = 60.0
_CACHED_COUNTS = 100_000


# The posting's file: its row's seq (unique per file), looked up once per
# file written (0 for a chunk without a file row: no filter passes it).
FILE_SEQ_SQL = "coalesce((SELECT seq FROM vector_store_files WHERE vector_store_id = :store AND file_id = :file), 0)"


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


MAX_LISTS = 256  # (term, store) lists one search reads at most

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
            if read.get(term, 0) > 0:  # an absent term is read again: a file ingested next may bring it
                _counts[(database, key, term)] = _Counts(now, read[term])
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
            if len(_totals) > _CACHED_COUNTS:
                _totals.clear()
            cached = _totals[(database, store_key(store_id))] = _Counts(now, int(count.scalar_one()))
        total += cached.value
    return total


def _list_sql(position: int, store: int, passing: PassingFiles | None) -> str:
    """The best ``:depth`` postings of term ``position`` in store ``store``
    (numbered bind names) as weighted scores; with ``passing``, only
    postings of those files, checked on the posting itself (its file's seq:
    no lookup of its chunk)."""
    condition = f"p.term = :term_{position} AND p.store_key = :key_{store}"
    if passing is not None:
        # The seq range first: a comparison, where the table is a probe
        # (~0.1 us per posting read: a third of a filtered statement's time
        # at 100k chunks); enough alone when every file in it passes.
        condition += f" AND p.file_seq BETWEEN :lowest_{store} AND :highest_{store}"
        if not passing.contiguous:
            # The table's own key (SQLite: "USING ROWID SEARCH ... FOR IN-OPERATOR").
            condition += f" AND p.file_seq IN (SELECT seq FROM {passing.table})"  # noqa: S608 (constant fragments only)
    return (
        f"SELECT p.chunk_id AS id, :weight_{position} * p.impact AS score FROM {TABLE} p "  # noqa: S608 (constant fragments only; values are bound)
        f"WHERE {condition} ORDER BY p.impact DESC LIMIT :depth"
    )


async def _candidates(
    session: AsyncSession,
    weights: dict[str, float],
    stores: Sequence[str],
    depth: int,
    count: int,
    condition: Compiled | None,
    passing: Mapping[str, PassingFiles] | None,
) -> list[int]:
    """The ``count`` chunks with the best partial scores over the top
    ``depth`` postings of each term, summed in the database (only the
    candidates' ids cross into Python). A filter is ``condition`` on
    PostgreSQL, ``passing`` on SQLite (see top_chunks)."""
    terms = list(weights)
    keys = [store_key(store_id) for store_id in stores]
    bound: dict[str, object] = {**(condition.params if condition is not None else {}), "depth": depth, "count": count}
    if session.get_bind().dialect.name == "postgresql":
        # One statement whatever the number of words (asyncpg prepares each
        # distinct text): a lateral top-k per (term, store). A filter's
        # passing (store, file) pairs are one hashed set, built once and
        # probed per posting read from the lists index alone (file_seq is
        # INCLUDEd in it).
        bound.update(
            {"terms": terms, "weights": [weights[term] for term in terms], "keys": keys, "stores": list(stores)}
        )
        prefix = check = ""
        if condition is not None:
            prefix = (
                "WITH passing AS MATERIALIZED (SELECT s.key, f.seq FROM vector_store_files f "  # noqa: S608 (the condition is compiled with bound values)
                "JOIN unnest(CAST(:stores AS text[]), CAST(:keys AS bigint[])) AS s(store, key) "
                f"ON f.vector_store_id = s.store WHERE f.status = 'completed' AND {condition.sql}) "
            )
            # Wrapped in COALESCE so the planner keeps it a filter on the
            # index scan (a hashed SubPlan, built once) rather than a semi
            # join, which read each word's whole list before sorting it
            # (EXPLAIN ANALYZE: 4,190 postings per word at 20k chunks
            # against ~1,200 for the filtered top 512).
            check = " AND COALESCE((p.store_key, p.file_seq) IN (SELECT key, seq FROM passing), FALSE)"
        lists = (
            "SELECT l.id, l.score FROM unnest(CAST(:terms AS text[]), CAST(:weights AS float8[])) AS t(term, weight) "  # noqa: S608 (constant fragments only; values are bound)
            "CROSS JOIN unnest(CAST(:keys AS bigint[])) AS s(key) "
            f"CROSS JOIN LATERAL (SELECT p.chunk_id AS id, t.weight * p.impact AS score FROM {TABLE} p "
            f"WHERE p.term = t.term AND p.store_key = s.key{check} ORDER BY p.impact DESC LIMIT :depth) l"
        )
    else:
        parts = []
        for store, key in enumerate(keys):
            bound[f"key_{store}"] = key
            if passing is not None:
                bound[f"lowest_{store}"] = passing[stores[store]].lowest
                bound[f"highest_{store}"] = passing[stores[store]].highest
        for position, term in enumerate(terms):
            bound[f"term_{position}"] = term
            bound[f"weight_{position}"] = weights[term]
            for store, store_id in enumerate(stores):
                sql = _list_sql(position, store, passing[store_id] if passing is not None else None)
                parts.append(f"SELECT * FROM ({sql}) AS l_{position}_{store}")  # noqa: S608 (constant fragments only)
        lists = " UNION ALL ".join(parts)
        prefix = ""
    statement = text(
        f"{prefix}SELECT id FROM ({lists}) AS postings GROUP BY id ORDER BY sum(score) DESC, id LIMIT :count"  # noqa: S608 (constant fragments only; values are bound)
    )
    return [int(chunk_id) for (chunk_id,) in (await session.execute(statement, bound)).all()]


async def _exact_scores(session: AsyncSession, weights: dict[str, float], chunk_ids: Sequence[int]) -> dict[int, float]:
    """BM25 of these chunks over all the terms, read by chunk id."""
    scores = dict.fromkeys(chunk_ids, 0.0)
    if not chunk_ids:
        return scores
    terms = list(weights)
    if session.get_bind().dialect.name == "postgresql":  # arrays: one prepared statement
        statement = text(
            f"SELECT chunk_id, term, impact FROM {TABLE} "  # noqa: S608 (constant table name)
            "WHERE chunk_id = ANY(CAST(:ids AS bigint[])) AND term = ANY(CAST(:terms AS text[]))"
        )
    else:
        statement = text(
            f"SELECT chunk_id, term, impact FROM {TABLE} WHERE chunk_id IN :ids AND term IN :terms"  # noqa: S608 (constant table name)
        ).bindparams(bindparam("ids", expanding=True), bindparam("terms", expanding=True))
    rows = await session.execute(statement, {"ids": list(chunk_ids), "terms": terms})
    for chunk_id, term, impact in rows.all():
        scores[int(chunk_id)] += weights[str(term)] * int(impact)
    return scores


async def top_chunks(
    session: AsyncSession,
    store_ids: Sequence[str],
    terms: Sequence[str],
    limit: int,
    *,
    condition: Compiled | None = None,
    passing: Mapping[str, PassingFiles] | None = None,
) -> list[tuple[int, float]]:
    """(chunk id, BM25 score) of the best ``limit`` chunks of these stores for
    the (already tokenized) terms, best first. Filtered: on PostgreSQL only
    chunks of completed files whose row (aliased ``f``) passes ``condition``;
    on SQLite only chunks of the files in ``passing`` (per store: a table
    keyed by their seqs and their range, index.Scope.passing, shared with
    the vector side)."""
    terms = list(dict.fromkeys(terms))
    stores = list(dict.fromkeys(store_ids))
    if not terms or not stores or limit <= 0:
        return []
    database = str(session.get_bind().engine.url)
    keys = [store_key(store_id) for store_id in stores]
    counts = await _document_counts(session, database, keys, terms)
    # The rarest terms, within what one statement may hold: SQLite's UNION ALL
    # of a list per (term, store) allows 500 (a word like a_b_c... is split
    # into many terms by the tokenizer).
    terms = sorted((term for term in terms if counts[term] > 0), key=lambda term: counts[term])
    terms = terms[: max(1, MAX_LISTS // len(keys))]
    if not terms:
        return []
    total = await _chunk_total(session, database, stores)
    # IDF per stored impact unit: the sums below are BM25 scores themselves.
    weights = {term: idf(counts[term], max(total, counts[term])) / IMPACT_SCALE for term in terms}
    depth = max(DEPTH, 2 * limit)
    count = max(RESCORED_PER_RESULT * limit, MIN_RESCORED)
    candidates = await _candidates(session, weights, stores, depth, count, condition, passing)
    exact = await _exact_scores(session, weights, candidates)
    return sorted(exact.items(), key=lambda pair: (-pair[1], pair[0]))[:limit]


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
