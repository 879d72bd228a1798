"""Region maps for DIML's structural re-ranking, kept in the index database beside each vector.

An index that keeps them (``index build --regions``, ``Index.create(..., regions=True)``, or
``cmn-edge index regions`` for an existing one) stores every item's [R, C] region features
as float16 in the ``regions`` table: 16 KiB an item for the bundled model (R = 4x4,
C = 512). float16 keeps the region cosines to about 1e-3, far inside what the Sinkhorn
kernel (temperature 0.05) can tell apart; float32 would double the cost for no change in
ranking. They are rows of the same SQLite database, written in the same transaction as the
item, so a ``kill -9`` leaves an item and its maps together or neither.

They are opt-in because they cost four times the vector itself per item: a gallery that is
never re-ranked structurally should not pay for them.

Invariant: an index that keeps region maps has them for every item. ``add`` refuses items
without them, and ``index regions`` turns the feature on only once every item has its map.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

import numpy as np

from .errors import ConceptIndexError

TABLE = "CREATE TABLE IF NOT EXISTS regions (id INTEGER PRIMARY KEY, maps BLOB NOT NULL)"
#: the info row that says an index keeps region maps, and their grid (rows, columns)
INFO_KEY = "region_grid"
STORED_DTYPE = np.float16


class RegionsError(ConceptIndexError):
    """Structural re-ranking asked of an index, model or query that has no region maps."""


def how_to_add(where: str) -> str:
    return f"add them with `cmn-edge index regions --index {where}` (re-embeds every item)"


def check_shape(maps: np.ndarray, n: int, grid: tuple[int, int], num_concepts: int, where: str):
    """[n, R, C] float32, finite, or a one-line error naming the index."""
    array = np.asarray(maps, dtype=np.float32)
    expected = (n, grid[0] * grid[1], num_concepts)
    if array.shape != expected:
        raise RegionsError(
            f"{where}: region maps must be {list(expected)} (grid {grid[0]}x{grid[1]}), "
            f"got shape {list(array.shape)}"
        )
    if not np.isfinite(array).all():
        raise RegionsError(f"{where}: region maps hold NaN or infinite values")
    return array


def write(conn: sqlite3.Connection, ids: Sequence[int], maps: np.ndarray) -> None:
    """Insert or replace the maps of ``ids``, inside the caller's transaction."""
    conn.execute(TABLE)
    stored = np.ascontiguousarray(maps, dtype=STORED_DTYPE)
    conn.executemany(
        "INSERT OR REPLACE INTO regions (id, maps) VALUES (?, ?)",
        [(int(item_id), stored[i].tobytes()) for i, item_id in enumerate(ids)],
    )


def remove(conn: sqlite3.Connection, ids: Sequence[int]) -> None:
    if has_table(conn):
        conn.executemany("DELETE FROM regions WHERE id = ?", [(int(i),) for i in ids])


def has_table(conn: sqlite3.Connection) -> bool:
    row = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'regions'"
    ).fetchone()
    return row is not None


def read(conn: sqlite3.Connection, ids: Sequence[int], cells: int, num_concepts: int) -> np.ndarray:
    """float32 [len(ids), R, C] in the order of ``ids``; every id must have its maps."""
    out = np.empty((len(ids), cells, num_concepts), dtype=np.float32)
    if not len(ids):
        return out
    position = {int(item_id): i for i, item_id in enumerate(ids)}
    marks = ",".join("?" * len(position))
    found = 0
    for item_id, blob in conn.execute(
        f"SELECT id, maps FROM regions WHERE id IN ({marks})", list(position)
    ):
        out[position[item_id]] = np.frombuffer(blob, dtype=STORED_DTYPE).reshape(
            cells, num_concepts
        )
        found += 1
    if found != len(position):
        raise ConceptIndexError(f"{len(position) - found} item(s) have no region maps")
    return out


def ids_without(conn: sqlite3.Connection) -> list[int]:
    """Items with no region maps (``index regions`` fills them, ``verify`` reports them)."""
    if not has_table(conn):
        return [r[0] for r in conn.execute("SELECT id FROM items ORDER BY id")]
    return [
        r[0]
        for r in conn.execute(
            "SELECT items.id FROM items LEFT JOIN regions ON regions.id = items.id "
            "WHERE regions.id IS NULL ORDER BY items.id"
        )
    ]


def stored_bytes(conn: sqlite3.Connection) -> int:
    if not has_table(conn):
        return 0
    return int(conn.execute("SELECT COALESCE(SUM(LENGTH(maps)), 0) FROM regions").fetchone()[0])


class RegionsMixin:
    """Which items keep region maps; mixed into :class:`~.core.ConceptIndex`."""

    # ------------------------------------------------------------------ region maps
    @property
    def region_grid(self) -> tuple[int, int] | None:
        """(rows, columns) of the region maps this index keeps, or None (see :mod:`.regions`)."""
        grid = self._store.get_info(INFO_KEY)
        return None if grid is None else (int(grid[0]), int(grid[1]))

    def _region_maps(self, regions: np.ndarray | None, n: int) -> np.ndarray | None:
        grid = self.region_grid
        if grid is None:
            if regions is not None:
                raise RegionsError(
                    f"{self._where()}: this index keeps no region maps; "
                    + how_to_add(self._where())
                )
            return None
        if regions is None:
            raise RegionsError(
                f"{self._where()}: this index keeps region maps for structural re-ranking; "
                "add images (the Index API embeds them) or pass regions= "
                f"[N, {grid[0] * grid[1]}, {self.num_concepts}]"
            )
        return check_shape(regions, n, grid, self.num_concepts, self._where())

    def items_without_regions(self) -> list[int]:
        with self._store.lock:
            return ids_without(self._store.conn)

    def put_regions(self, item_ids: Sequence[int], regions: np.ndarray, grid: tuple[int, int]):
        """Store region maps of existing items (one transaction); the index keeps using them
        only once :meth:`keep_regions` found every item mapped."""
        current = self.region_grid
        if current is not None and tuple(grid) != current:
            raise RegionsError(
                f"{self._where()}: keeps {current[0]}x{current[1]} region maps, not "
                f"{grid[0]}x{grid[1]}"
            )
        maps = check_shape(regions, len(item_ids), tuple(grid), self.num_concepts, self._where())
        with self._store.write() as conn:
            self._check_not_rebuilt()  # maps made with the model this handle opened
            write(conn, [int(i) for i in item_ids], maps)

    def keep_regions(self, grid: tuple[int, int]) -> None:
        """From now on, keep region maps: every item must have one already (put_regions)."""
        with self._store.write() as conn:
            self._check_not_rebuilt()
            conn.execute(TABLE)
            missing = ids_without(conn)
            if missing:
                raise RegionsError(
                    f"{self._where()}: {len(missing)} item(s) have no region maps yet "
                    f"(first: id {missing[0]})"
                )
            self._store.set_info(INFO_KEY, [int(grid[0]), int(grid[1])])


__all__ = [
    "INFO_KEY",
    "RegionsMixin",
    "RegionsError",
    "check_shape",
    "how_to_add",
    "ids_without",
    "read",
    "remove",
    "stored_bytes",
    "write",
]
