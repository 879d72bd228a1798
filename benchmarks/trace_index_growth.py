"""Recall@10 along the way while an index grows through add, at the depth its checkpoints
tuned (and checked): where between two tunings recall falls below the target.

The index grows as ``bench_index_growth.py --grow-from`` grows it (synthetic classes drawn
like the real embeddings, 1% of the final size per batch, automatic checkpoints). After
each checkpoint that tuned or checked, and at ``--points``, a fresh reader measures
recall@10 of the walk against brute force on ``--queries`` held-out items under each mask.
Each checkpoint that tuned or checked is printed with its wall time and what it found.
``--check-growth`` replaces the index's CHECK_GROWTH (a huge value: tunings at each
doubling only, as before the checks). Prints figures, asserts nothing.

    python benchmarks/trace_index_growth.py --embeddings E.npy --labels L.npy \\
        --to 100000 --queries 1000 --points 29000 47000 59000 75000 97000
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_index import masks_for, synthetic_classes  # noqa: E402
from bench_index_growth import cpu_class  # noqa: E402

from cmn_edge.index import ConceptIndex, persistence  # noqa: E402

MASKS = ("plain", "exclude 10%", "exclude 50%", "renormalize 50%")


def recall(index: ConceptIndex, queries: np.ndarray, controls: dict) -> dict:
    """Per mask: (mean recall@10, its standard error)."""
    out = {}
    for mask, per_mask in controls.items():
        truth = index.exact_ids_many(queries, 10, per_mask)
        per_query = np.array(
            [
                len(set(index.search_ids(q, 10, **c)[0].tolist()) & set(t.tolist())) / len(t)
                for q, c, t in zip(queries, per_mask, truth)
            ]
        )
        out[mask] = (float(per_query.mean()), float(per_query.std(ddof=1) / len(per_query) ** 0.5))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--embeddings", required=True, help="real [N, C] float32 .npy")
    parser.add_argument("--labels", required=True, help="their class labels (.npy)")
    parser.add_argument("--to", type=int, default=100000)
    parser.add_argument("--start", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--points", type=int, nargs="*", default=[], help="also measure here")
    parser.add_argument("--graph-dims", type=int, default=64)
    parser.add_argument("--check-growth", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tmp", default=None, help="where the index is written")
    args = parser.parse_args()
    if args.check_growth is not None:
        persistence.CHECK_GROWTH = args.check_growth
    print(f"CPU: {cpu_class()}; CHECK_GROWTH {persistence.CHECK_GROWTH:g}")

    checkpoint = ConceptIndex.checkpoint

    def logged_checkpoint(self, **kwargs):
        began = time.perf_counter()
        done = checkpoint(self, **kwargs)
        if "check" in done or "calibration" in done:
            check = done.get("check")
            print(
                f"  checkpoint at {self._live}: {time.perf_counter() - began:.2f} s, "
                + (
                    f"check {'met' if check['ok'] else 'missed'} the target "
                    f"(plain {check['recall']:.4f}, "
                    + ", ".join(f"{m} {v:.4f}" for m, v in check["masked_recall"].items())
                    + ")"
                    if check
                    else "due to tune"
                )
                + (", re-tuned" if "calibration" in done else ""),
                flush=True,
            )
        return done

    ConceptIndex.checkpoint = logged_checkpoint

    real = np.load(args.embeddings).astype(np.float32)
    data = synthetic_classes(real, np.load(args.labels), args.to + args.queries, args.seed)
    gallery, queries = data[: args.to], data[args.to :]
    rng = np.random.default_rng(args.seed)
    controls = {m: masks_for(m, data.shape[1], len(queries), rng) for m in MASKS}
    work = Path(tempfile.mkdtemp(prefix="trace-growth-", dir=args.tmp))
    folder = work / "index"
    try:
        index = ConceptIndex(
            data.shape[1], "benchmark", exact_below=0, graph_dims=args.graph_dims or None
        )
        index.add(gallery[: args.start])
        index.save(folder)
        index = ConceptIndex.open(folder)
        step = max(1000, args.to // 100)
        points = set(args.points) | {args.to}
        looked = None
        for begin in range(args.start, args.to, step):
            index.add(gallery[begin : begin + step])
            live = min(begin + step, args.to)
            state = index._state()
            look = (state.get("tuned_at"), state.get("checked_at"))
            if look != looked or live in points:
                looked = look
                reader = ConceptIndex.load(folder)
                found = recall(reader, queries, controls)
                print(
                    f"{live} items (tuned at {state['tuned_at']}, ef {reader.ef}, exponents "
                    f"{reader.mask_ef_power:g} / {reader.renorm_ef_power:g}): recall@10 "
                    + ", ".join(f"{m} {v:.4f} (se {e:.4f})" for m, (v, e) in found.items()),
                    flush=True,
                )
        print(json.dumps({"cpu": cpu_class(), "check_growth": persistence.CHECK_GROWTH}))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
