"""An index on disk as a whole: saving, copying, graph checkpoints, optimising, verifying,
and the manifest ``index info`` shows. Single changes are committed by :mod:`.core`; this is
what runs now and then, or on request.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import sqlite3
from pathlib import Path

import numpy as np

from ..files import atomic_path, fsync_dir
from . import regions as db_regions
from .calibrate import CHECK_GROWTH, REFIT_GROWTH, RETUNE_GROWTH
from .errors import ConceptIndexError, IndexCorruptError
from .store import (
    DB_FILE,
    FORMAT,
    FORMAT_VERSION,
    Checkpoint,
    Store,
    is_index_dir,
)


def _last_look(state: dict) -> int:
    """The gallery size at which the tuned depth was last measured: a tuning or a check
    (an index from before the checks records tunings only)."""
    return max(int(state.get("checked_at", 0)), int(state.get("tuned_at", 0)))


class PersistenceMixin:
    """Checkpoints and whole-index operations; mixed into :class:`~.core.ConceptIndex`."""

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
            "parts": {
                **self.parts.to_info(),
                "kind": f"{self.parts.noun}s",
                "count": self.parts.count,
                "size": self.parts.size,
            },
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
                "checked_at": _last_look(state),
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
        copied = type(self).open(target)
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
                check = False
                if retune is None:
                    # a graph rebuilt in new directions (a projection fitted or refitted)
                    # is not the one the depth was tuned on (grown 1k -> 100k, tuned at 63k,
                    # projected at 84k: a 50% mask's recall@10 was 0.976)
                    grown = live >= max(tuned_at, 1) * RETUNE_GROWTH
                    rebuilt = self._graph_rebuild_due(bool(refit))
                    retune = live > self.exact_below and (grown or rebuilt)
                    check = (
                        not retune
                        and tuned_at > 0
                        and live > self.exact_below
                        and live >= _last_look(state) * CHECK_GROWTH
                    )
                held = np.zeros(0, np.int64)
                if (retune or check) and len(tail) >= 5:
                    # tune on items the graph has not seen yet: a user's query is one of those
                    held = tail[-min(200, len(tail) // 5) :]
                    tail = np.setdiff1d(tail, held)
                if self._fold_unlocked(tail, num_threads, refit=refit):
                    state["fitted_at"] = live
                    done["refit"] = True
                queries = self._rows.gather(held) if len(held) else None
                own = self._row_ids[held] if len(held) else None
                if check and queries is not None:
                    done["check"] = self.meets_target(queries, exclude_own=own)
                    state["checked_at"] = live
                    retune = not done["check"]["ok"]
                if retune:
                    self._tuning = True
                    try:
                        done["calibration"] = self.calibrate(queries=queries, exclude_own=own)
                    finally:
                        self._tuning = False
                    state["tuned_at"] = state["checked_at"] = live
                if len(held):
                    self._fold_unlocked(held, num_threads)
                dead = int((self._row_ids[: len(self._rows)] < 0).sum())
                if compact is None:
                    compact = dead * 4 > len(self._rows)
                ckpt = self._write_checkpoint_files(self._store, compact=compact)
                state = {
                    **self._state(),
                    **{k: state[k] for k in ("fitted_at", "tuned_at", "checked_at") if k in state},
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
            state["tuned_at"] = state["checked_at"] = int(live)
            self._store.set_info("state", state)
            self._store.set_info("params", self._params())

    def optimize(self, *, rebuild_graph: bool = False, num_threads: int = -1) -> dict:
        """Checkpoint, compact, re-tune (and re-fit the projection) now; then shrink the WAL."""
        if rebuild_graph and self.path is not None:
            with self._lock.write(), self._store.write():
                self._forget_graph_unlocked()
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

    def _forget_graph_unlocked(self) -> None:
        """Inside the caller's write transaction: record no graph and no vector file, so
        every item is read from the database and the next checkpoint builds the graph anew
        (the generation stays: readers keep their view and follow the database)."""
        ckpt = self._store.checkpoint()
        self._store.set_checkpoint(
            dataclasses.replace(
                ckpt,
                graph_file=None,
                graph_sha256=None,
                seq=0,
                vector_rows=0,
                row_ids=b"",
                vectors_file=None,
                projection=None,
                graph_dims=None,
                colmax2=None,  # recomputed from the vectors as the view reads them
            )
        )

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


__all__ = ["PersistenceMixin"]
