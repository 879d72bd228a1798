"""The search paths: exact (numpy), graph + exact re-rank, renormalised over-fetch, and the
exact scan of the tail (items changed since the last graph checkpoint), merged.

Every hit is re-scored from the stored float32 vectors, so a graph result and an exact one
agree on every score they share, whichever path found the item.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping

import numpy as np

from .errors import ConceptIndexError
from .plan import Plan, checked_k
from .scan import SCAN_AFTER, ProjectedRows

CHUNK = 32768
#: Scores held at once by a batch of exact searches (rows x queries): 64 MiB of float32.
BATCH_SCORES = 16 * 2**20


class SearchMixin:
    """Needs the view attributes of :class:`~cmn_edge.index.core.ConceptIndex`."""

    def _search_unlocked(
        self,
        q: np.ndarray,
        k: int,
        plan: Plan,
        where: Mapping[str, object] | None,
        exact: bool,
        exclude_ids: set[int],
    ) -> tuple[np.ndarray, np.ndarray]:
        k = checked_k(k)
        live = self._live
        if live == 0:
            raise ConceptIndexError(f"{self._where()}: the index is empty")
        exclude_ids = {i for i in exclude_ids if self._has(i)}
        searchable = live - len(exclude_ids)
        if searchable <= 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        k = min(k, searchable)  # the caller says so when it asked for more than there is
        subset = None
        if where:
            subset = self._ids_where(where) - exclude_ids
            subset = {i for i in subset if self._has(i)}  # a reader's view may lag the database
            if not subset:
                return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        qh = self._walk_vector(q, plan)
        size = len(subset) if subset is not None else searchable
        tail = self._tail_rows()
        in_graph = live - len(tail)
        if exact or size <= self.exact_below or self._graph is None or in_graph <= 0:
            if subset is not None:
                rows = self._id_rows[np.fromiter(subset, dtype=np.int64, count=len(subset))]
                return self._exact_unlocked(q, k, plan, rows)
            return self._exact_unlocked(q, k, plan, None, exclude_ids)
        depth = self._query_ef(q, qh, k, plan)
        scan = self._scan_copy(depth) if subset is None else None
        if scan is not None:  # every row, the tail's included: nothing to merge
            return self._scan_search(q, qh, k, plan, scan, depth, exclude_ids)
        graph_ids, graph_scores = self._graph_search(
            q, qh, k, plan, subset, exclude_ids, in_graph, depth
        )
        if not len(tail):
            return graph_ids, graph_scores
        tail_ids = self._row_ids[tail]
        keep = ~np.isin(tail_ids, np.fromiter(exclude_ids, np.int64, len(exclude_ids)))
        if subset is not None:
            keep &= np.isin(tail_ids, np.fromiter(subset, np.int64, len(subset)))
        tail_ids, tail_scores = self._exact_unlocked(q, k, plan, tail[keep])
        return self._merge(graph_ids, graph_scores, tail_ids, tail_scores, k)

    def _merge(self, ids_a, scores_a, ids_b, scores_b, k: int):
        """Top k of two exactly scored lists; an item in both (updated since the checkpoint)
        carries the same exact score in each, so it is kept once."""
        ids = np.concatenate([ids_a, ids_b])
        scores = np.concatenate([scores_a, scores_b])
        ids, first = np.unique(ids, return_index=True)
        scores = scores[first]
        order = self._top_k(scores, ids, k)
        return ids[order], scores[order]

    def _scan_copy(self, depth: int) -> ProjectedRows | None:
        """The projected copy when scanning it beats a walk ``depth`` deep, else None."""
        if (
            self._projection is None
            or self._walk_only
            or self._searches < SCAN_AFTER
            or not self._costs.scan_pays(depth, len(self._rows))
        ):
            return None
        if self._scan is None or self._scan.projection is not self._projection:
            self._scan = ProjectedRows(self._projection)
        self._scan.follow(self._rows)
        return self._scan

    def _scan_search(self, q, qh, k, plan, scan, depth, exclude_ids):
        dead = scan.dead_rows(self._row_ids, self._live)
        if exclude_ids:
            rows = self._id_rows[np.fromiter(exclude_ids, dtype=np.int64, count=len(exclude_ids))]
            dead = np.union1d(dead, rows[rows >= 0])
        top = scan.ranking(self._projection.matrix @ qh, dead, self._costs)
        if plan.renormalize:
            limit = self._live - len(exclude_ids)
            return self._renormalized_unlocked(q, qh, k, plan, limit, depth, top, None, exclude_ids)
        return self._exact_unlocked(q, k, plan, top(depth))

    def _graph_search(self, q, qh, k, plan, subset, exclude_ids, in_graph, depth):
        # a where-subset filters inside the graph walk; a few excluded ids are cheaper to
        # over-fetch and drop afterwards than a Python callback on every visited node
        filt = subset.__contains__ if subset is not None else None
        drop = exclude_ids if subset is None else set()
        limit = len(subset) if subset is not None else in_graph
        ef = depth + len(drop)
        try:
            if plan.renormalize:

                def walk(fetch: int) -> np.ndarray:
                    return self._candidate_rows(self._knn(qh, fetch, filt), drop)

                return self._renormalized_unlocked(q, qh, k, plan, limit, ef, walk, subset, drop)
            labels = self._knn(qh, min(ef, limit), filt)
            return self._exact_unlocked(q, k, plan, self._candidate_rows(labels, drop))
        except RuntimeError:  # the graph walk found fewer than asked: brute force instead
            if subset is not None:
                ids = np.fromiter(subset, dtype=np.int64, count=len(subset))
                return self._exact_unlocked(q, k, plan, self._id_rows[ids])
            return self._exact_unlocked(q, k, plan, None, exclude_ids)

    def _query_ef(self, q: np.ndarray, qh: np.ndarray, k: int, plan: Plan) -> int:
        """Search depth: the base ef, deepened by how much of the query the graph cannot see.

        A mask turns the query away from the data the graph was built on (``cos(q, q*w)``,
        exponent tuned by calibration; renormalised masks have their own, since ranking by
        masked cosine from a walk that ranks by masked inner product needs a deeper walk,
        and one exponent for both made every excluding query walk as deep). A reduced graph
        sees only the query's part in its directions: compared with how much it sees of a
        typical gallery item under the same mask, a query unlike the gallery is searched
        deeper, steeply (an unlike query needed about (1/seen)^4 the depth to reach the
        recall of a typical one).
        """
        ef = float(max(self.ef, k))
        if qh is not q:
            cos = float(q @ qh) / (float(np.linalg.norm(qh)) + 1e-30)
            power = self.renorm_ef_power if plan.renormalize else self.mask_ef_power
            ef /= max(cos, 1e-3) ** power
        if self._projection is not None:
            w = None
            if plan.weights is not None:
                w = plan.weights * plan.weights if plan.renormalize else plan.weights
            seen = self._projection.capture(qh) / self._projection.typical_capture(w)
            ef /= max(min(seen, 1.0), 1e-3) ** 4
        return int(min(max(math.ceil(ef), k), max(self.max_ef, k)))

    def _knn(self, qh: np.ndarray, fetch: int, filt) -> np.ndarray:
        qg = qh if self._projection is None else self._projection.matrix @ qh
        start = time.perf_counter()
        labels = self._graph.knn(qg, fetch, filt)
        if filt is None:  # a filtered walk's cost is the filter's as much as the depth's
            self._costs.walked(fetch, time.perf_counter() - start)
        return labels

    def _candidate_rows(self, labels: np.ndarray, drop: set[int]) -> np.ndarray:
        if drop:
            labels = labels[~np.isin(labels, np.fromiter(drop, dtype=np.int64))]
        return self._id_rows[labels]

    def _renormalized_unlocked(
        self,
        q: np.ndarray,
        qh: np.ndarray,
        k: int,
        plan: Plan,
        limit: int,
        ef: int,
        candidates: Callable[[int], np.ndarray],
        subset: set[int] | None = None,
        drop: set[int] = frozenset(),
    ) -> tuple[np.ndarray, np.ndarray]:
        """Over-fetch by masked inner product, re-rank by masked cosine; fetch deeper until safe.

        ``candidates(fetch)``: rows of the first ``fetch`` by masked inner product, from a
        walk or from the projected scan.

        Safe: either a bound proves no unfetched item can beat the k-th (its masked inner
        product is at most the last fetched one's, and its masked norm at least
        ``_min_masked_norm``; full-concept graphs only), or the current top k all rank in the
        first three quarters of the fetched list by exact masked inner product, so the tail
        that was fetched added nothing and a deeper one is unlikely to. (The first half, as
        this rule was, sent 10% of 50%-masked queries at 100k items on a second, twice as
        deep walk for +0.0005 recall@10, and set p99 at 8 ms against 3-4.)
        """
        fetch = max(ef, self.overfetch * k)
        qn = float(np.linalg.norm(q * plan.weights))
        while True:
            if fetch * 2 >= limit:  # the walk would visit most of the gallery: brute force
                if subset is None:
                    return self._exact_unlocked(q, k, plan, None, drop)
                ids = np.fromiter(subset, dtype=np.int64, count=len(subset))
                return self._exact_unlocked(q, k, plan, self._id_rows[ids])
            rows = candidates(fetch)
            rows = rows[rows >= 0]
            # one gather of the candidates serves both orders: the masked cosine and, since
            # the query side of that cosine is qh / ||q*w||, the masked inner product
            scores, ip = self._renormalized_scores(q, plan, self._rows.gather(rows))
            top = self._top_k(scores, self._row_ids[rows], k)
            rank = np.empty(len(ip), dtype=np.int64)
            rank[np.argsort(-ip, kind="stable")] = np.arange(len(ip))
            last_ip = float(ip.min()) * qn if len(ip) else 0.0
            if self._projection is not None:
                bound = math.inf  # the graph's own order is approximate there: no proof
            elif last_ip <= 0:
                bound = 0.0
            else:
                bound = last_ip / (qn * max(self._min_masked_norm(plan.weights), 1e-12))
            deepest = int(rank[top].max()) if len(top) else 0
            if (
                not len(top)
                or scores[top[-1]] >= bound
                or deepest < len(rows) * 3 // 4
                or fetch >= self.max_ef
            ):
                return self._row_ids[rows][top], scores[top]
            fetch *= 2

    def _min_masked_norm(self, w: np.ndarray) -> float:
        """A lower bound of ||g * w|| over unit g with each |g_i| at most its column maximum."""
        colmax = self._colmax2
        order = np.argsort(w * w)
        remaining, total = 1.0, 0.0
        for i in order:
            take = min(float(colmax[i]), remaining)
            total += take * float(w[i] * w[i])
            remaining -= take
            if remaining <= 0:
                break
        return math.sqrt(max(total, 0.0))

    @staticmethod
    def _scoring_vector(q: np.ndarray, plan: Plan) -> np.ndarray:
        """What a stored row is multiplied by: the query, masked; for a renormalised mask
        the numerator of the masked cosine, over ||q*w||, the row's own norm apart."""
        if plan.weights is None:
            return q
        qv = q * plan.weights
        if plan.renormalize:
            return (qv / np.float32(np.linalg.norm(qv))) * plan.weights
        return qv

    def _score_block(self, q: np.ndarray, plan: Plan, block: np.ndarray) -> np.ndarray:
        if plan.renormalize:
            return self._renormalized_scores(q, plan, block)[0]
        return block @ self._scoring_vector(q, plan)

    def _scores(self, q: np.ndarray, plan: Plan, rows: np.ndarray | None) -> np.ndarray:
        """Exact scores of ``rows`` (None: every row, read in place without a copy), in
        chunks so a large gallery needs little extra memory."""
        if rows is not None:
            if len(rows) <= CHUNK:
                return self._score_block(q, plan, self._rows.gather(rows))
            return np.concatenate(
                [
                    self._score_block(q, plan, self._rows.gather(rows[s : s + CHUNK]))
                    for s in range(0, len(rows), CHUNK)
                ]
            )
        parts = [np.zeros(0, dtype=np.float32)]
        for _first, segment in self._rows.segments():
            for s in range(0, len(segment), CHUNK):
                parts.append(self._score_block(q, plan, segment[s : s + CHUNK]))
        return np.concatenate(parts).astype(np.float32, copy=False)

    @staticmethod
    def _renormalized_scores(
        q: np.ndarray, plan: Plan, vectors: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """(masked cosine, masked inner product / ||q*w||) of ``vectors``: one computation
        for the exact search and the re-rank, so both give the very same floats."""
        w = plan.weights
        ip = vectors @ SearchMixin._scoring_vector(q, plan)
        norms = np.sqrt((vectors * vectors) @ (w * w))
        return np.divide(ip, norms, out=np.zeros_like(ip), where=norms > 0), ip

    def _exact_unlocked(
        self,
        q: np.ndarray,
        k: int,
        plan: Plan,
        rows: np.ndarray | None,
        exclude_ids: set[int] = frozenset(),
    ) -> tuple[np.ndarray, np.ndarray]:
        """Brute force over ``rows``, or with None over every live item but ``exclude_ids``."""
        if rows is not None:
            rows = rows[rows >= 0]
        scores = self._scores(q, plan, rows)
        if rows is None:
            ids = self._row_ids[: len(scores)]
            invalid = ids < 0
            if exclude_ids:
                invalid[self._id_rows[np.fromiter(exclude_ids, dtype=np.int64)]] = True
            if invalid.any():
                keep = np.flatnonzero(~invalid)
                ids, scores = ids[keep], scores[keep]
        else:
            ids = self._row_ids[rows]
        order = self._top_k(scores, ids, k)
        return ids[order], scores[order]

    def _exact_many_unlocked(
        self, queries: np.ndarray, k: int, plans: list[Plan], exclude: list[set[int]]
    ) -> list[np.ndarray]:
        """The ids :meth:`_exact_unlocked` finds over every live item, for many queries in
        one pass over the vectors per batch of them.

        Calibration's truth: one exact search per query is one pass over every stored
        vector each, which at tens of thousands of items cost a checkpoint far more than
        the walks it judges (an uncommitted profile: 18 s against 0.9 s at 75k).
        A matrix product sums in another order than one query's, so a score may differ in
        its last bit: only a tie at the k-th place could tell.
        """
        rows = sum(len(segment) for _first, segment in self._rows.segments())
        ids_all = self._row_ids[:rows]
        dead = ids_all < 0
        batch = max(1, BATCH_SCORES // max(rows, 1))
        out: list[np.ndarray] = []
        for start in range(0, len(queries), batch):
            chosen = range(start, min(start + batch, len(queries)))
            scores = self._score_columns(queries[start : chosen.stop], plans[start : chosen.stop])
            for j, column in zip(chosen, scores.T):
                excluded = {i for i in exclude[j] if self._has(i)}
                invalid = dead.copy()
                if excluded:
                    invalid[self._id_rows[np.fromiter(excluded, np.int64, len(excluded))]] = True
                keep = np.flatnonzero(~invalid)
                ids = ids_all[keep]
                out.append(ids[self._top_k(column[keep], ids, min(k, self._live - len(excluded)))])
        return out

    def _score_columns(self, queries: np.ndarray, plans: list[Plan]) -> np.ndarray:
        """[rows, queries] exact scores, each query under its own plan (:meth:`_score_block`
        for many queries: the renormalised masked cosine as :meth:`_renormalized_scores`)."""
        matrix = np.stack(
            [self._scoring_vector(q, plan) for q, plan in zip(queries, plans)], axis=1
        ).astype(np.float32, copy=False)
        renormalized = [j for j, plan in enumerate(plans) if plan.renormalize]
        squares = (
            np.stack([plans[j].weights * plans[j].weights for j in renormalized], axis=1)
            if renormalized
            else None
        )
        parts = [np.zeros((0, len(plans)), dtype=np.float32)]
        for _first, segment in self._rows.segments():
            for s in range(0, len(segment), CHUNK):
                block = segment[s : s + CHUNK]
                scores = block @ matrix
                if squares is not None:
                    norms = np.sqrt((block * block) @ squares)
                    ip = scores[:, renormalized]
                    scores[:, renormalized] = np.divide(
                        ip, norms, out=np.zeros_like(ip), where=norms > 0
                    )
                parts.append(scores)
        return np.concatenate(parts).astype(np.float32, copy=False)

    @staticmethod
    def _top_k(scores: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
        """Positions of the k best scores, ties broken by id, the same way everywhere."""
        candidates = np.arange(len(scores))
        if len(scores) > max(k, 512):
            # every row tied with the k-th score stays in, so the tie order is by id everywhere
            kth = np.partition(scores, len(scores) - k)[len(scores) - k]
            candidates = np.flatnonzero(scores >= kth)
        order = np.lexsort((ids[candidates], -scores[candidates]))[:k]
        return candidates[order]


__all__ = ["SearchMixin"]
