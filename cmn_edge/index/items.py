"""Items, their paths, metadata and file stamps, and concept names: rows in the database.

Each function runs inside the caller's transaction (see :class:`~.store.Store`), so a batch
of changes commits whole or not at all.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping, Sequence

import numpy as np

from .errors import ConceptIndexError


def clean_metadata(meta: Mapping[str, object] | None, where: str) -> dict[str, str] | None:
    """Metadata as ``{str: str}``; None values are left out, keys must be non-empty."""
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


def ids_for_paths(conn: sqlite3.Connection, paths: Sequence[str]) -> dict[str, int]:
    found: dict[str, int] = {}
    for start in range(0, len(paths), 500):
        chunk = list(paths[start : start + 500])
        marks = ",".join("?" * len(chunk))
        found.update(
            conn.execute(f"SELECT path, id FROM items WHERE path IN ({marks})", chunk).fetchall()
        )
    return found


def write_items(
    conn: sqlite3.Connection,
    seq: int,
    ids: Sequence[int],
    paths: Sequence[str | None],
    vectors: np.ndarray,
    metadata: Sequence[dict[str, str] | None],
    stamps: Sequence[tuple[int, int, str | None] | None] | None = None,
) -> None:
    """Insert or replace items (vector, path, metadata, file stamp) under change ``seq``."""
    for i, item_id in enumerate(ids):
        stamp = stamps[i] if stamps is not None and stamps[i] is not None else (None, None, None)
        conn.execute(
            "INSERT INTO items (id, path, seq, size, mtime_ns, sha256) VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT(id) DO UPDATE SET path = excluded.path, seq = excluded.seq, "
            "size = excluded.size, mtime_ns = excluded.mtime_ns, sha256 = excluded.sha256",
            (int(item_id), paths[i], seq, *stamp),
        )
        conn.execute(
            "INSERT OR REPLACE INTO vectors (id, vec) VALUES (?, ?)",
            (int(item_id), np.ascontiguousarray(vectors[i], dtype=np.float32).tobytes()),
        )
        if metadata[i] is not None:
            conn.execute("DELETE FROM meta WHERE id = ?", (int(item_id),))
            conn.executemany(
                "INSERT INTO meta (id, key, value) VALUES (?, ?, ?)",
                [(int(item_id), k, v) for k, v in metadata[i].items()],
            )


def remove_items(conn: sqlite3.Connection, seq: int, ids: Sequence[int]) -> None:
    rows = [(int(i),) for i in ids]
    conn.executemany("DELETE FROM meta WHERE id = ?", rows)
    conn.executemany("DELETE FROM vectors WHERE id = ?", rows)
    conn.executemany("DELETE FROM items WHERE id = ?", rows)
    conn.executemany(
        "INSERT OR REPLACE INTO removed (id, seq) VALUES (?, ?)", [(i, seq) for (i,) in rows]
    )


def describe(conn: sqlite3.Connection, ids: Sequence[int]) -> dict[int, tuple[str | None, dict]]:
    """id -> (path, metadata) for the ids that exist."""
    if not ids:
        return {}
    marks = ",".join("?" * len(ids))
    rows = conn.execute(
        "SELECT items.id, items.path, meta.key, meta.value FROM items LEFT JOIN meta "
        f"ON meta.id = items.id WHERE items.id IN ({marks}) ORDER BY meta.key",
        [int(i) for i in ids],
    ).fetchall()
    out: dict[int, tuple[str | None, dict]] = {}
    for item_id, path, key, value in rows:
        entry = out.setdefault(item_id, (path, {}))
        if key is not None:
            entry[1][key] = value
    return out


def metadata_keys(conn: sqlite3.Connection) -> list[str]:
    return [r[0] for r in conn.execute("SELECT DISTINCT key FROM meta ORDER BY key")]


def ids_where(conn: sqlite3.Connection, where: Mapping[str, object], place: str) -> set[int]:
    """Ids whose metadata has every ``key == value`` (as strings); unknown keys are errors."""
    parts, args = [], []
    for key, value in where.items():
        if conn.execute("SELECT 1 FROM meta WHERE key = ? LIMIT 1", (key,)).fetchone() is None:
            known = metadata_keys(conn)
            raise ConceptIndexError(
                f"{place}: no item has metadata key '{key}' (known keys: "
                f"{', '.join(known) or 'none'})"
            )
        parts.append("SELECT id FROM meta WHERE key = ? AND value = ?")
        args += [str(key), str(value)]
    return {r[0] for r in conn.execute(" INTERSECT ".join(parts), args)}


def concept_names(conn: sqlite3.Connection) -> dict[int, str]:
    return {int(i): str(n) for i, n in conn.execute("SELECT concept, name FROM concepts")}


def set_concept_name(conn: sqlite3.Connection, concept: int, name: str | None) -> None:
    conn.execute("DELETE FROM concepts WHERE concept = ?", (concept,))
    if name is not None:
        conn.execute("INSERT INTO concepts (concept, name) VALUES (?, ?)", (concept, name))


def stamps_under(
    conn: sqlite3.Connection,
) -> dict[str, tuple[int, int | None, int | None, str | None]]:
    """path -> (id, size, mtime_ns, sha256) of every item with a path (for sync)."""
    return {
        path: (item_id, size, mtime, digest)
        for item_id, path, size, mtime, digest in conn.execute(
            "SELECT id, path, size, mtime_ns, sha256 FROM items WHERE path IS NOT NULL"
        )
    }


__all__ = [
    "clean_metadata",
    "concept_names",
    "describe",
    "ids_for_paths",
    "ids_where",
    "metadata_keys",
    "remove_items",
    "set_concept_name",
    "stamps_under",
    "write_items",
]
