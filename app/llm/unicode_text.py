"""A model's text made valid Unicode as it enters the server.

A provider may send half of a UTF-16 surrogate pair as a JSON escape
(``"\\ud83d"``): Python's json decodes it into a ``str`` holding a lone
surrogate, which no UTF-8 encoder takes. Stored as it came, the run
completed and every later list of its thread's messages was a 500, on both
databases. Streamed answers split text anywhere, so a valid pair may come
as its high half ending one delta and its low half starting the next: the
high half is held back until the next piece of the same text (a message's
text, its refusal, or one tool call's arguments) or the stream's end, then joined into
its character; a half without its partner becomes U+FFFD, as a UTF-8
decoder's ``replace`` writes a broken sequence.

Nearly every delta has no surrogate at all: it costs an ``isascii`` (a
flag) or, for other text, one search of a compiled pattern
(``StreamMender.clean``), and passes through as it is.
"""

from __future__ import annotations

from app.llm.interface import Event, Finish, RefusalDelta, TextDelta, ToolCallDelta
from app.llm.whole_text import REPLACEMENT, valid, whole

# The channels of the message's text and of its refusal; tool calls' are
# their indexes (a provider's index is any int, so these are not ints).
_TEXT = None
_REFUSAL = "refusal"
Channel = int | str | None


def _whole_or_none(text: str | None) -> str | None:
    return None if text is None else whole(text)


class StreamMender:
    """One stream's events with valid text (see the module's docstring).
    ``clean`` first: only an event it refuses goes through ``mend``."""

    __slots__ = ("_channel", "_held")

    def __init__(self) -> None:
        self._held = ""  # a trailing high half kept for the next piece of its channel
        self._channel: Channel = _TEXT

    def clean(self, event: Event) -> bool:
        """Whether ``event`` passes as it is: nothing held back, no surrogate."""
        if self._held:
            return False
        if type(event) is TextDelta:
            return valid(event.text)
        if type(event) is RefusalDelta:
            return valid(event.refusal)
        if type(event) is ToolCallDelta:
            return (
                valid(event.arguments)
                and (event.name is None or valid(event.name))
                and (event.id is None or valid(event.id))
            )
        return True  # a Finish

    def mend(self, event: Event) -> list[Event]:
        """What to pass on for ``event``: its text made whole, preceded by a
        half held back from another channel (as U+FFFD); at the Finish, a
        half still held comes before it."""
        if isinstance(event, Finish):
            return [*self._release(), event]
        channel, piece = _channel_and_text(event)
        out = self._release() if self._held and channel != self._channel else []
        text = self._held + piece
        self._held = ""
        if text and "\ud800" <= text[-1] <= "\udbff":  # a high half: its low half may start the next piece
            text, self._held, self._channel = text[:-1], text[-1], channel
        text = whole(text)
        if isinstance(event, TextDelta):
            if text:
                out.append(TextDelta(text))
        elif isinstance(event, RefusalDelta):
            if text:
                out.append(RefusalDelta(text))
        else:  # id and name come whole, with the call's first piece
            out.append(ToolCallDelta(event.index, _whole_or_none(event.id), _whole_or_none(event.name), text))
        return out

    def _release(self) -> list[Event]:
        """The half held back, which no low half followed, as U+FFFD."""
        if not self._held:
            return []
        self._held = ""
        if self._channel is _TEXT:
            return [TextDelta(REPLACEMENT)]
        if isinstance(self._channel, str):
            return [RefusalDelta(REPLACEMENT)]
        return [ToolCallDelta(self._channel, arguments=REPLACEMENT)]


def _channel_and_text(event: TextDelta | RefusalDelta | ToolCallDelta) -> tuple[Channel, str]:
    if isinstance(event, TextDelta):
        return _TEXT, event.text
    if isinstance(event, RefusalDelta):
        return _REFUSAL, event.refusal
    return event.index, event.arguments


def mended(events: list[Event]) -> list[Event]:
    """A whole answer's events (LLM.answer_at_once) with valid text."""
    mender = StreamMender()
    if all(mender.clean(event) for event in events):
        return events
    return [each for event in events for each in mender.mend(event)]
