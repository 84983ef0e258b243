"""Token-based chunking with overlap (cl100k_base, the tokenizer of the
models file_search was built for), as OpenAI's static chunking strategy.

The encoding's token ranks ship inside this package (tokenizer/, from OpenAI's
tiktoken, MIT), so tokens are counted the same way on every install, offline,
whether or not the litellm extra is there; tiktoken only runs the BPE.
"""

from __future__ import annotations

import base64
import gzip
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import tiktoken

# tiktoken (its compiled BPE extension) is imported by the first chunking,
# not when the API's routes import this module: about 2 MiB an idle server
# need not hold; the import adds a few ms to the encoding's 0.5 s load (issue 17).

RANKS_FILE = Path(__file__).with_name("tokenizer") / "cl100k_base.tiktoken.gz"
# cl100k_base's pre-tokenisation pattern (as published with tiktoken).
CL100K_PATTERN = (
    r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+"
    r"| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"
)

DEFAULT_MAX_TOKENS = 800
DEFAULT_OVERLAP_TOKENS = 400


def static(max_tokens: int = DEFAULT_MAX_TOKENS, overlap: int = DEFAULT_OVERLAP_TOKENS) -> dict[str, Any]:
    """The response form of a chunking strategy (``auto`` resolves to this)."""
    return {"type": "static", "static": {"max_chunk_size_tokens": max_tokens, "chunk_overlap_tokens": overlap}}


def _read_ranks(path: Path) -> dict[bytes, int]:
    """A .tiktoken file: one ``<base64 token> <rank>`` per line."""
    ranks: dict[bytes, int] = {}
    with gzip.open(path, "rt", encoding="ascii") as lines:
        for line in lines:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def cl100k_ranks() -> dict[bytes, int]:
    """Every token of cl100k_base and its merge rank (lower = more frequent in
    the text the encoding was trained on)."""
    return _read_ranks(RANKS_FILE)


@cache
def _encoding() -> tiktoken.Encoding:
    # No special tokens: documents are plain text, so "<|endoftext|>" in a
    # file is chunked as the characters it is.
    import tiktoken

    return tiktoken.Encoding(
        name="cl100k_base", pat_str=CL100K_PATTERN, mergeable_ranks=_read_ranks(RANKS_FILE), special_tokens={}
    )


def count_tokens(text: str) -> int:
    return len(_encoding().encode(text, disallowed_special=()))


def chunk(text: str, max_tokens: int = DEFAULT_MAX_TOKENS, overlap: int = DEFAULT_OVERLAP_TOKENS) -> list[str]:
    """Windows of ``max_tokens`` tokens, each starting ``max_tokens - overlap``
    tokens after the previous one; the last window ends at the text's end."""
    encoding = _encoding()
    tokens = encoding.encode(text, disallowed_special=())
    step = max(1, max_tokens - overlap)
    pieces: list[str] = []
    start = 0
    while start < len(tokens):
        window = tokens[start : start + max_tokens]
        piece = encoding.decode(window)
        if piece.strip():
            pieces.append(piece.strip())
        if start + max_tokens >= len(tokens):
            break
        start += step
    return pieces
