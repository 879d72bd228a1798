"""On disk: one SQLite database (WAL mode), the source of truth, plus derived files.

::

    DIR/index.db (+ -wal, -shm)   items, paths, metadata, concept names, model identity,
                                  every vector (float32 blobs), the change counter, and the
                                  record of the last graph checkpoint
                                  (+ each item's float16 region maps, where the
                                  index keeps them: see .regions)
    DIR/graph-000007.bin          the hnswlib graph as of checkpoint 7 (hnswlib's own save);
                                  its sha256 is in the database and is checked before
                                  hnswlib parses the file (hnswlib trusts its input)
    DIR/vectors-000003.f32        the checkpointed vectors, raw float32 rows, memory-mapped;
                                  append-only between compactions

Every change is one SQLite transaction: it costs what it changes, and a ``kill -9`` at any
instant leaves the last committed transaction. The graph and the vector file are derived:
a checkpoint writes them *before* the transaction that records them commits, so a kill
leaves either the old record (and some ignored debris) or the new one. Items changed since
the last checkpoint (the *tail*) are read from the database and searched exactly.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import ConceptIndexError, IndexCorruptError

FORMAT = "cmn-edge-index"
FORMAT_VERSION = 2
DB_FILE = "index.db"
OLD_POINTER = "current"  # format 1: a pointer file and whole-version directories
BUSY_TIMEOUT_S = 60.0

SCHEMA = """
CREATE TABLE info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE items (
    id INTEGER PRIMARY KEY, path TEXT UNIQUE, seq INTEGER NOT NULL,
    size INTEGER, mtime_ns INTEGER, sha256 TEXT
);
CREATE INDEX items_seq ON items (seq);
CREATE TABLE vectors (id INTEGER PRIMARY KEY, vec BLOB NOT NULL);
CREATE TABLE meta (
    id INTEGER NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL, PRIMARY KEY (id, key)
);
CREATE INDEX meta_key_value ON meta (key, value);
CREATE TABLE removed (id INTEGER PRIMARY KEY, seq INTEGER NOT NULL);
CREATE INDEX removed_seq ON removed (seq);
CREATE TABLE concepts (concept INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
CREATE TABLE regions (id INTEGER PRIMARY KEY, maps BLOB NOT NULL);
CREATE TABLE checkpoint (
    one INTEGER PRIMARY KEY CHECK (one = 1),
    gen INTEGER NOT NULL, seq INTEGER NOT NULL,
    graph_file TEXT, graph_sha256 TEXT, graph_bytes INTEGER,
    max_elements INTEGER, element_count INTEGER,
    vectors_file TEXT, vector_rows INTEGER NOT NULL,
    row_ids BLOB NOT NULL, colmax2 BLOB, projection BLOB, graph_dims INTEGER
);
"""


def create_schema(conn: sqlite3.Connection) -> None:
    """The tables, inside the caller's transaction (``executescript`` would commit it)."""
    for statement in SCHEMA.split(";"):
        if statement.strip():
            conn.execute(statement)


def new_state() -> dict:
    """The change counter's record of a new index (the ``state`` info row)."""
    return {
        "seq": 0,
        "next_id": 0,
        "count": 0,
        "tail": 0,
        "tuned_at": 0,
        "checked_at": 0,
        "fitted_at": 0,
    }


def _read_only_mount(path: Path) -> bool:
    """Whether ``path`` is on a file system mounted read-only (root can write anywhere else,
    so ``os.access`` alone cannot tell)."""
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):  # no statvfs on Windows
        return False


@dataclass(frozen=True)
class Checkpoint:
    """The record of the last graph checkpoint (gen 0: none yet, everything is tail)."""

    gen: int
    seq: int
    graph_file: str | None
    graph_sha256: str | None
    graph_bytes: int | None
    max_elements: int | None
    element_count: int | None
    vectors_file: str | None
    vector_rows: int
    row_ids: bytes
    colmax2: bytes | None
    projection: bytes | None
    graph_dims: int | None


EMPTY_CHECKPOINT = Checkpoint(0, 0, None, None, None, None, None, None, 0, b"", None, None, None)


class Store:
    """One SQLite connection (a file in WAL mode, or ``:memory:``) and its transactions.

    ``write()`` is ``BEGIN IMMEDIATE``: one writer at a time across processes, readers
    never blocked; ``read()`` is a deferred transaction, a consistent snapshot.
    """

    def __init__(self, conn: sqlite3.Connection, root: Path | None) -> None:
        self.conn = conn
        self.root = root
        self.lock = threading.RLock()  # one connection, many threads

    # ------------------------------------------------------------------ opening
    @staticmethod
    def _connect(target: str, uri: bool = False) -> sqlite3.Connection:
        conn = sqlite3.connect(
            target,
            uri=uri,
            timeout=BUSY_TIMEOUT_S,
            isolation_level=None,
            check_same_thread=False,
        )
        return conn

    @classmethod
    def memory(cls) -> Store:
        store = cls(cls._connect(":memory:"), None)
        with store.write():
            create_schema(store.conn)
        return store

    @classmethod
    def create(cls, root: Path, info: dict) -> Store:
        """A new database in ``root`` (which must hold no index), filled in one transaction."""
        root.mkdir(parents=True, exist_ok=True)
        db = root / DB_FILE
        if db.exists():
            raise ConceptIndexError(f"{root}: already holds an index")
        conn = cls._connect(str(db))
        store = cls(conn, root)
        store._pragmas()
        with store.write():
            create_schema(conn)
            for key, value in info.items():
                store.set_info(key, value)
        return store

    @classmethod
    def open(cls, root: Path) -> Store:
        """The database in ``root``; nothing is read beyond its schema and info rows."""
        root = Path(root)
        if not root.exists():
            raise FileNotFoundError(f"{root}: index directory not found")
        if not root.is_dir():
            raise IndexCorruptError(f"{root}: not a directory (an index is a directory)")
        db = root / DB_FILE
        if not db.is_file():
            if (root / OLD_POINTER).is_file():
                raise IndexCorruptError(
                    f"{root}: an index in the old whole-version format (cmn-edge 0.1); "
                    "rebuild it with `cmn-edge index build`"
                )
            raise IndexCorruptError(
                f"{root}: not a cmn-edge index (no {DB_FILE}); build one with "
                "`cmn-edge index build`"
            )
        try:
            store = None
            try:
                store = cls(cls._connect(f"file:{db}?mode=rw", uri=True), root)
                store._pragmas()
                fmt = store.get_info("format")
            except sqlite3.OperationalError:
                if os.access(root, os.W_OK) and not _read_only_mount(root):
                    raise
                if store is not None:
                    store.close()
                store = cls._open_read_only(db, root)
                fmt = store.get_info("format")
            version = store.get_info("format_version")
        except sqlite3.DatabaseError as exc:
            raise IndexCorruptError(f"{db}: not a readable index database ({exc})") from None
        if fmt != FORMAT:
            raise IndexCorruptError(f"{db}: not a {FORMAT} database")
        if version != FORMAT_VERSION:
            raise IndexCorruptError(
                f"{db}: format version {version} is not supported (this cmn-edge reads "
                f"{FORMAT_VERSION}); rebuild the index"
            )
        return store

    @classmethod
    def _open_read_only(cls, db: Path, root: Path) -> Store:
        """An index on read-only media (a kiosk's mounted gallery): SQLite cannot create the
        WAL's shared-memory file there, so it is opened immutable, which needs none. Nothing
        can change it meanwhile, so searches are exact; any write is refused by SQLite and
        reported as a read-only error."""
        wal = db.with_name(db.name + "-wal")
        if wal.exists() and wal.stat().st_size > 0:
            # immutable ignores the WAL: commits not yet copied into the database would be
            # silently missing
            raise IndexCorruptError(
                f"{wal}: the index on this read-only file system has commits still in its "
                "write-ahead log; open it once where it is writable (or run `cmn-edge index "
                "optimize` there) before mounting it read-only"
            )
        return cls(cls._connect(f"file:{db}?mode=ro&immutable=1", uri=True), root)

    def _pragmas(self) -> None:
        self.conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a commit survives a process kill at any instant; only a power
        # cut can lose the last commits (never corrupt the database)
        self.conn.execute("PRAGMA synchronous=NORMAL")

    def close(self) -> None:
        with self.lock:
            self.conn.close()

    # ------------------------------------------------------------------ transactions
    @contextlib.contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on any error)."""
        with self.lock:
            self._begin("BEGIN IMMEDIATE")
            try:
                yield self.conn
                self.conn.execute("COMMIT")
            except BaseException as exc:
                with contextlib.suppress(sqlite3.Error):
                    self.conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.OperationalError):
                    raise self._os_error(exc) from exc
                raise

    @contextlib.contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """A consistent snapshot across several SELECTs."""
        with self.lock:
            if self.conn.in_transaction:  # inside our own write: it sees its own changes
                yield self.conn
                return
            self._begin("BEGIN")
            try:
                yield self.conn
            finally:
                with contextlib.suppress(sqlite3.Error):
                    self.conn.execute("COMMIT")

    def _begin(self, statement: str) -> None:
        try:
            self.conn.execute(statement)
        except sqlite3.OperationalError as exc:
            raise self._os_error(exc) from exc

    def _os_error(self, exc: sqlite3.OperationalError) -> Exception:
        """SQLite's errors as what they are: a full disk is an OSError (ENOSPC), a read-only
        one a PermissionError, so the CLI shows them as one line like any other."""
        db = str(self.root / DB_FILE) if self.root else "index"
        text = str(exc)
        if "full" in text:
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), db)
        if "readonly" in text or "read-only" in text:
            return PermissionError(errno.EROFS, f"cannot write ({text})", db)
        return ConceptIndexError(f"{db}: {text}")

    @property
    def where(self) -> str:
        return str(self.root) if self.root else "index"

    def data_version(self) -> int:
        """Changes whenever another connection commits: a cheap 'anything new?' test."""
        with self.lock:
            return int(self.conn.execute("PRAGMA data_version").fetchone()[0])

    # ------------------------------------------------------------------ info and state
    def get_info(self, key: str, default=None):
        with self.lock:
            row = self.conn.execute("SELECT value FROM info WHERE key = ?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    def set_info(self, key: str, value) -> None:
        self.conn.execute(
            "INSERT INTO info (key, value) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, json.dumps(value, sort_keys=True)),
        )

    def info(self) -> dict:
        with self.lock:
            return {k: json.loads(v) for k, v in self.conn.execute("SELECT key, value FROM info")}

    def checkpoint(self) -> Checkpoint:
        with self.lock:
            row = self.conn.execute(
                "SELECT gen, seq, graph_file, graph_sha256, graph_bytes, max_elements, "
                "element_count, vectors_file, vector_rows, row_ids, colmax2, projection, "
                "graph_dims FROM checkpoint WHERE one = 1"
            ).fetchone()
        return EMPTY_CHECKPOINT if row is None else Checkpoint(*row)

    def set_checkpoint(self, ckpt: Checkpoint) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO checkpoint (one, gen, seq, graph_file, graph_sha256, "
            "graph_bytes, max_elements, element_count, vectors_file, vector_rows, row_ids, "
            "colmax2, projection, graph_dims) VALUES (1, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                ckpt.gen,
                ckpt.seq,
                ckpt.graph_file,
                ckpt.graph_sha256,
                ckpt.graph_bytes,
                ckpt.max_elements,
                ckpt.element_count,
                ckpt.vectors_file,
                ckpt.vector_rows,
                ckpt.row_ids,
                ckpt.colmax2,
                ckpt.projection,
                ckpt.graph_dims,
            ),
        )

    # ------------------------------------------------------------------ derived files
    def file(self, name: str) -> Path:
        assert self.root is not None
        if os.sep in name or name.startswith(".") or "/" in name:
            raise IndexCorruptError(f"{self.root / DB_FILE}: bad file name {name!r} recorded")
        return self.root / name

    def clear_debris(self, keep: set[str]) -> None:
        """Delete derived files no checkpoint refers to (killed checkpoints, old ones)."""
        if self.root is None:
            return
        for entry in os.listdir(self.root):
            if entry in keep:
                continue
            if entry.startswith(("graph-", "vectors-", ".graph-", ".vectors-")):
                with contextlib.suppress(OSError):
                    os.unlink(self.root / entry)


def is_index_dir(path: str | os.PathLike) -> bool:
    """A directory holding an index of this format (or the old one, which open refuses)."""
    root = Path(path)
    return (root / DB_FILE).is_file() or (root / OLD_POINTER).is_file()


__all__ = [
    "DB_FILE",
    "EMPTY_CHECKPOINT",
    "FORMAT",
    "FORMAT_VERSION",
    "Checkpoint",
    "Store",
    "is_index_dir",
]
