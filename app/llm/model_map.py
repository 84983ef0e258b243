"""litellm's bundled model map (``model_prices_and_context_window_backup.json``,
2 MB) read as data, without importing litellm: the file's text is kept and
only the entries asked for are decoded (about a millisecond per new name,
then cached). Parsing the whole map would leave some 15 MiB more resident in
every serving process (issue 17's idle-memory aim).

litellm_adapter.bundled_window reads context windows from it for direct
routes; providers.py asks which names litellm counts among OpenAI's models."""

from __future__ import annotations

import functools
import importlib.machinery
import json
from pathlib import Path
from typing import Any

_MODEL_MAP = "model_prices_and_context_window_backup.json"  # what LITELLM_LOCAL_MODEL_COST_MAP loads


@functools.cache
def _text() -> str:
    """The map's text, read once; empty if litellm is not installed."""
    # Looked up on sys.path without importing litellm (nor asking sys.modules,
    # so what a test blocks or a run imported changes nothing).
    spec = importlib.machinery.PathFinder.find_spec("litellm")
    if spec is None or spec.origin is None:
        return ""
    try:
        return (Path(spec.origin).parent / _MODEL_MAP).read_text(encoding="utf-8")
    except OSError:
        return ""


def available() -> bool:
    return bool(_text())


@functools.lru_cache(maxsize=1024)
def entry(name: str) -> dict[str, Any] | None:
    """The map's entry for a model name (a top-level key); None if it has none."""
    text = _text()
    key = json.dumps(name) + ":"
    start = text.find(key)
    if start == -1:
        return None
    at = start + len(key)
    while at < len(text) and text[at] in " \t\r\n":
        at += 1
    try:
        info, _ = json.JSONDecoder().raw_decode(text, at)
    except ValueError:
        return None
    return info if isinstance(info, dict) else None
