"""``ConceptIndex``: the parts of the package put together (storage, view, graph, search).

An index is either in memory (``ConceptIndex(C)``; :meth:`save` writes it to a directory)
or attached to a directory (:meth:`load`, :meth:`open`), where every change is committed
to the database at once and costs what it changes.

Each process keeps a *view* for searching: the checkpointed vectors (memory-mapped), the
graph (hnswlib, loaded once its checksum matched), and the tail of items changed since that
checkpoint (read from the database, searched exactly). A view is refreshed incrementally when
the database changed (``PRAGMA data_version``), so a reader follows a writer in another
process without re-reading the index.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..explain import top_concepts
from ..files import atomic_path, fsync_dir
from . import items as db_items
from . import regions as db_regions
from .calibrate import REFIT_GROWTH, RETUNE_GROWTH, CalibrateMixin
from .errors import ConceptError, ConceptIndexError, IndexCorruptError, ModelMismatchError
from .graph import Graph
from .lock import RWLock
from .plan import ConceptRef, Plan, PlanMixin, check_concept_name
from .projection import Projection
from .rerank import DEFAULT_DEPTH, check_rerank, structural_rerank
from .search import SearchMixin
from .store import (
    DB_FILE,
    EMPTY_CHECKPOINT,
    FORMAT,
    FORMAT_VERSION,
    Checkpoint,
    Store,
    is_index_dir,
)
from .vectors import VectorRows

#: With no explicit ``checkpoint_every``: checkpoint once the tail holds 1/TAIL_SHARE of the
#: gallery (but at least MIN_TAIL items). A checkpoint writes the whole graph, so this sets
#: the amortised bytes per change (graph bytes per item x 32) and bounds the exact scan.
TAIL_SHARE = 32
MIN_TAIL = 1024
#: Refit the projection when new items keep less than this share of the energy the fitted
#: items kept in it (root-mean-square capture).
DRIFT_CAPTURE = 0.97
#: A process that has served SOFT_FOLD_AFTER searches with a tail over SOFT_FOLD_TAIL items
#: puts the tail into its own in-memory graph (written nowhere): a kiosk then searches the
#: graph instead of scanning the tail on every query, while a one-shot search pays nothing.
SOFT_FOLD_TAIL = 512
SOFT_FOLD_AFTER = 100

PARAMS = (
    "M",
    "ef_construction",
    "ef",
    "exact_below",
    "mask_ef_power",
    "renorm_ef_power",
    "overfetch",
    "max_ef",
    "seed",
)


@dataclass(frozen=True)
class Hit:
    """One search result; ``top_concepts`` only when an explanation was asked for."""

    rank: int
    id: int
    score: float
    path: str | None
    metadata: dict[str, str]
    top_concepts: list[dict] | None = None
    #: with structural re-ranking: ``score`` is their sum (DIML's re-ranking score)
    score_global: float | None = None
    score_structural: float | None = None

    def to_dict(self) -> dict:
        out = {
            "rank": self.rank,
            "id": self.id,
            "score": self.score,
            "path": self.path,
            "metadata": dict(self.metadata),
        }
        if self.score_structural is not None:
            out["score_global"] = self.score_global
            out["score_structural"] = self.score_structural
        if self.top_concepts is not None:
            out["top_concepts"] = self.top_concepts
        return out

    def with_path(self, path: str | None) -> Hit:
        return self if path == self.path else dataclasses.replace(self, path=path)


class ConceptIndex(PlanMixin, SearchMixin, CalibrateMixin):
    """Images' concept embeddings, their paths and metadata; searchable with concept control.

    ``exact_below``: galleries (or ``where`` subsets) this small are searched by brute force,
    which is both exact and faster than a graph walk there.

    ``graph_dims``: build the graph on the embeddings' top principal directions instead of
    all C concepts, and re-rank what it finds exactly in concept space (see
    :mod:`.projection`). It assumes queries resemble the gallery; the default full-concept
    graph has no such limit.

    ``ef`` is the HNSW search depth for a plain query; a masked query searches
    ``ef / cos(q, q*w)**mask_ef_power`` deep (see :mod:`.calibrate`).

    ``checkpoint_every``: tail size that triggers an automatic graph checkpoint of an
    on-disk index (default: 1/32 of the gallery, at least 1024).
    """

    def __init__(
        self,
        num_concepts: int,
        model_id: str | None = None,
        *,
        model_ref: str | None = None,
        precision: str | None = None,
        M: int = 32,
        ef_construction: int = 200,
        ef: int = 64,
        exact_below: int = 2048,
        mask_ef_power: float = 2.0,
        renorm_ef_power: float | None = None,
        overfetch: int = 10,
        max_ef: int = 4096,
        seed: int = 100,
        capacity: int = 1024,
        graph_dims: int | None = None,
        checkpoint_every: int | None = None,
        _store: Store | None = None,
    ) -> None:
        if num_concepts < 1:
            raise ConceptIndexError(f"num_concepts must be positive, not {num_concepts}")
        for name, value in (("M", M), ("ef_construction", ef_construction), ("ef", ef)):
            if int(value) < 1:
                raise ConceptIndexError(f"{name} must be positive, not {value}")
        self.num_concepts = int(num_concepts)
        self.model_id = model_id
        self.model_ref = model_ref
        self.precision = precision
        self.M = int(M)
        self.ef_construction = int(ef_construction)
        self.ef = int(ef)
        self.exact_below = int(exact_below)
        self.mask_ef_power = float(mask_ef_power)
        #: the same for renormalised masks (calibrated apart: they need a deeper walk)
        self.renorm_ef_power = float(mask_ef_power if renorm_ef_power is None else renorm_ef_power)
        self.overfetch = int(overfetch)
        self.max_ef = int(max_ef)
        self.seed = int(seed)
        self.checkpoint_every = None if checkpoint_every is None else int(checkpoint_every)
        if graph_dims is not None:
            self._check_graph_dims(graph_dims)
        self._wanted_graph_dims = None if graph_dims is None else int(graph_dims)
        #: an on-disk index checkpoints (and re-tunes) by itself; bulk loads turn it off
        self.auto_checkpoint = True
        self._lock = RWLock()
        self._capacity = max(16, int(capacity))
        if _store is None:
            self.path: Path | None = None
            self._store = Store.memory()
            with self._store.write():
                self._write_info()
            self._reset_view()
            self._loaded = True
        else:
            self._store = _store
            self.path = _store.root
            self._loaded = False

    # ------------------------------------------------------------------ info rows
    def _params(self) -> dict:
        out = {name: getattr(self, name) for name in PARAMS}
        out["graph_dims"] = self._wanted_graph_dims
        out["checkpoint_every"] = self.checkpoint_every
        return out

    def _write_info(self) -> None:
        store = self._store
        store.set_info("format", FORMAT)
        store.set_info("format_version", FORMAT_VERSION)
        store.set_info(
            "model", {"id": self.model_id, "ref": self.model_ref, "precision": self.precision}
        )
        store.set_info("num_concepts", self.num_concepts)
        store.set_info("params", self._params())
        if store.get_info("state") is None:
            store.set_info("state", _new_state())

    def _save_params(self) -> None:
        with self._store.write():
            self._store.set_info("params", self._params())

    def _state(self) -> dict:
        return self._store.get_info("state") or _new_state()

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
            # a plain ndarray view of the mapping: np.memmap's subclass hooks cost ~20% on
            # the re-rank's gather
            base = np.asarray(
                np.memmap(
                    file, dtype=np.float32, mode="r", shape=(ckpt.vector_rows, self.num_concepts)
                )
            )
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
        state = self._store.get_info("state") or _new_state()
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

    def _refresh_unlocked(self) -> None:
        if not self._loaded:
            self._load_view_unlocked()
            return
        with self._store.read() as conn:
            if self._store.checkpoint().gen != self._ckpt.gen:
                self._loaded = False  # another process checkpointed: read its checkpoint
            else:
                self._apply_delta(conn)
                if self.path is not None:
                    self._data_version = self._store.data_version()
        if not self._loaded:
            self._load_view_unlocked()
        self._dirty = False
        if self.path is None and self._tail_ids:
            self._fold_unlocked(self._tail_rows_unlocked())  # in memory: nothing to persist

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

    def _fold_unlocked(self, rows: np.ndarray, num_threads: int = -1, refit: bool = False):
        """Put the items at ``rows`` into the graph (the tail, or part of it).

        Fits the --graph-dims projection first when the gallery just became large enough
        (or ``refit``), which rebuilds the graph from every live item in it plus ``rows``.
        """
        wanted = self._wanted_graph_dims
        due = wanted and (
            refit or (self._projection is None and self._live >= self._fit_threshold())
        )
        if wanted is None and self._projection is not None:
            due = True  # set back to all concepts
        if due:
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

    # ------------------------------------------------------------------ construction
    @classmethod
    def for_embedder(
        cls, embedder, model_ref: str | None = None, precision: str | None = None, **params
    ) -> ConceptIndex:
        """An empty index bound to ``embedder``'s model (queries from others are refused).

        Concept names the model carries become the index's names (those usable as names).
        """
        index = cls(
            embedder.num_concepts,
            embedder.model_id,
            model_ref=model_ref,
            precision=precision,
            **params,
        )
        names = getattr(getattr(embedder, "metadata", None), "concept_names", ()) or ()
        for i, name in enumerate(names):
            with contextlib.suppress(ConceptError):
                index.set_concept_name(i, name)
        return index

    @classmethod
    def create(
        cls, path: str | os.PathLike, num_concepts: int, model_id: str | None = None, **kw
    ) -> ConceptIndex:
        """A new, empty index in a new or empty directory, attached to it."""
        index = cls(num_concepts, model_id, **kw)
        index.save(path)
        return index

    @classmethod
    def open(cls, path: str | os.PathLike) -> ConceptIndex:
        """Attach to the index in ``path`` reading only its info rows; the search view is
        loaded on first use. For writers that may never search (``index add``)."""
        store = Store.open(Path(path))
        try:
            info = store.info()
            params = info["params"]
            model = info["model"]
            index = cls(
                int(info["num_concepts"]),
                model.get("id"),
                model_ref=model.get("ref"),
                precision=model.get("precision"),
                graph_dims=params.get("graph_dims"),
                checkpoint_every=params.get("checkpoint_every"),
                capacity=16,
                _store=store,
                # an index from before renorm_ef_power: one exponent for every mask
                renorm_ef_power=params.get("renorm_ef_power"),
                **{name: params[name] for name in PARAMS if name != "renorm_ef_power"},
            )
        except (KeyError, TypeError, ValueError) as exc:
            store.close()
            if isinstance(exc, ConceptIndexError):
                raise
            raise IndexCorruptError(f"{Path(path) / DB_FILE}: malformed info ({exc})") from None
        return index

    @classmethod
    def load(cls, path: str | os.PathLike) -> ConceptIndex:
        """Open an index and load its search view now (the graph's checksum is verified
        before hnswlib parses it; a tampered graph is refused)."""
        index = cls.open(path)
        index._fresh()
        return index

    def load_view(self) -> None:
        """Load the search view now (it loads on first use otherwise)."""
        self._fresh()

    def close(self) -> None:
        self._store.close()

    def __enter__(self) -> ConceptIndex:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        if not self._loaded:
            return int(self._state()["count"])
        self._fresh()
        return self._live

    def __contains__(self, item_id: object) -> bool:
        try:
            item_id = int(item_id)
        except (TypeError, ValueError):
            return False
        if self._loaded:
            self._fresh()
            return 0 <= item_id < len(self._id_rows) and bool(self._id_rows[item_id] >= 0)
        with self._store.lock:
            return (
                self._store.conn.execute("SELECT 1 FROM items WHERE id = ?", (item_id,)).fetchone()
                is not None
            )

    def _has(self, item_id: int) -> bool:
        """In the view (no refresh: for code that holds the view's lock)."""
        return 0 <= item_id < len(self._id_rows) and bool(self._id_rows[item_id] >= 0)

    def __repr__(self) -> str:
        where = f" at {self.path}" if self.path else ""
        return f"<ConceptIndex {len(self)} items, {self.num_concepts} concepts{where}>"

    @property
    def ids(self) -> list[int]:
        with self._store.lock:
            return [r[0] for r in self._store.conn.execute("SELECT id FROM items ORDER BY id")]

    def _where(self) -> str:
        return str(self.path) if self.path else "index"

    def _db_file(self) -> str:
        return str(self.path / DB_FILE) if self.path else "index"

    # ------------------------------------------------------------------ model identity
    def check_model(self, model_id: str) -> None:
        """Refuse embeddings of another model: their concept axes mean something else."""
        if self.model_id is not None and model_id != self.model_id:
            raise ModelMismatchError(
                f"{self._where()}: built with model {self.model_id}, but the query model is "
                f"{model_id}; use the same --model/--precision or rebuild the index"
            )

    # ------------------------------------------------------------------ writes
    def _query_vector(self, query: np.ndarray | Sequence) -> np.ndarray:
        """One query, unit norm; the hot-path twin of :meth:`_vectors`."""
        q = np.asarray(query, dtype=np.float32)
        if q.shape != (self.num_concepts,):
            return self._vectors(q)[0]
        norm2 = float(np.dot(q, q))
        if not math.isfinite(norm2) or norm2 == 0:
            return self._vectors(q)[0]  # raises the precise error
        return q * np.float32(1.0 / math.sqrt(norm2))

    def _vectors(self, embeddings: np.ndarray | Sequence) -> np.ndarray:
        array = np.asarray(embeddings, dtype=np.float32)
        if array.ndim == 1:
            array = array[None, :]
        if array.ndim != 2 or array.shape[1] != self.num_concepts:
            raise ConceptIndexError(
                f"{self._where()}: embeddings must be [N, {self.num_concepts}], "
                f"got shape {list(array.shape)}"
            )
        if not np.isfinite(array).all():
            raise ConceptIndexError(f"{self._where()}: embeddings hold NaN or infinite values")
        norms = np.linalg.norm(array, axis=1, keepdims=True)
        if (norms == 0).any():
            raise ConceptIndexError(f"{self._where()}: an embedding is all zeros")
        return np.ascontiguousarray(array / norms, dtype=np.float32)

    def _after_write(self, num_threads: int = -1) -> None:
        """Let the view follow our own commit (``data_version`` does not see those), and
        checkpoint an on-disk index whose tail has grown past the threshold."""
        self._dirty = True
        if self._loaded and self.path is None:
            with self._lock.write():
                self._refresh_unlocked()
                self._fold_unlocked(self._tail_rows_unlocked(), num_threads)
        if self.path is not None and self.auto_checkpoint:
            state = self._state()
            if state["tail"] > self._tail_limit(int(state["count"])):
                self.checkpoint(num_threads=num_threads)

    def _tail_limit(self, count: int) -> int:
        if self.checkpoint_every is not None:
            return self.checkpoint_every
        return max(MIN_TAIL, count // TAIL_SHARE)

    def add(
        self,
        embeddings: np.ndarray | Sequence,
        paths: Sequence[str | os.PathLike | None] | None = None,
        metadata: Sequence[Mapping[str, object] | None] | None = None,
        *,
        num_threads: int = -1,
        stamps: Sequence[tuple[int, int, str | None] | None] | None = None,
        regions: np.ndarray | None = None,
    ) -> list[int]:
        """Add items; a path already in the index updates that item instead (one item a path).

        Returns the item ids, in input order. Metadata values are stored as strings. On an
        on-disk index the batch is one committed transaction when this returns. An index
        that keeps region maps needs ``regions`` [N, R, C] (``Embedder.embed_regions``).
        """
        vectors = self._vectors(embeddings)
        n = len(vectors)
        maps = self._region_maps(regions, n)
        paths = [None] * n if paths is None else [None if p is None else str(p) for p in paths]
        metadata = [None] * n if metadata is None else list(metadata)
        if len(paths) != n or len(metadata) != n:
            raise ConceptIndexError(
                f"{self._where()}: {n} embeddings but {len(paths)} paths and "
                f"{len(metadata)} metadata rows"
            )
        clean_meta = [db_items.clean_metadata(m, self._where()) for m in metadata]
        seen: set[str] = set()
        for path in paths:
            if path is not None:
                if path in seen:
                    raise ConceptIndexError(f"{path}: given twice in one add")
                seen.add(path)
        with self._lock.write(), self._store.write() as conn:
            state = self._state()
            existing = db_items.ids_for_paths(conn, [p for p in paths if p is not None])
            ids = []
            for path in paths:
                if path is not None and path in existing:
                    ids.append(existing[path])
                else:
                    ids.append(state["next_id"])
                    state["next_id"] += 1
            state["seq"] += 1
            db_items.write_items(conn, state["seq"], ids, paths, vectors, clean_meta, stamps)
            if maps is not None:
                db_regions.write(conn, ids, maps)
            state["count"] += sum(1 for p in paths if p is None or p not in existing)
            state["tail"] += n
            self._store.set_info("state", state)
        self._after_write(num_threads)
        return ids

    def update(
        self,
        item_id: int,
        embedding: np.ndarray | None = None,
        *,
        path: str | os.PathLike | None = None,
        metadata: Mapping[str, object] | None = None,
        regions: np.ndarray | None = None,
    ) -> None:
        """Replace an item's embedding, path and/or metadata (None leaves a field as it is).

        A new embedding in an index that keeps region maps comes with its ``regions``."""
        vector = None if embedding is None else self._vectors(embedding)
        maps = None if vector is None else self._region_maps(regions, 1)
        clean = db_items.clean_metadata(metadata, self._where()) if metadata is not None else None
        with self._lock.write(), self._store.write() as conn:
            row = conn.execute("SELECT 1 FROM items WHERE id = ?", (int(item_id),)).fetchone()
            if row is None:
                raise ConceptIndexError(f"{self._where()}: no item with id {item_id}")
            state = self._state()
            state["seq"] += 1
            if vector is not None:
                conn.execute("UPDATE items SET seq = ? WHERE id = ?", (state["seq"], int(item_id)))
                conn.execute(
                    "UPDATE vectors SET vec = ? WHERE id = ?", (vector[0].tobytes(), int(item_id))
                )
                if maps is not None:
                    db_regions.write(conn, [int(item_id)], maps)
                state["tail"] += 1
            if path is not None:
                try:
                    conn.execute("UPDATE items SET path = ? WHERE id = ?", (str(path), item_id))
                except sqlite3.IntegrityError:
                    raise ConceptIndexError(
                        f"{path}: already in the index as another item"
                    ) from None
            if clean is not None:
                conn.execute("DELETE FROM meta WHERE id = ?", (int(item_id),))
                conn.executemany(
                    "INSERT INTO meta (id, key, value) VALUES (?, ?, ?)",
                    [(int(item_id), k, v) for k, v in clean.items()],
                )
            self._store.set_info("state", state)
        self._after_write()

    def remove(self, item_ids: Iterable[int]) -> None:
        """Remove items (all or none); their graph slots are reused by later adds."""
        item_ids = list(dict.fromkeys(int(i) for i in item_ids))
        with self._lock.write(), self._store.write() as conn:
            for item_id in item_ids:
                if conn.execute("SELECT 1 FROM items WHERE id = ?", (item_id,)).fetchone() is None:
                    raise ConceptIndexError(f"{self._where()}: no item with id {item_id}")
            state = self._state()
            state["seq"] += 1
            db_items.remove_items(conn, state["seq"], item_ids)
            db_regions.remove(conn, item_ids)
            state["count"] -= len(item_ids)
            state["tail"] += len(item_ids)
            self._store.set_info("state", state)
        self._after_write()

    # ------------------------------------------------------------------ region maps
    @property
    def region_grid(self) -> tuple[int, int] | None:
        """(rows, columns) of the region maps this index keeps, or None (see :mod:`.regions`)."""
        grid = self._store.get_info(db_regions.INFO_KEY)
        return None if grid is None else (int(grid[0]), int(grid[1]))

    def _region_maps(self, regions: np.ndarray | None, n: int) -> np.ndarray | None:
        grid = self.region_grid
        if grid is None:
            if regions is not None:
                raise db_regions.RegionsError(
                    f"{self._where()}: this index keeps no region maps; "
                    + db_regions.how_to_add(self._where())
                )
            return None
        if regions is None:
            raise db_regions.RegionsError(
                f"{self._where()}: this index keeps region maps for structural re-ranking; "
                "add images (the Index API embeds them) or pass regions= "
                f"[N, {grid[0] * grid[1]}, {self.num_concepts}]"
            )
        return db_regions.check_shape(regions, n, grid, self.num_concepts, self._where())

    def items_without_regions(self) -> list[int]:
        with self._store.lock:
            return db_regions.ids_without(self._store.conn)

    def put_regions(self, item_ids: Sequence[int], regions: np.ndarray, grid: tuple[int, int]):
        """Store region maps of existing items (one transaction); the index keeps using them
        only once :meth:`keep_regions` found every item mapped."""
        current = self.region_grid
        if current is not None and tuple(grid) != current:
            raise db_regions.RegionsError(
                f"{self._where()}: keeps {current[0]}x{current[1]} region maps, not "
                f"{grid[0]}x{grid[1]}"
            )
        maps = db_regions.check_shape(
            regions, len(item_ids), tuple(grid), self.num_concepts, self._where()
        )
        with self._store.write() as conn:
            db_regions.write(conn, [int(i) for i in item_ids], maps)

    def keep_regions(self, grid: tuple[int, int]) -> None:
        """From now on, keep region maps: every item must have one already (put_regions)."""
        with self._store.write() as conn:
            conn.execute(db_regions.TABLE)
            missing = db_regions.ids_without(conn)
            if missing:
                raise db_regions.RegionsError(
                    f"{self._where()}: {len(missing)} item(s) have no region maps yet "
                    f"(first: id {missing[0]})"
                )
            self._store.set_info(db_regions.INFO_KEY, [int(grid[0]), int(grid[1])])

    # ------------------------------------------------------------------ lookups
    def id_for_path(self, path: str | os.PathLike) -> int | None:
        with self._store.lock:
            return db_items.ids_for_paths(self._store.conn, [str(path)]).get(str(path))

    def ids_for_paths(self, paths: Sequence[str]) -> dict[str, int]:
        with self._store.lock:
            return db_items.ids_for_paths(self._store.conn, list(paths))

    def embedding(self, item_id: int) -> np.ndarray:
        with self._store.lock:
            row = self._store.conn.execute(
                "SELECT vec FROM vectors WHERE id = ?", (int(item_id),)
            ).fetchone()
        if row is None:
            raise ConceptIndexError(f"{self._where()}: no item with id {item_id}")
        return np.frombuffer(row[0], dtype=np.float32).copy()

    def item(self, item_id: int) -> tuple[str | None, dict[str, str]]:
        """(path, metadata) of one item."""
        with self._store.lock:
            found = db_items.describe(self._store.conn, [int(item_id)])
        if int(item_id) not in found:
            raise ConceptIndexError(f"{self._where()}: no item with id {item_id}")
        return found[int(item_id)]

    def _describe(self, ids: Sequence[int]) -> dict[int, tuple[str | None, dict]]:
        with self._store.lock:
            return db_items.describe(self._store.conn, ids)

    def metadata_keys(self) -> list[str]:
        with self._store.lock:
            return db_items.metadata_keys(self._store.conn)

    def ids_where(self, where: Mapping[str, object]) -> set[int]:
        """Ids whose metadata has every ``key == value`` (as strings); unknown keys are errors."""
        return self._ids_where(where)

    def _ids_where(self, where: Mapping[str, object]) -> set[int]:
        with self._store.lock:
            return db_items.ids_where(self._store.conn, where, self._where())

    def file_stamps(self) -> dict[str, tuple[int, int | None, int | None, str | None]]:
        """path -> (id, size, mtime_ns, sha256) for every item with a path (sync uses it)."""
        with self._store.lock:
            return db_items.stamps_under(self._store.conn)

    @property
    def root(self) -> Path | None:
        """The folder relative paths are relative to (recorded by ``sync``), if any."""
        root = self._store.get_info("root")
        return None if root is None else Path(root)

    def full_path(self, stored: str | None) -> str | None:
        """A stored path as a file path: relative ones (from ``sync``) joined to the root."""
        if stored is None or os.path.isabs(stored):
            return stored
        root = self.root
        return str(root / stored) if root is not None else stored

    def set_root(self, root: str | os.PathLike) -> None:
        with self._store.write():
            self._store.set_info("root", str(Path(root).resolve()))

    def _restamp(self, item_id: int, stamp: tuple[int, int, str | None]) -> None:
        """A file touched but not changed: its new size/mtime, same embedding."""
        with self._store.write() as conn:
            conn.execute(
                "UPDATE items SET size = ?, mtime_ns = ?, sha256 = ? WHERE id = ?",
                (*stamp, int(item_id)),
            )

    # ------------------------------------------------------------------ concept names
    @property
    def concept_names(self) -> dict[int, str]:
        with self._store.lock:
            return db_items.concept_names(self._store.conn)

    def set_concept_name(self, concept: ConceptRef, name: str | None) -> None:
        """Name a concept (None clears); names are unique and never look like an index."""
        index = self.resolve_concept(concept)
        if name is not None:
            name = check_concept_name(name)
        with self._store.write() as conn:
            names = db_items.concept_names(conn)
            owner = next((i for i, n in names.items() if n == name), None)
            if name is not None and owner is not None and owner != index:
                raise ConceptError(f"{self._where()}: concept {owner} is already named '{name}'")
            db_items.set_concept_name(conn, index, name)
            state = self._state()
            state["seq"] += 1
            self._store.set_info("state", state)
        self._dirty = True

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
        explain: int = 0,
        rerank: str | None = None,
        rerank_depth: int = DEFAULT_DEPTH,
        query_regions: np.ndarray | None = None,
    ) -> list[Hit]:
        """The k best items for one query embedding, under the given concept controls.

        Fewer than k come back when the gallery (or a ``where`` filter) holds fewer.
        ``explain`` > 0 attaches that many top contributing concepts to every hit.
        ``rerank="structural"`` re-orders the best ``max(k, rerank_depth)`` by DIML's
        ``s_global + s_struct`` (needs ``query_regions`` [R, C] and an index that keeps
        region maps); each hit then carries both parts of its score.
        """
        q = self._query_vector(query)
        check_rerank(rerank, rerank_depth)
        q_regions = None
        if rerank is not None:
            q_regions = self._query_regions(query_regions)
        self._fresh()
        self._maybe_soft_fold()
        plan = self.plan(exclude, only, weights, renormalize)
        depth = max(int(k), int(rerank_depth)) if rerank is not None else k
        with self._lock.read():
            ids, scores = self._search_unlocked(q, depth, plan, where, exact, set(exclude_ids))
            wanted = explain or rerank is not None
            vectors = self._rows.gather(self._id_rows[ids]) if wanted and len(ids) else None
        parts = None
        if rerank is not None and len(ids):
            grid = self.region_grid
            with self._store.lock:
                maps = db_regions.read(
                    self._store.conn, ids.tolist(), grid[0] * grid[1], self.num_concepts
                )
            parts = structural_rerank(ids, scores, q, q_regions, vectors, maps, plan.weights)
            position = {int(i): n for n, i in enumerate(ids)}
            ids, scores = parts.ids[:k], parts.score[:k]
            vectors = vectors[[position[int(i)] for i in ids]]
        described = self._describe([int(i) for i in ids])
        names = self.concept_names if explain else {}
        hits = []
        for rank, (item_id, score) in enumerate(zip(ids, scores), start=1):
            path, meta = described.get(int(item_id), (None, {}))
            top = None
            if explain:
                top = top_concepts(
                    q, vectors[rank - 1], plan.weights, plan.renormalize, names, explain
                )
            split = {}
            if parts is not None:
                split = dict(
                    score_global=float(parts.score_global[rank - 1]),
                    score_structural=float(parts.score_structural[rank - 1]),
                )
            hits.append(Hit(rank, int(item_id), float(score), path, meta, top, **split))
        return hits

    def _query_regions(self, query_regions: np.ndarray | None) -> np.ndarray:
        grid = self.region_grid
        if grid is None:
            raise db_regions.RegionsError(
                f"{self._where()}: structural re-ranking needs region maps, and this index "
                "keeps none; " + db_regions.how_to_add(self._where())
            )
        if query_regions is None:
            raise db_regions.RegionsError(
                f"{self._where()}: structural re-ranking needs the query's region maps "
                "(query with an image, or pass query_regions=)"
            )
        return db_regions.check_shape(
            np.asarray(query_regions)[None], 1, grid, self.num_concepts, "the query"
        )[0]

    def regions_of(self, item_id: int) -> np.ndarray:
        """The stored region maps [R, C] of one item (a query by id re-ranks with them)."""
        grid = self.region_grid
        if grid is None:
            raise db_regions.RegionsError(
                f"{self._where()}: this index keeps no region maps; "
                + db_regions.how_to_add(self._where())
            )
        with self._store.lock:
            return db_regions.read(
                self._store.conn, [int(item_id)], grid[0] * grid[1], self.num_concepts
            )[0]

    def search_ids(
        self, query: np.ndarray, k: int = 10, *, exact: bool = False, **controls
    ) -> tuple[np.ndarray, np.ndarray]:
        """(ids, scores) only: the search without the metadata look-up, for benchmarks."""
        q = self._query_vector(query)
        where = controls.pop("where", None)
        exclude_ids = set(controls.pop("exclude_ids", ()))
        self._fresh()
        self._maybe_soft_fold()
        plan = self.plan(**controls)
        with self._lock.read():
            return self._search_unlocked(q, k, plan, where, exact, exclude_ids)

    def search_id(self, item_id: int, k: int = 10, **kwargs) -> list[Hit]:
        """More like an item already in the index (the item itself is left out)."""
        vector = self.embedding(item_id)
        exclude_ids = set(kwargs.pop("exclude_ids", ())) | {int(item_id)}
        if kwargs.get("rerank") is not None and kwargs.get("query_regions") is None:
            kwargs["query_regions"] = self.regions_of(item_id)
        return self.search(vector, k, exclude_ids=exclude_ids, **kwargs)

    # ------------------------------------------------------------------ persistence
    def manifest(self) -> dict:
        """What ``index info`` shows: model, counts, parameters, the last checkpoint."""
        self._fresh()
        state = self._state()
        ckpt = self._store.checkpoint()
        graph = self._graph.hnsw if self._graph is not None else None
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": {"id": self.model_id, "ref": self.model_ref, "precision": self.precision},
            "num_concepts": self.num_concepts,
            "space": "ip",
            "counts": {
                "items": self._live,
                "deleted_slots": 0
                if graph is None
                else int(graph.element_count)
                - int(self._in_graph[self._row_ids[self._row_ids >= 0]].sum()),
                "named_concepts": len(self._concept_names),
                "tail": len(self._tail_rows_unlocked()),
            },
            "next_id": int(state["next_id"]),
            "hnsw": {
                "M": self.M,
                "ef_construction": self.ef_construction,
                "ef": self.ef,
                "max_elements": 0 if graph is None else int(graph.max_elements),
                "element_count": 0 if graph is None else int(graph.element_count),
                "seed": self.seed,
                "graph_dims": self._wanted_graph_dims,
                "graph_dims_in_use": None if self._projection is None else self._projection.dims,
            },
            "search": {
                "exact_below": self.exact_below,
                "mask_ef_power": self.mask_ef_power,
                "renorm_ef_power": self.renorm_ef_power,
                "overfetch": self.overfetch,
                "max_ef": self.max_ef,
            },
            "checkpoint": {
                "gen": ckpt.gen,
                "seq": ckpt.seq,
                "graph_bytes": ckpt.graph_bytes,
                "vector_rows": ckpt.vector_rows,
                "tuned_at": state.get("tuned_at", 0),
                "fitted_at": state.get("fitted_at", 0),
            },
            "regions": self._regions_manifest(),
        }

    def _regions_manifest(self) -> dict | None:
        grid = self.region_grid
        if grid is None:
            return None
        with self._store.lock:
            stored = db_regions.stored_bytes(self._store.conn)
        return {"grid": list(grid), "dtype": "float16", "bytes": stored}

    def save(self, path: str | os.PathLike | None = None, *, overwrite: bool = False) -> Path:
        """Write an in-memory index to a directory and attach to it; for an attached index,
        write a graph checkpoint (its changes are committed already).

        Refuses a directory that holds another index (unless ``overwrite``) or other files.
        """
        if self.path is not None and (path is None or _same_dir(Path(path), self.path)):
            self.checkpoint()
            return self.path
        if path is None:
            raise ConceptIndexError("save: no directory given and the index was never saved")
        target = Path(path)
        if target.exists() and not target.is_dir():
            raise ConceptIndexError(f"{target}: exists and is not a directory")
        if is_index_dir(target):
            if not overwrite:
                raise ConceptIndexError(
                    f"{target}: already holds an index (overwrite it explicitly)"
                )
            _remove_index_files(target)
        elif target.is_dir() and any(not e.startswith(".") for e in os.listdir(target)):
            raise ConceptIndexError(
                f"{target}: directory is not empty and holds no cmn-edge index; "
                "choose a new or empty directory"
            )
        if self.path is not None:
            return self._copy_to(target)
        self._fresh()
        target.mkdir(parents=True, exist_ok=True)
        with self._lock.write():
            self._refresh_unlocked()
            self._fold_unlocked(self._tail_rows_unlocked())
            with atomic_path(target / DB_FILE) as tmp:
                dest = sqlite3.connect(str(tmp))
                try:
                    with self._store.lock:
                        self._store.conn.backup(dest)
                    staged = Store(dest, target)
                    with staged.write():
                        ckpt = self._write_checkpoint_files(staged, compact=True)
                        state = staged.get_info("state")
                        state["tail"] = 0
                        staged.set_info("state", state)
                        staged.set_checkpoint(ckpt)
                    dest.execute("PRAGMA journal_mode=WAL")
                finally:
                    dest.close()
        self._store.close()
        self._store = Store.open(target)
        self.path = target
        self._loaded = False
        self._store.clear_debris(_files_of(ckpt))
        return target

    def _copy_to(self, target: Path) -> Path:
        """An on-disk index saved elsewhere: a copy of its database (``VACUUM INTO``) with a
        graph built there from it; this index stays where it is."""
        target.mkdir(parents=True, exist_ok=True)
        with atomic_path(target / DB_FILE) as tmp:
            with self._store.lock:
                self._store.conn.execute("VACUUM INTO ?", (str(tmp),))
            copy = sqlite3.connect(str(tmp), isolation_level=None)
            try:
                copy.execute("DELETE FROM checkpoint")  # its files stay with the original
                copy.execute("PRAGMA journal_mode=WAL")
            finally:
                copy.close()
        copied = ConceptIndex.open(target)
        try:
            copied.checkpoint(compact=True, retune=False)
        finally:
            copied.close()
        return target

    def _write_checkpoint_files(self, store: Store, compact: bool) -> Checkpoint:
        """Vectors (appended, or every live row when compacting) and the graph, both
        fsynced, for a checkpoint record the caller commits."""
        old = store.checkpoint()
        gen = old.gen + 1
        n = len(self._rows)
        row_ids = self._row_ids[:n]
        if compact or not old.vectors_file:
            live = np.flatnonzero(row_ids >= 0)
            name = f"vectors-{gen:06d}.f32"
            with open(store.file(name), "wb") as handle:
                for start in range(0, len(live), 16384):
                    handle.write(self._rows.gather(live[start : start + 16384]).tobytes())
                handle.flush()
                os.fsync(handle.fileno())
            rows_written, ids_written = len(live), row_ids[live]
        else:
            name = old.vectors_file
            file = store.file(name)
            with open(file, "r+b") as handle:
                handle.truncate(old.vector_rows * self.num_concepts * 4)  # a killed append
                handle.seek(0, os.SEEK_END)
                handle.write(self._rows.extra_rows().tobytes())
                handle.flush()
                os.fsync(handle.fileno())
            rows_written, ids_written = n, row_ids
        fsync_dir(store.root)
        graph_name = f"graph-{gen:06d}.bin"
        sha, size = (None, None)
        if self._graph is not None:
            sha, size = self._graph.save(store.file(graph_name))
        return Checkpoint(
            gen=gen,
            seq=int(store.get_info("state")["seq"]),
            graph_file=graph_name if self._graph is not None else None,
            graph_sha256=sha,
            graph_bytes=size,
            max_elements=None if self._graph is None else int(self._graph.hnsw.max_elements),
            element_count=None if self._graph is None else len(self._graph),
            vectors_file=name,
            vector_rows=int(rows_written),
            row_ids=np.ascontiguousarray(ids_written, dtype=np.int64).tobytes(),
            colmax2=self._colmax2.astype(np.float32).tobytes(),
            projection=None if self._projection is None else self._projection.to_bytes(),
            graph_dims=None if self._projection is None else self._projection.dims,
        )

    def checkpoint(
        self,
        *,
        compact: bool | None = None,
        retune: bool | None = None,
        refit: bool | None = None,
        num_threads: int = -1,
    ) -> dict:
        """Fold the tail into the graph and write it (and the new vectors) to disk.

        ``retune``/``refit`` None: when due (the gallery grew by RETUNE_GROWTH /
        REFIT_GROWTH since the last tuning / fit); ``compact`` None: when dead rows are a
        quarter of the vector file. Returns what it did.
        """
        if self.path is None:
            with self._lock.write():
                self._fresh()
                self._fold_unlocked(self._tail_rows_unlocked(), num_threads, refit=bool(refit))
            return {"checkpoint": None}
        done: dict = {}
        with self._lock.write(), self._store.write():
            try:
                self._refresh_unlocked()
                state = self._state()
                live = self._live
                tail = self._tail_rows_unlocked()
                fitted_at = int(state.get("fitted_at", 0))
                if refit is None and (
                    self._wanted_graph_dims
                    and self._projection is not None
                    and live >= max(fitted_at, 1) * REFIT_GROWTH
                ):
                    # grown enough to look again: refit (a full graph rebuild) only if the
                    # new items have drifted from what the directions were fitted on
                    refit = self._projection_drifted(tail)
                    if not refit:
                        state["fitted_at"] = live  # still fits: look again after more growth
                tuned_at = int(state.get("tuned_at", 0))
                if retune is None:
                    retune = live > self.exact_below and live >= max(tuned_at, 1) * RETUNE_GROWTH
                held = np.zeros(0, np.int64)
                if retune and len(tail) >= 5:
                    # tune on items the graph has not seen yet: a user's query is one of those
                    held = tail[-min(200, len(tail) // 5) :]
                    tail = np.setdiff1d(tail, held)
                if self._fold_unlocked(tail, num_threads, refit=refit):
                    state["fitted_at"] = live
                    done["refit"] = True
                if retune:
                    queries = self._rows.gather(held) if len(held) else None
                    own = self._row_ids[held] if len(held) else None
                    self._tuning = True
                    try:
                        done["calibration"] = self.calibrate(queries=queries, exclude_own=own)
                    finally:
                        self._tuning = False
                    state["tuned_at"] = live
                    if len(held):
                        self._fold_unlocked(held, num_threads)
                dead = int((self._row_ids[: len(self._rows)] < 0).sum())
                if compact is None:
                    compact = dead * 4 > len(self._rows)
                ckpt = self._write_checkpoint_files(self._store, compact=compact)
                state = {
                    **self._state(),
                    **{k: state[k] for k in ("fitted_at", "tuned_at") if k in state},
                }
                state["tail"] = 0
                self._store.set_info("state", state)
                self._store.set_info("params", self._params())
                self._store.set_checkpoint(ckpt)
                if compact:
                    self._store.conn.execute("DELETE FROM removed WHERE seq <= ?", (ckpt.seq,))
            except BaseException:
                self._loaded = False  # the view ran ahead of what is committed: re-read it
                raise
        previous = self._ckpt
        self._loaded = False  # the next use maps the new checkpoint (cheap: no re-embedding)
        keep = _files_of(ckpt) | _files_of(previous)  # readers may still be opening these
        self._store.clear_debris(keep)
        done.update({"checkpoint": ckpt.gen, "graph_bytes": ckpt.graph_bytes, "compacted": compact})
        return done

    def _tuned(self, live: int) -> None:
        """Calibration just ran at this gallery size: remember it and the tuned values."""
        if getattr(self, "_tuning", False):
            return  # inside a checkpoint, which records it in the same transaction
        with self._store.write():
            state = self._state()
            state["tuned_at"] = int(live)
            self._store.set_info("state", state)
            self._store.set_info("params", self._params())

    def optimize(self, *, rebuild_graph: bool = False, num_threads: int = -1) -> dict:
        """Checkpoint, compact, re-tune (and re-fit the projection) now; then shrink the WAL."""
        if rebuild_graph and self.path is not None:
            with self._lock.write(), self._store.write():
                ckpt = self._store.checkpoint()
                self._store.set_checkpoint(
                    Checkpoint(
                        **{
                            **ckpt.__dict__,
                            "graph_file": None,
                            "graph_sha256": None,
                            "seq": 0,
                            "vector_rows": 0,
                            "row_ids": b"",
                            "vectors_file": None,
                            "projection": None,
                            "graph_dims": None,
                        }
                    )
                )
            self._loaded = False
        done = self.checkpoint(
            compact=True,
            retune=True,
            refit=bool(self._wanted_graph_dims),
            num_threads=num_threads,
        )
        if self.path is not None:
            with self._store.lock:
                self._store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                self._store.conn.execute("PRAGMA optimize")
        return done

    def verify(self) -> list[str]:
        """Check everything (slow: reads the whole index): the database's integrity, the
        graph's checksum, every checkpointed vector against the database. [] = sound."""
        problems: list[str] = []
        with self._store.lock:
            result = self._store.conn.execute("PRAGMA integrity_check").fetchone()[0]
        if result != "ok":
            problems.append(f"{self._db_file()}: {result}")
        try:
            self._loaded = False
            self._fresh()
        except (IndexCorruptError, OSError) as exc:
            return [*problems, str(exc).splitlines()[0]]
        with self._lock.read(), self._store.read() as conn:
            count = conn.execute("SELECT COUNT(*) FROM items").fetchone()[0]
            if count != self._live or count != int(self._state()["count"]):
                problems.append(f"{self._db_file()}: {count} items, the view holds {self._live}")
            for item_id, blob in conn.execute("SELECT id, vec FROM vectors"):
                row = self._id_rows[item_id] if item_id < len(self._id_rows) else -1
                if row < 0:
                    problems.append(f"{self._db_file()}: item {item_id} has no vector row")
                elif self._rows.row(int(row)).tobytes() != blob:
                    file = self._ckpt.vectors_file if row < self._rows.n_base else "tail"
                    problems.append(f"{file}: vector of item {item_id} differs from the database")
            if self.region_grid is not None:
                missing_maps = db_regions.ids_without(conn)
                if missing_maps:
                    problems.append(
                        f"{self._db_file()}: {len(missing_maps)} item(s) have no region maps "
                        f"(first: id {missing_maps[0]})"
                    )
            if self._graph is not None:
                labels = set(int(i) for i in self._graph.hnsw.get_ids_list())
                base_ids = self._row_ids[: self._rows.n_base]
                missing = set(base_ids[base_ids >= 0].tolist()) - labels
                if missing:
                    problems.append(
                        f"{self._ckpt.graph_file}: {len(missing)} checkpointed items missing"
                    )
        return problems


# ---------------------------------------------------------------------- helpers
def _new_state() -> dict:
    return {"seq": 0, "next_id": 0, "count": 0, "tail": 0, "tuned_at": 0, "fitted_at": 0}


def _files_of(ckpt: Checkpoint) -> set[str]:
    return {f for f in (ckpt.graph_file, ckpt.vectors_file) if f}


def _remove_index_files(root: Path) -> None:
    for entry in os.listdir(root):
        if entry.startswith((DB_FILE, "graph-", "vectors-", ".graph-")) or entry == "current":
            with contextlib.suppress(OSError):
                os.unlink(root / entry)
        elif entry.startswith("v-") and (root / entry).is_dir():
            shutil.rmtree(root / entry, ignore_errors=True)


def _same_dir(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


__all__ = ["ConceptIndex", "Hit", "Plan"]
