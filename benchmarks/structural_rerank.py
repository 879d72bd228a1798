"""Does DIML's structural re-ranking help the bundled model? Recall and latency, with and without.

Embeds each dataset's test split once (global embedding and 4 x 4 region features from the
same forward pass), then scores leave-one-out retrieval by cosine alone and re-ranked:
the top K by cosine re-ordered by ``s_global + s_struct`` (DIML's rule), the rest in
cosine order. Also times the re-rank of K candidates for one query, and the alternative
of using the mean region as the global vector, and what ``Index.search`` pays for it on an
on-disk index holding the split (query latency, database bytes per item):

    python benchmarks/structural_rerank.py ../shared/datasets/cub100 ../shared/datasets/caltech97

State the CPU class (printed first) beside any figure you quote.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cmn_edge import Embedder  # noqa: E402
from cmn_edge.dataset import load_samples  # noqa: E402
from cmn_edge.index import ConceptIndex  # noqa: E402
from cmn_edge.metrics import retrieval_metrics  # noqa: E402
from cmn_edge.structural import structural_scores, unit_rows  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("datasets", nargs="+", type=Path)
    parser.add_argument("--model", default=None)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--depth", type=int, default=100, help="K, candidates re-ranked")
    parser.add_argument("--limit", type=int, default=None, help="first N test images")
    args = parser.parse_args()

    embedder = Embedder(args.model, precision=args.precision, threads=2)
    print(f"{embedder.path.name} ({embedder.precision}); CPU: {embedder.cpu.describe()}")
    for root in args.datasets:
        samples = load_samples(root, "test")[: args.limit]
        labels = np.array([s.label for s in samples])
        started = time.perf_counter()
        emb, regions = embedder.embed_regions([s.path for s in samples])
        seconds = time.perf_counter() - started
        print(f"\n{root.name}: {len(samples)} images embedded in {seconds:.0f} s")

        def structural(query, candidates, scores, emb=emb, regions=regions) -> np.ndarray:
            extra = structural_scores(
                regions[query], emb[query], regions[candidates], emb[candidates]
            )
            return np.argsort(-(scores + extra), kind="stable")

        rows = {
            "global (cosine)": retrieval_metrics(emb, labels),
            f"global + structural, K={args.depth}": retrieval_metrics(
                emb, labels, rerank=structural, rerank_depth=args.depth
            ),
            "mean region as the global vector": retrieval_metrics(
                unit_rows(regions.mean(1)), labels
            ),
        }
        print(f"{'':40} {'R@1':>6} {'R@2':>6} {'R@4':>6} {'R@8':>6} {'MAP@R':>6}")
        for name, m in rows.items():
            print(
                f"{name:40} "
                + " ".join(f"{m[k]:6.2f}" for k in ("R@1", "R@2", "R@4", "R@8", "MAP@R"))
            )
        k = min(args.depth, len(samples) - 1)
        times = []
        for query in range(min(50, len(samples))):
            candidates = np.argsort(-(emb @ emb[query]))[1 : k + 1]
            started = time.perf_counter()
            structural_scores(regions[query], emb[query], regions[candidates], emb[candidates])
            times.append(time.perf_counter() - started)
        print(
            f"re-rank of K={k} for one query: median {1000 * np.median(times):.1f} ms; "
            f"region features {regions.shape[1]} x {regions.shape[2]} = "
            f"{regions[0].astype(np.float16).nbytes / 1024:.0f} KiB an item in float16"
        )
        through_the_index(embedder, emb, regions, args.depth)


def through_the_index(embedder: Embedder, emb: np.ndarray, regions: np.ndarray, depth: int):
    """What a user pays: ``Index.search`` with and without ``rerank="structural"`` on an
    on-disk index of these images (maps read from SQLite), and the disk per item."""
    sizes, times = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for kept in (False, True):
            index = ConceptIndex.for_embedder(embedder)
            if kept:
                index.keep_regions(embedder.metadata.region_grid)
            index.save(Path(tmp) / str(kept))
            index.add(emb, regions=regions if kept else None)
            index.checkpoint()
            with sqlite3.connect(Path(tmp) / str(kept) / "index.db") as db:
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                db.execute("VACUUM")
            sizes[kept] = (Path(tmp) / str(kept) / "index.db").stat().st_size
            queries = range(0, len(emb), max(1, len(emb) // 200))
            for q in list(queries)[:5]:  # warm the page cache and the view
                index.search(emb[q], 10)
            for rerank in (None, "structural") if kept else (None,):
                spent = []
                for q in queries:
                    started = time.perf_counter()
                    index.search(
                        emb[q], 10, rerank=rerank, rerank_depth=depth, query_regions=regions[q]
                    )
                    spent.append(time.perf_counter() - started)
                times[(kept, rerank)] = np.array(spent) * 1000
            index.close()
    plain, reranked = times[(True, None)], times[(True, "structural")]
    print(
        f"Index.search k=10 on {len(emb)} items: {np.median(plain):.2f} ms plain, "
        f"{np.median(reranked):.2f} ms with --rerank structural (K={depth}), p90 "
        f"{np.percentile(reranked, 90):.2f} ms: +{np.median(reranked) - np.median(plain):.1f} "
        f"ms a query; database {(sizes[True] - sizes[False]) / len(emb) / 1024:.1f} KiB an "
        "item more with region maps"
    )


if __name__ == "__main__":
    main()
