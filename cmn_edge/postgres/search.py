"""Searching a PostgreSQL gallery: concept controls, per-query HNSW settings, exact fallback.

Concept controls come from the local index's planner (:class:`~cmn_edge.index.plan.PlanMixin`)
and scale the query alone: with ``vector_ip_ops``, ``embedding <#> (q * w)`` *is* the masked
score, so HNSW ranks by the exact masked inner product.

A heavy mask turns the query away from the data the graph was built on, and a default-depth
walk can then miss (issue #19 measured recall@10 0.60 with half the concepts masked on 20k
items at ``ef_search`` 40-200, 1.00 at 1000). As the local index does, the depth grows with
how far the mask turns the query: ``ef = ef_base / cos(q, q*w) ** ef_power``, ``ef_base``
calibrated at export for an unmasked query, the power steep on purpose (half the concepts
masked, cos ~0.7, asks for 17x the depth). Where that passes pgvector's limit (1000), or the
rows a query may match are few, an exact scan is used instead: a walk that deep costs about
what the scan does, and the scan is exact. A ``--where`` filter turns on
``hnsw.iterative_scan`` (relaxed order: every hit is re-scored and sorted here anyway) so
the walk continues until enough rows pass the filter.

``renormalize`` (cosine over the kept concepts) has no index order: the HNSW over-fetches by
the masked inner product with ``q * w * w`` (the cosine's numerator) and the candidates are
re-ranked exactly; the fetch doubles while the best k sit in the back half of what came back,
as the local index does. Every hit is re-scored here, in numpy, by the local index's own
functions, so its score equals the local search's for the same item.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from ..index.core import ConceptIndex, Hit
from ..index.errors import ConceptIndexError, ModelMismatchError
from ..index.plan import ConceptRef, Plan, PlanMixin, checked_k
from ..index.search import SearchMixin
from ..parts import Parts
from .connect import DEFAULT_TABLE, connect, display_url, first_line, psycopg_modules
from .errors import PostgresError
from .schema import Names, read_model, sql

#: pgvector's ceiling for ``hnsw.ef_search``.
EF_LIMIT = 1000


@dataclass(frozen=True)
class SearchPlan:
    """How one query runs: ``method`` "hnsw" or "exact", and why (for --json and tests)."""

    method: str
    ef_search: int
    iterative_scan: str
    fetch: int
    reason: str

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "ef_search": self.ef_search,
            "iterative_scan": self.iterative_scan,
            "fetch": self.fetch,
            "reason": self.reason,
        }


class PgGallery(PlanMixin):
    """A gallery exported to PostgreSQL, searched with the local index's concept controls.

    ``ef_base`` and ``ef_power`` set the HNSW depth per query (see the module); galleries or
    ``where`` subsets of at most ``exact_below`` rows are scanned exactly.
    """

    ef_base = 40
    ef_power = 8.0
    exact_below = 5000
    overfetch = 10

    # the local index's query normalisation, reused (it needs num_concepts and _where)
    _query_vector = ConceptIndex._query_vector
    _vectors = ConceptIndex._vectors

    def __init__(self, conn, url: str, table: str = DEFAULT_TABLE) -> None:
        self.conn = conn
        self.url = display_url(url)
        self.table = table
        self.names = Names.of(table)
        model = read_model(conn, self.names, self._where())
        conn.commit()
        self.model_id: str | None = model["model_id"]
        self.model_ref: str | None = model["model_ref"]
        self.precision: str | None = model["precision"]
        self.num_concepts = int(model["num_concepts"])
        # a gallery exported before parts existed has no column: one concept a dimension
        self.parts = Parts.from_info(model.get("parts"), self.num_concepts)
        self.count = int(model["items"])
        self.metadata_keys: list[str] = list(model["metadata_keys"])
        self.ef_base = int(model["ef_search"])  # calibrated at export
        self._concept_names: dict[int, str] = model["concept_names"]
        self.last_plan: SearchPlan | None = None

    @classmethod
    def connect(cls, url: str, table: str = DEFAULT_TABLE) -> PgGallery:
        """Open the gallery ``table`` at ``url`` (errors name the server and the reason)."""
        conn = connect(url)
        try:
            return cls(conn, url, table)
        except BaseException:
            conn.close()
            raise

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> PgGallery:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        return self.count

    @property
    def concept_names(self) -> dict[int, str]:
        return dict(self._concept_names)

    def _where(self) -> str:
        return f"{self.url} table {self.table}"

    def check_model(self, model_id: str) -> None:
        """Refuse a query of another model, as the local index does: other concept axes."""
        if self.model_id is not None and model_id != self.model_id:
            raise ModelMismatchError(
                f"{self._where()}: built with model {self.model_id}, but the query model is "
                f"{model_id}; use the same --model/--precision or export the index again"
            )

    def embedding(self, item_id: int) -> np.ndarray:
        row = self._execute(
            sql("SELECT embedding FROM {t} WHERE id = %s", t=self.names.items), (int(item_id),)
        ).fetchone()
        if row is None:
            raise ConceptIndexError(f"{self._where()}: no item with id {item_id}")
        return _array(row[0])

    def _execute(self, query, params=()):
        psycopg, _ = psycopg_modules()
        try:
            return self.conn.execute(query, params, binary=True)
        except psycopg.Error as exc:
            self.conn.rollback()
            raise PostgresError(f"{self._where()}: {first_line(exc)}") from None

    # ------------------------------------------------------------------ planning
    def _filter(self, where: Mapping[str, object] | None) -> str | None:
        """``where`` as a jsonb containment document; unknown keys are errors, as locally."""
        if not where:
            return None
        for key in where:
            if key not in self.metadata_keys:
                raise ConceptIndexError(
                    f"{self._where()}: no item has metadata key '{key}' (known keys: "
                    f"{', '.join(self.metadata_keys) or 'none'})"
                )
        return json.dumps({str(k): str(v) for k, v in where.items()})

    def _subset_size(self, doc: str | None, exclude_ids: list[int], cap: int) -> int:
        """Rows the query may match, counted up to ``cap`` (only "few or many" matters)."""
        if doc is None:
            return max(self.count - len(exclude_ids), 0)
        query = sql(
            "SELECT count(*) FROM (SELECT 1 FROM {t} WHERE metadata @> %s::jsonb "
            "AND id <> ALL(%s::bigint[]) LIMIT %s) s",
            t=self.names.items,
        )
        return int(self._execute(query, (doc, exclude_ids, cap)).fetchone()[0])

    def plan_query(
        self, q: np.ndarray, qh: np.ndarray, k: int, plan: Plan, size: int, filtered: bool
    ) -> SearchPlan:
        """HNSW depth and scan mode for this query, or an exact scan where that is cheaper."""
        scan = "relaxed_order" if filtered else "off"
        pad = k + max(8, k // 4)  # near-ties: the server's float order may differ from numpy's
        if size <= self.exact_below:
            return SearchPlan("exact", 0, "off", pad, f"{size} rows to match: a scan is cheaper")
        cos = 1.0
        if qh is not q:
            cos = max(float(q @ qh) / (float(np.linalg.norm(qh)) + 1e-30), 1e-3)
        ef = max(self.ef_base, pad) / cos**self.ef_power
        fetch = pad
        if plan.renormalize:
            fetch = max(pad, self.overfetch * k, math.ceil(ef))
        ef = max(ef, fetch)
        if ef > EF_LIMIT or fetch * 2 >= size:
            return SearchPlan(
                "exact", 0, "off", pad, f"the mask needs ef {math.ceil(ef)} > {EF_LIMIT}: a scan"
            )
        reason = f"cos(q, q*w) {cos:.3f}" + (", filtered: iterative scan" if filtered else "")
        return SearchPlan("hnsw", int(math.ceil(ef)), scan, int(fetch), reason)

    # ------------------------------------------------------------------ search
    def search(
        self,
        query: np.ndarray,
        k: int = 10,
        *,
        exclude: Iterable[ConceptRef] = (),
        only: Iterable[ConceptRef] | None = None,
        weights: Mapping[ConceptRef, float] | None = None,
        renormalize: bool = False,
        where: Mapping[str, object] | None = None,
        exact: bool = False,
        exclude_ids: Iterable[int] = (),
    ) -> list[Hit]:
        """The k best items for one query embedding; the local ``search``'s hits and scores."""
        k = checked_k(k)
        q = self._query_vector(query)
        plan = self.plan(exclude, only, weights, renormalize)
        qh = self._walk_vector(q, plan)
        doc = self._filter(where)
        skip = sorted({int(i) for i in exclude_ids})
        size = self._subset_size(doc, skip, max(self.exact_below, 2 * EF_LIMIT) + 1)
        if size == 0:
            return []
        chosen = self.plan_query(q, qh, k, plan, size if doc else self.count, doc is not None)
        if exact and chosen.method != "exact":
            chosen = SearchPlan("exact", 0, "off", chosen.fetch, "asked for --exact")
        self.last_plan = chosen
        ids, vectors, paths, metas = self._fetch(q, qh, plan, chosen, doc, skip)
        if plan.renormalize and chosen.method == "hnsw":
            while True:
                scores, ip = SearchMixin._renormalized_scores(q, plan, vectors)
                top = SearchMixin._top_k(scores, ids, k)
                rank = np.empty(len(ip), dtype=np.int64)
                rank[np.argsort(-ip, kind="stable")] = np.arange(len(ip))
                deepest = int(rank[top].max()) if len(top) else 0
                if deepest < len(ids) // 2 or len(ids) < chosen.fetch:
                    break
                fetch = chosen.fetch * 2
                if fetch > EF_LIMIT or fetch * 2 >= self.count:
                    chosen = SearchPlan("exact", 0, "off", k + max(8, k // 4), "re-rank: a scan")
                else:
                    chosen = SearchPlan("hnsw", fetch, chosen.iterative_scan, fetch, "deeper")
                self.last_plan = chosen
                ids, vectors, paths, metas = self._fetch(q, qh, plan, chosen, doc, skip)
                if chosen.method == "exact":
                    break
        scores = self._scores(q, plan, vectors)
        top = SearchMixin._top_k(scores, ids, k)
        return [
            Hit(rank, int(ids[i]), float(scores[i]), paths[i], metas[i])
            for rank, i in enumerate(top, start=1)
        ]

    @staticmethod
    def _scores(q: np.ndarray, plan: Plan, vectors: np.ndarray) -> np.ndarray:
        """The local index's exact scores of these rows (the same floats, same code)."""
        if not len(vectors):
            return np.zeros(0, dtype=np.float32)
        if plan.weights is None:
            return vectors @ q
        if plan.renormalize:
            return SearchMixin._renormalized_scores(q, plan, vectors)[0]
        return vectors @ (q * plan.weights)

    def _fetch(self, q, qh, plan: Plan, chosen: SearchPlan, doc, skip):
        """Candidates (ids, vectors, paths, metadata) in the server's order for ``chosen``."""
        filters = ["id <> ALL(%(skip)s::bigint[])"]
        if doc is not None:
            filters.append("metadata @> %(doc)s::jsonb")
        params = {"skip": skip, "doc": doc, "limit": chosen.fetch}
        if chosen.method == "exact" and plan.renormalize:
            # the exact SQL expression of the masked cosine: no index can order by it
            order = "(embedding * %(w)s) <=> %(qw)s"
            params["w"] = plan.weights
            params["qw"] = q * plan.weights
        else:
            order = "embedding <#> %(qh)s"
            params["qh"] = qh
        query = sql(
            "SELECT id, embedding, path, metadata FROM {t} WHERE "
            + " AND ".join(filters)
            + f" ORDER BY {order} LIMIT %(limit)s",
            t=self.names.items,
        )
        psycopg, _ = psycopg_modules()
        from pgvector import Vector

        for key in ("qh", "w", "qw"):
            if key in params:
                params[key] = Vector(np.asarray(params[key], dtype=np.float32))
        try:
            with self.conn.transaction():
                if chosen.method == "exact":
                    self.conn.execute("SET LOCAL enable_indexscan = off")
                else:
                    self.conn.execute(f"SET LOCAL hnsw.ef_search = {int(chosen.ef_search)}")
                    self.conn.execute(f"SET LOCAL hnsw.iterative_scan = {chosen.iterative_scan}")
                    if chosen.iterative_scan != "off":
                        self.conn.execute(f"SET LOCAL hnsw.max_scan_tuples = {max(self.count, 1)}")
                rows = self.conn.execute(query, params, binary=True).fetchall()
        except psycopg.Error as exc:
            raise PostgresError(f"{self._where()}: {first_line(exc)}") from None
        ids = np.array([r[0] for r in rows], dtype=np.int64)
        if rows:
            vectors = np.stack([_array(r[1]) for r in rows])
        else:
            vectors = np.zeros((0, self.num_concepts), dtype=np.float32)
        return ids, vectors, [r[2] for r in rows], [dict(r[3]) for r in rows]


def _array(value) -> np.ndarray:
    """A loaded ``vector`` (pgvector's Vector in binary mode, or an array) as float32."""
    to_numpy = getattr(value, "to_numpy", None)
    return np.asarray(to_numpy() if to_numpy else value, dtype=np.float32)


__all__ = ["EF_LIMIT", "PgGallery", "SearchPlan"]
