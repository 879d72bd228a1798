"""PostgreSQL + pgvector gallery: build time, size, masked and unmasked p50/p99 latency and
recall@10 against the exact masked search. Prints figures; asserts nothing.

The gallery is synthetic, drawn like real embeddings (``bench_index.synthetic_classes``):
class centres from a Gaussian fitted to the real class means of a split embedded by the
bundled model, items around them with the real within-class covariance, L2-normalised.
Queries are fresh draws. Each item gets a ``camera`` (one of 8) for the ``--where`` runs.

Without ``--url`` a throwaway server is started on 127.0.0.1 (tests/pg_cluster.py; needs
``bash .ci/postgres.sh``). Every figure is one client on the same machine as the server.

    python benchmarks/bench_index.py --data ../shared/datasets/cub100 --split test \\
        --save-embeddings /tmp/cub100-test.npy --synthetic 0
    python benchmarks/bench_postgres.py --embeddings /tmp/cub100-test.npy --n 100000
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

from bench_index import embed_split, synthetic_classes  # noqa: E402

from cmn_edge.index import ConceptIndex  # noqa: E402
from cmn_edge.index.search import SearchMixin  # noqa: E402
from cmn_edge.postgres import PgGallery, export_index  # noqa: E402


def masks(kind: str, c: int, rng: np.random.Generator) -> list[int]:
    count = {"none": 0, "one": 1, "10%": c // 10, "50%": c // 2}[kind]
    return rng.choice(c, count, replace=False).tolist()


def naive_recall(gallery: PgGallery, q: np.ndarray, w: np.ndarray, truth: set, doc) -> float:
    """pgvector at its defaults (ef_search 40, no iterative scan): what the planning fixes."""
    from pgvector import Vector

    from cmn_edge.postgres.schema import sql

    where = "WHERE metadata @> %s::jsonb" if doc else ""
    query = sql(f"SELECT id FROM {{t}} {where} ORDER BY embedding <#> %s LIMIT 10", t=gallery.table)
    params = ([doc] if doc else []) + [Vector(q * w)]
    with gallery.conn.transaction():
        gallery.conn.execute("SET LOCAL hnsw.ef_search = 40")
        ids = {r[0] for r in gallery.conn.execute(query, params)}
    return len(ids & truth) / 10


def exact_top(gallery, vectors, subsets, q, exclude, where, renorm, k: int = 10) -> set:
    """The exact masked top k (ids are row numbers), by the local index's own scoring."""
    plan = gallery.plan(exclude=exclude, renormalize=renorm)
    rows = subsets[where["camera"]] if where else slice(None)
    scores = PgGallery._scores(q / np.linalg.norm(q), plan, vectors[rows])
    ids = np.arange(len(vectors), dtype=np.int64)[rows]
    return set(ids[SearchMixin._top_k(scores, ids, k)].tolist())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--embeddings", help=".npy of real embeddings (labels: .labels.npy)")
    parser.add_argument("--data", help="or a dataset to embed with the bundled model")
    parser.add_argument("--split", default="test")
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--url", help="an existing server (default: a throwaway one)")
    parser.add_argument("--table", default="bench_gallery")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hnsw-m", type=int, default=16)
    parser.add_argument("--hnsw-ef-construction", type=int, default=64)
    parser.add_argument(
        "--queries-only",
        dest="reuse",
        action="store_true",
        help="--url's gallery is already this one (same --n, --seed): no export",
    )
    args = parser.parse_args()
    if args.embeddings:
        real = np.load(args.embeddings)
        labels = np.load(args.embeddings.replace(".npy", ".labels.npy"))
    elif args.data:
        real, labels = embed_split(args.data, args.split, None, "auto", None, 32)
    else:
        parser.error("--embeddings or --data")
    c = real.shape[1]
    drawn = synthetic_classes(real, labels, args.n + args.queries, args.seed)
    gallery_vectors, queries = drawn[: args.n], drawn[args.n :]
    cameras = [{"camera": f"cam{i % 8}"} for i in range(args.n)]
    with ExitStack() as stack:
        # on disk without checkpoints: no local graph is built (the truth is an exact scan)
        folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-pg-"))
        index = ConceptIndex.create(Path(folder) / "g.idx", c, "bench@synthetic")
        index.auto_checkpoint = False
        index.add(gallery_vectors, None, cameras)
        print(f"gallery: {args.n} synthetic items x {c} concepts, drawn like {len(real)} real")
        url = args.url
        if url is None:
            from pg_cluster import Cluster

            url = stack.enter_context(Cluster())
        start = time.perf_counter()
        if args.reuse:
            summary = None
        else:
            summary = export_index(
                index,
                url,
                table=args.table,
                replace=True,
                m=args.hnsw_m,
                ef_construction=args.hnsw_ef_construction,
            )
        total = time.perf_counter() - start
        if summary:
            print(
                f"export: {total:.1f}s (COPY {summary['copy_s']:.1f}s; HNSW build m={args.hnsw_m} "
                f"ef_construction={args.hnsw_ef_construction}, GIN, calibration "
                f"{summary['index_s']:.1f}s); "
                f"{summary['bytes'] / 2**20:.0f} MiB with indexes; calibrated ef_search "
                f"{summary['ef_search']} (recall@10 {summary['ef_recall']})"
            )
        gallery = stack.enter_context(PgGallery.connect(url, args.table))
        hnsw = gallery.conn.execute(
            "SELECT pg_relation_size(%s::regclass)", (f"{args.table}_hnsw",)
        ).fetchone()[0]
        print(f"  of which the HNSW index: {hnsw / 2**20:.0f} MiB; ef_search {gallery.ef_base}")
        vectors = gallery_vectors
        subsets = {f"cam{i}": np.arange(i, args.n, 8) for i in range(8)}
        rng = np.random.default_rng(args.seed + 1)
        header = ("query", "plan", "p50 ms", "p99 ms", "recall@10", "ef40")
        print("{:>24} {:>14} {:>7} {:>7} {:>9} {:>6}".format(*header))
        for kind in ("none", "one", "10%", "50%", "50%+renorm"):
            for where in (None, {"camera": "cam3"}):
                times, recalls, naive, plans = [], [], [], {}
                for q in queries:
                    exclude = masks(kind.split("+")[0], c, rng)
                    renorm = kind.endswith("renorm")
                    t = time.perf_counter()
                    hits = gallery.search(q, 10, exclude=exclude, where=where, renormalize=renorm)
                    times.append(time.perf_counter() - t)
                    method = gallery.last_plan.method
                    plans[method] = plans.get(method, 0) + 1
                    truth = exact_top(gallery, vectors, subsets, q, exclude, where, renorm)
                    recalls.append(len({h.id for h in hits} & truth) / 10)
                    if not renorm:
                        w = np.ones(c, dtype=np.float32)
                        w[exclude] = 0
                        doc = '{"camera": "cam3"}' if where else None
                        naive.append(naive_recall(gallery, q / np.linalg.norm(q), w, truth, doc))
                label = kind + (" where" if where else "")
                plan = "/".join(f"{m}:{n}" for m, n in sorted(plans.items()))
                ms = 1000 * np.asarray(times)
                print(
                    f"{label:>24} {plan:>14} {np.percentile(ms, 50):7.1f} "
                    f"{np.percentile(ms, 99):7.1f} {np.mean(recalls):9.3f} "
                    + (f"{np.mean(naive):6.3f}" if naive else "     -")
                )


if __name__ == "__main__":
    main()
