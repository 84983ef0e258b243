"""Token counts without a provider's tokenizer: an estimate for routes that
do not go through litellm (and litellm's fallback), and cl100k_base for
decoding token ids.

The estimate counts pieces the way cl100k_base splits text (letter runs,
groups of up to three digits, punctuation runs, spaces that do not start a
word) and words over 8 letters as several tokens. Against cl100k_base it reads 1.0-1.3
times the true count over prose, code, JSON, CJK and numbers: over, which is
the safe side for fitting a prompt into a context window, and without the 36
MiB and half a second that loading the real encoding costs
(bench/README.md, issue 17).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

_CJK = "\u3000-\u303f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef"
_PIECE = re.compile(rf"[{_CJK}]|[^\W\d_{_CJK}]+|\d{{1,3}}|[^\w\s]+|_+|\s+", re.UNICODE)
_ONE_TOKEN_WORD = 8  # most words up to this length are one token
_LETTERS_PER_TOKEN = 5
_PUNCTUATION_PER_TOKEN = 2
_IMAGE_TOKENS = 85


def estimate_text(text: str) -> int:
    count = 0
    pieces = _PIECE.findall(text)
    for position, piece in enumerate(pieces):
        first = piece[0]
        if first.isspace():
            # " word" is one token in cl100k_base; other whitespace counts.
            following = pieces[position + 1][:1] if position + 1 < len(pieces) else ""
            count += 0 if piece == " " and following.isalpha() and len(following.encode()) == 1 else 1
        elif first.isalpha():
            count += 1 if len(piece) <= _ONE_TOKEN_WORD else -(-len(piece) // _LETTERS_PER_TOKEN)
        elif first.isdigit():
            count += 1
        else:
            count += -(-len(piece) // _PUNCTUATION_PER_TOKEN)
    return count


def _content_text(content: Any) -> tuple[str, int]:
    """The text of a message's content and how many images it has."""
    if isinstance(content, str):
        return content, 0
    if not isinstance(content, list):
        return "", 0
    texts = [str(part.get("text", "")) for part in content if isinstance(part, dict) and "text" in part]
    images = sum(1 for part in content if isinstance(part, dict) and part.get("type") in ("image_url", "image_file"))
    return "\n".join(texts), images


def estimate_prompt(messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None) -> int:
    """OpenAI's framing (3 per message, 3 to prime the answer) around the estimated content."""
    total = 3
    for message in messages:
        text, images = _content_text(message.get("content"))
        total += 3 + estimate_text(text) + _IMAGE_TOKENS * images + (1 if message.get("name") else 0)
        for call in message.get("tool_calls") or []:
            function = call.get("function") or {}
            total += (
                3 + estimate_text(str(function.get("name", ""))) + estimate_text(str(function.get("arguments", "")))
            )
    return total + (estimate_text(json.dumps(list(tools))) if tools else 0)


def decode(tokens: Sequence[int]) -> str:
    """Text of OpenAI token ids (cl100k_base, whose ranks ship with the
    server: no network, no litellm); LangChain's OpenAIEmbeddings sends its
    inputs as token ids. The first call loads the encoding (about 0.5 s)."""
    from app.retrieval import chunking  # the one copy of the encoding; loaded only when ids arrive

    return chunking._encoding().decode(list(tokens))
