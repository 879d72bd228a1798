"""Recall of the pretrained backbone alone (global-average-pooled features, no metric
learning): the anchor a trained CMN has to beat, at any input size.

    python benchmarks/anchor.py ../shared/datasets/cub100 ../shared/datasets/caltech97 \
        --input-size 224 --input-size 288

Needs the training side (``pip install ".[export]"``); evaluates like ``cmn-edge eval``
(leave-one-out over the split, cosine) with the training side's evaluation transform.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from cmn_edge.metrics import retrieval_metrics
from cmn_export import data as D
from cmn_export.backbones import Backbone, get_spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("datasets", nargs="+", type=Path)
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--input-size", type=int, action="append", default=[])
    parser.add_argument("--split", default="test")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    spec = get_spec(args.backbone)
    network = Backbone(spec).eval()
    for size in args.input_size or [224]:
        for root in args.datasets:
            data, _ = D.merge_datasets([root], args.split)
            loader = DataLoader(
                D.ImageSet(data, D.eval_transform(spec.preprocess(size))),
                batch_size=64,
                num_workers=args.workers,
            )
            with torch.no_grad():
                pooled = torch.cat([network(x).mean(dim=(2, 3)) for x, _ in loader]).numpy()
            metrics = retrieval_metrics(pooled, np.array(data.labels))
            shown = ", ".join(f"{k} {v:.2f}" for k, v in metrics.items())
            print(f"{root.name} {args.split} {size} px: {shown}", flush=True)


if __name__ == "__main__":
    main()
