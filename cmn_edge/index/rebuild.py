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


#: rounds of "stage what changed meanwhile" before giving up on a writer that never pauses
MAX_ROUNDS = 5


@dataclass
class RebuildReport:
    model_from: str | None
    model_to: str
    embedded: int = 0  # images embedded by this run
    resumed: int = 0  # items staged by an earlier, interrupted run
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    items: int = 0  # items whose vectors the swap replaced
    dropped: int = 0
    names_cleared: int = 0
    swapped: bool = False

    def summary(self) -> str:
        if not self.swapped:
            return f"nothing to re-embed: the index is on {self.model_to}"
        text = f"re-embedded {self.items} items with {self.model_to}"
        if self.resumed:
            text += f" ({self.resumed} from the interrupted run)"
        if self.dropped:
            text += f"; removed {self.dropped} unreadable"
        if self.names_cleared:
            text += f"; cleared {self.names_cleared} concept names (another model's concepts)"
        return text


def _pending(conn: sqlite3.Connection, with_regions: bool) -> list[tuple[int, str | None, int]]:
    """(id, stored path, seq) of the items with no current staged vector (or, in an index
    that keeps region maps, no staged maps)."""
    return conn.execute(
        "SELECT items.id, items.path, items.seq FROM items LEFT JOIN restaged "
        "ON restaged.id = items.id WHERE restaged.id IS NULL OR restaged.seq != items.seq "
        "OR (? AND restaged.maps IS NULL) ORDER BY items.id",
        (int(with_regions),),
    ).fetchall()


def _model_name(model_id: str | None) -> str | None:
    return None if model_id is None else model_id.split("@", 1)[0]


def _check_regions(index, embedder) -> bool:
    """Whether the index keeps region maps now, refusing a model that cannot make them."""
    grid = index.region_grid
    if grid is None:
        return False
    embedder._check_regions()
    made = tuple(embedder.metadata.region_grid)
    if made != tuple(grid):
        raise ConceptIndexError(
            f"{index._where()}: keeps {grid[0]}x{grid[1]} region maps, the model makes "
            f"{made[0]}x{made[1]}"
        )
    return True


def _check_target(store, target: str) -> None:
    """Inside a write transaction: the staging table is still this rebuild's."""
    current = store.get_info(INFO_KEY)
    if current != target:
        raise ConceptIndexError(
            f"{store.where}: another rebuild (to {current}) started meanwhile; run one at a time"
        )


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
    with_regions = _check_regions(index, embedder)
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
        report.resumed = items - len(_pending(conn, with_regions))  # staged, still current
    if index.model_id == target and not staged:
        _forget_staging(store)
        ckpt = store.checkpoint()
        if ckpt.gen and ckpt.vectors_file is None and len(index):
            index.optimize()  # a swap (or graph rebuild) whose graph build was interrupted
        return report

    # id -> (path, reason, seq when it failed)
    unreadable: dict[int, tuple[str, str, int]] = {}
    for _round in range(MAX_ROUNDS):
        with store.read() as conn:
            pending = [r for r in _pending(conn, with_regions) if r[0] not in unreadable]
        if pending:
            report.embedded += _stage(
                index, embedder, target, pending, batch_size, with_regions, unreadable,
                progress, plan,
            )  # fmt: skip
            continue
        with index._lock.write(), store.write() as conn:
            _check_target(store, target)
            with_regions = _check_regions(index, embedder)  # `index regions` may have run
            late = _recheck(conn, unreadable, with_regions)
            if late:
                continue  # another writer changed items meanwhile: embed them too
            report.unreadable = [(path, reason) for path, reason, _ in unreadable.values()]
            if unreadable and not drop_unreadable:
                return report
            model = {"id": target, "ref": model_ref, "precision": embedder.precision}
            _swap(index, conn, report, sorted(unreadable), model, with_regions)
        # committed: this handle follows its own change
        index.model_id, index.model_ref, index.precision = target, model_ref, model["precision"]
        index._loaded = False
        index.optimize()  # the graph anew, on the new vectors, and the depth re-tuned
        return report
    raise ConceptIndexError(
        f"{where}: items kept changing while they were re-embedded; pause the other writer "
        "and run again (it resumes)"
    )


def _count(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT COUNT(*) FROM restaged").fetchone()[0])


def _recheck(conn, unreadable: dict, with_regions: bool) -> bool:
    """Inside the swap's transaction: anything left to embed? Unreadable items another writer
    removed are forgotten; ones it changed (a restored file) are embedded again."""
    if unreadable:
        ids = list(unreadable)
        marks = ",".join("?" * len(ids))
        now = dict(conn.execute(f"SELECT id, seq FROM items WHERE id IN ({marks})", ids))
        for item_id in ids:
            if now.get(item_id) != unreadable[item_id][2]:
                del unreadable[item_id]  # gone, or changed since it failed: not ours to drop
    return any(r[0] not in unreadable for r in _pending(conn, with_regions))


def embed_stored(index, embedder, stored, batch_size, with_regions, unreadable, plan=None):
    """Embed items again from their image files: (item ids, embeddings, region maps or None)
    batches. ``stored``: item id -> stored path (None: added as an embedding). An item with no
    image, or whose image cannot be read, goes into ``unreadable`` as id -> (path, reason)
    (the last ones once the batches are done); ``plan(n)`` is told how many images it reads.
    """
    by_file: dict[str, int] = {}
    for item_id, path in stored.items():
        if path is None:
            unreadable[item_id] = (f"id {item_id}", NO_IMAGE)
        else:
            by_file[str(Path(index.full_path(path)))] = item_id
    if plan is not None:
        plan(len(by_file))
    errors: list[tuple[Path, str]] = []
    files = [Path(f) for f in by_file]
    if with_regions:
        for batch, (vectors, maps) in embedder.iter_regions(files, batch_size, True, errors):
            yield [by_file[str(f)] for f in batch], vectors, maps
    else:
        for batch, vectors in embedder.iter_paths(files, batch_size, True, errors):
            yield [by_file[str(f)] for f in batch], vectors, None
    for file, reason in errors:
        unreadable[by_file[str(file)]] = (str(file), reason)


def _stage(
    index, embedder, target, pending, batch_size, with_regions, unreadable, progress, plan
) -> int:
    """Embed the pending items' images into the staging table, a transaction a batch."""
    seq_of = {item_id: seq for item_id, _path, seq in pending}
    failed: dict[int, tuple[str, str]] = {}
    stored = {item_id: path for item_id, path, _seq in pending}
    done = 0
    for ids, vectors, maps in embed_stored(
        index, embedder, stored, batch_size, with_regions, failed, plan
    ):
        vectors = index._vectors(vectors)
        if maps is not None:
            maps = np.ascontiguousarray(maps, dtype=db_regions.STORED_DTYPE)
        rows = [
            (
                item_id,
                seq_of[item_id],
                vectors[i].tobytes(),
                None if maps is None else maps[i].tobytes(),
            )
            for i, item_id in enumerate(ids)
        ]
        with index._store.write() as conn:
            _check_target(index._store, target)
            conn.executemany("INSERT OR REPLACE INTO restaged VALUES (?, ?, ?, ?)", rows)
        done += len(ids)
        if progress is not None:
            progress(len(ids))
    for item_id, (path, reason) in failed.items():
        unreadable[item_id] = (path, reason, seq_of[item_id])
    return done


def _swap(index, conn, report: RebuildReport, drop: list[int], model: dict, regions: bool):
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
    if regions:
        conn.execute(
            "UPDATE regions SET maps = (SELECT maps FROM restaged WHERE restaged.id = regions.id)"
            " WHERE id IN (SELECT id FROM restaged)"
        )
    elif db_regions.has_table(conn):
        # maps from an interrupted `index regions` are the old model's: `index regions`
        # makes them again with this one
        conn.execute("DELETE FROM regions")
    report.items = conn.execute(
        "UPDATE items SET seq = ? WHERE id IN (SELECT id FROM restaged)", (seq,)
    ).rowcount
    state["tail"] = int(state["count"])
    if _model_name(index.model_id) != _model_name(model["id"]):
        report.names_cleared = conn.execute("DELETE FROM concepts").rowcount
    store.set_info("model", model)
    store.set_info("state", state)
    index._forget_graph_unlocked()
    conn.execute("DROP TABLE restaged")
    conn.execute("DELETE FROM info WHERE key = ?", (INFO_KEY,))
    report.swapped = report.items > 0 or bool(drop)


def _forget_staging(store) -> None:
    with store.write() as conn:
        conn.execute("DROP TABLE IF EXISTS restaged")
        conn.execute("DELETE FROM info WHERE key = ?", (INFO_KEY,))


__all__ = ["RebuildReport", "embed_stored", "rebuild"]
