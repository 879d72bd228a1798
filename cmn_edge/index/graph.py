"""The hnswlib graph's life cycle: create, grow in place, save, and load only once verified.

The graph is derived data (the database holds every vector): it is saved with hnswlib's own
``save_index`` at a checkpoint, and its sha256 is recorded in the database. hnswlib trusts
the file it parses (offsets, counts), so a load checks the size and the sha256 first; a file
that fails is never parsed, and the caller rebuilds the graph from the database instead.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import hnswlib
import numpy as np

from ..files import atomic_path, file_sha256
from .errors import IndexCorruptError


class Graph:
    """An hnswlib ``ip`` index whose labels are item ids."""

    def __init__(self, index: hnswlib.Index, dim: int) -> None:
        self.hnsw = index
        self.dim = dim

    @classmethod
    def new(cls, dim: int, capacity: int, M: int, ef_construction: int, seed: int) -> Graph:
        index = hnswlib.Index(space="ip", dim=dim)
        index.init_index(
            max_elements=max(16, int(capacity)),
            M=M,
            ef_construction=ef_construction,
            random_seed=seed,
            allow_replace_deleted=True,
        )
        return cls(index, dim)

    @classmethod
    def load(cls, path: Path, dim: int, sha256: str, size: int, max_elements: int) -> Graph:
        """Verify, then parse; IndexCorruptError (nothing parsed) when the file is not the
        one the checkpoint recorded."""
        try:
            actual = os.stat(path).st_size
        except FileNotFoundError:
            raise
        if actual != size or file_sha256(path) != sha256:
            raise IndexCorruptError(f"{path}: checksum mismatch (file was modified)")
        index = hnswlib.Index(space="ip", dim=dim)
        try:
            index.load_index(str(path), max_elements=max_elements, allow_replace_deleted=True)
        except RuntimeError as exc:
            raise IndexCorruptError(f"{path}: unreadable ({exc})") from None
        return cls(index, dim)

    def save(self, path: Path) -> tuple[str, int]:
        """Write to a temporary name, fsync, rename: (sha256, bytes) of the file."""
        with atomic_path(path) as tmp:
            self.hnsw.save_index(str(tmp))
            digest, size = file_sha256(tmp), os.stat(tmp).st_size
            if size != self.hnsw.index_file_size():
                # hnswlib does not check its writes: a full disk leaves a short file
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return digest, size

    def __len__(self) -> int:
        return int(self.hnsw.element_count)

    def grow_for(self, new_items: int, live: int) -> None:
        """Resize in place (no rebuild) when deleted slots cannot take the new items."""
        deleted = self.hnsw.element_count - live
        needed = self.hnsw.element_count + max(0, new_items - deleted)
        if needed > self.hnsw.max_elements:
            self.hnsw.resize_index(max(needed, 2 * self.hnsw.max_elements, 16))

    def add(
        self,
        vectors: np.ndarray,
        ids: np.ndarray,
        present: np.ndarray,
        live: int,
        num_threads: int = -1,
    ) -> None:
        """Insert new labels (reusing deleted slots) and move ``present`` ones in place."""
        new, moved = ~present, present
        self.grow_for(int(new.sum()), live)
        if new.any():
            self.hnsw.add_items(
                vectors[new], ids[new], num_threads=num_threads, replace_deleted=True
            )
        if moved.any():  # an existing label: hnswlib updates it (never with replace_deleted)
            self.hnsw.add_items(vectors[moved], ids[moved], num_threads=num_threads)

    def mark_deleted(self, item_id: int) -> None:
        try:
            self.hnsw.mark_deleted(int(item_id))
        except RuntimeError:
            pass  # already deleted, or never in this graph

    def knn(self, vector: np.ndarray, fetch: int, filt) -> np.ndarray:
        # hnswlib searches max(ef, k) deep: asking for ``fetch`` results sets the depth per
        # query, so concurrent searches never race on the shared ef setting
        labels, _ = self.hnsw.knn_query(vector[None, :], k=int(fetch), num_threads=1, filter=filt)
        return labels[0].astype(np.int64)


__all__ = ["Graph"]
