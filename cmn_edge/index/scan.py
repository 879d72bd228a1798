"""The projected scan: every row scored in the graph's reduced space, for queries whose walk
would be deeper than reading them all.

A walk's cost grows with its depth (a cache miss per visited node: 1.5-3 us per unit of ef
at 100k items on a 2-core AVX-512 Xeon), while scoring a contiguous ``[rows, d]`` copy is
one matrix-vector product at memory speed (about 6 ns a row at d=64 there, the selection
included). How the two compare moves with the CPU's caches, so both are timed as searches
run (:class:`Costs`).
A heavily masked query needs a walk several times the plain depth, so past a crossover the
scan is faster; and since it ranks *every* row in the reduced space exactly, its top ``ef``
holds at least what a walk of depth ``ef`` finds, so the exact re-rank behind it loses no
recall. The copy costs ``4 d`` bytes a row in memory (25.6 MB at 100k, d=64) and is built
from the stored vectors on first use in a process that has served :data:`SCAN_AFTER`
searches, so a one-shot search never pays for it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np

from .projection import Projection
from .vectors import VectorRows, sequential

#: A process builds the copy only after serving this many searches (a kiosk, a benchmark):
#: building it reads every stored vector (100k items: 0.16 s from a cold disk, 0.05-0.08 s
#: from the page cache, on a 2-core AVX-512 Xeon).
SCAN_AFTER = 10
#: Seconds per unit of walk depth and per scanned row before this process has timed any
#: (a 2-core Xeon at 100k items, d=64): both are then followed as the searches run.
DEFAULT_WALK_PER_EF = 1.5e-6
DEFAULT_SCAN_PER_ROW = 6.5e-9
#: Weight of the newest timing in the running averages.
SMOOTHING = 0.05
#: The top of a scan is found past a threshold read off every SAMPLE_STRIDE-th score.
SAMPLE_STRIDE = 64
#: Rows projected at a time when the copy is built (bounds the temporary memory).
BUILD_CHUNK = 16384


class Costs:
    """What a walk costs per unit of depth and a scan per row, on this machine, in this
    process: timed on the searches themselves, since the ratio moves several-fold between
    CPUs (a copy that fits the cache against one that streams from memory)."""

    def __init__(self) -> None:
        self.walk_per_ef = DEFAULT_WALK_PER_EF
        self.scan_per_row = DEFAULT_SCAN_PER_ROW

    def walked(self, depth: int, seconds: float) -> None:
        self.walk_per_ef += SMOOTHING * (seconds / max(depth, 1) - self.walk_per_ef)

    def scanned(self, rows: int, seconds: float) -> None:
        self.scan_per_row += SMOOTHING * (seconds / max(rows, 1) - self.scan_per_row)

    def scan_pays(self, depth: int, rows: int) -> bool:
        return depth * self.walk_per_ef > rows * self.scan_per_row


class ProjectedRows:
    """The stored vectors under one projection, a contiguous float32 ``[rows, d]``, kept in
    step as rows are appended (rows are never renumbered within a checkpoint generation; a
    new generation starts a new view, and with it a new copy).

    One pass over all ``d`` directions, not a coarse pass over the leading half and a
    second over the best few: on a gallery whose spectrum is flat (the tests' clustered
    vectors) the coarse pass lost a tenth of recall@10 unless it kept 16x the rows asked
    for, and then it saved nothing at 100k items."""

    def __init__(self, projection: Projection) -> None:
        self.projection = projection
        self.array = np.zeros((0, projection.dims), dtype=np.float32)
        self.rows = 0
        self._dead: tuple[tuple[int, int], np.ndarray] = ((-1, -1), np.zeros(0, np.int64))
        self._growing = threading.Lock()  # readers share a view: one of them extends it

    def follow(self, rows: VectorRows) -> None:
        """Project the rows appended since the last call."""
        if len(rows) <= self.rows:
            return
        with self._growing:
            total = len(rows)
            array = self.array
            if total > len(array):
                array = np.zeros((max(total, len(array) * 5 // 4), array.shape[1]), np.float32)
                array[: self.rows] = self.array[: self.rows]
            for first, segment in rows.segments():
                with sequential(segment):
                    for s in range(max(self.rows - first, 0), len(segment), BUILD_CHUNK):
                        block = segment[s : s + BUILD_CHUNK]
                        array[first + s : first + s + len(block)] = self.projection.to_graph(block)
            self.array, self.rows = array, total

    def dead_rows(self, row_ids: np.ndarray, live: int) -> np.ndarray:
        """Rows whose item was removed or re-embedded since the checkpoint. Within a
        generation rows only grow and, for a given row count, live items only fall, so
        (rows, live) names the set, and it is recomputed only when that pair changes."""
        key = (self.rows, live)
        cached_key, dead = self._dead
        if key != cached_key:
            dead = np.flatnonzero(row_ids[: self.rows] < 0)
            self._dead = (key, dead)
        return dead

    def ranking(
        self, query: np.ndarray, skip: np.ndarray, costs: Costs
    ) -> Callable[[int], np.ndarray]:
        """``top(fetch)``: rows of the ``fetch`` best reduced-space scores of ``query``
        (already projected), best first, leaving out the rows ``skip``. The scan runs once;
        a deeper ``top`` (a renormalised query fetching more) reuses it."""
        rows = self.rows
        start = time.perf_counter()
        scores = self.array[:rows] @ query
        costs.scanned(rows, time.perf_counter() - start)
        if len(skip):
            scores[skip] = -np.inf

        def top(fetch: int) -> np.ndarray:
            fetch = min(int(fetch), rows - len(skip))
            if fetch <= 0:
                return np.zeros(0, dtype=np.int64)
            best = _best(scores, fetch)
            return best[np.argsort(-scores[best], kind="stable")].astype(np.int64)

        return top


def _best(scores: np.ndarray, fetch: int) -> np.ndarray:
    """Positions of the ``fetch`` largest scores, in no order.

    A partition of every score costs a quarter of the scan at 100k rows; a threshold read off
    every 64th score keeps about 1.25 times ``fetch`` of them in one comparison pass, and only
    those are partitioned (a threshold that kept too few, as on rows sorted by score, falls
    back to the full partition).
    """
    n = len(scores)
    if fetch >= n:
        return np.arange(n)
    sample = scores[::SAMPLE_STRIDE]
    rank = 5 * fetch // (4 * SAMPLE_STRIDE) + 8
    if rank < len(sample) // 2:
        threshold = np.partition(sample, len(sample) - rank)[len(sample) - rank]
        kept = np.flatnonzero(scores >= threshold)
        if len(kept) >= fetch:
            part = np.argpartition(scores[kept], len(kept) - fetch)[len(kept) - fetch :]
            return kept[part]
    return np.argpartition(scores, n - fetch)[n - fetch :]


__all__ = ["SCAN_AFTER", "Costs", "ProjectedRows"]
