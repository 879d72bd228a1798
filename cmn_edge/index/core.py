"""``ConceptIndex``: the parts of the package put together, and the writes.

An index is either in memory (``ConceptIndex(C)``; :meth:`save` writes it to a directory)
or attached to a directory (:meth:`load`, :meth:`open`), where every change (add, update,
remove, a concept's name) is committed to the database at once and costs what it changes.
Searching goes through each process's view (:mod:`.view`); checkpoints and whole-index
operations are :mod:`.persistence`; region maps :mod:`.regions`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..explain import top_concepts
from ..parts import Parts
from . import items as db_items
from . import regions as db_regions
from .calibrate import CalibrateMixin
from .errors import ConceptError, ConceptIndexError, IndexCorruptError, ModelMismatchError
from .lock import RWLock
from .persistence import PersistenceMixin
from .plan import ConceptRef, Plan, PlanMixin, check_concept_name, checked_k
from .regions import RegionsMixin
from .rerank import DEFAULT_DEPTH, check_rerank, structural_rerank
from .scan import Costs
from .search import SearchMixin
from .store import (
    DB_FILE,
    FORMAT,
    FORMAT_VERSION,
    Store,
    new_state,
)
from .view import ViewMixin

#: With no explicit ``checkpoint_every``: checkpoint once the tail holds 1/TAIL_SHARE of the
#: gallery (but at least MIN_TAIL items). A checkpoint writes the whole graph, so this sets
#: the amortised bytes per change (graph bytes per item x 32) and bounds the exact scan.
TAIL_SHARE = 32
MIN_TAIL = 1024

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


class ConceptIndex(
    ViewMixin, PersistenceMixin, RegionsMixin, PlanMixin, SearchMixin, CalibrateMixin
):
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
        parts: Parts | None = None,
        _store: Store | None = None,
    ) -> None:
        if num_concepts < 1:
            raise ConceptIndexError(f"num_concepts must be positive, not {num_concepts}")
        #: what the controls, names and explanations count (None: one concept a dimension)
        self.parts = Parts(int(num_concepts)) if parts is None else parts
        if self.parts.dims != int(num_concepts):
            raise ConceptIndexError(
                f"{self.parts.describe()} do not fill a {num_concepts}-d embedding"
            )
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
        #: this process's timings of walks and scans (which path a deep query takes)
        self._costs = Costs()
        #: calibration tunes the walk's depth: it turns the projected scan off meanwhile
        self._walk_only = False
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
        store.set_info("parts", self.parts.to_info())
        store.set_info("params", self._params())
        if store.get_info("state") is None:
            store.set_info("state", new_state())

    def _save_params(self) -> None:
        with self._store.write():
            self._store.set_info("params", self._params())

    def _state(self) -> dict:
        return self._store.get_info("state") or new_state()

    # ------------------------------------------------------------------ construction
    @classmethod
    def for_embedder(
        cls, embedder, model_ref: str | None = None, precision: str | None = None, **params
    ) -> ConceptIndex:
        """An empty index bound to ``embedder``'s model (queries from others are refused),
        with its parts (concepts, or a DGML's groups).

        Part names the model carries become the index's names (those usable as names).
        """
        meta = getattr(embedder, "metadata", None)
        parts = Parts.of(meta) if meta is not None else None
        index = cls(
            embedder.num_concepts,
            embedder.model_id,
            model_ref=model_ref,
            precision=precision,
            parts=parts,
            **params,
        )
        names = index.parts.model_names(meta) if meta is not None else ()
        for i, name in enumerate(names):
            if name:
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
                parts=Parts.from_info(info.get("parts"), int(info["num_concepts"])),
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
        return f"<ConceptIndex {len(self)} items, {self.parts.describe()}{where}>"

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
        """Refuse embeddings of another model: their concept axes mean something else.

        An on-disk index is asked each time: another process may have re-embedded it with
        another model (``cmn-edge index rebuild``) since this one opened it."""
        current = self._stored_model_id()
        if current is not None and model_id != current:
            raise ModelMismatchError(
                f"{self._where()}: built with model {current}, but the query model is "
                f"{model_id}; use the same --model/--precision, or re-embed the index with "
                f"`cmn-edge index rebuild --index {self._where()}`"
            )

    def _stored_model_id(self) -> str | None:
        if self.path is None:
            return self.model_id
        return (self._store.get_info("model") or {}).get("id")

    def _check_not_rebuilt(self) -> None:
        """Vectors given to this handle were made with the model it opened; refuse them once
        another process re-embedded the index with another model (they would mix two
        models' axes in one gallery, or rank by the wrong ones)."""
        current = self._stored_model_id()
        if current != self.model_id:
            raise ModelMismatchError(
                f"{self._where()}: re-embedded with model {current} since this process opened "
                f"it (with {self.model_id}); open it again with that model"
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
        if self.path is None:
            # the graph is built here, with the caller's threads: left to the first search,
            # a new index's view loaded and folded it with every core, so a one-thread
            # build (the same graph on every run) was not one
            with self._lock.write():
                self._refresh_unlocked(num_threads)
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
            self._check_not_rebuilt()
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
            if vector is not None:
                self._check_not_rebuilt()
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

    # ------------------------------------------------------------------ part names
    @property
    def concept_names(self) -> dict[int, str]:
        """Names of parts (concepts, or a DGML's groups) by part id."""
        with self._store.lock:
            return db_items.concept_names(self._store.conn)

    @property
    def part_names(self) -> dict[int, str]:
        return self.concept_names

    def set_part_name(self, part: ConceptRef, name: str | None) -> None:
        """The model-neutral name of :meth:`set_concept_name`."""
        self.set_concept_name(part, name)

    def set_concept_name(self, concept: ConceptRef, name: str | None) -> None:
        """Name a part (None clears); names are unique and never look like an index."""
        noun = self.parts.noun
        index = self.resolve_part(concept)
        if name is not None:
            name = check_concept_name(name)
        with self._store.write() as conn:
            self._check_not_rebuilt()  # names belong to the model's concepts
            names = db_items.concept_names(conn)
            owner = next((i for i, n in names.items() if n == name), None)
            if name is not None and owner is not None and owner != index:
                raise ConceptError(f"{self._where()}: {noun} {owner} is already named '{name}'")
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
        Controls name parts (:mod:`cmn_edge.parts`): concepts, or a DGML model's groups.
        ``explain`` > 0 attaches that many top contributing parts to every hit.
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
                    q,
                    vectors[rank - 1],
                    plan.weights,
                    plan.renormalize,
                    names,
                    explain,
                    self.parts,
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

    def exact_ids_many(
        self,
        queries: np.ndarray,
        k: int = 10,
        controls: Sequence[Mapping] | None = None,
        exclude_ids: Sequence[Iterable[int]] | None = None,
    ) -> list[np.ndarray]:
        """The ids ``search_ids(q, k, exact=True, exclude_ids=..., **controls)`` gives for
        each query, found together: calibration measures its walks against these."""
        queries = self._vectors(queries)
        controls = [{} for _ in queries] if controls is None else list(controls)
        exclude = [set() for _ in queries] if exclude_ids is None else exclude_ids
        exclude = [{int(i) for i in e} for e in exclude]
        if not len(controls) == len(exclude) == len(queries):
            raise ConceptIndexError("exact_ids_many: one control and one exclusion per query")
        k = checked_k(k)
        plans = [self.plan(**c) for c in controls]
        for q, plan in zip(queries, plans):
            self._walk_vector(q, plan)  # refuses a query the controls leave nothing
        self._fresh()
        with self._lock.read():
            if self._live == 0:
                raise ConceptIndexError(f"{self._where()}: the index is empty")
            return self._exact_many_unlocked(queries, k, plans, exclude)

    def search_id(self, item_id: int, k: int = 10, **kwargs) -> list[Hit]:
        """More like an item already in the index (the item itself is left out)."""
        vector = self.embedding(item_id)
        exclude_ids = set(kwargs.pop("exclude_ids", ())) | {int(item_id)}
        if kwargs.get("rerank") is not None and kwargs.get("query_regions") is None:
            kwargs["query_regions"] = self.regions_of(item_id)
        return self.search(vector, k, exclude_ids=exclude_ids, **kwargs)


__all__ = ["ConceptIndex", "Hit", "Plan"]
