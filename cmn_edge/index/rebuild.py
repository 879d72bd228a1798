"""Re-embed every item of an index with another model file, in place.

An index refuses queries from any model but its own (its content hash), so a package
upgrade that ships a re-quantized INT8 file, or a switch to a newer model, leaves an index
that only a rebuild can serve. This is that rebuild, with the index's item ids, paths,
metadata and (for the same model name) concept names kept.

How it stays safe:

- each batch's new vectors go to a staging table, committed batch by batch, so an
  interrupted rebuild resumes where it stopped; the items themselves do not change yet;
- an item changed by another writer after it was staged (its ``seq`` moved) is embedded again;
- one transaction then swaps every vector, records the new model and forgets the graph
  checkpoint (the old graph ranks by the old vectors); a ``kill -9`` leaves the old index
  or the new one, never a mixture, and readers in other processes follow as they follow
  any commit (an image query embedded with the old model is refused from then on);
- the graph is built anew (and the search depth re-tuned) after the swap;
- an item whose image cannot be read cannot be re-embedded: the rebuild stops before the
  swap and lists them, unless told to remove them (``drop_unreadable``).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..parts import Parts
from . import items as db_items
from . import regions as db_regions
from .errors import ConceptIndexError

STAGING = (
    "CREATE TABLE IF NOT EXISTS restaged "
    "(id INTEGER PRIMARY KEY, seq INTEGER NOT NULL, vec BLOB NOT NULL, maps BLOB)"
)
#: the info row naming the model whose vectors the staging table holds
INFO_KEY = "rebuilding"
NO_IMAGE = "added as an embedding, with no image to re-embed"


@dataclass
class RebuildReport:
    model_from: str | None
    model_to: str
    embedded: int = 0  # images embedded by this run
    resumed: int = 0  # staged by an earlier, interrupted run
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    dropped: int = 0
    names_cleared: int = 0
    swapped: bool = False

    def summary(self) -> str:
        if not self.swapped:
            return f"nothing to re-embed: the index is on {self.model_to}"
        text = f"re-embedded {self.embedded + self.resumed} items with {self.model_to}"
        if self.resumed:
            text += f" ({self.resumed} from the interrupted run)"
        if self.dropped:
            text += f"; removed {self.dropped} unreadable"
        if self.names_cleared:
            text += f"; cleared {self.names_cleared} concept names (another model's concepts)"
        return text


def _pending(conn: sqlite3.Connection) -> list[tuple[int, str | None, int]]:
    """(id, stored path, seq) of the items with no current staged vector."""
    return conn.execute(
        "SELECT items.id, items.path, items.seq FROM items LEFT JOIN restaged "
        "ON restaged.id = items.id WHERE restaged.id IS NULL OR restaged.seq != items.seq "
        "ORDER BY items.id"
    ).fetchall()


def _model_name(model_id: str | None) -> str | None:
    return None if model_id is None else model_id.split("@", 1)[0]


def rebuild(
    index,
    embedder,
    *,
    model_ref: str | None = None,
    batch_size: int = 32,
    drop_unreadable: bool = False,
    progress: Callable[[int], None] | None = None,
    plan: Callable[[int], None] | None = None,
) -> RebuildReport:
    """Re-embed every item of ``index`` (an on-disk :class:`ConceptIndex`) with ``embedder``.

    ``model_ref`` is what the index remembers of the model (a bundled name or a path; see
    :func:`.api.model_ref`). Returns the report; when ``unreadable`` is not empty and
    ``drop_unreadable`` is False, nothing was swapped (the staged vectors are kept, so the
    next run resumes).
    """
    if index.path is None:
        raise ConceptIndexError("rebuild: an in-memory index has no images to re-embed")
    where = index._where()
    if embedder.num_concepts != index.num_concepts:
        raise ConceptIndexError(
            f"{where}: the model has {embedder.num_concepts} concepts, the index "
            f"{index.num_concepts}; build a new index for it"
        )
    parts = Parts.of(embedder.metadata)
    if parts != index.parts:
        raise ConceptIndexError(
            f"{where}: the model's parts are {parts.describe()}, the index's "
            f"{index.parts.describe()}; build a new index for it"
        )
    grid = index.region_grid
    if grid is not None:
        embedder._check_regions()
        if tuple(embedder.metadata.region_grid) != tuple(grid):
            raise ConceptIndexError(
                f"{where}: keeps {grid[0]}x{grid[1]} region maps, the model makes "
                f"{embedder.metadata.region_grid[0]}x{embedder.metadata.region_grid[1]}"
            )
    target = embedder.model_id
    store = index._store
    report = RebuildReport(index.model_id, target)
    with store.write() as conn:
        conn.execute(STAGING)
        if store.get_info(INFO_KEY) != target:
            conn.execute("DELETE FROM restaged")  # staged for another model: start over
            store.set_info(INFO_KEY, target)
        staged = _count(conn)
        items = int(conn.execute("SELECT COUNT(*) FROM items").fetchone()[0])
        report.resumed = items - len(_pending(conn))  # staged and still current
    if index.model_id == target and not staged:
        _forget_staging(store)
        if index._store.checkpoint().seq == 0 and len(index):
            index.optimize()  # a swap whose graph build was interrupted
        return report

    unreadable: dict[int, tuple[str, str]] = {}
    while True:
        with store.read() as conn:
            pending = [row for row in _pending(conn) if row[0] not in unreadable]
        if not pending:
            with index._lock.write(), store.write() as conn:
                late = [row for row in _pending(conn) if row[0] not in unreadable]
                if not late:  # nothing changed since it was staged: swap now
                    report.unreadable = list(unreadable.values())
                    if unreadable and not drop_unreadable:
                        return report
                    _swap(index, conn, report, sorted(unreadable), embedder, model_ref)
            if not late:
                break
            pending = late  # another writer changed items meanwhile: embed them too
        report.embedded += _stage(
            index, embedder, pending, batch_size, grid is not None, unreadable, progress, plan
        )
    index._loaded = False
    index.optimize()  # the graph anew, on the new vectors, and the depth re-tuned
    return report


def _count(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT COUNT(*) FROM restaged").fetchone()[0])


def _stage(index, embedder, pending, batch_size, with_regions, unreadable, progress, plan) -> int:
    """Embed the pending items' images into the staging table, a transaction a batch."""
    by_file: dict[str, tuple[int, int]] = {}
    for item_id, stored, seq in pending:
        if stored is None:
            unreadable[item_id] = (f"id {item_id}", NO_IMAGE)
        else:
            by_file[str(Path(index.full_path(stored)))] = (item_id, seq)
    if plan is not None:
        plan(len(by_file))
    errors: list[tuple[Path, str]] = []
    files = [Path(f) for f in by_file]
    if with_regions:
        batches = (
            (batch, vectors, maps)
            for batch, (vectors, maps) in embedder.iter_regions(files, batch_size, True, errors)
        )
    else:
        batches = (
            (batch, vectors, None)
            for batch, vectors in embedder.iter_paths(files, batch_size, True, errors)
        )
    done = 0
    for batch, vectors, maps in batches:
        vectors = index._vectors(vectors)
        if maps is not None:
            maps = np.ascontiguousarray(maps, dtype=db_regions.STORED_DTYPE)
        rows = []
        for i, file in enumerate(batch):
            item_id, seq = by_file[str(file)]
            blob = None if maps is None else maps[i].tobytes()
            rows.append((item_id, seq, vectors[i].tobytes(), blob))
        with index._store.write() as conn:
            conn.executemany("INSERT OR REPLACE INTO restaged VALUES (?, ?, ?, ?)", rows)
        done += len(batch)
        if progress is not None:
            progress(len(batch))
    for file, reason in errors:
        item_id, _seq = by_file[str(file)]
        unreadable[item_id] = (str(file), reason)
    return done


def _swap(index, conn, report: RebuildReport, drop: list[int], embedder, model_ref) -> None:
    """Inside the caller's write transaction: the staged vectors become the items' vectors."""
    store = index._store
    state = index._state()
    state["seq"] += 1
    seq = state["seq"]
    if drop:
        db_items.remove_items(conn, seq, drop)
        db_regions.remove(conn, drop)
        state["count"] -= len(drop)
        report.dropped = len(drop)
    conn.execute(
        "UPDATE vectors SET vec = (SELECT vec FROM restaged WHERE restaged.id = vectors.id) "
        "WHERE id IN (SELECT id FROM restaged)"
    )
    if index.region_grid is not None:
        conn.execute(
            "UPDATE regions SET maps = (SELECT maps FROM restaged WHERE restaged.id = regions.id)"
            " WHERE id IN (SELECT id FROM restaged)"
        )
    changed = conn.execute(
        "UPDATE items SET seq = ? WHERE id IN (SELECT id FROM restaged)", (seq,)
    ).rowcount
    state["tail"] = int(state["count"])
    if _model_name(index.model_id) != _model_name(report.model_to):
        report.names_cleared = conn.execute("DELETE FROM concepts").rowcount
    model = {"id": report.model_to, "ref": model_ref, "precision": embedder.precision}
    store.set_info("model", model)
    store.set_info("state", state)
    index._forget_graph_unlocked()
    conn.execute("DROP TABLE restaged")
    conn.execute("DELETE FROM info WHERE key = ?", (INFO_KEY,))
    index.model_id, index.model_ref, index.precision = model["id"], model_ref, model["precision"]
    report.swapped = changed > 0 or bool(drop)


def _forget_staging(store) -> None:
    with store.write() as conn:
        conn.execute("DROP TABLE IF EXISTS restaged")
        conn.execute("DELETE FROM info WHERE key = ?", (INFO_KEY,))


__all__ = ["RebuildReport", "rebuild"]
