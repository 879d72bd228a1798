"""The projected scan: every row scored in the graph's reduced space, for queries whose walk
would be deeper than reading them all.

A walk's cost grows with its depth (a cache miss per visited node: 1.5-3 us per unit of ef
at 100k items on 2-core AVX-512 machines), while scoring a contiguous copy of every row is
one pass at memory speed. The copy holds 7-bit codes of the rows (:class:`ProjectedRows`),
64 bytes a row at d=64, scored by onnxruntime's INT8 GEMM: about 1.5 ns a row on a 2-core
AVX-512 VNNI EPYC, selection included, against 5-6 ns for a float32 copy. How a scan and a
walk compare moves with the CPU's caches and INT8 kernels, so both are timed as searches
run (:class:`Costs`).
A heavily masked query needs a walk several times the plain depth, so past a crossover the
scan is faster; and since it ranks *every* row in the reduced space (to within the codes'
rounding), its top ``ef`` holds about what a walk of depth ``ef`` finds, and the exact
re-rank behind it scores them exactly. The copy costs ``d`` bytes a row in memory (6.4 MB
at 100k, d=64) and is built from the stored vectors on first use in a process that has
served :data:`SCAN_AFTER` searches, so a one-shot search never pays for it.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np

from .projection import Projection
from .vectors import VectorRows, sequential

#: A process builds the copy only after serving this many searches (a kiosk, a benchmark):
#: building it reads every stored vector (100k items: 0.16 s from a cold disk, 0.05-0.08 s
#: from the page cache, on a 2-core AVX-512 Xeon).
SCAN_AFTER = 10
#: Seconds per unit of walk depth and per scanned row before this process has timed any
#: (2-core AVX-512 machines at 100k items, d=64): both are then followed as the searches
#: run. The scan's is the low end of what was measured: a scan is timed only when it is
#: taken, so a guess too high would never be corrected, one too low is after a few scans.
DEFAULT_WALK_PER_EF = 1.5e-6
DEFAULT_SCAN_PER_ROW = 1.5e-9
#: Weight of the newest timing in the running averages.
SMOOTHING = 0.05
#: The top of a scan is found past a threshold read off every SAMPLE_STRIDE-th score.
SAMPLE_STRIDE = 64
#: Rows projected at a time when the copy is built (bounds the temporary memory).
BUILD_CHUNK = 16384
#: The copy reserves an eighth more columns than it holds, so appended rows are coded in
#: place; the scan reads the spare columns too (they score zero), at most 1/8 more work.
GROWTH_DIVISOR = 8
#: Codes span +-CODE_MAX: on x86 without VNNI onnxruntime's U8S8 kernel adds pairs of u8 x s8
#: products in 16-bit lanes with saturation (:mod:`cmn_edge.cpu`), and 2 x 255 x 63 = 32130
#: stays below 32767, so every CPU computes the same exact integer scores.
CODE_MAX = 63
#: The query is coded as QUERY_OFFSET + round(QUERY_MAX * value / peak): a u8 in 1..255.
QUERY_MAX = 127
QUERY_OFFSET = 128
#: The coded score of a row the scan must leave out: below any real one (onnxruntime's raw
#: sums are at most 255 x 63 x d, within int32 for any d below 130,000).
SKIPPED = np.iinfo(np.int32).min + 1
#: The one-MatMulInteger graph, package data (built by ``cmn_export.scan_graph``).
SCAN_GRAPH = "scan_int8.onnx"


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
    """The stored vectors under one projection, as 7-bit codes ``[d, capacity]`` (rows
    transposed, unused columns zero), kept in step as rows are appended (rows are never
    renumbered within a checkpoint generation; a new generation starts a new view, and
    with it a new copy).

    Codes, not float32: the float32 copy's matrix-vector pass read 256 bytes a row and was
    bound by memory (0.53-0.64 ms at 100k rows, d=64, on 2-core AVX-512 machines); 64 bytes
    a row through onnxruntime's INT8 GEMM took 0.08-0.15 ms. Each dimension is coded
    between the least and the greatest value the rows had when the codes were fitted (a
    per-dimension offset adds the same to every row's score, so it drops out of the order);
    the order is therefore approximate, and the re-rank behind the scan scores its ``fetch``
    rows exactly. Rows appended later are clipped to that range until the rows have
    doubled, when the codes are fitted again.

    One pass over all ``d`` directions, not a coarse pass over the leading half and a
    second over the best few: on a gallery whose spectrum is flat (the tests' clustered
    vectors) the coarse pass lost a tenth of recall@10 unless it kept 16x the rows asked
    for, and then it saved nothing at 100k items."""

    def __init__(self, projection: Projection) -> None:
        self.projection = projection
        self.coded = _Codes.empty(projection.dims, 0)
        self._dead: tuple[tuple[int, int], np.ndarray] = ((-1, -1), np.zeros(0, np.int64))
        self._growing = threading.Lock()  # readers share a view: one of them extends it

    @property
    def rows(self) -> int:
        return self.coded.rows

    def follow(self, rows: VectorRows) -> None:
        """Code the rows appended since the last call (all of them when the rows have
        doubled since the codes were fitted). A scan under way keeps the codes it read:
        new ones are published whole, by one assignment."""
        if len(rows) <= self.rows:
            return
        with self._growing:
            total, coded = len(rows), self.coded
            if total >= 2 * coded.fitted_rows:
                coded = self._fit(rows, total + total // GROWTH_DIVISOR)
            elif total > coded.capacity:
                coded = coded.reserve(total + total // GROWTH_DIVISOR)
            for first, graph in self._projected(rows, coded.rows):
                coded.write(first, graph)
            self.coded = dataclasses.replace(coded, rows=total)

    def _projected(self, rows: VectorRows, start: int) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, rows in the graph's space) from row ``start`` on, BUILD_CHUNK at a
        time, each segment read in order."""
        for first, segment in rows.segments():
            with sequential(segment):
                for s in range(max(start - first, 0), len(segment), BUILD_CHUNK):
                    yield first + s, self.projection.to_graph(segment[s : s + BUILD_CHUNK])

    def _fit(self, rows: VectorRows, capacity: int) -> _Codes:
        """Empty codes over the range of every dimension in all rows: a pass of its own,
        so no row read later in the coding pass is clipped."""
        low = np.full(self.projection.dims, np.inf, np.float32)
        high = np.full(self.projection.dims, -np.inf, np.float32)
        for _first, graph in self._projected(rows, 0):
            low = np.minimum(low, graph.min(axis=0))
            high = np.maximum(high, graph.max(axis=0))
        step = (np.maximum(high - low, 1e-12) / (2 * CODE_MAX)).astype(np.float32)
        return dataclasses.replace(
            _Codes.empty(self.projection.dims, capacity), low=low, step=step, fitted_rows=len(rows)
        )

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
        """``top(fetch)``: rows of the ``fetch`` best coded scores of ``query`` (already
        projected), best first, leaving out the rows ``skip``. The scan runs once; a deeper
        ``top`` (a renormalised query fetching more) reuses it."""
        coded = self.coded
        rows = coded.rows
        start = time.perf_counter()
        weighted = query * coded.step  # the score's part that differs between rows
        peak = float(np.abs(weighted).max())
        scale = QUERY_MAX / peak if peak > 0 else 0.0
        query_codes = (np.rint(weighted * scale) + QUERY_OFFSET).astype(np.uint8)[None, :]
        raw = _session().run(None, {"query": query_codes, "codes": coded.codes})[0][0, :rows]
        scores = raw - coded.offsets[:rows]
        costs.scanned(rows, time.perf_counter() - start)
        if len(skip):
            scores[skip] = SKIPPED

        def top(fetch: int) -> np.ndarray:
            fetch = min(int(fetch), rows - len(skip))
            if fetch <= 0:
                return np.zeros(0, dtype=np.int64)
            best = _best(scores, fetch)
            return best[np.argsort(-scores[best], kind="stable")].astype(np.int64)

        return top


@dataclasses.dataclass(frozen=True)
class _Codes:
    """One published state of the copy. ``codes[:, :rows]`` are the rows, the columns past
    them are zero (rows appended later are written there in place: no scan reads them
    before ``rows`` is raised in a new state)."""

    codes: np.ndarray  # int8 [d, capacity]
    #: QUERY_OFFSET x the sum of each row's codes: the scan graph has no zero point, so the
    #: query's offset is taken off the scores with these
    offsets: np.ndarray  # int32 [capacity]
    low: np.ndarray  # float32 [d]: the value coded -CODE_MAX
    step: np.ndarray  # float32 [d]: one code
    rows: int = 0
    fitted_rows: int = 0

    @classmethod
    def empty(cls, dims: int, capacity: int) -> _Codes:
        return cls(
            np.zeros((dims, capacity), np.int8),
            np.zeros(capacity, np.int32),
            np.zeros(dims, np.float32),
            np.ones(dims, np.float32),
        )

    @property
    def capacity(self) -> int:
        return int(self.codes.shape[1])

    def reserve(self, capacity: int) -> _Codes:
        grown = _Codes.empty(len(self.low), capacity)
        grown.codes[:, : self.rows] = self.codes[:, : self.rows]
        grown.offsets[: self.rows] = self.offsets[: self.rows]
        return dataclasses.replace(self, codes=grown.codes, offsets=grown.offsets)

    def write(self, first: int, graph: np.ndarray) -> None:
        codes = np.rint((graph - self.low) / self.step) - CODE_MAX
        codes = np.clip(codes, -CODE_MAX, CODE_MAX).astype(np.int8)
        self.codes[:, first : first + len(codes)] = codes.T
        self.offsets[first : first + len(codes)] = QUERY_OFFSET * codes.sum(axis=1, dtype=np.int32)


@functools.cache
def _session():
    """The scan graph's session, one a process (onnxruntime's ``run`` is thread-safe)."""
    import onnxruntime as ort  # the runtime's own dependency; imported when first scanned

    options = ort.SessionOptions()
    options.log_severity_level = 3
    # one thread, no pool: two threads scanned 100k rows in 0.08 ms instead of 0.15, but
    # their spinning between scans burned a core a kiosk needs for decoding and embedding
    # (0.48 s of CPU in 0.45 s of wall time over 200 scans 2 ms apart, against 0.07 s)
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    graph = (importlib.resources.files(__package__) / SCAN_GRAPH).read_bytes()
    return ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])


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
