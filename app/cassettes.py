"""Record and replay of real models' answers ("cassettes").

Run a test suite once against a real provider with ``ASSISTANTS_LLM_RECORD=DIR``
(the pytest plugin's ``--llm-record DIR``): every chat completion routed to a
provider is saved under DIR, one JSON file per distinct request, with the
answer streamed chunk by chunk. Commit DIR; later runs with
``ASSISTANTS_LLM_REPLAY=DIR`` (``--llm-replay DIR``) answer the same requests
from the files, with no network and no key: identical text, tool calls and
usage.

A request is keyed by its normalised chat-completions body: the ids this
server generates (``asst_``, ``thread_``, ``msg_``, ``run_``, ``file-``, ...)
are replaced by placeholders, since they differ on every run; a request with
no file of its key is answered by a recording equal to it but for how its
whole numbers are written (1 or 1.0, one JSON number) and for the values of
the secrets redacted below (a recording made with one key replays in a CI
whose key differs, the variable's name the same). A request with
no recording fails the run with a ``last_error`` naming the closest recording
and what differs from it; the misses are also kept for the pytest plugin,
which fails the test that caused them.

Nothing secret is written: provider parameters (keys, bases, headers) are not
part of the request, and the values of environment variables whose names say
KEY, TOKEN, SECRET or PASSWORD are redacted should they appear in a prompt.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

Mode = Literal["record", "replay"]

_GENERATED_ID = re.compile(r"\b(?:asst|thread|msg|run|step|vs|vsfb)_[0-9A-Za-z]{8,}\b|\bfile-[0-9A-Za-z]{8,}\b")
_SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD", re.IGNORECASE)
_UNSAFE_NAME = re.compile(r"[^0-9A-Za-z._-]+")


def normalise(body: Mapping[str, Any]) -> dict[str, Any]:
    """The request as it is keyed: generated ids replaced, keys sorted."""
    text = _GENERATED_ID.sub(lambda match: match.group(0).split("_")[0].split("-")[0] + "_<id>", _dump(body))
    normalised: dict[str, Any] = json.loads(text)
    return normalised


def _dump(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def _whole_numbers(value: Any) -> Any:
    """``value`` with each float that is a whole number as an int: JSON
    does not tell 1 from 1.0, nor does a provider, but a request's key (its
    text) does. A server before 2026-12-01 sent a run's default
    temperature as 1 on SQLite when a tick claimed the run (its RETURNING
    read the REAL column so) and as 1.0 otherwise; a recording of either
    answers both (Cassettes.lookup)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {key: _whole_numbers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_whole_numbers(item) for item in value]
    return value


def _alike_text(normalised: Mapping[str, Any]) -> str:
    """A normalised request as _equal_recording() compares it: whole
    numbers as ints, secrets redacted (as its recording has them)."""
    return redact(_dump(_whole_numbers(normalised)))


def request_key(normalised: Mapping[str, Any]) -> str:
    return hashlib.sha256(_dump(normalised).encode()).hexdigest()[:20]


def _secrets() -> list[tuple[str, str]]:
    return [(name, value) for name, value in os.environ.items() if _SECRET_NAME.search(name) and len(value) >= 8]


def redact(text: str) -> str:
    for name, value in _secrets():
        text = text.replace(value, f"<redacted:{name}>")
    return text


def difference(recorded: Any, current: Any, where: str = "") -> str | None:
    """The first place two normalised requests differ, in words; None if equal."""
    if isinstance(recorded, dict) and isinstance(current, dict):
        for key in sorted(set(recorded) | set(current)):
            if key not in recorded:
                return f"{where}.{key} is new ({_short(current[key])})".lstrip(".")
            if key not in current:
                return f"{where}.{key} is missing (recorded {_short(recorded[key])})".lstrip(".")
            found = difference(recorded[key], current[key], f"{where}.{key}")
            if found:
                return found
        return None
    if isinstance(recorded, list) and isinstance(current, list):
        for index, (old, new) in enumerate(zip(recorded, current, strict=False)):
            found = difference(old, new, f"{where}[{index}]")
            if found:
                return found
        if len(recorded) != len(current):
            return f"{where.lstrip('.')} has {len(current)} items, recorded {len(recorded)}"
        return None
    if recorded != current or type(recorded) is not type(current):  # (1 == 1.0 == True in Python)
        return f"{where.lstrip('.')}: recorded {_short(recorded)}, now {_short(current)}"
    return None


def _short(value: Any, limit: int = 120) -> str:
    text = _dump(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class Miss:
    """A request that had no recording, for the run's last_error and the plugin."""

    model: str
    message: str


@dataclass
class Cassettes:
    directory: Path
    mode: Mode
    misses: list[Miss] = field(default_factory=list)
    # Replay: each recording by its request's _alike_text, read at the first
    # request whose key has no file (_equal_recording).
    _alike: dict[str, Path] | None = field(default=None, init=False, repr=False)

    def path(self, model: str, key: str) -> Path:
        return self.directory / f"{_UNSAFE_NAME.sub('_', model)[:60]}-{key}.json"

    def lookup(self, model: str, body: Mapping[str, Any]) -> tuple[list[dict[str, Any]] | None, str]:
        """(the recorded events, "") or (None, why there is no recording)."""
        normalised = normalise(body)
        path = self.path(model, request_key(normalised))
        if not path.is_file():
            path = self._equal_recording(normalised) or path
        if path.is_file():
            events: list[dict[str, Any]] = json.loads(path.read_text(encoding="utf-8"))["events"]
            return events, ""
        return None, self._explain_miss(model, normalised)

    def _equal_recording(self, normalised: Mapping[str, Any]) -> Path | None:
        """The recording of a request equal to this one but for how its
        whole numbers are written (1 or 1.0: _whole_numbers), if any."""
        if self._alike is None:
            self._alike = {}
            for candidate in sorted(self.directory.glob("*.json")) if self.directory.is_dir() else []:
                try:
                    recorded = json.loads(candidate.read_text(encoding="utf-8"))["request"]
                except (OSError, ValueError, KeyError, TypeError):
                    continue
                self._alike.setdefault(_dump(_whole_numbers(recorded)), candidate)
        return self._alike.get(_alike_text(normalised))

    def _explain_miss(self, model: str, normalised: Mapping[str, Any]) -> str:
        # Redacted as the recordings are: a secret in the prompt is no
        # difference; nor is a whole number's 1 against 1.0 (lookup).
        with suppress(ValueError):  # (a secret spanning JSON's syntax: compared unredacted)
            normalised = json.loads(redact(_dump(normalised)))
        normalised = _whole_numbers(normalised)
        current = _dump(normalised)
        best: tuple[int, str, str] | None = None  # (agreement, file name, first difference)
        for candidate in sorted(self.directory.glob("*.json")) if self.directory.is_dir() else []:
            try:
                recorded = _whole_numbers(json.loads(candidate.read_text(encoding="utf-8"))["request"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
            # The closest recording is the one that agrees longest with this request.
            agreement = _common_prefix(_dump(recorded), current)
            if best is None or agreement > best[0]:
                best = (agreement, candidate.name, difference(recorded, normalised) or "nothing")
        if best is None:
            return f"No recorded answer for this {model} request: the cassette directory {self.directory} has none."
        return (
            f"No recorded answer for this {model} request in {self.directory}. "
            f"The closest recording, {best[1]}, differs at {best[2]}."
        )

    def save(self, model: str, body: Mapping[str, Any], events: list[dict[str, Any]]) -> None:
        normalised = normalise(body)
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.path(model, request_key(normalised))
        document = redact(json.dumps({"request": normalised, "events": events}, indent=1, ensure_ascii=False))
        temp = path.with_name(path.name + ".tmp")
        # A provider's lone surrogate (half a pair, mended only past the
        # recording: LLM._stream) is written as its JSON escape, the
        # backslash form of a surrogate, so the replay gives what came.
        temp.write_text(document + "\n", encoding="utf-8", errors="backslashreplace")
        os.replace(temp, path)


def _common_prefix(first: str, second: str) -> int:
    length = 0
    for a, b in zip(first, second, strict=False):
        if a != b:
            break
        length += 1
    return length


class _Embedder(Protocol):
    name: str

    async def embed(self, texts: Sequence[str]) -> list[list[float]]: ...


class RecordedEmbedder:
    """Embeddings through a provider, recorded or replayed like chat
    completions (one file per batch of texts)."""

    def __init__(self, inner: _Embedder, book: Cassettes) -> None:
        self.name = inner.name
        self._inner = inner
        self._book = book

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        body = {"model": self.name, "input": list(texts)}
        path = self._book.path(f"embeddings-{self.name}", request_key(normalise(body)))
        if self._book.mode == "replay":
            if not path.is_file():
                miss = Miss(
                    self.name, f"No recorded embeddings for these {len(texts)} texts ({self.name}) in {path.parent}."
                )
                self._book.misses.append(miss)
                raise RuntimeError(miss.message)
            vectors: list[list[float]] = json.loads(path.read_text(encoding="utf-8"))["vectors"]
            return vectors
        vectors = await self._inner.embed(texts)
        self._book.directory.mkdir(parents=True, exist_ok=True)
        document = redact(json.dumps({"request": normalise(body), "vectors": vectors}, ensure_ascii=False))
        temp = path.with_name(path.name + ".tmp")
        temp.write_text(document + "\n", encoding="utf-8")
        os.replace(temp, path)
        return vectors
