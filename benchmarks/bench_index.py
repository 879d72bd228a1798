"""Index benchmark: build time, size on disk, query latency and recall@k against brute force.

Two galleries: the embeddings of a real dataset split (embedded with the bundled model, or
reused from ``--embeddings``), and a synthetic gallery of ``--synthetic`` items drawn to match
their statistics at a size no bundled dataset has, then L2-normalised:

- ``gaussian``: one Gaussian with the real embeddings' mean and covariance. It keeps the
  correlations but not the clusters, so it is the hardest case for a graph index.
- ``classes``: new class centres drawn from a Gaussian fitted to the real class means, and
  items around them with the real within-class covariance (about 60 items a class): the
  same total covariance, with the clustered neighbourhoods a real gallery has. Needs labels.

Queries are held out of the gallery (the real split's last ``--queries`` images; fresh draws
for the synthetic one). Every query is searched plain and under concept masks (1 concept,
10% and 50% of the concepts excluded, and 50% excluded with ``renormalize``); recall@k is
against the exact masked search on the same index. Prints figures; it asserts nothing.

    python benchmarks/bench_index.py --data ../shared/datasets/cub100 --split test \\
        --save-embeddings /tmp/cub100-test.npy
    python benchmarks/bench_index.py --embeddings /tmp/cub100-test.npy --synthetic 100000

``--index-dir`` keeps the built (and calibrated) index and measures the next run on it: a
change to the search is then compared on the very same graph.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from cmn_edge.index import ConceptIndex


def embed_split(
    data: str, split: str, model: str | None, precision: str, threads: int | None, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    from cmn_edge import Embedder
    from cmn_edge.dataset import load_samples

    samples = load_samples(data, split)
    embedder = Embedder(model, precision=precision, threads=threads)
    chunks = []
    start = time.perf_counter()
    for _paths, emb in embedder.iter_paths([s.path for s in samples], batch_size=batch_size):
        chunks.append(emb)
    print(
        f"embedded {len(samples)} images of {data} ({split}) with {embedder.model_id} "
        f"in {time.perf_counter() - start:.1f}s"
    )
    return np.concatenate(chunks), np.array([s.label for s in samples])


def _cholesky(cov: np.ndarray) -> np.ndarray:
    # a covariance from fewer samples than dimensions is singular: add a small ridge
    ridge = 1e-6 * np.trace(cov) / len(cov)
    return np.linalg.cholesky(cov + ridge * np.eye(len(cov)))


def _normalised(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def synthetic(real: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Gaussian draws with the real embeddings' mean and covariance, L2-normalised."""
    rng = np.random.default_rng(seed)
    mean = real.mean(axis=0, dtype=np.float64)
    chol = _cholesky(np.cov(real.astype(np.float64), rowvar=False))
    out = np.empty((n, real.shape[1]), dtype=np.float32)
    for start in range(0, n, 20000):
        m = min(20000, n - start)
        out[start : start + m] = _normalised(mean + rng.standard_normal((m, len(mean))) @ chol.T)
    return out


def synthetic_classes(
    real: np.ndarray, labels: np.ndarray, n: int, seed: int, per_class: int = 60
) -> np.ndarray:
    """New classes: centres like the real class means, spread like the real classes."""
    rng = np.random.default_rng(seed)
    x = real.astype(np.float64)
    classes = np.unique(labels)
    means = np.stack([x[labels == c].mean(axis=0) for c in classes])
    within = np.concatenate([x[labels == c] - means[i] for i, c in enumerate(classes)])
    between_chol = _cholesky(np.cov(means, rowvar=False))
    within_chol = _cholesky(np.cov(within, rowvar=False))
    n_classes = max(1, n // per_class)
    centres = means.mean(axis=0) + rng.standard_normal((n_classes, x.shape[1])) @ between_chol.T
    out = np.empty((n, x.shape[1]), dtype=np.float32)
    for start in range(0, n, 20000):
        m = min(20000, n - start)
        which = rng.integers(n_classes, size=m)
        noise = rng.standard_normal((m, x.shape[1])) @ within_chol.T
        out[start : start + m] = _normalised(centres[which] + noise)
    return out


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def masks_for(name: str, num_concepts: int, n: int, rng: np.random.Generator) -> list[dict]:
    if name == "plain":
        return [{} for _ in range(n)]
    if name == "exclude 1":
        return [{"exclude": [int(rng.integers(num_concepts))]} for _ in range(n)]
    fraction = {"exclude 10%": 0.1, "exclude 50%": 0.5, "renormalize 50%": 0.5}[name]
    drop = max(1, round(fraction * num_concepts))
    out = []
    for _ in range(n):
        control = {"exclude": rng.choice(num_concepts, drop, replace=False).tolist()}
        if name.startswith("renormalize"):
            control["renormalize"] = True
        out.append(control)
    return out


MASKS = ("plain", "exclude 1", "exclude 10%", "exclude 50%", "renormalize 50%")


def run_gallery(
    name: str,
    gallery: np.ndarray,
    queries: np.ndarray,
    args,
    calibration_queries: np.ndarray | None = None,
) -> dict:
    print(
        f"\n== {name}: {len(gallery)} items x {gallery.shape[1]} concepts, "
        f"{len(queries)} queries, k={args.k}"
    )
    kept = None
    if args.index_dir:
        kept = Path(args.index_dir) / (
            f"{name.replace(' ', '-').replace('(', '').replace(')', '')}-{len(gallery)}"
            f"-d{args.graph_dims}-M{args.M}{'-cal' if args.calibrate else ''}"
        )
        if (kept / "index").exists():
            # the same draws (same seed), built and calibrated by an earlier run: measure
            # the search of this checkout on it; build figures are not measured again
            start = time.perf_counter()
            index = ConceptIndex.load(kept / "index")
            load_s = time.perf_counter() - start
            print(f"reusing the index in {kept / 'index'}")
            size = dir_size(kept / "index")
            return _measure(name, gallery, queries, args, index, 0.0, 0.0, None, 0.0, size, load_s)
    index = ConceptIndex(
        gallery.shape[1],
        "benchmark",
        M=args.M,
        ef_construction=args.ef_construction,
        ef=args.ef,
        exact_below=0,
        capacity=len(gallery),
        graph_dims=args.graph_dims or None,
    )
    start, cpu_start = time.perf_counter(), time.process_time()
    for begin in range(0, len(gallery), 10000):
        chunk = gallery[begin : begin + 10000]
        index.add(chunk, [f"item-{i}" for i in range(begin, begin + len(chunk))])
    build_s = time.perf_counter() - start
    build_cpu_s = time.process_time() - cpu_start  # all build threads together
    calibration = None
    if args.calibrate:
        start = time.perf_counter()
        calibration = index.calibrate(target=args.target, k=args.k, queries=calibration_queries)
        calibration["seconds"] = round(time.perf_counter() - start, 2)
    folder = kept if kept is not None else Path(tempfile.mkdtemp(prefix="bench-index-"))
    try:
        start = time.perf_counter()
        index.save(folder / "index")
        save_s = time.perf_counter() - start
        size = dir_size(folder / "index")
        start = time.perf_counter()
        # what users search: the index as opened from disk (memory-mapped vectors)
        index = ConceptIndex.load(folder / "index")
        load_s = time.perf_counter() - start
        return _measure(
            name,
            gallery,
            queries,
            args,
            index,
            build_s,
            build_cpu_s,
            calibration,
            save_s,
            size,
            load_s,
        )
    finally:
        if kept is None:
            shutil.rmtree(folder, ignore_errors=True)


def _measure(
    name, gallery, queries, args, index, build_s, build_cpu_s, calibration, save_s, size, load_s
) -> dict:
    print(
        f"build {build_s:.2f}s wall, {build_cpu_s:.2f}s CPU "
        f"({len(gallery) / max(build_s, 1e-9):.0f} items/s), save {save_s:.2f}s, "
        f"load {load_s:.2f}s, on disk {size / 2**20:.1f} MiB, M={index.M} "
        f"ef_construction={index.ef_construction} ef={index.ef} "
        f"mask_ef_power={index.mask_ef_power} graph_dims={index.graph_dims}"
    )
    if calibration:
        print(f"calibration: {calibration}")
    rng = np.random.default_rng(args.seed)
    rows = []
    for mask in MASKS:
        controls = masks_for(mask, gallery.shape[1], len(queries), rng)
        for q, c in zip(queries[:5], controls[:5]):  # warm-up
            index.search_ids(q, args.k, **c)
        # separate passes: a second search of the same query would find the graph in cache
        # wall time, and this thread's CPU time: on a shared CPU the wall time includes the
        # waits for a core; the CPU time is what one query costs a core of its own
        latencies, cpu, full_latencies, found, total, approx = [], [], [], 0, 0, []
        for q, c in zip(queries, controls):
            start, cpu_start = time.perf_counter(), time.thread_time()
            ids, _ = index.search_ids(q, args.k, **c)
            latencies.append(time.perf_counter() - start)
            cpu.append(time.thread_time() - cpu_start)
            approx.append(ids)
        for q, c in zip(queries, controls):
            start = time.perf_counter()
            index.search(q, args.k, **c)  # with the SQLite metadata look-up
            full_latencies.append(time.perf_counter() - start)
        for q, c, ids in zip(queries, controls, approx):
            exact, _ = index.search_ids(q, args.k, exact=True, **c)
            found += len(set(ids.tolist()) & set(exact.tolist()))
            total += len(exact)
        row = {
            "mask": mask,
            "p50_ms": 1000 * float(np.percentile(latencies, 50)),
            "p90_ms": 1000 * float(np.percentile(latencies, 90)),
            "p99_ms": 1000 * float(np.percentile(latencies, 99)),
            "cpu_p50_ms": 1000 * float(np.percentile(cpu, 50)),
            "cpu_p99_ms": 1000 * float(np.percentile(cpu, 99)),
            "p50_with_metadata_ms": 1000 * float(np.percentile(full_latencies, 50)),
            "recall": found / total,
        }
        rows.append(row)
        print(
            f"  {mask:<16} p50 {row['p50_ms']:6.3f} ms  p90 {row['p90_ms']:6.3f} ms  "
            f"p99 {row['p99_ms']:6.3f} ms  "
            f"CPU p50 {row['cpu_p50_ms']:6.3f} ms  p99 {row['cpu_p99_ms']:6.3f} ms  "
            f"(with metadata p50 {row['p50_with_metadata_ms']:6.3f} ms)  "
            f"recall@{args.k} {row['recall']:.4f}"
        )
    exact_lat = []
    for q in queries[:50]:
        start = time.perf_counter()
        index.search_ids(q, args.k, exact=True)
        exact_lat.append(time.perf_counter() - start)
    print(f"  {'exact (numpy)':<16} p50 {1000 * np.percentile(exact_lat, 50):6.3f} ms")
    return {
        "gallery": name,
        "items": len(gallery),
        "concepts": gallery.shape[1],
        "build_s": build_s,
        "build_cpu_s": build_cpu_s,
        "save_s": save_s,
        "load_s": load_s,
        "disk_bytes": size,
        "M": index.M,
        "ef_construction": index.ef_construction,
        "ef": index.ef,
        "mask_ef_power": index.mask_ef_power,
        "graph_dims": index.graph_dims,
        "calibration": calibration,
        "searches": rows,
        "exact_p50_ms": 1000 * float(np.percentile(exact_lat, 50)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="dataset folder to embed (manifest.csv or ImageFolder)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--embeddings", help="reuse a saved [N, C] float32 .npy instead")
    parser.add_argument("--labels", help="class labels [N] (.npy) for --embeddings")
    parser.add_argument(
        "--save-embeddings", help="write the embedded split here (.npy; labels beside it)"
    )
    parser.add_argument(
        "--synthetic-kind", choices=["gaussian", "classes", "both"], default="gaussian"
    )
    parser.add_argument("--model", default=None)
    parser.add_argument("--precision", default="int8", choices=["int8", "fp32"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--synthetic", type=int, default=100_000, help="synthetic gallery size (0: none)"
    )
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--M", type=int, default=32)
    parser.add_argument("--ef-construction", type=int, default=200)
    parser.add_argument("--ef", type=int, default=64)
    parser.add_argument(
        "--graph-dims", type=int, default=0, help="reduced graph dimensions (0: all concepts)"
    )
    parser.add_argument(
        "--calibrate", action="store_true", help="run ConceptIndex.calibrate before measuring"
    )
    parser.add_argument("--target", type=float, default=0.98)
    parser.add_argument(
        "--calibration-queries",
        type=int,
        default=300,
        help="held-out queries --calibrate tunes on (apart from the measured ones)",
    )
    parser.add_argument(
        "--index-dir",
        help="keep each built index here and reuse it on the next run with the same "
        "arguments (compare search changes on one graph; build figures then not measured)",
    )
    parser.add_argument("--skip-real", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()

    labels = None
    if args.embeddings:
        real = np.load(args.embeddings, allow_pickle=False).astype(np.float32)
        print(f"loaded {real.shape} embeddings from {args.embeddings}")
        if args.labels:
            labels = np.load(args.labels, allow_pickle=False)
    elif args.data:
        real, labels = embed_split(
            args.data, args.split, args.model, args.precision, args.threads, args.batch_size
        )
        if args.save_embeddings:
            np.save(args.save_embeddings, real)
            np.save(Path(args.save_embeddings).with_suffix(".labels.npy"), labels)
    else:
        parser.error("give --data (to embed a split) or --embeddings")
    kinds = ["gaussian", "classes"] if args.synthetic_kind == "both" else [args.synthetic_kind]
    if "classes" in kinds and labels is None:
        parser.error("--synthetic-kind classes needs labels (--data, or --labels)")
    print(
        f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} "
        "(a load above the CPU count means the figures were taken on a shared CPU)"
    )
    results = []
    # the split's last images are the measured queries, the ones before them the calibration
    # queries (when --calibrate): neither is in the gallery
    n_queries = min(args.queries, len(real) // 10)
    n_cal = min(args.calibration_queries, len(real) // 10) if args.calibrate else 0
    if not args.skip_real:
        results.append(
            run_gallery(
                "real",
                real[: len(real) - n_queries - n_cal],
                real[-n_queries:],
                args,
                real[len(real) - n_queries - n_cal : len(real) - n_queries] if n_cal else None,
            )
        )
    # the real queries are the split's last images: leave them out of the fitted statistics
    fit, fit_labels = real[:-n_queries], None if labels is None else labels[:-n_queries]
    for kind in kinds if args.synthetic else []:
        total = args.synthetic + args.queries + args.calibration_queries
        if kind == "gaussian":
            drawn = synthetic(fit, total, args.seed)
        else:
            drawn = synthetic_classes(fit, fit_labels, total, args.seed)
        n = args.synthetic
        results.append(
            run_gallery(
                f"synthetic ({kind})",
                drawn[:n],
                drawn[n : n + args.queries],
                args,
                drawn[n + args.queries :] if args.calibrate else None,
            )
        )
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
