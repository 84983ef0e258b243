"""Keyword search on PostgreSQL: 'english' lexemes, BM25 from the postings table.

Ranking is app.retrieval.keyword_postings (an impact-ordered inverted table
read top-down per query word). The chunk's generated ``tsv`` column
(to_tsvector('english', text)) is the tokenizer: at ingest one INSERT ...
SELECT unnests each new chunk's tsvector into postings (term frequency from
its positions, the chunk's length their sum; stop words are already gone),
and query words become lexemes the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from app.retrieval import keyword_postings
from app.retrieval.filters import Compiled

# Lexemes per chunk of the default static chunking (800 tokens, 400 overlap)
# in its tsvector (stop words excluded): BM25's average length, fixed so that
# a stored impact never depends on the rest of the store (python3.11-doc).
AVERAGE_LENGTH = 333.0
_CACHED_WORDS = 50_000

_lexemes: dict[str, tuple[str, ...]] = {}  # query word -> its lexemes

# A tsvector keeps at most 256 positions per lexeme: tf saturates there,
# where BM25's tf part is flat anyway.
_WRITE_POSTINGS = (
    f"INSERT INTO {keyword_postings.TABLE} (term, store_key, impact, chunk_id, file_seq) "  # noqa: S608 (constant fragments only; values are bound)
    f"SELECT w.lexeme, :key, {keyword_postings.impact_sql('w.tf', 'l.dl', AVERAGE_LENGTH)}, c.id, "
    f"{keyword_postings.FILE_SEQ_SQL} "
    "FROM vector_store_chunks c "
    "CROSS JOIN LATERAL (SELECT lexeme, coalesce(array_length(positions, 1), 1) AS tf FROM unnest(c.tsv)) w "
    "CROSS JOIN LATERAL (SELECT sum(coalesce(array_length(positions, 1), 1)) AS dl FROM unnest(c.tsv)) l "
    "WHERE c.vector_store_id = :store AND c.file_id = :file"
)


async def _lexemes_of(session: AsyncSession, words: Sequence[str]) -> list[str]:
    """The words' lexemes under the 'english' configuration (stop words have
    none), each word's kept per process: one round trip less per search."""
    if len(_lexemes) + len(words) > _CACHED_WORDS:
        _lexemes.clear()  # before ``missing`` is taken: this query's words are all read again
    missing = [word for word in dict.fromkeys(words) if word not in _lexemes]
    if missing:
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


async def write_postings(session: AsyncSession, vector_store_id: str, file_id: str) -> None:
    """Postings of the file's chunks (just inserted: ingestion replaces a file's chunks whole)."""
    await session.execute(
        text(_WRITE_POSTINGS),
        {"key": keyword_postings.store_key(vector_store_id), "store": vector_store_id, "file": file_id},
    )


async def search(
    session: AsyncSession,
    store_ids: Sequence[str],
    condition: Compiled | None,
    words: Sequence[str],
    limit: int,
) -> list[tuple[int, str, str, str, float]]:
    """(chunk id, store id, file id, text, score) of the best ``limit`` chunks;
    only chunks of files whose row passes ``condition`` when one is given."""
    lexemes = await _lexemes_of(session, words)
    ranked = await keyword_postings.top_chunks(session, store_ids, lexemes, limit, condition=condition)
    return await keyword_postings.with_texts(session, store_ids, ranked)
