"""Ids: the encoded sequence reads back, the random digits are base62 and
not shared with a forked child."""

from __future__ import annotations

import contextlib
import os
import random
import signal

import pytest

from app import ids


def _digit_by_digit(number: int, width: int) -> str:
    """Base62 one digit at a time: what ``ids._encode`` must agree with."""
    digits = []
    for _ in range(width):
        number, rem = divmod(number, 62)
        digits.append(ids._ALPHABET[rem])
    return "".join(reversed(digits))


def test_encode_agrees_with_base62_digit_by_digit() -> None:
    rng = random.Random(17)  # noqa: S311 (test inputs, not secrets)
    for width in (1, 2, 11, 13):
        for bits in (0, 6, 40, 64, 80, 120):
            number = rng.getrandbits(bits) if bits else 0
            assert ids._encode(number, width) == _digit_by_digit(number, width)


def test_new_id_carries_its_sequence_and_random_base62_digits() -> None:
    made = [ids.new_id(ids.RUN) for _ in range(2000)]
    assert len(set(made)) == len(made)
    seqs = [ids.seq_of(ids.RUN, made_id) for made_id in made]
    assert all(seq is not None for seq in seqs) and seqs == sorted(seqs)
    suffixes = "".join(made_id[len(ids.RUN) + ids._SEQ_WIDTH :] for made_id in made)
    assert len(suffixes) == 2000 * ids._RANDOM_WIDTH
    # 26,000 digits: every one of the 62 appears (each about 419 times).
    assert set(suffixes) == set(ids._ALPHABET)


def _id_made_in_a_forked_child(seq: int | None, *, holding_the_lock: bool = False) -> str:
    """The id a child forked here makes (``holding_the_lock``: forked while
    this thread holds the ids' lock, as another thread of a server might).
    Whatever happens in the child, it ends there: never back into pytest."""
    read, write = os.pipe()
    with ids._lock if holding_the_lock else contextlib.nullcontext():
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                signal.alarm(10)  # a deadlocked child ends, and the parent sees no id
                os.close(read)
                os.write(write, ids.new_id(ids.RUN, seq).encode())
                status = 0
            finally:
                os._exit(status)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        made = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and made.startswith(ids.RUN), made
    return made


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_does_not_reuse_the_parents_random_digits() -> None:
    ids.new_id(ids.RUN)  # the pool now holds digits the parent has not used
    assert _id_made_in_a_forked_child(0) != ids.new_id(ids.RUN, 0)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_child_forked_while_the_id_lock_is_held_still_makes_ids() -> None:
    """Another thread of the parent holding the ids' lock at the fork (here
    the test itself): the child's copy of that lock would never be released."""
    _id_made_in_a_forked_child(None, holding_the_lock=True)
