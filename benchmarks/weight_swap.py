"""Which of a trained CMN's weights cost retrieval on unseen classes?

Takes a run trained with ``--head-init features`` (its start, epoch 0, and a later
checkpoint) and reads models made of both on the hold-out and on each dataset's test split:

- ``--alphas 0,0.5,1``: weight-space interpolation ``(1 - a) start + a end`` (WiSE-FT);
- ``--swap backbone keys queries+concepts``: the end's weights for the named groups
  (``+`` joins groups; ``backbone``, ``keys``, ``queries``, ``tokens``, ``concepts``), the
  start's for the rest.

    cmn-export train ../shared/datasets/cub100 ../shared/datasets/caltech97 --out runs/fi \\
        --mode tail --epochs 6 --token-norm none --head-init features --no-final-test
    cp runs/fi/best.pt runs/fi-start.pt   # right after "hold-out at the start" (epoch 0)
    python benchmarks/weight_swap.py runs/fi-start.pt runs/fi/last.pt --alphas 0,0.2,1 \\
        --swap backbone keys

Test figures are the trainer's own tail-mode reading (centre crops of the cached trunk maps
of the whole 256 px image), not ``cmn-edge eval``'s: compare rows with each other and with
the ``anchor`` row it prints, read the same way. Needs the training side (``pip install
".[export]"``); the run's trunk cache is reused. Prints figures; it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from cmn_edge.metrics import retrieval_metrics
from cmn_export import data as D
from cmn_export.checkpoint import load_checkpoint
from cmn_export.train import TrainConfig, Trainer

GROUPS = {
    "backbone": ("backbone.",),
    "keys": ("head.key_",),
    "queries": ("head.query_",),
    "tokens": ("head.token_",),
    "concepts": ("head.concepts",),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("start", type=Path, help="the run's epoch-0 best.pt (the start)")
    parser.add_argument("end", type=Path, help="a later best.pt or last.pt of the same run")
    parser.add_argument("--alphas", default="", help="comma-separated interpolation weights")
    parser.add_argument("--swap", nargs="*", default=[], help="groups taken from END")
    args = parser.parse_args()
    start_checkpoint = load_checkpoint(args.start)
    start = start_checkpoint["model"]
    end = load_checkpoint(args.end, trusted=True)["model"]
    trainer = Trainer(TrainConfig(**start_checkpoint["config"]))
    torch.set_grad_enabled(False)
    tests = {Path(r).name: D.merge_datasets([r], "test")[0] for r in trainer.config.datasets}

    def read(pooled: bool = False) -> dict:
        model = trainer.model
        row = {"hold-out MAP@R": round(trainer.validate(pooled_backbone=pooled)["MAP@R"], 2)}
        for name, data in tests.items():
            crops = trainer._centre_crops("test-" + name, data)
            out = [
                (model.backbone.tail(c).mean(dim=(2, 3)) if pooled else model.forward_tail(c))
                for c in crops
            ]
            m = retrieval_metrics(torch.cat(out).cpu().numpy(), np.array(data.labels))
            row[name] = {"R@1": round(m["R@1"], 2), "MAP@R": round(m["MAP@R"], 2)}
        return row

    trainer.model.load_state_dict(start)
    print("anchor", json.dumps(read(pooled=True)), flush=True)
    for alpha in [float(a) for a in args.alphas.split(",") if a]:
        mixed = {
            k: (1 - alpha) * v + alpha * end[k] if v.is_floating_point() else v
            for k, v in start.items()
        }
        trainer.model.load_state_dict(mixed)
        print(f"alpha {alpha:g}", json.dumps(read()), flush=True)
    for spec in args.swap:
        prefixes = tuple(p for group in spec.split("+") for p in GROUPS[group])
        trainer.model.load_state_dict(
            {k: end[k] if k.startswith(prefixes) else v for k, v in start.items()}
        )
        print(f"swap {spec}", json.dumps(read()), flush=True)


if __name__ == "__main__":
    main()
