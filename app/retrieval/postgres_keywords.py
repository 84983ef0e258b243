"""Keyword ranking on PostgreSQL: BM25's ideas on a tsvector column.

``ts_rank`` alone ranks every chunk that contains any query word (a 6-word
question matched 70% of a 100k-chunk store: a 1.25 s scan) and weighs a
word like "file" as much as "bisection". Here:

- each query word's document frequency comes from the planner's statistics
  of the tsv column (``pg_stats.most_common_elems``, kept by ANALYZE /
  autovacuum; a word absent from that list is rarer than all of it), read
  once a minute per process;
- candidates are selected through the GIN index by the query's words while
  their estimated row counts fit ``POSTING_BUDGET`` (the rarest first, at
  least one word; the others only add to the score), so the scored set stays
  bounded as a store grows, and a small store is ranked on every word;
- the score is the sum over the query's words of IDF times ts_rank of that
  word (term frequency, normalised by the chunk's length), i.e. BM25's shape.

Without statistics yet (a new table before its first ANALYZE) every word
selects candidates and weighs the same: the plain ts_rank behaviour.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import bindparam, text
from sqlalchemy.ext.asyncio import AsyncSession

from app.retrieval.sqlite_keywords import within_budget

# Rows scored per query (each reads a chunk's tsvector out of TOAST).
POSTING_BUDGET = 8_000
STATS_TTL_SECONDS = 60.0
# A word absent from most_common_elems is rarer than its least common entry.
_UNLISTED_SHARE = 0.5


@dataclass
class _Stats:
    read_at: float
    frequencies: dict[str, float]
    floor: float  # frequency below every listed lexeme (0 when unknown)
    rows: float  # the planner's estimate of the table's rows


_CACHED_WORDS = 50_000
_lexemes: dict[str, tuple[str, ...]] = {}  # query word -> its lexemes

# Per database (a process normally has one), read again after the TTL.
_stats: dict[str, _Stats] = {}


async def _frequencies(session: AsyncSession) -> _Stats:
    database = str(session.get_bind().engine.url)
    cached = _stats.get(database)
    if cached is not None and time.monotonic() - cached.read_at < STATS_TTL_SECONDS:
        return cached
    row = (
        await session.execute(
            text(
                "SELECT s.most_common_elems::text::text[] AS words, s.most_common_elem_freqs AS freqs, "
                "c.reltuples AS rows FROM pg_stats s JOIN pg_class c ON c.relname = s.tablename "
                "AND c.relnamespace = to_regnamespace(s.schemaname) WHERE s.tablename = 'vector_store_chunks' "
                "AND s.attname = 'tsv' AND s.schemaname = current_schema()"
            )
        )
    ).first()
    frequencies: dict[str, float] = {}
    floor = rows = 0.0
    if row is not None and row.words and row.freqs:
        rows = max(0.0, float(row.rows))
        # most_common_elem_freqs ends with the minimum, maximum and null share.
        frequencies = {str(word): float(share) for word, share in zip(row.words, row.freqs, strict=False)}
        floor = float(row.freqs[-3]) * _UNLISTED_SHARE
    _stats[database] = _Stats(time.monotonic(), frequencies, floor, rows)
    return _stats[database]


def _lexeme_literal(lexeme: str) -> str:
    """A tsquery of one lexeme, quoted so it is taken as it is (already normalised)."""
    return "'" + lexeme.replace("\\", "\\\\").replace("'", "''") + "'"


async def _lexemes_of(session: AsyncSession, words: Sequence[str]) -> list[str]:
    """The words' lexemes under the 'english' configuration (stop words have
    none), each word's kept per process: one round trip less per search."""
    missing = [word for word in dict.fromkeys(words) if word not in _lexemes]
    if missing:
        if len(_lexemes) + len(missing) > _CACHED_WORDS:
            _lexemes.clear()
        rows = await session.execute(
            text(
                "SELECT w.word, tsvector_to_array(to_tsvector('english', w.word)) AS lexemes "
                "FROM unnest(CAST(:words AS text[])) AS w(word)"
            ),
            {"words": missing},
        )
        for word, found in rows.all():
            _lexemes[str(word)] = tuple(str(lexeme) for lexeme in found)
    return list(dict.fromkeys(lexeme for word in words for lexeme in _lexemes.get(word, ())))


async def search(
    session: AsyncSession, where: str, params: dict[str, object], words: Sequence[str], limit: int
) -> list[tuple[int, str, str, str, float]]:
    """(chunk id, store id, file id, text, score) of the best ``limit`` chunks;
    ``where`` restricts chunks aliased ``c``."""
    lexemes = await _lexemes_of(session, words)
    if not lexemes:
        return []
    stats = await _frequencies(session)
    known = bool(stats.frequencies)
    share = {lexeme: stats.frequencies.get(lexeme, stats.floor) for lexeme in lexemes}
    ordered = sorted(lexemes, key=lambda lexeme: share[lexeme])
    counts = {lexeme: round(share[lexeme] * stats.rows) for lexeme in lexemes}
    selecting = within_budget(ordered, counts, POSTING_BUDGET) if known else lexemes
    bound: dict[str, object] = {**params, "limit": limit}
    score_terms = []
    for position, lexeme in enumerate(lexemes):
        bound[f"lex_{position}"] = _lexeme_literal(lexeme)
        frequency = max(share[lexeme], 1e-6) if known else 0.5
        weight = math.log(1.0 + (1.0 - frequency) / frequency) if known else 1.0
        score_terms.append(f"{weight:.6f} * ts_rank(m.tsv, CAST(:lex_{position} AS tsquery), 1)")
    bound["selecting"] = " | ".join(_lexeme_literal(lexeme) for lexeme in selecting)
    # Ranked on ids alone, then the text of the page's rows only.
    sql = (
        "SELECT c.id, c.vector_store_id, c.file_id, c.text, ranked.score FROM ("  # noqa: S608 (constant fragments only; values are bound)
        f"SELECT m.id, {' + '.join(score_terms)} AS score FROM ("
        # setweight copies each matching tsvector out of TOAST once (OFFSET 0
        # keeps the subquery apart); the per-word ts_rank calls then share the
        # copy instead of decompressing the stored value once per word.
        "SELECT c.id, setweight(c.tsv, 'D') AS tsv FROM vector_store_chunks c "
        f"WHERE c.tsv @@ CAST(:selecting AS tsquery) AND {where} OFFSET 0"
        ") m ORDER BY score DESC LIMIT :limit"
        ") ranked JOIN vector_store_chunks c ON c.id = ranked.id ORDER BY ranked.score DESC, c.id"
    )
    statement = text(sql).bindparams(bindparam("stores", expanding=True))
    rows = (await session.execute(statement, bound)).all()
    return [(int(r.id), str(r.vector_store_id), str(r.file_id), str(r.text), float(r.score)) for r in rows]
