"""OpenAI-style prefixed ids that carry a monotonic sequence.

An id is ``prefix + base62(seq, 11 chars) + 13 random base62 chars``. The
sequence is nanoseconds since the epoch, made strictly increasing within a
process, so:
- lists order by ``seq`` stably even within one second (created_at has 1 s
  resolution), and
- a pagination cursor (``after``/``before``) decodes to its position without a
  lookup, so paging keeps working when the cursor object was just deleted (the
  common "list and delete everything" loop).
"""

from __future__ import annotations

import secrets
import threading
import time

ASSISTANT = "asst_"
THREAD = "thread_"
MESSAGE = "msg_"
RUN = "run_"
STEP = "step_"
CALL = "call_"
FILE = "file-"
VECTOR_STORE = "vs_"
FILE_BATCH = "vsfb_"

_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_INDEX = {char: i for i, char in enumerate(_ALPHABET)}
_SEQ_WIDTH = 11
_RANDOM_WIDTH = 13

_lock = threading.Lock()
_last_seq = 0


def next_seq() -> int:
    """A strictly increasing nanosecond timestamp (per process)."""
    global _last_seq
    with _lock:
        _last_seq = max(time.time_ns(), _last_seq + 1)
        return _last_seq


def _encode(number: int, width: int) -> str:
    chars = []
    for _ in range(width):
        number, rem = divmod(number, 62)
        chars.append(_ALPHABET[rem])
    return "".join(reversed(chars))


_RANDOM_RANGE = 62**_RANDOM_WIDTH


def new_id(prefix: str, seq: int | None = None) -> str:
    seq = next_seq() if seq is None else seq
    # One draw from the system's randomness, uniform over the 13 base62
    # characters (issue 17: a draw per character was 13 reads of os.urandom).
    suffix = _encode(secrets.randbelow(_RANDOM_RANGE), _RANDOM_WIDTH)
    return prefix + _encode(seq, _SEQ_WIDTH) + suffix


def seq_of(prefix: str, object_id: str) -> int | None:
    """The sequence encoded in an id we issued, or None if it is not one of ours."""
    body = object_id[len(prefix) :]
    if not object_id.startswith(prefix) or len(body) != _SEQ_WIDTH + _RANDOM_WIDTH:
        return None
    value = 0
    for char in body[:_SEQ_WIDTH]:
        digit = _INDEX.get(char)
        if digit is None:
            return None
        value = value * 62 + digit
    if any(char not in _INDEX for char in body[_SEQ_WIDTH:]):
        return None
    return value


def seconds(seq: int) -> int:
    """Unix seconds (the wire's created_at) of a sequence value."""
    return seq // 1_000_000_000


def now() -> int:
    return int(time.time())
