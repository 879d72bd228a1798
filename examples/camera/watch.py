"""Watch a folder that a camera writes frames into; index each frame and report watch-list matches.

    python examples/camera/watch.py FRAMES --index DIR --watch REFERENCE_PHOTOS --threshold 0.8

Every new image in FRAMES is embedded, added to the concept index in DIR (created if missing)
and compared with the watch list (a folder of reference photos and/or ids already in the
index). A score at or above ``--threshold`` prints a ``MATCH`` line. ``--ignore-concept``
leaves concepts (by index or by name) out of that comparison, e.g. a background concept
that every frame of a fixed camera shares.

What a long-running watcher has to survive:
- half-written frames: a file is read only once its size and mtime stayed unchanged for
  ``--settle`` seconds; one that still cannot be decoded is retried after each change and
  given up as CORRUPT once it stayed unchanged and unreadable for ``--give-up`` seconds;
- restarts: each frame's path is stored in the index, and paths already there are skipped,
  so stopping and starting again never adds a frame twice;
- being killed: each frame is committed to the index's database as it is added (one small
  transaction, not a rewrite of the index), so a kill loses at most the frame being added;
- other programs: searches (the kiosk, ``cmn-edge search``) and other changes (naming a
  concept) may use the index while the watcher adds to it.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cmn_edge import Embedder, ImageError
from cmn_edge.dataset import IMAGE_SUFFIXES  # the runtime's one list (AVIF where Pillow reads it)
from cmn_edge.index import (
    ConceptIndexError,
    Index,
    ModelMismatchError,
    embedder_for_index,
    is_index_dir,
)

log = logging.getLogger("watch")

#: Suffixes capture tools give a file while they are still writing it (then rename it).
PARTIAL_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".download")
#: Consecutive failed commits after which the watcher stops (exit status 1).
MAX_SAVE_FAILURES = 3
#: A frame is given up as corrupt only after this many failed reads of the same version.
MIN_FAILED_READS = 2


# ---------------------------------------------------------------------------- the folder


@dataclass
class _Pending:
    size: int
    mtime_ns: int
    changed_at: float  # clock time of the last change in (size, mtime)
    tried_at: float | None = None  # last hand-out of this version of the file
    errors: list[str] = field(default_factory=list)  # failed reads of this version


class FrameQueue:
    """Poll a folder with ``os.scandir`` and hand out frames that have stopped changing.

    Polling needs no extra dependency and works on network shares and SD cards, where
    inotify-style events are often missing. ``seen(path)`` says whether a frame was already
    dealt with before this process started.
    """

    def __init__(
        self,
        folder: Path,
        seen: Callable[[Path], bool],
        settle: float,
        give_up: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.folder, self.seen, self.settle, self.give_up = folder, seen, settle, give_up
        self.clock = clock
        self.pending: dict[Path, _Pending] = {}
        self.done: dict[Path, tuple[int, int] | None] = {}  # corrupt ones keep their (size, mtime)

    def _scan(self) -> dict[Path, tuple[int, int]]:
        found = {}
        with os.scandir(self.folder) as listing:
            for entry in listing:
                name = entry.name
                if name.startswith(".") or name.lower().endswith(PARTIAL_SUFFIXES):
                    continue
                if os.path.splitext(name)[1].lower() not in IMAGE_SUFFIXES:
                    continue
                try:
                    if entry.is_file():
                        stat = entry.stat()
                        found[Path(entry.path)] = (stat.st_size, stat.st_mtime_ns)
                except FileNotFoundError:  # removed between the listing and the stat
                    continue
        return found

    def ready(self) -> list[Path]:
        """The frames worth reading now, oldest first (the order they were captured)."""
        now = self.clock()
        found = self._scan()
        for path, (size, mtime_ns) in found.items():
            if path in self.done:
                corrupt = self.done[path]
                if corrupt is None or corrupt == (size, mtime_ns):
                    continue
                del self.done[path]  # a corrupt frame was rewritten: look at it again
            state = self.pending.get(path)
            if state is None:
                if self.seen(path):
                    self.done[path] = None
                    continue
                self.pending[path] = _Pending(size, mtime_ns, now)
            elif (state.size, state.mtime_ns) != (size, mtime_ns):
                state.size, state.mtime_ns, state.changed_at = size, mtime_ns, now
                state.tried_at, state.errors = None, []
        for gone in [p for p in self.pending if p not in found]:
            del self.pending[gone]  # deleted before it was finished: nothing to do
        out = []
        for path, state in self.pending.items():
            if state.size == 0 or now - state.changed_at < self.settle:
                continue  # empty or still being written
            if state.tried_at is None or now - state.tried_at >= self.settle:
                state.tried_at = now
                out.append(path)
        return sorted(out, key=lambda p: (self.pending[p].mtime_ns, p.name))

    def finished(self, path: Path) -> None:
        self.pending.pop(path, None)
        self.done[path] = None

    def failed(self, path: Path, reason: str) -> bool:
        """Record a failed read; True once the frame is given up as corrupt.

        Only a file that stayed unchanged *and* unreadable for ``give_up`` seconds, over at
        least MIN_FAILED_READS reads, is called corrupt: a writer that pauses mid-file resets
        the clock when it goes on, and a first read that comes late (a busy CPU) never
        condemns a frame by itself.
        """
        state = self.pending[path]
        state.errors.append(reason)
        if len(state.errors) < MIN_FAILED_READS or self.clock() - state.changed_at < self.give_up:
            return False
        del self.pending[path]
        self.done[path] = (state.size, state.mtime_ns)
        return True


# ---------------------------------------------------------------------------- the watch list


@dataclass
class WatchList:
    """Reference embeddings and their labels; scores are the index's own concept-masked ones."""

    labels: list[str]
    vectors: np.ndarray  # [W, C] unit rows
    weights: np.ndarray | None  # [C] query-side concept weights (0 = ignored), None = all

    def matches(self, frame: np.ndarray, threshold: float) -> list[tuple[str, float]]:
        """(label, score) of every reference at or above ``threshold``, best first.

        With ignored concepts the score is ``(frame * w) . ref``: what the index's
        ``search(exclude=...)`` computes, so a watch-list hit and a search agree.
        """
        if not self.labels:
            return []
        query = frame if self.weights is None else frame * self.weights
        scores = self.vectors @ query
        order = np.argsort(-scores, kind="stable")
        return [(self.labels[i], float(scores[i])) for i in order if scores[i] >= threshold]


def load_watch_list(
    index: Index,
    embedder: Embedder,
    folder: Path | None,
    ids: list[int],
    ignore: list[str],
) -> WatchList:
    labels, vectors = [], []
    if folder is not None:
        for paths, embeddings in embedder.iter_folder(folder):
            labels += [p.name for p in paths]
            vectors.append(embeddings)
    for item_id in ids:
        if item_id not in index:
            raise ConceptIndexError(f"{index.path}: no item with id {item_id} to watch for")
        path, _ = index.item(item_id)
        labels.append(f"#{item_id} {Path(path).name}" if path else f"#{item_id}")
        vectors.append(index.embedding(item_id)[None, :])
    # The index resolves names and numbers and says which names exist when one is unknown.
    weights = index.plan(exclude=ignore).weights if ignore else None
    stacked = np.concatenate(vectors) if vectors else np.zeros((0, index.num_concepts), "float32")
    return WatchList(labels, stacked, weights)


# ---------------------------------------------------------------------------- the loop


def open_index(args: argparse.Namespace) -> Index:
    """The index in ``args.index`` with the model it was built with (or the one asked for,
    which must be the same), or a new index for ``--model``."""
    if is_index_dir(args.index):
        index = Index.open(args.index)
        index._embedder = embedder_for_index(index.index, args.model, args.precision, args.threads)
        return index
    return Index.create(
        args.index, model=args.model, precision=args.precision or "int8", threads=args.threads
    )


class Watcher:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.stop_reason: str | None = None
        self.index = open_index(args)
        self.embedder = self.index.embedder
        self.watch = load_watch_list(
            self.index, self.embedder, args.watch, args.watch_id, args.ignore_concept
        )
        self.frames = FrameQueue(args.folder, self.seen, settle=args.settle, give_up=args.give_up)
        self.save_failures = 0
        self.skipped = 0

    def seen(self, path: Path) -> bool:
        if self.index.id_for_path(str(path.resolve())) is None:
            return False
        self.skipped += 1
        return True

    def process(self, path: Path) -> None:
        maps = None
        try:
            if self.index.keeps_regions:  # an index kept for structural re-ranking
                vectors, maps = self.embedder.embed_regions([path])
                vector = vectors[0]
            else:
                vector = self.embedder.embed([path])[0]
        except ImageError as exc:
            reason = str(exc).removeprefix(f"{path}: ")
            if self.frames.failed(path, reason):
                log.warning(
                    "CORRUPT %s: still unreadable after %.0fs unchanged (%s); skipped",
                    path.name,
                    self.args.give_up,
                    reason,
                )
            elif len(self.frames.pending[path].errors) == 1:  # once per version of the file
                log.info("not readable yet: %s (%s); will retry", path.name, reason)
            return
        captured_ns = self.frames.pending[path].mtime_ns
        try:
            # one committed transaction: the frame's row, not a rewrite of the index
            item_id = self.index.add(
                vector[None, :],
                [path],
                [{"source": "camera", "captured_ns": captured_ns}],
                regions=maps,
            )[0]
        except ModelMismatchError as exc:
            # `cmn-edge index rebuild` re-embedded the index with another model: this
            # process's vectors no longer fit; the frame stays pending for the restart
            log.error("could not add %s to the index: %s", path.name, exc)
            self.stop_reason = "the index was re-embedded with another model; restart to load it"
            return
        except (OSError, ConceptIndexError) as exc:
            # Disk full, a read-only mount, the database locked for too long: the frame
            # stays pending and is tried again; after a few failures in a row, stop (a
            # restart picks up every frame not in the index).
            self.save_failures += 1
            log.error("could not add %s to the index: %s", path.name, exc)
            if self.save_failures >= MAX_SAVE_FAILURES:
                self.stop_reason = "the index cannot be written; restart to pick up where it was"
            return
        self.save_failures = 0
        self.frames.finished(path)
        log.info("added %s as item %d (committed; %d items)", path.name, item_id, len(self.index))
        for label, score in self.watch.matches(vector, self.args.threshold):
            log.warning(
                "MATCH %s ~ %s score %.3f (threshold %.2f)",
                path.name,
                label,
                score,
                self.args.threshold,
            )

    def run(self) -> bool:
        """Watch until stopped; False when the index could not be written."""
        ignored = ", ".join(self.args.ignore_concept) or "none"
        log.info(
            "watching %s -> index %s (%d items, model %s); watch list: %d; threshold %.2f; "
            "ignoring concepts: %s",
            self.args.folder,
            self.args.index,
            len(self.index),
            self.embedder.model_id,
            len(self.watch.labels),
            self.args.threshold,
            ignored,
        )
        folder_error = None
        while self.stop_reason is None:
            try:
                ready = self.frames.ready()
                folder_error = None
            except OSError as exc:  # an unmounted card or share: wait for it to come back
                if str(exc) != folder_error:
                    log.error("cannot read %s (%s); will retry", self.args.folder, exc)
                folder_error, ready = str(exc), []
            for path in ready:
                if self.stop_reason is not None:
                    break
                self.process(path)
            if self.skipped:
                log.info("skipped %d frame(s) already in the index", self.skipped)
                self.skipped = 0
            if self.args.once and not self.frames.pending:
                break
            time.sleep(self.args.interval)
        ok = self.save_failures < MAX_SAVE_FAILURES
        log.log(
            logging.INFO if ok else logging.ERROR,
            "stopped (%s)",
            self.stop_reason or "nothing left to do",
        )
        self.index.close()
        return ok


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", type=Path, help="Folder the camera writes frames into.")
    p.add_argument("--index", type=Path, required=True, help="Concept index (created if missing).")
    p.add_argument("--watch", type=Path, default=None, help="Folder of reference photos.")
    p.add_argument(
        "--watch-id",
        type=int,
        action="append",
        default=[],
        help="An item id in the index to watch for (repeatable).",
    )
    p.add_argument("--threshold", type=float, default=0.8, help="Report scores at or above this.")
    p.add_argument(
        "--ignore-concept",
        action="append",
        default=[],
        metavar="CONCEPT",
        help="Concept index or name left out of watch-list scores (repeatable).",
    )
    p.add_argument("--interval", type=float, default=0.5, help="Seconds between folder polls.")
    p.add_argument(
        "--settle",
        type=float,
        default=1.0,
        help="A frame is read once unchanged for this many seconds.",
    )
    p.add_argument(
        "--give-up",
        type=float,
        default=10.0,
        help="An unreadable frame unchanged this long is logged as corrupt.",
    )
    p.add_argument("--save-every", type=float, default=None, help=argparse.SUPPRESS)  # old
    p.add_argument("--once", action="store_true", help="Process what is there, then exit.")
    p.add_argument("--model", default=None, help="Model (default: the index's, else bundled).")
    p.add_argument(
        "--precision",
        choices=["int8", "fp32"],
        default=None,
        help="Default: the index's, else int8.",
    )
    p.add_argument("--threads", type=int, default=None, help="onnxruntime threads.")
    args = p.parse_args(argv)
    if not args.folder.is_dir():
        p.error(f"{args.folder}: folder not found")
    if args.watch is not None and not args.watch.is_dir():
        p.error(f"{args.watch}: watch-list folder not found")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(levelname)s %(message)s"
    )
    args = parse_args(argv)
    try:
        watcher = Watcher(args)
    except (ImageError, ConceptIndexError, ValueError, FileNotFoundError) as exc:
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 1

    def stop(signum: int, _frame: object) -> None:
        watcher.stop_reason = signal.Signals(signum).name

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    return 0 if watcher.run() else 1


if __name__ == "__main__":
    sys.exit(main())
