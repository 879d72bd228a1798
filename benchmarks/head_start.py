"""Where a CMN head starts before any training step, beside the backbone it sits on.

Prints test R@1 / MAP@R (leave-one-out, cosine, as ``cmn-edge eval``) of the pretrained
backbone's feature maps read five ways:

- ``anchor``: average pooling, the figure a trained model has to beat;
- ``LayerNorm mean``: the mean of LayerNormed regions, what upstream's head sees before its
  projections (the norm drops each region's magnitude, which average pooling weighs by);
- ``random head (layer)`` and ``random head (none)``: a CMN head at its random init, with
  and without that norm (``--token-norm``);
- ``features start``: ``--token-norm none --head-init features``, the head fitted to the
  pooled features of every image in the datasets' train splits (the trainer fits it on its
  train classes without the hold-out, so its start differs a little).

    python benchmarks/head_start.py ../shared/datasets/cub100 ../shared/datasets/caltech97

Needs the training side (``pip install ".[export]"``). About 12 minutes on 2 cores, most of
it the backbone over both splits. Prints figures; it asserts nothing.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from cmn_edge.metrics import retrieval_metrics
from cmn_export import data as D
from cmn_export.backbones import Backbone, get_spec
from cmn_export.model import ConceptHead


@torch.no_grad()
def feature_maps(network: Backbone, roots: list[Path], split: str, size: int, workers: int):
    """[N, D, h, w] float16 pretrained feature maps and the labels (float16: 2 GB, not 4)."""
    data, _ = D.merge_datasets(roots, split)
    loader = DataLoader(
        D.ImageSet(data, D.eval_transform(network.spec.preprocess(size))),
        batch_size=64,
        num_workers=workers,
    )
    maps = torch.cat([network(x).half() for x, _ in loader])
    return maps, np.array(data.labels)


@torch.no_grad()
def head_embedding(head: ConceptHead, maps: torch.Tensor) -> np.ndarray:
    head.eval()
    parts = [
        F.normalize(head(maps[s : s + 128].float())[0], dim=-1) for s in range(0, len(maps), 128)
    ]
    return torch.cat(parts).numpy()


def readings(maps: torch.Tensor, heads: dict[str, ConceptHead]) -> dict[str, np.ndarray]:
    regions = maps.flatten(2).transpose(1, 2)  # N, R, D
    out = {
        "anchor": maps.float().mean(dim=(2, 3)).numpy(),
        "LayerNorm mean": torch.cat(
            [
                F.layer_norm(regions[s : s + 128].float(), (regions.shape[-1],)).mean(1)
                for s in range(0, len(regions), 128)
            ]
        ).numpy(),
    }
    out.update({name: head_embedding(head, maps) for name, head in heads.items()})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("datasets", nargs="+", type=Path)
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--concepts", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    network = Backbone(get_spec(args.backbone)).eval()
    channels = network.spec.channels
    torch.manual_seed(args.seed)
    heads = {
        f"random head ({norm})": ConceptHead(channels, args.concepts, token_norm=norm)
        for norm in ("layer", "none")
    }
    train_maps, _ = feature_maps(network, args.datasets, "train", args.input_size, args.workers)
    start = ConceptHead(channels, args.concepts, token_norm="none")
    with torch.no_grad():
        fitted = start.init_from_features(train_maps.float())
    del train_maps
    heads["features start"] = start
    print(
        f"features start fitted on {fitted['images']} train images; its {args.concepts} "
        f"directions keep {100 * fitted['variance_explained']:.1f}% of the pooled variance",
        flush=True,
    )
    for root in args.datasets:
        maps, labels = feature_maps(network, [root], "test", args.input_size, args.workers)
        for name, embedding in readings(maps, heads).items():
            metrics = retrieval_metrics(embedding, labels)
            print(
                f"{root.name} test {args.input_size} px  {name:<20} "
                f"R@1 {metrics['R@1']:.2f}  MAP@R {metrics['MAP@R']:.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
