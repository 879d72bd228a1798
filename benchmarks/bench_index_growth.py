"""Index growth benchmark: what one change costs, what a cold open costs, how much memory.

For each gallery size (synthetic vectors drawn like real ones: see ``bench_index.py``):

- build: an index of N items written to a directory (the figures below are about changes
  to it, not about building it);
- add-1: single-item adds, each its own committed transaction, to the on-disk index:
  latency, and bytes written (``wchar`` of /proc/self/io: every byte handed to write(),
  SQLite's WAL included); then one graph checkpoint, and the bytes per add amortised over
  the checkpoint interval (the index checkpoints every N/32 changes, at least 1024);
- cold open + search: a fresh process opens the index and answers one query (page cache
  warm: the files were just written); its wall times and peak RSS;
- sustained ingest (``--sustained``): single adds for a while, automatic checkpoints
  included: items per second as the camera watcher would see them, less the embedding;
- the camera watcher (``--watcher``): ``examples/camera/watch.py``'s own loop (folder
  scan, settle, the path check, one committed add per frame with its metadata, watch-list
  scoring) over a folder of ``--watcher`` frames, with the embedder replaced by the
  precomputed embeddings (the model's own time per frame is apart from this): frames/s
  it sustains adding to the index of each size, automatic checkpoints included;
- peak RSS of this process (``resource.getrusage``), which built the index and ran the
  rest: an upper bound of what a writer needs.
- grown through add (``--grow-from``): an index grown from that size to N in batches,
  re-tuned (and checked between tunings) by itself on the way, then masked recall@10 on
  held-out queries.

Prints figures, asserts nothing. The CPU class (AVX-512 VNNI / AVX-VNNI / AVX2) is printed
with them: graph walks and numpy scans depend on it.

    python benchmarks/bench_index_growth.py --embeddings /tmp/cub100-test.npy \\
        --labels /tmp/cub100-test.labels.npy --sizes 10000 100000 --graph-dims 64
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_index import masks_for, synthetic, synthetic_classes  # noqa: E402

from cmn_edge.index import ConceptIndex  # noqa: E402


def cpu_class() -> str:
    """The instruction sets that matter here, as ``lscpu | grep -o ...`` would list them."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    found = sorted(set(re.findall(r"\b(avx512_vnni|avx_vnni|avx2)\b", flags)))
    return ",".join(found) or "no avx2"


def wchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    return 0


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


COLD = """
import sys, time
t0 = time.perf_counter()
import numpy as np
from cmn_edge.index import ConceptIndex
t1 = time.perf_counter()
index = ConceptIndex.load(sys.argv[1])
t2 = time.perf_counter()
q = np.load(sys.argv[2])
ids, _ = index.search_ids(q, 10)
t3 = time.perf_counter()
ids, _ = index.search_ids(q, 10, exclude=list(range(0, index.num_concepts, 2)))
t4 = time.perf_counter()
# VmHWM, not ru_maxrss: ru_maxrss keeps the parent's size from before exec()
status = open("/proc/self/status").read().split("VmHWM:")[1].split()
rss = int(status[0]) / 1024
print(f"{t1 - t0:.4f} {t2 - t1:.4f} {t3 - t2:.4f} {t4 - t3:.4f} {rss:.1f}")
"""


def cold_open(folder: Path, query: np.ndarray, repeats: int = 3) -> dict:
    qfile = folder.parent / "query.npy"
    np.save(qfile, query)
    runs = []
    for _ in range(repeats):
        out = subprocess.run(
            [sys.executable, "-c", COLD, str(folder), str(qfile)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        runs.append([float(v) for v in out])
    best = np.median(np.array(runs), axis=0)
    return {
        "import_s": best[0],
        "open_s": best[1],
        "first_search_ms": 1000 * best[2],
        "masked_search_ms": 1000 * best[3],
        "open_plus_search_s": best[1] + best[2],
        "rss_mb": best[4],
    }


def add_one_figures(folder: Path, extra: np.ndarray, count: int) -> dict:
    index = ConceptIndex.open(folder)
    index.auto_checkpoint = False
    latencies = []
    before_bytes, before_disk = wchar(), dir_bytes(folder)
    for i in range(count):
        start = time.perf_counter()
        index.add(extra[i : i + 1], [f"added-{i}"])
        latencies.append(time.perf_counter() - start)
    per_add = (wchar() - before_bytes) / count
    disk_growth = (dir_bytes(folder) - before_disk) / count
    live = len(index)
    start, b0 = time.perf_counter(), wchar()
    index.checkpoint(retune=False, refit=False, compact=False)
    ckpt_s, ckpt_bytes = time.perf_counter() - start, wchar() - b0
    interval = index._tail_limit(live)
    index.close()
    return {
        "add1_p50_ms": 1000 * float(np.percentile(latencies, 50)),
        "add1_p90_ms": 1000 * float(np.percentile(latencies, 90)),
        "add1_bytes": per_add,
        "add1_disk_growth_bytes": disk_growth,
        "checkpoint_s": ckpt_s,
        "checkpoint_bytes": ckpt_bytes,
        "checkpoint_interval": interval,
        "amortised_bytes_per_add": per_add + ckpt_bytes / interval,
    }


def sustained(folder: Path, extra: np.ndarray, seconds: float) -> dict:
    index = ConceptIndex.open(folder)
    start, n, gen0 = time.perf_counter(), 0, index._store.checkpoint().gen
    while time.perf_counter() - start < seconds and n < len(extra):
        index.add(extra[n : n + 1], [f"stream-{n}"])
        n += 1
    wall = time.perf_counter() - start
    checkpoints = index._store.checkpoint().gen - gen0
    index.close()
    return {"adds": n, "seconds": wall, "adds_per_s": n / wall, "checkpoints": checkpoints}


class _Precomputed:
    """The watcher's embedder, answering with embeddings drawn beforehand."""

    model_id = "benchmark"

    def __init__(self, by_name: dict[str, np.ndarray]) -> None:
        self.by_name = by_name

    def embed(self, paths) -> np.ndarray:
        return np.stack([self.by_name[Path(p).name] for p in paths])


def watcher_rate(folder: Path, extra: np.ndarray, frames: int) -> dict:
    """examples/camera/watch.py's loop over ``frames`` files, embeddings precomputed."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples" / "camera"))
    import watch  # noqa: PLC0415

    from cmn_edge.index import Index  # noqa: PLC0415

    logging.getLogger("watch").setLevel(logging.WARNING)  # not 1 log line a frame
    incoming = folder.parent / "frames"
    incoming.mkdir()
    by_name = {}
    for i in range(frames):
        name = f"frame-{i:06d}.jpg"
        (incoming / name).write_bytes(b"x")  # never decoded: the embedder is precomputed
        by_name[name] = extra[i]
    old = time.time() - 60  # already settled, in capture order
    for i, name in enumerate(sorted(by_name)):
        os.utime(incoming / name, (old + i * 1e-3, old + i * 1e-3))
    args = watch.parse_args([str(incoming), "--index", str(folder), "--once"])
    # scored against two watched items, but no MATCH line a frame (cosines stay below 1.01)
    args.interval, args.settle, args.threshold = 0.0, 0.0, 1.01
    watcher = watch.Watcher.__new__(watch.Watcher)
    watcher.args, watcher.stop_reason, watcher.save_failures, watcher.skipped = args, None, 0, 0
    watcher.index = Index.open(folder, _Precomputed(by_name))
    watcher.embedder = watcher.index.embedder
    watcher.watch = watch.load_watch_list(watcher.index, watcher.embedder, None, [0, 1], [])
    watcher.frames = watch.FrameQueue(incoming, watcher.seen, settle=0.0, give_up=10.0)
    before, gen0 = len(watcher.index), watcher.index.index._store.checkpoint().gen
    start = time.perf_counter()
    ok = watcher.run()
    wall = time.perf_counter() - start
    index = ConceptIndex.open(folder)
    added, checkpoints = len(index) - before, index._store.checkpoint().gen - gen0
    index.close()
    shutil.rmtree(incoming)
    return {
        "ok": ok,
        "frames": added,
        "seconds": wall,
        "frames_per_s": added / wall,
        "checkpoints": checkpoints,
    }


def grown(folder: Path, data: np.ndarray, start: int, queries: np.ndarray, args) -> dict:
    index = ConceptIndex(
        data.shape[1],
        "benchmark",
        exact_below=0,
        graph_dims=args.graph_dims or None,
        M=args.M,
        ef_construction=args.ef_construction,
    )
    index.add(data[:start])
    index.save(folder)
    index = ConceptIndex.open(folder)
    t0 = time.perf_counter()
    step = max(1000, len(data) // 100)
    for begin in range(start, len(data), step):
        index.add(data[begin : begin + step])
    grow_s = time.perf_counter() - t0
    index = ConceptIndex.load(folder)
    rng = np.random.default_rng(args.seed)
    rows = {}
    for mask in ("plain", "exclude 10%", "exclude 50%", "renormalize 50%"):
        controls = masks_for(mask, data.shape[1], len(queries), rng)
        for q, c in zip(queries[:5], controls[:5]):  # warm-up
            index.search_ids(q, 10, **c)
        found = total = 0
        lat, approx = [], []
        for q, c in zip(queries, controls):  # apart from the exact passes, as bench_index
            t = time.perf_counter()
            ids, _ = index.search_ids(q, 10, **c)
            lat.append(time.perf_counter() - t)
            approx.append(ids)
        for q, c, ids in zip(queries, controls, approx):
            exact, _ = index.search_ids(q, 10, exact=True, **c)
            found += len(set(ids.tolist()) & set(exact.tolist()))
            total += len(exact)
        rows[mask] = {"recall": found / total, "p50_ms": 1000 * float(np.median(lat))}
    state = index._state()
    rows["tail"] = index.manifest()["counts"]["tail"]
    return {
        "from": start,
        "to": len(data),
        "grow_s": grow_s,
        "ef": index.ef,
        "mask_ef_power": index.mask_ef_power,
        "renorm_ef_power": index.renorm_ef_power,
        "tuned_at": state["tuned_at"],
        "checked_at": index.manifest()["checkpoint"]["checked_at"],
        "fitted_at": state["fitted_at"],
        "checkpoints": index._store.checkpoint().gen,
        "masks": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--embeddings", required=True, help="real [N, C] float32 .npy")
    parser.add_argument("--labels", help="their class labels (.npy): clustered synthetic data")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10000, 100000])
    parser.add_argument("--graph-dims", type=int, default=64)
    parser.add_argument("--M", type=int, default=32)
    parser.add_argument("--ef-construction", type=int, default=200)
    parser.add_argument("--adds", type=int, default=200, help="single adds measured")
    parser.add_argument("--sustained", type=float, default=0, help="seconds of streaming adds")
    parser.add_argument(
        "--watcher", type=int, default=0, help="frames the camera watcher's loop adds"
    )
    parser.add_argument("--grow-from", type=int, default=0, help="grow to each size from this")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tmp", default=None, help="where the indexes are written")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()

    real = np.load(args.embeddings).astype(np.float32)
    labels = np.load(args.labels) if args.labels else None
    cpu = cpu_class()
    print(f"CPU: {os.cpu_count()} logical CPUs, {cpu}; load average {os.getloadavg()[0]:.2f}")
    results = []
    for n in args.sizes:
        total = n + args.adds + args.queries + max(0, int(args.sustained * 500)) + args.watcher
        if labels is not None:
            data = synthetic_classes(real, labels, total, args.seed)
        else:
            data = synthetic(real, total, args.seed)
        gallery, rest = data[:n], data[n:]
        queries, extra = rest[: args.queries], rest[args.queries :]
        work = Path(tempfile.mkdtemp(prefix="bench-growth-", dir=args.tmp))
        try:
            folder = work / "index"
            t0 = time.perf_counter()
            index = ConceptIndex(
                gallery.shape[1],
                "benchmark",
                exact_below=0,
                capacity=n,
                graph_dims=args.graph_dims or None,
                M=args.M,
                ef_construction=args.ef_construction,
            )
            for begin in range(0, n, 10000):
                index.add(gallery[begin : begin + 10000])
            build_s = time.perf_counter() - t0
            index.calibrate(queries=rest[-min(300, len(rest)) :])
            index.save(folder)
            del index
            row = {"items": n, "cpu": cpu, "build_s": build_s, "disk_mb": dir_bytes(folder) / 2**20}
            row.update(cold_open(folder, queries[0]))
            row.update(add_one_figures(folder, extra, args.adds))
            if args.sustained:
                row["sustained"] = sustained(folder, extra[args.adds :], args.sustained)
            if args.watcher:
                row["watcher"] = watcher_rate(folder, extra[-args.watcher :], args.watcher)
            if args.grow_from:
                shutil.rmtree(folder)
                row["grown"] = grown(folder, gallery, args.grow_from, queries, args)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        # ru_maxrss: KiB on Linux; the peak of this process so far (all sizes up to this)
        row["writer_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        results.append(row)
        print(
            f"\n== {n} items x {gallery.shape[1]} concepts [{cpu}], graph_dims="
            f"{args.graph_dims or 'all'}: built in {row['build_s']:.1f}s, "
            f"{row['disk_mb']:.1f} MiB on disk"
        )
        print(
            f"  add-1: p50 {row['add1_p50_ms']:.2f} ms, p90 {row['add1_p90_ms']:.2f} ms; "
            f"{row['add1_bytes'] / 1024:.1f} KiB written per add "
            f"(directory grows {row['add1_disk_growth_bytes'] / 1024:.1f} KiB per add)"
        )
        print(
            f"  checkpoint: {row['checkpoint_s']:.2f} s, {row['checkpoint_bytes'] / 2**20:.1f} "
            f"MiB, every {row['checkpoint_interval']} changes -> amortised "
            f"{row['amortised_bytes_per_add'] / 1024:.1f} KiB per add"
        )
        print(
            f"  cold process: import {row['import_s']:.3f} s, open {row['open_s']:.3f} s, "
            f"first search {row['first_search_ms']:.1f} ms, masked {row['masked_search_ms']:.1f}"
            f" ms (open + search {row['open_plus_search_s']:.3f} s), peak RSS "
            f"{row['rss_mb']:.0f} MiB"
        )
        if "sustained" in row:
            s = row["sustained"]
            print(
                f"  sustained single adds: {s['adds_per_s']:.0f}/s over {s['seconds']:.0f} s "
                f"({s['adds']} adds, {s['checkpoints']} automatic checkpoint(s))"
            )
        if "watcher" in row:
            w = row["watcher"]
            print(
                f"  camera watcher (precomputed embeddings): {w['frames_per_s']:.0f} frames/s "
                f"over {w['seconds']:.1f} s ({w['frames']} frames, each committed; "
                f"{w['checkpoints']} automatic checkpoint(s))"
            )
        print(f"  peak RSS of the writer process so far: {row['writer_peak_rss_mb']:.0f} MiB")
        if "grown" in row:
            g = row["grown"]
            tail = g["masks"].pop("tail")
            masks = ", ".join(
                f"{m} {v['recall']:.3f} ({v['p50_ms']:.2f} ms)" for m, v in g["masks"].items()
            )
            print(
                f"  grown {g['from']} -> {g['to']} through add in {g['grow_s']:.0f} s "
                f"({g['checkpoints']} checkpoints, tuned at {g['tuned_at']}, checked at "
                f"{g['checked_at']}, projection "
                f"fitted at {g['fitted_at']}, ef {g['ef']}, mask exponent "
                f"{g['mask_ef_power']:g} (renormalised {g['renorm_ef_power']:g}), {tail} items "
                f"in the tail): recall@10 {masks}"
            )
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
