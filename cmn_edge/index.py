"""A concept-aware image index: hnswlib for speed, numpy for exactness, one directory on disk.

Every embedding dimension is one concept, so a search can leave concepts out, keep only some,
or weight them. For inner product, scaling the *query* alone gives the exact masked score
``(q * w) . g``, so masked searches go through the same HNSW graph; ``renormalize`` (cosine
over the kept concepts only) over-fetches through HNSW and re-ranks exactly. Either way the
hits are re-scored from the stored float32 embeddings, so an HNSW result and an exact one
agree on every score they share.

On disk an index is ONE directory::

    DIR/current                  {"version": "v-000003-1a2b3c4d", "manifest_sha256": "..."}
    DIR/v-000003-1a2b3c4d/       one complete version
        manifest.json            format version, model identity, counts, sha256 of each file
        hnsw.bin                 the hnswlib graph (space "ip")
        embeddings.npy, ids.npy  float32 [N, C] unit rows and their int64 ids (exact path)
        projection.npy           reduced graph: [d + C + 1, C] (projection, capture weights,
                                 second moments); [0, C]: the graph is in concept space
        metadata.sqlite          items(id, path), meta(id, key, value)
        concepts.json            concept index -> name

A save writes a complete new version beside the old one, fsyncs it, then replaces
``current`` with ``os.replace``; a kill at any moment leaves the old or the new version.
A load checks every sha256 before any file reaches a parser (hnswlib trusts its input).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import hnswlib
import numpy as np

from .explain import concept_contributions

FORMAT = "cmn-edge-index"
FORMAT_VERSION = 1
POINTER = "current"
LOCK = ".lock"
HNSW_FILE = "hnsw.bin"
EMBEDDINGS_FILE = "embeddings.npy"
IDS_FILE = "ids.npy"
METADATA_FILE = "metadata.sqlite"
CONCEPTS_FILE = "concepts.json"
MANIFEST_FILE = "manifest.json"
PROJECTION_FILE = "projection.npy"
DATA_FILES = (HNSW_FILE, EMBEDDINGS_FILE, IDS_FILE, METADATA_FILE, CONCEPTS_FILE, PROJECTION_FILE)
_VERSION_RE = re.compile(r"^v-(\d{6,})-([0-9a-f]{8})$")
_TMP_PREFIX = ".tmp-"

_SCHEMA = """
CREATE TABLE items (id INTEGER PRIMARY KEY, path TEXT UNIQUE);
CREATE TABLE meta (
    id INTEGER NOT NULL REFERENCES items(id) ON DELETE CASCADE,
    key TEXT NOT NULL, value TEXT NOT NULL, PRIMARY KEY (id, key)
);
CREATE INDEX meta_key_value ON meta (key, value);
"""


class ConceptIndexError(ValueError):
    """An index that cannot be used as asked; the message names the directory or file."""


class IndexCorruptError(ConceptIndexError):
    """A missing, truncated, tampered or foreign file inside an index directory."""


class ModelMismatchError(ConceptIndexError):
    """Embeddings of one model compared with an index built by another: meaningless scores."""


class ConceptError(ConceptIndexError):
    """A concept index out of range or a name the index does not know."""


ConceptRef = int | str


@dataclass(frozen=True)
class Hit:
    """One search result; ``top_concepts`` only when an explanation was asked for."""

    rank: int
    id: int
    score: float
    path: str | None
    metadata: dict[str, str]
    top_concepts: list[dict] | None = None

    def to_dict(self) -> dict:
        out = {
            "rank": self.rank,
            "id": self.id,
            "score": self.score,
            "path": self.path,
            "metadata": dict(self.metadata),
        }
        if self.top_concepts is not None:
            out["top_concepts"] = self.top_concepts
        return out


@dataclass(frozen=True)
class _Plan:
    """A resolved concept control: the query-side weight vector and the score kind."""

    weights: np.ndarray | None  # float32 [C]; None = plain cosine
    renormalize: bool = False
    described: dict = field(default_factory=dict)


class _RWLock:
    """Many readers or one writer, writers first (hnswlib reads are thread safe, writes not).

    Hand-written: the runtime's dependency list has no lock library, and the stdlib has none.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._waiting = 0
        self._read_guard = _ReadGuard(self)

    def read(self) -> _ReadGuard:
        return self._read_guard  # a plain object, not a generator: cheap on the query path

    def acquire_read(self) -> None:
        with self._cond:
            while self._writer or self._waiting:
                self._cond.wait()
            self._readers += 1

    def release_read(self) -> None:
        with self._cond:
            self._readers -= 1
            if not self._readers:
                self._cond.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class _ReadGuard:
    __slots__ = ("_lock",)

    def __init__(self, lock: _RWLock) -> None:
        self._lock = lock

    def __enter__(self) -> None:
        self._lock.acquire_read()

    def __exit__(self, *exc) -> None:
        self._lock.release_read()


class ConceptIndex:
    """Images' concept embeddings, their paths and metadata; searchable with concept control.

    ``exact_below``: galleries (or ``where`` subsets) this small are searched by brute force,
    which is both exact and faster than a graph walk there.

    ``graph_dims``: build the graph on the embeddings' top principal directions (an uncentred
    PCA, which keeps inner products) instead of all C concepts, and re-rank what it finds
    exactly in concept space. A graph walk over a large gallery is bound by memory traffic
    (2 KB a vector at C=512); 64 dimensions cut that eightfold. Recall is then a matter of
    how many candidates are re-ranked, which :meth:`calibrate` tunes like ``ef``. Masks work
    unchanged: the masked query is projected like any other. It assumes queries resemble
    the gallery: one the projection sees little of is searched deeper, but masked queries
    unlike the gallery can still lose some recall. The default full-concept graph has no
    such limit. See :meth:`set_graph_dims`.

    ``ef`` is the HNSW search depth for a plain query; a masked query searches
    ``ef / cos(q, q*w)**mask_ef_power`` deep, because the further the mask turns the query
    away from the data it was built on, the further the graph walk must go for the same
    recall (see :meth:`calibrate`).
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
        overfetch: int = 10,
        max_ef: int = 4096,
        seed: int = 100,
        capacity: int = 1024,
        graph_dims: int | None = None,
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
        self.overfetch = int(overfetch)
        self.max_ef = int(max_ef)
        self.seed = int(seed)
        self.path: Path | None = None
        self._base_version: str | None = None
        self._lock = _RWLock()
        self._db_lock = threading.Lock()
        self._save_lock = threading.Lock()
        self._next_id = 0
        self._concept_names: dict[int, str] = {}
        capacity = max(16, int(capacity))
        self._emb = np.zeros((capacity, self.num_concepts), dtype=np.float32)
        self._alive = np.zeros(capacity, dtype=bool)
        self._row_ids = np.full(capacity, -1, dtype=np.int64)
        self._rows = 0  # high-water mark of used rows
        self._free: list[int] = []
        self._row_of: dict[int, int] = {}
        self._id_rows = np.full(capacity, -1, dtype=np.int64)  # id -> row, vectorised lookups
        # per-concept max of g_i^2 over the gallery: an upper bound kept on every add (a
        # removal leaves it a valid, looser bound), for the renormalised-search stopping test
        self._colmax2 = np.zeros(self.num_concepts, dtype=np.float32)
        # [d, C] once fitted; until a gallery is large enough to fit it (see add), the graph
        # stays in concept space, which is exact and, at that size, fast anyway
        self._projection: np.ndarray | None = None
        if graph_dims is not None:
            self._check_graph_dims(graph_dims)
        self._wanted_graph_dims = None if graph_dims is None else int(graph_dims)
        # with a projection P: the gallery's second moments C = E[g g^T], as C * (P^T P) and
        # diag(C), so how much of a typical item *under a mask w* the graph sees costs one
        # quadratic form per query: E||P(g*w)||^2 = w (C * P^T P) w, E||g*w||^2 = w^2 . diag C
        self._capture_weights: np.ndarray | None = None  # [C, C]
        self._second_moments: np.ndarray | None = None  # [C]
        self._hnsw = self._new_graph(capacity)
        self._db = _memory_db()
        self._db.executescript(_SCHEMA)

    # ------------------------------------------------------------------ graph space
    @property
    def graph_dims(self) -> int | None:
        """Dimensions the graph works in now (None: all concepts)."""
        return None if self._projection is None else int(self._projection.shape[0])

    def _fit_threshold(self) -> int:
        return max(256, 4 * (self._wanted_graph_dims or 0))

    def _check_graph_dims(self, dims: int) -> None:
        if not 1 <= int(dims) <= self.num_concepts:
            raise ConceptIndexError(
                f"graph_dims must be between 1 and {self.num_concepts}, not {dims}"
            )

    def _new_graph(self, capacity: int) -> hnswlib.Index:
        graph = hnswlib.Index(
            space="ip", dim=self.num_concepts if self._projection is None else len(self._projection)
        )
        graph.init_index(
            max_elements=max(16, int(capacity)),
            M=self.M,
            ef_construction=self.ef_construction,
            random_seed=self.seed,
            allow_replace_deleted=True,
        )
        graph.set_ef(self.ef)
        return graph

    def _to_graph(self, vectors: np.ndarray) -> np.ndarray:
        if self._projection is None:
            return vectors
        return np.ascontiguousarray(vectors @ self._projection.T, dtype=np.float32)

    def set_graph_dims(
        self, dims: int | None, sample: np.ndarray | None = None, *, num_threads: int = -1
    ) -> None:
        """Put the graph on the top ``dims`` principal directions (None: all concepts).

        The directions are fitted on ``sample`` (e.g. the embeddings about to be added) or
        else on the stored embeddings (up to 50,000 of them), and the graph is rebuilt from
        the stored embeddings. Call :meth:`calibrate` afterwards: recall depends on it.
        """
        if dims is not None:
            self._check_graph_dims(dims)
        with self._lock.write():
            self._wanted_graph_dims = None if dims is None else int(dims)
            if dims is None:
                self._projection = self._capture_weights = self._second_moments = None
            else:
                data = (
                    self._vectors(sample)
                    if sample is not None
                    else self._emb[np.flatnonzero(self._alive[: self._rows])]
                )
                if len(data) < int(dims):
                    raise ConceptIndexError(
                        f"{self._where()}: {len(data)} embeddings cannot fit {dims} graph "
                        "dimensions; add more images first"
                    )
                if len(data) > 50000:
                    picked = np.random.default_rng(self.seed).choice(len(data), 50000, False)
                    data = data[np.sort(picked)]
                # uncentred: a rotation keeps inner products, and the mean direction (large
                # for these all-positive-ish score vectors) is the first one it keeps
                _, _, vt = np.linalg.svd(data.astype(np.float64), full_matrices=False)
                self._projection = np.ascontiguousarray(vt[: int(dims)], dtype=np.float32)
                unit = data / np.linalg.norm(data, axis=1, keepdims=True)
                moments = unit.T @ unit / len(unit)
                p64 = self._projection.astype(np.float64)
                self._capture_weights = (moments * (p64.T @ p64)).astype(np.float32)
                self._second_moments = np.diag(moments).astype(np.float32)
            self._rebuild_graph_unlocked(num_threads)

    def _rebuild_graph_unlocked(self, num_threads: int = -1) -> None:
        live = len(self._row_of)
        graph = self._new_graph(max(live, 16))
        if live:
            ids = np.fromiter(self._row_of, dtype=np.int64, count=live)
            graph.add_items(
                self._to_graph(self._emb[self._id_rows[ids]]), ids, num_threads=num_threads
            )
        self._hnsw = graph

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

    def __len__(self) -> int:
        return len(self._row_of)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._row_of

    def __repr__(self) -> str:
        where = f" at {self.path}" if self.path else ""
        return f"<ConceptIndex {len(self)} items, {self.num_concepts} concepts{where}>"

    @property
    def ids(self) -> list[int]:
        with self._lock.read():
            return sorted(self._row_of)

    def _where(self) -> str:
        return str(self.path) if self.path else "index"

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

    def add(
        self,
        embeddings: np.ndarray | Sequence,
        paths: Sequence[str | os.PathLike | None] | None = None,
        metadata: Sequence[Mapping[str, object] | None] | None = None,
        *,
        num_threads: int = -1,
    ) -> list[int]:
        """Add items; a path already in the index updates that item instead (one item a path).

        Returns the item ids, in input order. Metadata values are stored as strings.
        """
        vectors = self._vectors(embeddings)
        n = len(vectors)
        paths = [None] * n if paths is None else [None if p is None else str(p) for p in paths]
        metadata = [None] * n if metadata is None else list(metadata)
        if len(paths) != n or len(metadata) != n:
            raise ConceptIndexError(
                f"{self._where()}: {n} embeddings but {len(paths)} paths and "
                f"{len(metadata)} metadata rows"
            )
        clean_meta = [_clean_metadata(m, self._where()) for m in metadata]
        seen: set[str] = set()
        for path in paths:
            if path is not None:
                if path in seen:
                    raise ConceptIndexError(f"{path}: given twice in one add")
                seen.add(path)
        wanted = self._wanted_graph_dims
        if wanted and self._projection is None and len(self) + n >= self._fit_threshold():
            # enough data to fit the reduced graph: fit it before this batch enters the graph
            with self._lock.read():
                stored = self._emb[np.flatnonzero(self._alive[: self._rows])]
            self.set_graph_dims(wanted, np.concatenate([stored, vectors]), num_threads=num_threads)
        with self._lock.write():
            existing = self._ids_for_paths_unlocked([p for p in paths if p is not None])
            ids, new_rows = [], []
            for i, path in enumerate(paths):
                if path is not None and path in existing:
                    ids.append(existing[path])
                else:
                    ids.append(self._next_id)
                    self._next_id += 1
                    new_rows.append(i)
            new_set = set(new_rows)
            update_rows = [i for i in range(n) if i not in new_set]
            new_ids = [ids[i] for i in new_rows]
            self._grow_unlocked(len(new_rows))
            if new_rows:
                self._hnsw.add_items(
                    self._to_graph(vectors[new_rows]),
                    np.asarray(new_ids, dtype=np.int64),
                    num_threads=num_threads,
                    replace_deleted=True,
                )
            if update_rows:
                self._hnsw.add_items(
                    self._to_graph(vectors[update_rows]),
                    np.asarray([ids[i] for i in update_rows]),
                    num_threads=num_threads,
                )
            for i, item_id in enumerate(ids):
                row = self._row_of.get(item_id)
                if row is None:
                    row = self._free.pop() if self._free else self._take_row_unlocked()
                    self._row_of[item_id] = row
                    self._set_id_row(item_id, row)
                    self._row_ids[row] = item_id
                    self._alive[row] = True
                self._emb[row] = vectors[i]
            np.maximum(self._colmax2, (vectors * vectors).max(axis=0), out=self._colmax2)
            with self._db_lock, self._db:
                for i, item_id in enumerate(ids):
                    self._db.execute(
                        "INSERT INTO items (id, path) VALUES (?, ?) "
                        "ON CONFLICT(id) DO UPDATE SET path = excluded.path",
                        (item_id, paths[i]),
                    )
                    if clean_meta[i] is not None:
                        self._db.execute("DELETE FROM meta WHERE id = ?", (item_id,))
                        self._db.executemany(
                            "INSERT INTO meta (id, key, value) VALUES (?, ?, ?)",
                            [(item_id, k, v) for k, v in clean_meta[i].items()],
                        )
        return ids

    def _set_id_row(self, item_id: int, row: int) -> None:
        if item_id >= len(self._id_rows):
            grown = np.full(max(2 * len(self._id_rows), item_id + 1), -1, dtype=np.int64)
            grown[: len(self._id_rows)] = self._id_rows
            self._id_rows = grown
        self._id_rows[item_id] = row

    def _take_row_unlocked(self) -> int:
        if self._rows == len(self._emb):
            capacity = 2 * len(self._emb)
            emb = np.zeros((capacity, self.num_concepts), dtype=np.float32)
            emb[: self._rows] = self._emb[: self._rows]
            alive = np.zeros(capacity, dtype=bool)
            alive[: self._rows] = self._alive[: self._rows]
            row_ids = np.full(capacity, -1, dtype=np.int64)
            row_ids[: self._rows] = self._row_ids[: self._rows]
            self._emb, self._alive, self._row_ids = emb, alive, row_ids
        self._rows += 1
        return self._rows - 1

    def _grow_unlocked(self, new_items: int) -> None:
        """Resize the graph in place (no rebuild) when deleted slots cannot take the new items."""
        deleted = self._hnsw.element_count - len(self._row_of)
        needed = self._hnsw.element_count + max(0, new_items - deleted)
        if needed > self._hnsw.max_elements:
            self._hnsw.resize_index(max(needed, 2 * self._hnsw.max_elements, 16))

    def update(
        self,
        item_id: int,
        embedding: np.ndarray | None = None,
        *,
        path: str | os.PathLike | None = None,
        metadata: Mapping[str, object] | None = None,
    ) -> None:
        """Replace an item's embedding, path and/or metadata (None leaves a field as it is)."""
        vector = None if embedding is None else self._vectors(embedding)
        clean = _clean_metadata(metadata, self._where()) if metadata is not None else None
        with self._lock.write():
            row = self._row_unlocked(item_id)
            if vector is not None:
                self._hnsw.add_items(self._to_graph(vector), np.asarray([item_id]), num_threads=1)
                self._emb[row] = vector[0]
                np.maximum(self._colmax2, vector[0] * vector[0], out=self._colmax2)
            with self._db_lock, self._db:
                if path is not None:
                    try:
                        self._db.execute(
                            "UPDATE items SET path = ? WHERE id = ?", (str(path), item_id)
                        )
                    except sqlite3.IntegrityError:
                        raise ConceptIndexError(
                            f"{path}: already in the index as another item"
                        ) from None
                if clean is not None:
                    self._db.execute("DELETE FROM meta WHERE id = ?", (item_id,))
                    self._db.executemany(
                        "INSERT INTO meta (id, key, value) VALUES (?, ?, ?)",
                        [(item_id, k, v) for k, v in clean.items()],
                    )

    def remove(self, item_ids: Iterable[int]) -> None:
        """Remove items (all or none); their graph slots are reused by later adds."""
        item_ids = [int(i) for i in item_ids]
        with self._lock.write():
            for item_id in item_ids:
                self._row_unlocked(item_id)
            for item_id in dict.fromkeys(item_ids):
                self._hnsw.mark_deleted(item_id)
                row = self._row_of.pop(item_id)
                self._id_rows[item_id] = -1
                self._alive[row] = False
                self._row_ids[row] = -1
                self._free.append(row)
            with self._db_lock, self._db:
                self._db.executemany("DELETE FROM meta WHERE id = ?", [(i,) for i in item_ids])
                self._db.executemany("DELETE FROM items WHERE id = ?", [(i,) for i in item_ids])

    def _row_unlocked(self, item_id: int) -> int:
        try:
            return self._row_of[int(item_id)]
        except (KeyError, TypeError, ValueError):
            raise ConceptIndexError(f"{self._where()}: no item with id {item_id}") from None

    # ------------------------------------------------------------------ lookups
    def _ids_for_paths_unlocked(self, paths: Sequence[str]) -> dict[str, int]:
        found: dict[str, int] = {}
        with self._db_lock:
            for start in range(0, len(paths), 500):
                chunk = list(paths[start : start + 500])
                marks = ",".join("?" * len(chunk))
                rows = self._db.execute(
                    f"SELECT path, id FROM items WHERE path IN ({marks})", chunk
                ).fetchall()
                found.update(rows)
        return found

    def id_for_path(self, path: str | os.PathLike) -> int | None:
        with self._lock.read():
            return self._ids_for_paths_unlocked([str(path)]).get(str(path))

    def embedding(self, item_id: int) -> np.ndarray:
        with self._lock.read():
            return self._emb[self._row_unlocked(item_id)].copy()

    def item(self, item_id: int) -> tuple[str | None, dict[str, str]]:
        """(path, metadata) of one item."""
        with self._lock.read():
            self._row_unlocked(item_id)
            return self._describe_unlocked([int(item_id)])[int(item_id)]

    def _describe_unlocked(self, ids: Sequence[int]) -> dict[int, tuple[str | None, dict]]:
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        with self._db_lock:
            rows = self._db.execute(
                "SELECT items.id, items.path, meta.key, meta.value FROM items LEFT JOIN meta "
                f"ON meta.id = items.id WHERE items.id IN ({marks}) ORDER BY meta.key",
                list(ids),
            ).fetchall()
        out: dict[int, tuple[str | None, dict]] = {}
        for item_id, path, key, value in rows:
            entry = out.setdefault(item_id, (path, {}))
            if key is not None:
                entry[1][key] = value
        return out

    def metadata_keys(self) -> list[str]:
        with self._lock.read(), self._db_lock:
            return [r[0] for r in self._db.execute("SELECT DISTINCT key FROM meta ORDER BY key")]

    def ids_where(self, where: Mapping[str, object]) -> set[int]:
        """Ids whose metadata has every ``key == value`` (as strings); unknown keys are errors."""
        with self._lock.read():
            return self._ids_where_unlocked(where)

    def _ids_where_unlocked(self, where: Mapping[str, object]) -> set[int]:
        with self._db_lock:
            parts, args = [], []
            for key, value in where.items():
                if (
                    self._db.execute("SELECT 1 FROM meta WHERE key = ? LIMIT 1", (key,)).fetchone()
                    is None
                ):
                    known = [r[0] for r in self._db.execute("SELECT DISTINCT key FROM meta")]
                    raise ConceptIndexError(
                        f"{self._where()}: no item has metadata key '{key}' (known keys: "
                        f"{', '.join(sorted(known)) or 'none'})"
                    )
                parts.append("SELECT id FROM meta WHERE key = ? AND value = ?")
                args += [str(key), str(value)]
            return {r[0] for r in self._db.execute(" INTERSECT ".join(parts), args)}

    # ------------------------------------------------------------------ concept names
    @property
    def concept_names(self) -> dict[int, str]:
        return dict(self._concept_names)

    def set_concept_name(self, concept: ConceptRef, name: str | None) -> None:
        """Name a concept (None clears); names are unique and never look like an index."""
        with self._lock.write():
            index = self._resolve_concept_unlocked(concept)
            if name is None:
                self._concept_names.pop(index, None)
                return
            name = _check_concept_name(name)
            owner = next((i for i, n in self._concept_names.items() if n == name), None)
            if owner is not None and owner != index:
                raise ConceptError(f"{self._where()}: concept {owner} is already named '{name}'")
            self._concept_names[index] = name

    def resolve_concept(self, concept: ConceptRef) -> int:
        """A concept index from an index or a name; the error lists what would have worked."""
        return self._resolve_concept_unlocked(concept)

    def _resolve_many(self, concepts: Iterable[ConceptRef]) -> np.ndarray:
        """Indices of many concepts; a plain integer list or array skips the per-item path."""
        if isinstance(concepts, (str, bytes)):
            concepts = [concepts]
        values = concepts if isinstance(concepts, np.ndarray) else list(concepts)
        array = np.asarray(values) if len(values) else np.zeros(0, dtype=np.int64)
        if array.dtype.kind in "iu" and array.ndim == 1:
            if len(array) and (array.min() < 0 or array.max() >= self.num_concepts):
                bad = next(int(c) for c in array if not 0 <= c < self.num_concepts)
                self._resolve_concept_unlocked(bad)  # raises the usual message
            return array.astype(np.int64)
        return np.asarray([self._resolve_concept_unlocked(c) for c in values], dtype=np.int64)

    def _resolve_concept_unlocked(self, concept: ConceptRef) -> int:
        if isinstance(concept, (bool, np.bool_)):
            raise ConceptError(f"{self._where()}: {concept!r} is not a concept")
        if isinstance(concept, str) and re.fullmatch(r"\s*-?\d+\s*", concept):
            concept = int(concept)
        if isinstance(concept, (int, np.integer)):
            if not 0 <= int(concept) < self.num_concepts:
                raise ConceptError(
                    f"{self._where()}: concept {int(concept)} is out of range "
                    f"(this index has concepts 0-{self.num_concepts - 1})"
                )
            return int(concept)
        if isinstance(concept, str):
            for index, name in self._concept_names.items():
                if name == concept.strip():
                    return index
            known = sorted(self._concept_names.values())
            shown = ", ".join(known[:10]) + (" ..." if len(known) > 10 else "")
            raise ConceptError(
                f"{self._where()}: unknown concept name '{concept}' "
                f"(named concepts: {shown or 'none; name them with `cmn-edge index name-concept`'})"
            )
        raise ConceptError(f"{self._where()}: {concept!r} is not a concept index or name")

    # ------------------------------------------------------------------ search
    def plan(
        self,
        exclude: Iterable[ConceptRef] = (),
        only: Iterable[ConceptRef] | None = None,
        weights: Mapping[ConceptRef, float] | None = None,
        renormalize: bool = False,
    ) -> _Plan:
        """Turn concept controls (indices or names) into one query-side weight vector."""
        exclude = self._resolve_many(exclude)
        only_list = None if only is None else self._resolve_many(only)
        weight_map = {}
        for concept, value in (weights or {}).items():
            value = float(value)
            if not math.isfinite(value) or value < 0:
                raise ConceptError(
                    f"{self._where()}: weight of concept {concept} must be a finite number "
                    f">= 0, not {value}"
                )
            weight_map[self._resolve_concept_unlocked(concept)] = value
        if only_list is not None and not len(only_list):
            raise ConceptError(f"{self._where()}: 'only' names no concept")
        described = {
            "exclude": sorted(set(exclude.tolist())),
            "only": None if only_list is None else sorted(set(only_list.tolist())),
            "weights": {str(k): v for k, v in sorted(weight_map.items())},
            "renormalize": bool(renormalize),
        }
        if not len(exclude) and only_list is None and not weight_map:
            return _Plan(None, False, described)  # renormalising over every concept: plain
        w = np.ones(self.num_concepts, dtype=np.float32)
        if only_list is not None:
            w[:] = 0
            w[only_list] = 1
        w[exclude] = 0
        for index, value in weight_map.items():
            w[index] *= value
        if not w.any():
            raise ConceptError(f"{self._where()}: the concept controls leave no concept")
        return _Plan(w, bool(renormalize), described)

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
    ) -> list[Hit]:
        """The k best items for one query embedding, under the given concept controls.

        ``k`` larger than the searchable gallery is an error (a silent short list hides a
        wrong index); a ``where`` filter may leave fewer than k, and then fewer are returned.
        ``explain`` > 0 attaches that many top contributing concepts to every hit.
        """
        q = self._query_vector(query)
        with self._lock.read():
            plan = self.plan(exclude, only, weights, renormalize)
            ids, scores = self._search_unlocked(q, k, plan, where, exact, set(exclude_ids))
            described = self._describe_unlocked([int(i) for i in ids])
            hits = []
            for rank, (item_id, score) in enumerate(zip(ids, scores), start=1):
                path, meta = described.get(int(item_id), (None, {}))
                top = None
                if explain:
                    top = self._top_concepts_unlocked(q, int(item_id), plan, explain)
                hits.append(Hit(rank, int(item_id), float(score), path, meta, top))
        return hits

    def search_ids(
        self, query: np.ndarray, k: int = 10, *, exact: bool = False, **controls
    ) -> tuple[np.ndarray, np.ndarray]:
        """(ids, scores) only: the search without the metadata look-up, for benchmarks."""
        q = self._query_vector(query)
        where = controls.pop("where", None)
        exclude_ids = set(controls.pop("exclude_ids", ()))
        with self._lock.read():
            plan = self.plan(**controls)
            return self._search_unlocked(q, k, plan, where, exact, exclude_ids)

    def search_id(self, item_id: int, k: int = 10, **kwargs) -> list[Hit]:
        """More like an item already in the index (the item itself is left out)."""
        vector = self.embedding(item_id)
        exclude_ids = set(kwargs.pop("exclude_ids", ())) | {int(item_id)}
        return self.search(vector, k, exclude_ids=exclude_ids, **kwargs)

    def _search_unlocked(
        self,
        q: np.ndarray,
        k: int,
        plan: _Plan,
        where: Mapping[str, object] | None,
        exact: bool,
        exclude_ids: set[int],
    ) -> tuple[np.ndarray, np.ndarray]:
        k = int(k)
        if k < 1:
            raise ConceptIndexError(f"k must be at least 1, not {k}")
        live = len(self._row_of)
        if live == 0:
            raise ConceptIndexError(f"{self._where()}: the index is empty")
        exclude_ids = {i for i in exclude_ids if i in self._row_of}
        searchable = live - len(exclude_ids)
        if k > searchable:
            raise ConceptIndexError(
                f"{self._where()}: k={k} is larger than the gallery ({searchable} searchable "
                f"item{'s' if searchable != 1 else ''}); ask for at most {searchable}"
            )
        subset = None
        if where:
            subset = self._ids_where_unlocked(where) - exclude_ids
            if not subset:
                return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        elif exclude_ids:
            subset = None  # handled by over-fetching past the excluded ids
        if plan.weights is None:
            qh = q
        elif plan.renormalize:
            qh = q * plan.weights * plan.weights  # numerator of the masked cosine
        else:
            qh = q * plan.weights
        if not np.any(qh):
            raise ConceptError(
                f"{self._where()}: the concept controls remove everything this query has"
            )
        size = len(subset) if subset is not None else searchable
        if exact or size <= self.exact_below:
            if subset is not None:
                rows = self._id_rows[np.fromiter(subset, dtype=np.int64, count=len(subset))]
                return self._exact_unlocked(q, k, plan, rows)
            return self._exact_unlocked(q, k, plan, None, exclude_ids)
        # a where-subset filters inside the graph walk; a few excluded ids are cheaper to
        # over-fetch and drop afterwards than a Python callback on every visited node
        filt = subset.__contains__ if subset is not None else None
        drop = exclude_ids if subset is None else set()
        limit = len(subset) if subset is not None else live
        ef = self._query_ef(q, qh, k, plan) + len(drop)
        try:
            if plan.renormalize:
                return self._renormalized_unlocked(q, qh, k, plan, limit, ef, subset, drop)
            labels, _ = self._knn(qh, min(ef, limit), filt)
            return self._rescore_unlocked(q, labels, plan, k, drop)
        except RuntimeError:  # the graph walk found fewer than asked: brute force instead
            rows = np.flatnonzero(self._alive[: self._rows])
            if subset is not None or exclude_ids:
                keep = subset if subset is not None else set(self._row_of) - exclude_ids
                rows = rows[np.isin(self._row_ids[rows], np.fromiter(keep, dtype=np.int64))]
            return self._exact_unlocked(q, k, plan, rows)

    def _query_ef(self, q: np.ndarray, qh: np.ndarray, k: int, plan: _Plan) -> int:
        """Search depth: the base ef, deepened by how much of the query the graph cannot see.

        A mask turns the query away from the data the graph was built on (``cos(q, q*w)``,
        exponent tuned by :meth:`calibrate`). A reduced graph sees only the query's part in
        its directions: compared with how much it sees of a typical gallery item under the
        same mask, a query unlike the gallery is searched deeper, steeply (an unlike query
        needed about (1/seen)^4 the depth to reach the recall of a typical one).
        """
        ef = float(max(self.ef, k))
        if qh is not q:
            cos = float(q @ qh) / (float(np.linalg.norm(qh)) + 1e-30)
            ef /= max(cos, 1e-3) ** self.mask_ef_power
        if self._projection is not None:
            w = None
            if plan.weights is not None:
                w = plan.weights * plan.weights if plan.renormalize else plan.weights
            seen = self._capture(qh) / self._typical_capture_for(w)
            ef /= max(min(seen, 1.0), 1e-3) ** 4
        return int(min(max(math.ceil(ef), k), max(self.max_ef, k)))

    def _capture(self, v: np.ndarray) -> float:
        return float(np.linalg.norm(self._projection @ v)) / (float(np.linalg.norm(v)) + 1e-30)

    def _typical_capture_for(self, w: np.ndarray | None) -> float:
        """Root-mean-square share of a gallery item ``g * w`` the projection keeps."""
        if w is None:
            kept, total = float(self._capture_weights.sum()), float(self._second_moments.sum())
        else:
            kept = float(w @ self._capture_weights @ w)
            total = float((w * w) @ self._second_moments)
        return math.sqrt(max(kept, 1e-30) / max(total, 1e-30))

    def _knn(self, qh: np.ndarray, fetch: int, filt) -> tuple[np.ndarray, np.ndarray]:
        # hnswlib searches max(ef, k) deep: asking for ``fetch`` results sets the depth per
        # query, so concurrent searches never race on the shared ef setting.
        qg = qh if self._projection is None else self._projection @ qh
        labels, dist = self._hnsw.knn_query(qg[None, :], k=int(fetch), num_threads=1, filter=filt)
        return labels[0].astype(np.int64), dist[0]

    def _candidate_rows(self, labels: np.ndarray, drop: set[int]) -> np.ndarray:
        if drop:
            labels = labels[~np.isin(labels, np.fromiter(drop, dtype=np.int64))]
        return self._id_rows[labels]

    def _rescore_unlocked(
        self, q: np.ndarray, labels: np.ndarray, plan: _Plan, k: int, drop: set[int]
    ) -> tuple[np.ndarray, np.ndarray]:
        return self._exact_unlocked(q, k, plan, self._candidate_rows(labels, drop))

    def _renormalized_unlocked(
        self,
        q: np.ndarray,
        qh: np.ndarray,
        k: int,
        plan: _Plan,
        limit: int,
        ef: int,
        subset: set[int] | None,
        drop: set[int],
    ) -> tuple[np.ndarray, np.ndarray]:
        """Over-fetch by masked inner product, re-rank by masked cosine; fetch deeper until safe.

        Safe: either a bound proves no unfetched item can beat the k-th (its masked inner
        product is at most the last fetched one's, and its masked norm at least
        ``_min_masked_norm``; full-concept graphs only), or the current top k all rank in the
        first half of the fetched list by exact masked inner product, so the tail that was
        fetched added nothing and a deeper one is unlikely to.
        """
        fetch = max(ef, self.overfetch * k)
        filt = subset.__contains__ if subset is not None else None
        qn = float(np.linalg.norm(q * plan.weights))
        while True:
            if fetch * 2 >= limit:  # the walk would visit most of the gallery: brute force
                if subset is None:
                    return self._exact_unlocked(q, k, plan, None, drop)
                ids = np.fromiter(subset, dtype=np.int64, count=len(subset))
                return self._exact_unlocked(q, k, plan, self._id_rows[ids])
            labels, _ = self._knn(qh, fetch, filt)
            rows = self._candidate_rows(labels, drop)
            # one gather of the candidates serves both orders: the masked cosine and, since
            # the query side of that cosine is qh / ||q*w||, the masked inner product
            scores, ip = self._renormalized_scores(q, plan, self._gather(rows))
            top = self._top_k(scores, self._row_ids[rows], k)
            rank = np.empty(len(ip), dtype=np.int64)
            rank[np.argsort(-ip, kind="stable")] = np.arange(len(ip))
            last_ip = float(ip.min()) * qn
            if self._projection is not None:
                bound = math.inf  # the graph's own order is approximate there: no proof
            elif last_ip <= 0:
                bound = 0.0
            else:
                bound = last_ip / (qn * max(self._min_masked_norm(plan.weights), 1e-12))
            deepest = int(rank[top].max())
            if scores[top[-1]] >= bound or deepest < len(rows) // 2 or fetch >= self.max_ef:
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

    def _gather(self, rows: np.ndarray) -> np.ndarray:
        # np.take copies rows about twice as fast as fancy indexing (measured: 17 vs 40 us
        # for 385 rows of 512), and a re-rank is mostly this copy
        return np.take(self._emb, rows, axis=0)

    def _scores(self, q: np.ndarray, plan: _Plan, rows: np.ndarray | None) -> np.ndarray:
        """Exact scores of ``rows`` (None: every used row, read in place without a copy), in
        chunks so a large gallery needs little extra memory."""
        count = self._rows if rows is None else len(rows)
        if plan.weights is None and count <= 32768:
            return (self._emb[:count] if rows is None else self._gather(rows)) @ q
        out = np.empty(count, dtype=np.float32)
        qv = q if plan.weights is None else q * plan.weights
        for start in range(0, count, 32768):
            if rows is None:
                chunk = self._emb[start : min(start + 32768, count)]
            else:
                chunk = self._gather(rows[start : start + 32768])
            if plan.renormalize:
                part, _ = self._renormalized_scores(q, plan, chunk)
            else:
                part = chunk @ qv
            out[start : start + len(part)] = part
        return out

    @staticmethod
    def _renormalized_scores(
        q: np.ndarray, plan: _Plan, vectors: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """(masked cosine, masked inner product / ||q*w||) of ``vectors``: one computation
        for the exact search and the re-rank, so both give the very same floats."""
        w = plan.weights
        qv = q * w
        qv = (qv / np.float32(np.linalg.norm(qv))) * w
        ip = vectors @ qv
        norms = np.sqrt((vectors * vectors) @ (w * w))
        return np.divide(ip, norms, out=np.zeros_like(ip), where=norms > 0), ip

    def _exact_unlocked(
        self,
        q: np.ndarray,
        k: int,
        plan: _Plan,
        rows: np.ndarray | None,
        exclude_ids: set[int] = frozenset(),
    ) -> tuple[np.ndarray, np.ndarray]:
        """Brute force over ``rows``, or with None over every live item but ``exclude_ids``."""
        scores = self._scores(q, plan, rows)
        if rows is None:
            ids = self._row_ids[: self._rows]
            invalid = ~self._alive[: self._rows]
            if exclude_ids:
                invalid[self._id_rows[np.fromiter(exclude_ids, dtype=np.int64)]] = True
            if invalid.any():
                scores[invalid] = -np.inf  # k <= the searchable count: never in the top k
        else:
            ids = self._row_ids[rows]
        order = self._top_k(scores, ids, k)
        return ids[order], scores[order]

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

    def _top_concepts_unlocked(self, q: np.ndarray, item_id: int, plan: _Plan, n: int) -> list:
        g = self._emb[self._row_of[item_id]].astype(np.float64)
        qv = q.astype(np.float64)
        if plan.weights is not None:
            w = plan.weights.astype(np.float64)
            qv = qv * w
            if plan.renormalize:
                qv = qv / np.linalg.norm(qv)
                g = g * w
                norm = np.linalg.norm(g)
                g = g / norm if norm > 0 else g
        terms = concept_contributions(qv, g)
        score = float(terms.sum())
        order = np.argsort(-terms, kind="stable")[:n]
        return [
            {
                "index": int(i),
                "name": self._concept_names.get(int(i)),
                "contribution": float(terms[i]),
                "share": float(terms[i] / score) if score > 0 else None,
            }
            for i in order
        ]

    # ------------------------------------------------------------------ calibration
    def recall(self, queries: np.ndarray, k: int = 10, **controls) -> float:
        """Mean recall@k of the graph search against brute force, under ``controls``."""
        queries = self._vectors(queries)
        hits = 0
        total = 0
        for q in queries:
            approx, _ = self.search_ids(q, k, **controls)
            exact, _ = self.search_ids(q, k, exact=True, **controls)
            hits += len(set(approx.tolist()) & set(exact.tolist()))
            total += len(exact)
        return hits / max(total, 1)

    def calibrate(
        self,
        target: float = 0.98,
        k: int = 10,
        queries: np.ndarray | None = None,
        sample: int = 100,
        seed: int = 0,
        mask_fractions: Sequence[float] = (0.1, 0.5),
    ) -> dict:
        """Raise ef (plain) and the mask depth exponent until recall@k reaches ``target``
        with a margin of two standard errors of the sample's mean recall.

        Give ``queries`` that are NOT in the index (e.g. images held back from the build):
        a gallery item used as its own query (left out of the results) still sits in the
        graph as a stepping stone right next to the answer, which flatters recall. Without
        ``queries`` that is what is used. Masks drop a random fraction of the concepts,
        scored both as masked inner product and renormalised. Galleries small enough for
        brute force need none of this.
        """
        rng = np.random.default_rng(seed)
        ids = np.asarray(self.ids)
        if len(ids) <= max(self.exact_below, k + 1):
            return {
                "ef": self.ef,
                "mask_ef_power": self.mask_ef_power,
                "recall": 1.0,
                "masked_recall": {},
                "queries": 0,
            }
        if queries is not None:
            queries = self._vectors(queries)
            own = [set() for _ in queries]
        else:
            chosen = rng.choice(ids, size=min(sample, len(ids)), replace=False)
            queries = np.stack([self.embedding(int(i)) for i in chosen])
            own = [{int(i)} for i in chosen]

        def measure(controls: list[dict], truth: list[set]) -> tuple[float, float]:
            """Mean recall, less two standard errors of it (from the per-query spread:
            the k results of one query are not independent draws)."""
            per_query = np.array(
                [
                    len(truth[j] & set(self.search_ids(q, k, exclude_ids=own[j], **c)[0].tolist()))
                    / max(len(truth[j]), 1)
                    for j, (q, c) in enumerate(zip(queries, controls))
                ]
            )
            spread = float(per_query.std(ddof=1)) if len(per_query) > 1 else 0.0
            mean = float(per_query.mean())
            return mean, mean - 2.0 * spread / math.sqrt(len(per_query))

        def exact(controls: list[dict]) -> list[set]:  # does not depend on ef: compute once
            return [
                set(self.search_ids(q, k, exact=True, exclude_ids=own[j], **c)[0].tolist())
                for j, (q, c) in enumerate(zip(queries, controls))
            ]

        plain_controls = [{} for _ in queries]
        truth = exact(plain_controls)
        plain, plain_low = measure(plain_controls, truth)
        while plain_low < target and self.ef < self.max_ef:
            self.ef = min(self.max_ef, math.ceil(self.ef * 1.25))
            plain, plain_low = measure(plain_controls, truth)
        mask_sets = []
        for fraction in mask_fractions:
            n_drop = max(1, round(fraction * self.num_concepts))
            drops = [rng.choice(self.num_concepts, n_drop, replace=False) for _ in queries]
            for renormalize in (False, True):
                name = f"{fraction}{' renormalized' if renormalize else ''}"
                controls = [{"exclude": d, "renormalize": renormalize} for d in drops]
                mask_sets.append((name, controls, exact(controls)))

        def masked_at(power: float) -> tuple[dict, bool]:
            self.mask_ef_power = power
            found = {name: measure(c, t) for name, c, t in mask_sets}
            return found, all(low >= target for _, low in found.values())

        # the exponent rises in whole steps to the first that meets the target for every
        # mask, then comes back down in quarter steps while it still does: deeper than
        # needed costs time on every masked query
        power, (masked, ok) = 0.0, masked_at(0.0)
        while not ok and power < 8:
            power += 1.0
            masked, ok = masked_at(power)
        if ok:
            for lower in (power - 0.25, power - 0.5, power - 0.75):
                if lower < 0:
                    break
                found, still = masked_at(lower)
                if not still:
                    break
                power, masked = lower, found
        self.mask_ef_power = power
        with self._lock.write():
            self._hnsw.set_ef(self.ef)
        return {
            "ef": self.ef,
            "mask_ef_power": self.mask_ef_power,
            "recall": plain,
            "masked_recall": {name: mean for name, (mean, _) in masked.items()},
            "queries": len(queries),
            "target": target,
        }

    # ------------------------------------------------------------------ persistence
    def manifest(self) -> dict:
        """What ``info`` shows and ``manifest.json`` holds (less the file checksums)."""
        with self._lock.read():
            return self._manifest_unlocked()

    def _manifest_unlocked(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": {"id": self.model_id, "ref": self.model_ref, "precision": self.precision},
            "num_concepts": self.num_concepts,
            "space": "ip",
            "counts": {
                "items": len(self._row_of),
                "deleted_slots": int(self._hnsw.element_count - len(self._row_of)),
                "named_concepts": len(self._concept_names),
            },
            "next_id": self._next_id,
            "hnsw": {
                "M": self.M,
                "ef_construction": self.ef_construction,
                "ef": self.ef,
                "max_elements": int(self._hnsw.max_elements),
                "element_count": int(self._hnsw.element_count),
                "seed": self.seed,
                "graph_dims": self._wanted_graph_dims,
                "graph_dims_in_use": self.graph_dims,
            },
            "search": {
                "exact_below": self.exact_below,
                "mask_ef_power": self.mask_ef_power,
                "overfetch": self.overfetch,
                "max_ef": self.max_ef,
            },
        }

    def save(self, path: str | os.PathLike | None = None, *, overwrite: bool = False) -> Path:
        """Write a complete new version, then switch ``current`` to it in one rename.

        Refuses a directory that holds another index (unless ``overwrite``), and refuses to
        overwrite a version saved by someone else since this index was loaded.
        """
        target = Path(path) if path is not None else self.path
        if target is None:
            raise ConceptIndexError("save: no directory given and the index was never saved")
        if target.exists() and not target.is_dir():
            raise ConceptIndexError(f"{target}: exists and is not a directory")
        same = self.path is not None and _same_dir(target, self.path)
        if target.is_dir():
            entries = [
                e
                for e in os.listdir(target)
                if e != LOCK and not e.startswith(_TMP_PREFIX) and not _VERSION_RE.match(e)
            ]
            if POINTER not in entries and entries:
                raise ConceptIndexError(
                    f"{target}: directory is not empty and holds no cmn-edge index; "
                    "choose a new or empty directory"
                )
        with self._save_lock, self._lock.read():
            target.mkdir(parents=True, exist_ok=True)
            with _dir_lock(target):
                pointer = _read_pointer(target, missing_ok=True)
                if pointer is not None and not overwrite:
                    if not same:
                        raise ConceptIndexError(
                            f"{target}: already holds an index (overwrite it explicitly)"
                        )
                    if pointer["version"] != self._base_version:
                        raise ConceptIndexError(
                            f"{target}: changed on disk since it was loaded "
                            f"({pointer['version']} != {self._base_version}); load it again"
                        )
                number = 1
                if pointer is not None:
                    match = _VERSION_RE.match(pointer["version"])
                    number = int(match.group(1)) + 1 if match else 1
                version = f"v-{number:06d}-{secrets.token_hex(4)}"
                tmp = target / f"{_TMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
                try:
                    tmp.mkdir()
                    manifest_sha = self._write_version_unlocked(tmp)
                    os.rename(tmp, target / version)
                except BaseException:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise
                _fsync_dir(target)
                _write_pointer(target, {"version": version, "manifest_sha256": manifest_sha})
                for entry in os.listdir(target):
                    if entry != version and (
                        _VERSION_RE.match(entry) or entry.startswith(_TMP_PREFIX)
                    ):
                        _remove(target / entry)
            self.path = target
            self._base_version = version
        return target

    def _write_version_unlocked(self, folder: Path) -> str:
        self._hnsw.save_index(str(folder / HNSW_FILE))
        ids = np.asarray(sorted(self._row_of), dtype=np.int64)
        rows = np.fromiter((self._row_of[int(i)] for i in ids), dtype=np.int64, count=len(ids))
        with open(folder / IDS_FILE, "wb") as handle:
            np.save(handle, ids, allow_pickle=False)
        with open(folder / EMBEDDINGS_FILE, "wb") as handle:
            np.save(handle, np.ascontiguousarray(self._emb[rows]), allow_pickle=False)
        if self._projection is None:
            projection = np.zeros((0, self.num_concepts), dtype=np.float32)
        else:  # [d + C + 1, C]: P, then C * P^T P, then diag C (see __init__)
            projection = np.concatenate(
                [self._projection, self._capture_weights, self._second_moments[None, :]]
            )
        with open(folder / PROJECTION_FILE, "wb") as handle:
            np.save(handle, projection, allow_pickle=False)
        destination = sqlite3.connect(str(folder / METADATA_FILE))
        try:
            with self._db_lock:
                self._db.backup(destination)
        finally:
            destination.close()
        names = {str(i): n for i, n in sorted(self._concept_names.items())}
        (folder / CONCEPTS_FILE).write_text(
            json.dumps({"num_concepts": self.num_concepts, "names": names}, indent=1) + "\n",
            encoding="utf-8",
        )
        manifest = self._manifest_unlocked()
        manifest["files"] = {}
        for name in DATA_FILES:
            file = folder / name
            _fsync_file(file)
            manifest["files"][name] = {"sha256": _sha256(file), "bytes": file.stat().st_size}
        extra = sorted(set(os.listdir(folder)) - set(DATA_FILES))
        if extra:  # e.g. a leftover sqlite journal: never ship a file the manifest ignores
            raise ConceptIndexError(f"{folder}: unexpected files while saving: {extra}")
        data = (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode("utf-8")
        with open(folder / MANIFEST_FILE, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        _fsync_dir(folder)
        return hashlib.sha256(data).hexdigest()

    @classmethod
    def load(cls, path: str | os.PathLike) -> ConceptIndex:
        """Open a saved index, verifying every checksum before any file is parsed."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: index directory not found")
        if not path.is_dir():
            raise IndexCorruptError(f"{path}: not a directory (an index is a directory)")
        for _attempt in range(3):
            pointer = _read_pointer(path)
            try:
                return cls._load_version(path, pointer)
            except FileNotFoundError:
                # a concurrent save may have replaced this version: read the pointer again
                if _read_pointer(path, missing_ok=True) == pointer:
                    raise IndexCorruptError(
                        f"{path / pointer['version']}: version named by '{POINTER}' is "
                        "missing files"
                    ) from None
        raise IndexCorruptError(f"{path}: index keeps changing while being loaded")

    @classmethod
    def _load_version(cls, root: Path, pointer: dict) -> ConceptIndex:
        folder = root / pointer["version"]
        manifest_path = folder / MANIFEST_FILE
        data = manifest_path.read_bytes()
        if hashlib.sha256(data).hexdigest() != pointer["manifest_sha256"]:
            raise IndexCorruptError(f"{manifest_path}: checksum mismatch (file was modified)")
        try:
            manifest = json.loads(data)
            if manifest.get("format") != FORMAT:
                raise IndexCorruptError(f"{manifest_path}: not a {FORMAT} manifest")
            if manifest.get("format_version") != FORMAT_VERSION:
                raise IndexCorruptError(
                    f"{manifest_path}: format version {manifest.get('format_version')} is not "
                    f"supported (this cmn-edge reads {FORMAT_VERSION})"
                )
            files = manifest["files"]
            if set(files) != set(DATA_FILES):
                raise IndexCorruptError(
                    f"{manifest_path}: lists files {sorted(files)}, expected "
                    f"{sorted(DATA_FILES)} (rebuild the index)"
                )
            for name in DATA_FILES:
                file = folder / name
                if not file.is_file():
                    raise FileNotFoundError(f"{file}: missing")
                if (
                    file.stat().st_size != files[name]["bytes"]
                    or _sha256(file) != files[name]["sha256"]
                ):
                    raise IndexCorruptError(f"{file}: checksum mismatch (file was modified)")
            hnsw = manifest["hnsw"]
            search = manifest["search"]
            model = manifest["model"]
            index = cls(
                int(manifest["num_concepts"]),
                model.get("id"),
                model_ref=model.get("ref"),
                precision=model.get("precision"),
                M=int(hnsw["M"]),
                ef_construction=int(hnsw["ef_construction"]),
                ef=int(hnsw["ef"]),
                seed=int(hnsw["seed"]),
                exact_below=int(search["exact_below"]),
                mask_ef_power=float(search["mask_ef_power"]),
                overfetch=int(search["overfetch"]),
                max_ef=int(search["max_ef"]),
                capacity=16,
                graph_dims=hnsw["graph_dims"],
            )
            in_use = None if hnsw["graph_dims_in_use"] is None else int(hnsw["graph_dims_in_use"])
            index._next_id = int(manifest["next_id"])
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, ConceptIndexError):
                raise
            raise IndexCorruptError(f"{manifest_path}: malformed manifest ({exc})") from None
        index._restore(folder, manifest, in_use)
        index.path = root
        index._base_version = pointer["version"]
        return index

    def _restore(self, folder: Path, manifest: dict, graph_dims: int | None) -> None:
        try:
            ids = np.load(folder / IDS_FILE, allow_pickle=False)
            emb = np.load(folder / EMBEDDINGS_FILE, allow_pickle=False)
        except ValueError as exc:
            raise IndexCorruptError(f"{folder}: unreadable array ({exc})") from None
        n = int(manifest["counts"]["items"])
        if ids.shape != (n,) or ids.dtype != np.int64 or len(set(ids.tolist())) != n:
            raise IndexCorruptError(f"{folder / IDS_FILE}: expected {n} distinct int64 ids")
        if emb.shape != (n, self.num_concepts) or emb.dtype != np.float32:
            raise IndexCorruptError(
                f"{folder / EMBEDDINGS_FILE}: expected float32 [{n}, {self.num_concepts}]"
            )
        capacity = max(16, n)
        self._emb = np.zeros((capacity, self.num_concepts), dtype=np.float32)
        self._emb[:n] = emb
        self._alive = np.zeros(capacity, dtype=bool)
        self._alive[:n] = True
        self._row_ids = np.full(capacity, -1, dtype=np.int64)
        self._row_ids[:n] = ids
        self._rows = n
        self._row_of = {int(i): r for r, i in enumerate(ids.tolist())}
        self._id_rows = np.full(max(16, int(manifest["next_id"])), -1, dtype=np.int64)
        if n:
            if ids.min() < 0 or ids.max() >= int(manifest["next_id"]):
                raise IndexCorruptError(f"{folder / IDS_FILE}: ids outside 0..next_id")
            self._id_rows[ids] = np.arange(n)
        if n:
            self._colmax2 = (emb * emb).max(axis=0)
        try:
            projection = np.load(folder / PROJECTION_FILE, allow_pickle=False)
        except ValueError as exc:
            raise IndexCorruptError(f"{folder / PROJECTION_FILE}: unreadable ({exc})") from None
        d, c = int(graph_dims or 0), self.num_concepts
        expected = (d + c + 1 if d else 0, c)
        if projection.shape != expected or projection.dtype != np.float32:
            raise IndexCorruptError(
                f"{folder / PROJECTION_FILE}: expected float32 {list(expected)}"
            )
        if d:
            self._projection = np.ascontiguousarray(projection[:d])
            self._capture_weights = np.ascontiguousarray(projection[d : d + c])
            self._second_moments = np.ascontiguousarray(projection[d + c])
        try:
            concepts = json.loads((folder / CONCEPTS_FILE).read_text(encoding="utf-8"))
            self._concept_names = {int(i): str(v) for i, v in concepts["names"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise IndexCorruptError(f"{folder / CONCEPTS_FILE}: malformed ({exc})") from None
        try:
            source = sqlite3.connect(f"file:{folder / METADATA_FILE}?mode=ro", uri=True)
            try:
                source.backup(self._db)
            finally:
                source.close()
            stored = {r[0] for r in self._db.execute("SELECT id FROM items")}
        except sqlite3.DatabaseError as exc:
            raise IndexCorruptError(f"{folder / METADATA_FILE}: unreadable ({exc})") from None
        if stored != set(self._row_of):
            raise IndexCorruptError(f"{folder / METADATA_FILE}: items disagree with {IDS_FILE}")
        hnsw = hnswlib.Index(space="ip", dim=self.graph_dims or self.num_concepts)
        try:
            hnsw.load_index(
                str(folder / HNSW_FILE),
                max_elements=int(manifest["hnsw"]["max_elements"]),
                allow_replace_deleted=True,
            )
        except RuntimeError as exc:
            raise IndexCorruptError(f"{folder / HNSW_FILE}: unreadable ({exc})") from None
        if hnsw.element_count != int(manifest["hnsw"]["element_count"]) or not set(
            self._row_of
        ) <= set(int(i) for i in hnsw.get_ids_list()):
            raise IndexCorruptError(f"{folder / HNSW_FILE}: graph disagrees with {IDS_FILE}")
        hnsw.set_ef(self.ef)
        self._hnsw = hnsw


# ---------------------------------------------------------------------- helpers
def _memory_db() -> sqlite3.Connection:
    db = sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None)
    db.isolation_level = ""  # implicit transactions, committed by ``with db``
    return db


def _clean_metadata(meta: Mapping[str, object] | None, where: str) -> dict[str, str] | None:
    if meta is None:
        return None
    if not isinstance(meta, Mapping):
        raise ConceptIndexError(f"{where}: metadata must be a mapping, not {type(meta).__name__}")
    out = {}
    for key, value in meta.items():
        if not isinstance(key, str) or not key.strip():
            raise ConceptIndexError(f"{where}: metadata key {key!r} must be a non-empty string")
        if value is None:
            continue
        out[key.strip()] = str(value)
    return out


def _check_concept_name(name: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise ConceptError("a concept name must be a non-empty string")
    name = name.strip()
    if re.fullmatch(r"-?\d+", name):
        raise ConceptError(f"concept name '{name}' looks like an index; use letters")
    if any(c in name for c in "=,\n"):
        raise ConceptError(f"concept name '{name}' may not contain '=', ',' or a newline")
    return name


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    """Make a rename durable; some platforms (Windows) cannot open a directory: skip there."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _read_pointer(root: Path, missing_ok: bool = False) -> dict | None:
    file = root / POINTER
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        if missing_ok:
            return None
        raise IndexCorruptError(
            f"{root}: not a cmn-edge index (no '{POINTER}' file); build one with "
            "`cmn-edge index build`"
        ) from None
    try:
        pointer = json.loads(text)
        version, sha = pointer["version"], pointer["manifest_sha256"]
    except (ValueError, KeyError, TypeError):
        raise IndexCorruptError(f"{file}: malformed pointer file") from None
    if not isinstance(version, str) or not _VERSION_RE.match(version) or not isinstance(sha, str):
        raise IndexCorruptError(f"{file}: malformed pointer file")
    return {"version": version, "manifest_sha256": sha}


def _write_pointer(root: Path, pointer: dict) -> None:
    tmp = root / f"{_TMP_PREFIX}{POINTER}-{os.getpid()}-{secrets.token_hex(4)}"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(pointer, handle)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, root / POINTER)
    _fsync_dir(root)


@contextlib.contextmanager
def _dir_lock(root: Path) -> Iterator[None]:
    """One saver at a time across processes (advisory; where fcntl exists)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: one process at a time is on the user
        yield
        return
    with open(root / LOCK, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _remove(path: Path) -> None:
    """Clear debris of an earlier (killed) save: a version or temp directory, or a temp file."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def _same_dir(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def is_index_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / POINTER).is_file()
