"""Do a model's parts look at different places? Overlap of their attention maps on real photos.

For each photo of a random subset of a split, the model's per-part attention maps (a DGML's
groups, or a CMN's concepts; ``cmn_edge.parts``) are compared pairwise: the cosine between two
parts' maps (1: the same place), and whether their peaks fall on the same cell. Printed per
pair of parts for a DGML (few parts), and as a distribution for a CMN (many):

    python benchmarks/part_maps.py MODEL.onnx ../shared/datasets/cub100 --count 200

Parts that all attend to the same cells explain nothing a single map would not.
"""

from __future__ import annotations

import argparse
import sys
from itertools import combinations
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cmn_edge import Embedder  # noqa: E402
from cmn_edge.dataset import load_samples  # noqa: E402
from cmn_edge.parts import Parts  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("datasets", nargs="+", type=Path)
    parser.add_argument("--split", default="test")
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--most", type=int, default=64, help="CMN: concepts compared")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    embedder = Embedder(args.model, threads=2)
    parts = Parts.of(embedder.metadata)
    print(f"{args.model.name}: {parts.describe()} ({embedder.metadata.head})")
    rng = np.random.default_rng(args.seed)
    for root in args.datasets:
        samples = load_samples(root, args.split)
        keep = rng.choice(len(samples), min(args.count, len(samples)), replace=False)
        paths = [samples[i].path for i in sorted(keep)]
        maps = []
        for start in range(0, len(paths), 16):
            out = embedder.embed_batch(paths[start : start + 16], with_attention=True)
            maps.append(parts.maps(out.attention))
        per_part = np.concatenate(maps)  # N, P, h, w
        n, p = per_part.shape[:2]
        chosen = range(p) if p <= args.most else rng.choice(p, args.most, replace=False)
        flat = per_part[:, list(chosen)].reshape(n, len(chosen), -1).astype(np.float64)
        unit = flat / np.maximum(np.linalg.norm(flat, axis=-1, keepdims=True), 1e-12)
        peaks = flat.argmax(-1)
        print(f"\n{root.name}: {n} {args.split} photos, maps of {per_part.shape[2]}x"
              f"{per_part.shape[3]} cells")  # fmt: skip
        pairs = list(combinations(range(len(chosen)), 2))
        cosines = np.array([(unit[:, a] * unit[:, b]).sum(-1) for a, b in pairs])  # pairs, N
        same_peak = np.array([(peaks[:, a] == peaks[:, b]) for a, b in pairs])
        if len(chosen) <= 8:
            for (a, b), cos, same in zip(pairs, cosines, same_peak):
                print(f"  {parts.noun} {a} vs {b}: map cosine mean {cos.mean():.3f} "
                      f"(p10 {np.percentile(cos, 10):.3f}, p90 {np.percentile(cos, 90):.3f}), "
                      f"same peak cell in {100 * same.mean():.0f}% of photos")  # fmt: skip
        print(f"  all pairs: map cosine mean {cosines.mean():.3f}, same peak cell in "
              f"{100 * same_peak.mean():.0f}% of photos (chance: "
              f"{100 / flat.shape[-1]:.0f}% for uniform peaks)")  # fmt: skip


if __name__ == "__main__":
    main()
