"""Which database errors the data causes: a retry would meet them again.

SQLite's driver raises DataError or IntegrityError for a value it refuses,
and SQLAlchemy keeps those classes. SQLAlchemy's asyncpg adapter maps only
some of asyncpg's errors (integrity violations, syntax, ...): a data
exception from PostgreSQL (SQLSTATE class 22: a NUL character in text,
22021 or 22P05; a number out of range in the server's arithmetic, 22003; a
string too long, 22001; a bad datetime, 22007/22008; and 22000 for a
parameter asyncpg refuses to bind before sending, such as an int past an
int32 column's range or a lone surrogate in text) comes as a plain
DBAPIError, indistinguishable by class from a dropped connection. Its
SQLSTATE, which the adapter keeps on ``error.orig`` (``sqlstate``, also
``pgcode``), says which it is.

A refused value fails its run; everything else the database says (class
08 connection failures, 57P01 admin shutdown, 40001 serialization
failures, 55P03 lock timeouts, 53xxx out of resources...) is the
database's failure, not the run's: the run is resumed once it is back.
"""

from __future__ import annotations

from sqlalchemy.exc import DataError, DBAPIError, IntegrityError

# SQLSTATE classes of a refusal of the data itself: 22 data exception, 23
# integrity constraint violation (IntegrityError already on PostgreSQL, as
# on SQLite: listed so that the rule is stated whole).
_DATA_CLASSES = frozenset({"22", "23"})


def refused_data(error: BaseException) -> bool:
    """Whether ``error`` is the database refusing the data it was given,
    which it would refuse again, rather than failing us."""
    if isinstance(error, IntegrityError | DataError):
        return True
    if not isinstance(error, DBAPIError):
        return False
    state = getattr(error.orig, "sqlstate", None)
    return isinstance(state, str) and state[:2] in _DATA_CLASSES
