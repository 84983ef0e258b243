"""How many bytes the SQLite vector cache (vectors.py) may hold.

Apart from vectors.py so that the Runtime can set it from ``vector_cache_mib``
at start-up without importing numpy: an idle server stays about 17 MiB
smaller until its first vector search (issue 17)."""

from __future__ import annotations

DEFAULT_BYTES = 512 * 1024**2
_limit = DEFAULT_BYTES


def set_limit(limit: int) -> None:
    global _limit
    _limit = max(0, limit)


def limit() -> int:
    return _limit
