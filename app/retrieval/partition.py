"""An inverted-file (IVF) partition of a store's cached vector matrix, so that a
search on SQLite scans a few percent of a large store instead of all of it.

Why: at 100k chunks the cached matrix is ~154 MB of float32 and one exact
product over it takes 10-14 ms, bound by memory bandwidth, not arithmetic.
Here the rows are clustered by spherical k-means (centroids trained on a
sample, every row then assigned to its nearest centroid) and the matrix is
reordered so that each cluster's rows are contiguous. A search ranks the
centroids by the query (a few hundred dot products), scans the rows of the
nearest clusters until ``PROBE_FRACTION`` of the store (and enough rows that
pass the filter) has been seen, and ranks those rows by their exact cosine: a
row the search returns carries the same score as in a full scan; what can be
missed is a row whose cluster was not probed.

Small stores (below ``MIN_ROWS``) are not partitioned: the full product costs
less than a millisecond or two there, and its result is exact.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

Array = np.ndarray[Any, np.dtype[np.float32]]
Indices = np.ndarray[Any, np.dtype[np.int64]]

MIN_ROWS = 20_000
# The share of the store a search scans at least (nearest clusters first).
PROBE_FRACTION = 0.06
MIN_PROBES = 8
# Clusters: about sqrt(rows), so that ranking the centroids costs about as
# much as scanning one cluster.
ROWS_PER_LIST = 1.0
TRAIN_ROWS_PER_LIST = 48
ITERATIONS = 8
ASSIGN_BATCH = 8192
SEED = 18


@dataclass(frozen=True)
class Partition:
    centroids: Array  # (lists, dimensions), unit rows
    offsets: Indices  # (lists + 1,): the rows of list i are offsets[i]:offsets[i + 1]
    trained_rows: int  # rows of the store when the centroids were trained

    @property
    def nbytes(self) -> int:
        return int(self.centroids.nbytes + self.offsets.nbytes)

    def ranges(self, query: Array) -> Iterator[tuple[int, int]]:
        """Row ranges of the non-empty lists, nearest centroid first."""
        order = np.argsort(-np.einsum("ij,j->i", self.centroids, query), kind="stable")
        for position in order:
            start, end = int(self.offsets[position]), int(self.offsets[position + 1])
            if end > start:
                yield start, end


def list_count(rows: int) -> int:
    return max(1, round(math.sqrt(rows) * ROWS_PER_LIST))


def _unit_rows(matrix: Array) -> Array:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    unit: Array = (matrix / norms).astype(np.float32)
    return unit


def assign(vectors: Array, centroids: Array) -> Indices:
    """The nearest centroid (largest dot product) of every row, in batches
    (a batch's score block is ASSIGN_BATCH x lists floats)."""
    labels = np.empty(len(vectors), dtype=np.int64)
    for start in range(0, len(vectors), ASSIGN_BATCH):
        labels[start : start + ASSIGN_BATCH] = np.argmax(vectors[start : start + ASSIGN_BATCH] @ centroids.T, axis=1)
    return labels


def train(vectors: Array, lists: int) -> Array:
    """Spherical k-means on a sample of the rows (deterministic: fixed seed).
    A cluster left empty is re-seeded with a random sample row."""
    rng = np.random.default_rng(SEED)
    sample_size = min(len(vectors), lists * TRAIN_ROWS_PER_LIST)
    sample = vectors[np.sort(rng.choice(len(vectors), size=sample_size, replace=False))]
    centroids = sample[rng.choice(sample_size, size=min(lists, sample_size), replace=False)].copy()
    for _ in range(ITERATIONS):
        labels = assign(sample, centroids)
        sums = np.zeros_like(centroids)
        np.add.at(sums, labels, sample)
        empty = ~np.bincount(labels, minlength=len(centroids)).astype(bool)
        if empty.any():
            sums[empty] = sample[rng.choice(sample_size, size=int(empty.sum()), replace=False)]
        centroids = _unit_rows(sums)
    return centroids


def build(vectors: Array, centroids: Array | None = None, trained_rows: int = 0) -> tuple[Indices, Partition]:
    """(the row order that makes each list contiguous, the partition). Given
    centroids (from an earlier version of the same store) are reused: a store
    that grows or shrinks a little keeps its clusters, and assigning rows is
    a fraction of training them."""
    if centroids is None or centroids.shape[1] != vectors.shape[1]:
        centroids, trained_rows = train(vectors, list_count(len(vectors))), len(vectors)
    labels = assign(vectors, centroids)
    order: Indices = np.argsort(labels, kind="stable")
    counts = np.bincount(labels, minlength=len(centroids))
    offsets: Indices = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return order, Partition(centroids, offsets, trained_rows)


def permute_rows(matrix: Array, order: Indices) -> None:
    """``matrix[i] = matrix[order[i]]`` for every row, in place, cycle by
    cycle: reordering a 154 MB matrix by fancy indexing would hold a second
    copy of it (~0.1 s of CPU at 100k rows this way)."""
    targets = order.tolist()
    done = bytearray(len(targets))
    for start, first_source in enumerate(targets):
        if done[start] or first_source == start:
            continue
        saved = matrix[start].copy()
        position = start
        while True:
            done[position] = 1
            source = targets[position]
            if source == start:
                matrix[position] = saved
                break
            matrix[position] = matrix[source]
            position = source


def worth_retraining(partition: Partition, rows: int) -> bool:
    """Whether the store has changed size so much that its clusters should be trained anew."""
    return not (partition.trained_rows / 2 <= rows <= partition.trained_rows * 2)
