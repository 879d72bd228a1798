"""Locks: many reader threads or one writer thread over the in-memory search structures.

Between processes SQLite's own locking (WAL mode) does the work: any number of readers and
one writer at a time, readers never blocked. Within a process the hnswlib graph and the
numpy rows need this lock: hnswlib reads are thread safe, its writes are not.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator


class RWLock:
    """Many readers or one writer, writers first.

    Hand-written: the runtime's dependency list has no lock library, and the stdlib has none.
    The write side is re-entrant for its owner thread (a write may refresh, which writes).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer: int | None = None
        self._depth = 0
        self._waiting = 0
        self._read_guard = _ReadGuard(self)

    def read(self) -> _ReadGuard:
        return self._read_guard  # a plain object, not a generator: cheap on the query path

    def acquire_read(self) -> None:
        with self._cond:
            if self._writer == threading.get_ident():
                self._depth += 1  # a writer reading its own state
                return
            while self._writer is not None or self._waiting:
                self._cond.wait()
            self._readers += 1

    def release_read(self) -> None:
        with self._cond:
            if self._writer == threading.get_ident():
                self._depth -= 1
                return
            self._readers -= 1
            if not self._readers:
                self._cond.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._cond:
            if self._writer == me:
                self._depth += 1
            else:
                self._waiting += 1
                while self._writer is not None or self._readers:
                    self._cond.wait()
                self._waiting -= 1
                self._writer, self._depth = me, 1
        try:
            yield
        finally:
            with self._cond:
                self._depth -= 1
                if not self._depth:
                    self._writer = None
                    self._cond.notify_all()


class _ReadGuard:
    __slots__ = ("_lock",)

    def __init__(self, lock: RWLock) -> None:
        self._lock = lock

    def __enter__(self) -> None:
        self._lock.acquire_read()

    def __exit__(self, *exc) -> None:
        self._lock.release_read()


__all__ = ["RWLock"]
