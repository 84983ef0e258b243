"""Annotations in the stream, the way OpenAI sent them (wire notes 3.3, issue 12).

A citation marker (``【3:0†policy.txt】``) or a code_interpreter link
(``sandbox:/mnt/data/out.csv``) reaches a streaming client as ONE text delta
whose ``value`` is the whole marker and which carries the marker's
annotation. Clients depend on it: Semantic Kernel reads annotations only
inside ``if delta.text.value``, agency-swarm and OpenAI's quickstart do
``text += delta.value``. So the text of a marker is held back until it is
complete, and no text delta is ever sent without ``value``.

``MarkerStream`` is fed the model's text fragments and returns what to
publish; ``Targets`` says which markers this run can annotate (the citations
file_search made, the files code_interpreter wrote). The final message's
annotations are computed by the tools' ``decorate`` over the same text with
the same rules, so the streamed ones accumulate to exactly those.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypedDict

from app.runner.tools import BuiltinTool, ToolResult
from app.runner.tools import code_interpreter as code_tool
from app.runner.tools import file_search as search_tool

CITATION_OPEN, CITATION_CLOSE = "【", "】"
LINK_PREFIX = code_tool.LINK_PREFIX
# A 【 with no 】 this far on is not a marker: release it rather than hold the answer.
MAX_CITATION_CHARS = 256


class Annotation(TypedDict, total=False):
    index: int
    type: Literal["file_citation", "file_path"]
    text: str
    start_index: int
    end_index: int
    file_citation: dict[str, str]
    file_path: dict[str, str]


@dataclass
class Targets:
    """What can be annotated right now: citation marker -> file id, and
    name under /mnt/data -> file id."""

    citations: dict[str, str] = field(default_factory=dict)
    links: dict[str, str] = field(default_factory=dict)


TargetSource = Callable[[], Targets]


def no_targets() -> Targets:
    return Targets()


def run_targets(builtins: Mapping[str, BuiltinTool], results: Mapping[str, list[ToolResult]]) -> TargetSource:
    """Targets from a run's built-in tool results, read live (results grow as tools run)."""

    def targets() -> Targets:
        found = Targets()
        for result in results.get(search_tool.FileSearch.type, []):
            if isinstance(result, search_tool.FileSearchResult):
                found.citations.update(result.citations)
        tool = builtins.get(code_tool.TYPE)
        if isinstance(tool, code_tool.CodeInterpreter):
            for result in results.get(code_tool.TYPE, []):
                found.links.update(tool.produced.get(str(result.call.get("id")), {}))
        return found

    return targets


@dataclass
class Piece:
    """One text delta to publish: ``text`` is never empty."""

    text: str
    annotation: Annotation | None = None
    first: bool = False  # the message's first text delta (it opens ``annotations``)


@dataclass
class MarkerStream:
    """Splits one message's text into deltas so that markers are never split.

    ``feed`` returns the pieces that can go out now; ``flush`` (at the end of
    the message) returns the rest. ``offset`` counts characters published, so
    annotation indexes match ``str`` indexes of the final text.
    """

    targets: TargetSource = no_targets
    held: str = ""
    offset: int = 0
    annotations: int = 0

    def feed(self, fragment: str) -> list[Piece]:
        self.held += fragment
        return self._drain(final=False)

    def flush(self) -> list[Piece]:
        return self._drain(final=True)

    def _drain(self, *, final: bool) -> list[Piece]:
        pieces: list[Piece] = []
        targets = self.targets()
        while self.held:
            start = _marker_start(self.held, targets)
            if start is None:
                pieces.append(self._plain(self.held))
                break
            if start > 0:
                pieces.append(self._plain(self.held[:start]))
            length = _marker_length(self.held[start:], targets, final=final)
            if length is None:  # not complete yet: wait for more text
                self.held = self.held[start:]
                return pieces
            marker, self.held = self.held[start : start + length], self.held[start + length :]
            pieces.append(self._marker(marker, targets))
        self.held = ""
        return pieces

    def _plain(self, text: str) -> Piece:
        self.offset += len(text)
        return Piece(text, first=self.offset == len(text))

    def _marker(self, text: str, targets: Targets) -> Piece:
        annotation = _annotation(text, targets)
        start, self.offset = self.offset, self.offset + len(text)
        if annotation is not None:
            annotation["index"], annotation["start_index"], annotation["end_index"] = (
                self.annotations,
                start,
                self.offset,
            )
            self.annotations += 1
        return Piece(text, annotation, first=start == 0)


def _marker_start(text: str, targets: Targets) -> int | None:
    """Where the first (possibly still partial) marker begins, if any."""
    found = [text.find(CITATION_OPEN)]
    if targets.links:
        found.append(text.find(LINK_PREFIX))
        # A tail that may become the link prefix once more text arrives.
        for size in range(min(len(LINK_PREFIX) - 1, len(text)), 0, -1):
            if LINK_PREFIX.startswith(text[-size:]):
                found.append(len(text) - size)
                break
    starts = [position for position in found if position >= 0]
    return min(starts) if starts else None


def _marker_length(text: str, targets: Targets, *, final: bool) -> int | None:
    """Length of the marker at the start of ``text``; None while it may still grow."""
    if text.startswith(CITATION_OPEN):
        close = text.find(CITATION_CLOSE)
        if close >= 0:
            return close + 1
        return len(text) if final or len(text) > MAX_CITATION_CHARS else None
    if not text.startswith(LINK_PREFIX):  # a partial prefix
        if final or not LINK_PREFIX.startswith(text):
            return len(text) if final else 1  # not a link after all: release its first character
        return None
    name = text[len(LINK_PREFIX) :]
    if not final and any(known.startswith(name) and known != name for known in targets.links):
        return None  # a longer known name may follow
    matching = [known for known in targets.links if name.startswith(known)]
    if not matching:
        # Not a file of this run: send the prefix as plain text and go on.
        return len(LINK_PREFIX)
    return len(LINK_PREFIX) + len(max(matching, key=len))


def _annotation(text: str, targets: Targets) -> Annotation | None:
    if text in targets.citations:
        return Annotation(type="file_citation", text=text, file_citation={"file_id": targets.citations[text]})
    name = text[len(LINK_PREFIX) :] if text.startswith(LINK_PREFIX) else None
    if name is not None and name in targets.links:
        return Annotation(type="file_path", text=text, file_path={"file_id": targets.links[name]})
    return None


def text_delta(index: int, piece: Piece) -> dict[str, Any]:
    """The ``delta.content`` entry of one piece: ``value`` always, the annotation with it."""
    text: dict[str, Any] = {"value": piece.text}
    if piece.annotation is not None:
        text["annotations"] = [dict(piece.annotation)]
    elif piece.first:
        text["annotations"] = []
    return {"index": index, "type": "text", "text": text}
