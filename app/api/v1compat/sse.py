"""v1 event streams: the v2 stream's frames (app/api/sse.py writes one
``event:`` and one ``data:`` line per frame) rewritten to v1 shapes as they
pass, keep-alives and ``[DONE]`` untouched."""

from __future__ import annotations

import json
from typing import Any

from app.api.v1compat import shapes
from app.services import v1_files


class EventRewriter:
    def __init__(self, runtime: Any) -> None:
        self.runtime = runtime
        self._pending = b""
        self._file_ids: dict[str, list[str]] = {}  # per stream: an assistant's files do not change mid-run

    async def feed(self, chunk: bytes) -> bytes:
        """The complete frames of what arrived so far, rewritten; a partial frame waits."""
        self._pending += chunk
        comments = b""
        while self._pending.startswith(b":") and b"\n" in self._pending:  # keep-alives pass at once
            line, self._pending = self._pending.split(b"\n", 1)
            comments += line + b"\n"
        *frames, self._pending = self._pending.split(b"\n\n")
        return comments + b"".join([await self._frame(frame) + b"\n\n" for frame in frames])

    async def _frame(self, frame: bytes) -> bytes:
        lines = frame.split(b"\n")
        data_at = next((n for n, line in enumerate(lines) if line.startswith(b"data: ")), None)
        if data_at is None:
            return frame
        raw = lines[data_at][6:]
        if raw == b"[DONE]":
            return frame
        try:
            value = json.loads(raw)
        except ValueError:
            return frame
        missing = shapes.assistants_named(value) - set(self._file_ids)
        if missing:
            async with self.runtime.transaction() as session:
                self._file_ids.update(await v1_files.file_ids_of(session, missing))
        lines[data_at] = b"data: " + json.dumps(shapes.to_v1(value, self._file_ids), separators=(",", ":")).encode()
        return b"\n".join(lines)
