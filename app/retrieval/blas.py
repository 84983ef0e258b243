"""One BLAS thread per computing thread for the local embedders.

numpy's OpenBLAS starts a thread per core for every matrix product. The
embedders run in worker threads, two files at a time, on a machine that also
serves requests: each product then fights the others for the same cores, and
small products (a query of 20 tokens) spend more time waking threads than
computing (measured at load 10 on 2 cores: 300 ms for one query against 18 ms
with one thread). So the local embedders set OpenBLAS to one thread; the
parallelism comes from the files ingested at once. Best effort: a numpy built
on another BLAS is left as it is.
"""

from __future__ import annotations

import ctypes
import logging
from functools import cache
from pathlib import Path

import numpy as np

log = logging.getLogger("app.retrieval")

_SETTERS = ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads", "openblas_set_num_threads")


@cache
def single_threaded() -> bool:
    """Whether numpy's OpenBLAS now runs each product on one thread."""
    libraries = Path(np.__file__).parent.parent / "numpy.libs"
    for library in sorted(libraries.glob("*openblas*")):
        try:
            handle = ctypes.CDLL(str(library))
        except OSError:
            continue
        for name in _SETTERS:
            setter = getattr(handle, name, None)
            if setter is not None:
                setter(ctypes.c_int(1))
                return True
    log.debug("no OpenBLAS found beside numpy; its thread count is left as it is")
    return False
