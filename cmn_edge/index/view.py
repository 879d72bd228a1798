"""The per-process search view of an index: checkpointed vectors (memory-mapped), the
graph, and the tail of items changed since the checkpoint, kept in step with the database.

A view loads the last checkpoint once (its files' checksums verified before hnswlib parses
them) and then follows the database incrementally (``PRAGMA data_version`` and the change
counter), so a reader follows a writer in another process without re-reading the index.
Folding the tail into a graph, and the ``--graph-dims`` space it lives in, are here too.
"""

from __future__ import annotations

import os
import sqlite3

import numpy as np

from . import items as db_items
from .errors import ConceptIndexError, IndexCorruptError
from .graph import Graph
from .projection import Projection
from .scan import ProjectedRows
from .store import (
    EMPTY_CHECKPOINT,
    Checkpoint,
    new_state,
)
from .vectors import VectorRows, map_rows

#: Refit the projection when new items keep less than this share of the energy the fitted
#: items kept in it (root-mean-square capture).
DRIFT_CAPTURE = 0.97
#: A process that has served SOFT_FOLD_AFTER searches with a tail over SOFT_FOLD_TAIL items
#: puts the tail into its own in-memory graph (written nowhere): a kiosk then searches the
#: graph instead of scanning the tail on every query, while a one-shot search pays nothing.
SOFT_FOLD_TAIL = 512
SOFT_FOLD_AFTER = 100


class ViewMixin:
    """The view's life cycle; mixed into :class:`~.core.ConceptIndex`."""

    # ------------------------------------------------------------------ the view
    def _reset_view(self, base: np.ndarray | None = None, row_ids: np.ndarray | None = None):
        c = self._capacity
        self._rows = VectorRows(self.num_concepts, base)
        n = len(self._rows)
        self._row_ids = np.full(max(c, n), -1, dtype=np.int64)
        if row_ids is not None:
            self._row_ids[:n] = row_ids
        self._id_rows = np.full(c, -1, dtype=np.int64)
        self._in_graph = np.zeros(c, dtype=bool)
        self._live = 0
        self._tail_ids: list[int] = []
        self._tail_cache: np.ndarray | None = None
        self._graph: Graph | None = None
        self._projection: Projection | None = None
        self._scan: ProjectedRows | None = None  # built on demand (search.py)
        self._colmax2 = np.zeros(self.num_concepts, dtype=np.float32)
        self._concept_names: dict[int, str] = {}
        self._seq = 0
        self._ckpt = EMPTY_CHECKPOINT
        self._data_version: int | None = None
        self._dirty = False
        self._searches = 0
        self._tuning = False

    def _grow_ids(self, top: int) -> None:
        if top >= len(self._id_rows):
            size = max(2 * len(self._id_rows), top + 1)
            grown = np.full(size, -1, dtype=np.int64)
            grown[: len(self._id_rows)] = self._id_rows
            self._id_rows = grown
            flags = np.zeros(size, dtype=bool)
            flags[: len(self._in_graph)] = self._in_graph
            self._in_graph = flags

    def _load_view_unlocked(self) -> None:
        """Read the checkpoint (memory-map its vectors, verify and load its graph), then the
        tail. A checkpoint replaced while we read it (a writer in another process) is read
        again; a missing or tampered file is an error, never trusted."""
        for attempt in range(5):
            try:
                with self._store.read() as conn:
                    self._check_not_rebuilt()  # in the snapshot: a swap cannot slip between
                    self._load_checkpoint(self._store.checkpoint())
                    self._apply_delta(conn)
                    self._data_version = self._store.data_version()
                self._loaded = True
                self._dirty = False
                return
            except FileNotFoundError as exc:
                latest = self._store.checkpoint()
                if attempt == 4 or latest.gen == self._ckpt.gen:
                    raise IndexCorruptError(
                        f"{exc.filename}: missing (recorded by checkpoint {latest.gen}); "
                        "`cmn-edge index optimize --rebuild-graph` rebuilds it"
                    ) from None

    def _load_checkpoint(self, ckpt: Checkpoint) -> None:
        base, row_ids = None, None
        if ckpt.vector_rows:
            file = self._store.file(ckpt.vectors_file)
            need = ckpt.vector_rows * self.num_concepts * 4
            size = os.stat(file).st_size  # FileNotFoundError: replaced meanwhile, read again
            if size < need:
                raise IndexCorruptError(f"{file}: {size} bytes, the checkpoint needs {need}")
            base = map_rows(file, ckpt.vector_rows, self.num_concepts)
            row_ids = np.frombuffer(ckpt.row_ids, dtype=np.int64)
            if len(row_ids) != ckpt.vector_rows:
                raise IndexCorruptError(f"{self._db_file()}: checkpoint row ids disagree")
        self._reset_view(base, row_ids)
        self._ckpt = ckpt
        self._seq = ckpt.seq
        if row_ids is not None:
            live = np.flatnonzero(row_ids >= 0)
            ids = row_ids[live]
            if len(ids):
                self._grow_ids(int(ids.max()))
                self._id_rows[ids] = live
                self._in_graph[ids] = True
            self._live = len(ids)
        if ckpt.colmax2 is not None:
            self._colmax2 = np.frombuffer(ckpt.colmax2, dtype=np.float32).copy()
        if ckpt.projection is not None:
            try:
                self._projection = Projection.from_bytes(
                    ckpt.projection, int(ckpt.graph_dims), self.num_concepts
                )
            except (ValueError, TypeError) as exc:
                raise IndexCorruptError(f"{self._db_file()}: bad projection ({exc})") from None
        if ckpt.graph_file:
            dim = self._projection.dims if self._projection is not None else self.num_concepts
            self._graph = Graph.load(
                self._store.file(ckpt.graph_file),
                dim,
                ckpt.graph_sha256,
                int(ckpt.graph_bytes),
                int(ckpt.max_elements),
            )
            if len(self._graph) != int(ckpt.element_count):
                raise IndexCorruptError(
                    f"{self._store.file(ckpt.graph_file)}: graph disagrees with the checkpoint"
                )
        self._concept_names = db_items.concept_names(self._store.conn)

    def _apply_delta(self, conn: sqlite3.Connection) -> None:
        """Bring the view from ``self._seq`` to the database's current change."""
        since = self._seq
        for (item_id,) in conn.execute("SELECT id FROM removed WHERE seq > ?", (since,)):
            if item_id < len(self._id_rows) and self._id_rows[item_id] >= 0:
                self._row_ids[self._id_rows[item_id]] = -1
                self._id_rows[item_id] = -1
                self._live -= 1
                if self._graph is not None and self._in_graph[item_id]:
                    self._graph.mark_deleted(item_id)
        rows = conn.execute(
            "SELECT items.id, vectors.vec FROM items JOIN vectors ON vectors.id = items.id "
            "WHERE items.seq > ? ORDER BY items.seq, items.id",
            (since,),
        ).fetchall()
        if rows:
            ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
            try:
                vecs = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(
                    len(rows), self.num_concepts
                )
            except ValueError:
                raise IndexCorruptError(
                    f"{self._db_file()}: a stored vector has the wrong size"
                ) from None
            self._grow_ids(int(ids.max()))
            old = self._id_rows[ids]
            self._row_ids[old[old >= 0]] = -1
            self._live += int((old < 0).sum())
            first = self._rows.append(vecs)
            if len(self._rows) > len(self._row_ids):
                grown = np.full(max(2 * len(self._row_ids), len(self._rows)), -1, np.int64)
                grown[: len(self._row_ids)] = self._row_ids
                self._row_ids = grown
            new_rows = np.arange(first, first + len(ids))
            self._row_ids[new_rows] = ids
            self._id_rows[ids] = new_rows
            self._tail_ids.extend(ids.tolist())
            np.maximum(self._colmax2, (vecs * vecs).max(axis=0), out=self._colmax2)
        self._tail_cache = None
        state = self._store.get_info("state") or new_state()
        self._seq = int(state["seq"])
        self._concept_names = db_items.concept_names(conn)

    def _fresh(self) -> None:
        """Make the view current: load it on first use, else apply what changed since."""
        if not self._loaded:
            with self._lock.write():
                if not self._loaded:
                    self._load_view_unlocked()
            return
        if self.path is None and not self._dirty:
            return
        if not self._dirty and self._store.data_version() == self._data_version:
            return
        with self._lock.write():
            self._refresh_unlocked()

    def _refresh_unlocked(self, num_threads: int = -1) -> None:
        if self._loaded:
            with self._store.read() as conn:
                self._check_not_rebuilt()  # another process's rebuild: our vectors are stale
                if self._store.checkpoint().gen != self._ckpt.gen:
                    self._loaded = False  # another process checkpointed: read its checkpoint
                else:
                    self._apply_delta(conn)
                    if self.path is not None:
                        self._data_version = self._store.data_version()
        if not self._loaded:
            self._load_view_unlocked()
        self._dirty = False
        if self.path is None and self._tail_ids:  # in memory: nothing to persist
            self._fold_unlocked(self._tail_rows_unlocked(), num_threads)

    def _tail_rows_unlocked(self) -> np.ndarray:
        if self._tail_cache is None:
            ids = np.unique(np.asarray(self._tail_ids, dtype=np.int64))
            rows = self._id_rows[ids] if len(ids) else np.zeros(0, np.int64)
            self._tail_cache = rows[rows >= 0]
            self._tail_ids = self._row_ids[self._tail_cache].tolist()
        return self._tail_cache

    def _tail_rows(self) -> np.ndarray:
        return self._tail_rows_unlocked()

    def _maybe_soft_fold(self) -> None:
        """See SOFT_FOLD_TAIL: a long-lived reader stops scanning a large tail."""
        self._searches += 1
        if (
            self.path is None
            or self._tuning
            or self._searches < SOFT_FOLD_AFTER
            or len(self._tail_ids) <= SOFT_FOLD_TAIL
        ):
            return
        with self._lock.write():
            self._fold_unlocked(self._tail_rows_unlocked())

    # ------------------------------------------------------------------ graph space
    @property
    def graph_dims(self) -> int | None:
        """Dimensions the graph works in now (None: all concepts)."""
        self._fresh()
        return None if self._projection is None else self._projection.dims

    def _check_graph_dims(self, dims: int) -> None:
        if not 1 <= int(dims) <= self.num_concepts:
            raise ConceptIndexError(
                f"graph_dims must be between 1 and {self.num_concepts}, not {dims}"
            )

    def _fit_threshold(self) -> int:
        return max(256, 4 * (self._wanted_graph_dims or 0))

    def _graph_vectors(self, vectors: np.ndarray) -> np.ndarray:
        if self._projection is None:
            return np.ascontiguousarray(vectors, dtype=np.float32)
        return self._projection.to_graph(vectors)

    def _new_graph(self, capacity: int) -> Graph:
        dim = self.num_concepts if self._projection is None else self._projection.dims
        return Graph.new(dim, capacity, self.M, self.ef_construction, self.seed)

    def _graph_rebuild_due(self, refit: bool) -> bool:
        """Whether folding rebuilds the graph in new directions: a projection first fitted
        (the gallery just became large enough), fitted again, or dropped."""
        wanted = self._wanted_graph_dims
        if wanted is None:
            return self._projection is not None  # set back to all concepts
        return bool(
            refit or (self._projection is None and self._live >= self._fit_threshold())
        )

    def _fold_unlocked(self, rows: np.ndarray, num_threads: int = -1, refit: bool = False):
        """Put the items at ``rows`` into the graph (the tail, or part of it).

        Fits the --graph-dims projection first when the gallery just became large enough
        (or ``refit``), which rebuilds the graph from every live item in it plus ``rows``.
        """
        wanted = self._wanted_graph_dims
        if self._graph_rebuild_due(refit):
            members = np.flatnonzero(self._row_ids[: len(self._rows)] >= 0)
            ids = self._row_ids[members]
            in_graph = self._in_graph[ids]
            keep = np.union1d(members[in_graph], rows)
            if wanted is None:
                self._projection = None
            else:
                self._projection = Projection.fit(
                    self._rows.gather(members), int(wanted), self.seed
                )
            self._graph = self._new_graph(len(keep))
            self._in_graph[:] = False
            rows = keep
            state_fit = True
            if not self._store.conn.in_transaction:  # a checkpoint records it itself
                with self._store.write():
                    state = self._state()
                    state["fitted_at"] = self._live
                    self._store.set_info("state", state)
        else:
            state_fit = False
            if self._graph is None:
                self._graph = self._new_graph(max(len(rows), self._capacity))
        if len(rows):
            ids = self._row_ids[rows]
            self._graph.add(
                self._graph_vectors(self._rows.gather(rows)),
                ids,
                self._in_graph[ids],
                self._live,
                num_threads,
            )
            self._in_graph[ids] = True
        folded = set(self._row_ids[rows].tolist())
        self._tail_ids = [i for i in self._tail_ids if i not in folded]
        self._tail_cache = None
        return state_fit

    def _projection_drifted(self, tail: np.ndarray) -> bool:
        """True when the newest items keep clearly less of their energy in the graph's
        directions than the items the projection was fitted on (same distribution: about
        the same share, and a refit would only rebuild the graph for nothing)."""
        sample = tail[-2000:] if len(tail) >= 50 else np.flatnonzero(self._row_ids >= 0)[-2000:]
        if not len(sample):
            return False
        vectors = self._rows.gather(sample)
        kept = np.linalg.norm(vectors @ self._projection.matrix.T, axis=1) ** 2
        total = np.linalg.norm(vectors, axis=1) ** 2
        now = float(np.sqrt(kept.sum() / max(total.sum(), 1e-30)))
        return now < DRIFT_CAPTURE * self._projection.typical_capture(None)

    def set_graph_dims(
        self, dims: int | None, sample: np.ndarray | None = None, *, num_threads: int = -1
    ) -> None:
        """Put the graph on the top ``dims`` principal directions (None: all concepts).

        The graph is rebuilt from the stored vectors (an on-disk index writes a new
        checkpoint). Call :meth:`calibrate` afterwards: recall depends on it.
        """
        if dims is not None:
            self._check_graph_dims(dims)
        self._fresh()
        if dims is not None and self._live < int(dims):
            raise ConceptIndexError(
                f"{self._where()}: {self._live} embeddings cannot fit {dims} graph "
                "dimensions; add more images first"
            )
        self._wanted_graph_dims = None if dims is None else int(dims)
        self._save_params()
        if self.path is not None:
            self.checkpoint(refit=True, num_threads=num_threads)
            return
        with self._lock.write():
            self._fold_unlocked(self._tail_rows_unlocked(), num_threads, refit=dims is not None)


__all__ = ["ViewMixin"]
