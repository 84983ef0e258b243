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

import os
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


# Every pair of base62 digits, by value: an 11-digit sequence is 6 divmods
# instead of 11 (issue 17).
_PAIRS = tuple(high + low for high in _ALPHABET for low in _ALPHABET)


def _encode(number: int, width: int) -> str:
    """``number`` in base62, ``width`` digits (the highest ones dropped)."""
    pairs = []
    for _ in range(width // 2):
        number, rem = divmod(number, 3844)
        pairs.append(_PAIRS[rem])
    if width % 2:
        pairs.append(_ALPHABET[number % 62])
    return "".join(reversed(pairs))


# Random bytes to base62 digits: a byte below 248 (4 x 62) is the digit of its
# value modulo 62, each digit from four byte values, so uniform; the 8 others
# are dropped.
_DIGIT_OF_BYTE = bytes(ord(_ALPHABET[value % 62]) for value in range(248)) + bytes(8)
_DROPPED = bytes(range(248, 256))
_POOL_BYTES = 4096
_pool = ""
_taken = 0


def _random_digits(count: int) -> str:
    """``count`` uniformly random base62 digits from the system's randomness,
    drawn 4 KiB at a time (issue 17: a draw per id was a system call and a
    rejection loop over a 78-bit integer, 9 µs an id)."""
    global _pool, _taken
    with _lock:
        while len(_pool) - _taken < count:
            _pool = _pool[_taken:] + os.urandom(_POOL_BYTES).translate(_DIGIT_OF_BYTE, _DROPPED).decode("ascii")
            _taken = 0
        digits = _pool[_taken : _taken + count]
        _taken += count
    return digits


def _forget_pool() -> None:
    """A forked child draws its own digits: the parent's unused ones would
    otherwise be used by both. Its lock is new too: another thread of the
    parent may have held it at the fork, and no thread of the child will
    ever release that copy."""
    global _pool, _taken, _lock
    _pool, _taken = "", 0
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_pool)


def new_id(prefix: str, seq: int | None = None) -> str:
    seq = next_seq() if seq is None else seq
    return prefix + _encode(seq, _SEQ_WIDTH) + _random_digits(_RANDOM_WIDTH)


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
