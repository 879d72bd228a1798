"""Keep an index in step with a folder: embed new files, re-embed changed ones (size and
mtime, then sha256), remove vanished ones. Paths are stored relative to the folder, so a
moved folder still matches, and each batch is its own commit, so an interrupted run resumes
where it stopped (the files it committed match their stamps and are skipped)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..dataset import passed_over_note
from ..embedder import list_images
from ..files import file_sha256, storable_name
from ..preprocess import ImageError
from .errors import ConceptIndexError

#: Why a file whose name is not UTF-8 (kept by Python as lone surrogates) is left out.
NOT_UTF8 = "file name is not valid UTF-8, which the index cannot store (rename the file)"


def check_storable_folder(folder: str | os.PathLike) -> None:
    """Refuse a folder whose resolved path the index cannot store, before anything is written."""
    root = Path(folder).resolve()
    if not storable_name(root):
        raise ConceptIndexError(
            f"{root}: folder name is not valid UTF-8, which the index cannot store "
            "(rename the folder)"
        )


@dataclass
class SyncReport:
    added: int = 0
    updated: int = 0
    removed: int = 0
    unchanged: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    #: photos in formats Pillow cannot decode here (HEIC), left out of the folder's listing
    passed_over: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"added {self.added}, updated {self.updated}, removed {self.removed}, "
            f"unchanged {self.unchanged}, skipped {len(self.skipped)}"
        )


def sync_folder(
    index,
    embedder,
    folder: str | os.PathLike,
    *,
    strict: bool = False,
    remove_missing: bool = True,
    batch_size: int = 32,
    metadata: dict[str, dict[str, str]] | None = None,
    progress: Callable[[int], None] | None = None,
    plan: Callable[[int], None] | None = None,
) -> SyncReport:
    """Bring ``index`` (a :class:`ConceptIndex`) in step with ``folder``.

    A folder without images is refused when the index holds items synced from a folder
    (an unmounted drive would empty it); ``remove_missing=False`` adds to it anyway.
    ``metadata``: absolute resolved path -> {key: value}. ``plan(n)`` is told how many
    files will be embedded, ``progress(k)`` after every k of them. An unreadable file is
    skipped and listed in the report (``strict``: the first one raises ImageError).
    """
    root = Path(folder).resolve()
    check_storable_folder(root)
    report = SyncReport()
    passed_over: list[Path] = []
    files = list_images(root, passed_over)
    report.passed_over = [str(p) for p in passed_over]
    stored = {p: v for p, v in index.file_stamps().items() if not os.path.isabs(p)}
    if remove_missing and stored and not files:
        # an unmounted drive or share is an empty folder: removing every item would lose
        # the index to a missing mount
        note = passed_over_note(passed_over)
        raise ConceptIndexError(
            f"{root}: no images found; syncing would remove all {len(stored)} items of "
            f"{index._where()} (is the folder mounted?)" + (f"; {note}" if note else "")
        )
    todo: list[tuple[Path, str, tuple[int, int, str | None]]] = []
    present: set[str] = set()
    for file in files:
        rel = file.relative_to(root).as_posix()
        present.add(rel)
        if not storable_name(rel):
            if strict:
                raise ImageError(f"{file}: {NOT_UTF8}")
            report.skipped.append((str(file), NOT_UTF8))
            continue
        try:
            st = file.stat()
        except OSError as exc:
            if strict:
                raise ImageError(f"{file}: cannot read ({exc.strerror or exc})") from None
            report.skipped.append((str(file), exc.strerror or str(exc)))
            continue
        known = stored.get(rel)
        if known is not None and (known[1], known[2]) == (st.st_size, st.st_mtime_ns):
            report.unchanged += 1
            continue
        try:
            digest = file_sha256(file)
        except OSError as exc:
            if strict:
                raise ImageError(f"{file}: cannot read ({exc.strerror or exc})") from None
            report.skipped.append((str(file), exc.strerror or str(exc)))
            continue
        if known is not None and known[3] == digest:
            # touched, not changed: remember the new stamp, keep the embedding
            index._restamp(known[0], (st.st_size, st.st_mtime_ns, digest))
            report.unchanged += 1
            continue
        todo.append((file, rel, (st.st_size, st.st_mtime_ns, digest)))
    if plan is not None:
        plan(len(todo))
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        kept, arrays = [], []
        for file, rel, stamp in batch:
            try:
                arrays.append(embedder.load(file))
                kept.append((file, rel, stamp))
            except ImageError as exc:
                if strict:
                    raise
                report.skipped.append((str(file), str(exc).removeprefix(f"{file}: ")))
        if arrays:
            keeps_regions = index.region_grid is not None
            out = embedder.embed_arrays(np.stack(arrays), with_regions=keeps_regions)
            rels = [rel for _, rel, _ in kept]
            before = index.ids_for_paths(rels)
            meta = None
            if metadata is not None:
                meta = [metadata.get(str(file.resolve())) for file, _, _ in kept]
            stamps = [stamp for _, _, stamp in kept]
            index.add(out.embedding, rels, meta, stamps=stamps, regions=out.regions)
            report.updated += len(before)
            report.added += len(kept) - len(before)
        if progress is not None:
            progress(len(batch))
    if remove_missing:
        gone = [item_id for rel, (item_id, *_rest) in stored.items() if rel not in present]
        if gone:
            index.remove(gone)
            report.removed = len(gone)
    index.set_root(root)
    return report


__all__ = ["NOT_UTF8", "SyncReport", "check_storable_folder", "storable_name", "sync_folder"]
