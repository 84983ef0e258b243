"""Text made valid Unicode: each surrogate pair joined into its character,
each lone half replaced by U+FFFD (why a model's text can hold one:
unicode_text.py). A leaf module, so that LLMError (interface.py) mends its
message wherever it is raised, as the stream mender mends a stream's text.
"""

from __future__ import annotations

import re

REPLACEMENT = "\ufffd"
_SURROGATE = re.compile("[\ud800-\udfff]")


def valid(text: str) -> bool:
    """Whether ``text`` has no surrogate. ``isascii`` reads a flag the str
    keeps (no scan): an ASCII delta, the common case, costs about 20 ns
    against the pattern's 150 ns for 6 characters, 1.2 us for 200."""
    return text.isascii() or _SURROGATE.search(text) is None


def whole(text: str) -> str:
    """``text`` with each surrogate pair joined into its character and each
    lone half replaced by U+FFFD."""
    if valid(text):
        return text
    # UTF-16 takes the halves as code units ("surrogatepass"); decoding
    # them joins the pairs and replaces what is left alone.
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
