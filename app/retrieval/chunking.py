"""Token-based chunking with overlap (cl100k_base, the tokenizer of the
models file_search was built for), as OpenAI's static chunking strategy.

The tokenizer files ship inside litellm's package, so no network is needed;
only their location is borrowed (litellm itself is not imported here). If
tiktoken cannot load them, words stand in for tokens: deterministic, and
within a small factor of the real count for English.
"""

from __future__ import annotations

import importlib.util
import os
import re
from functools import cache
from pathlib import Path
from typing import Any

DEFAULT_MAX_TOKENS = 800
DEFAULT_OVERLAP_TOKENS = 400
_WORD = re.compile(r"\S+\s*")


def static(max_tokens: int = DEFAULT_MAX_TOKENS, overlap: int = DEFAULT_OVERLAP_TOKENS) -> dict[str, Any]:
    """The response form of a chunking strategy (``auto`` resolves to this)."""
    return {"type": "static", "static": {"max_chunk_size_tokens": max_tokens, "chunk_overlap_tokens": overlap}}


def _bundled_tokenizers() -> Path | None:
    spec = importlib.util.find_spec("litellm")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "litellm_core_utils" / "tokenizers"
    return path if path.is_dir() else None


@cache
def _encoding() -> Any | None:
    try:
        import tiktoken

        bundled = _bundled_tokenizers()
        if bundled is not None:
            os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(bundled))
        return tiktoken.get_encoding("cl100k_base")
    except Exception:  # no tokenizer files offline: fall back to words
        return None


def count_tokens(text: str) -> int:
    encoding = _encoding()
    if encoding is None:
        return len(_WORD.findall(text))
    return len(encoding.encode(text, disallowed_special=()))


def chunk(text: str, max_tokens: int = DEFAULT_MAX_TOKENS, overlap: int = DEFAULT_OVERLAP_TOKENS) -> list[str]:
    """Windows of ``max_tokens`` tokens, each starting ``max_tokens - overlap``
    tokens after the previous one; the last window ends at the text's end."""
    encoding = _encoding()
    tokens: list[Any] = encoding.encode(text, disallowed_special=()) if encoding is not None else _WORD.findall(text)
    step = max(1, max_tokens - overlap)
    pieces: list[str] = []
    start = 0
    while start < len(tokens):
        window = tokens[start : start + max_tokens]
        piece = encoding.decode(window) if encoding is not None else "".join(window)
        if piece.strip():
            pieces.append(piece.strip())
        if start + max_tokens >= len(tokens):
            break
        start += step
    return pieces
