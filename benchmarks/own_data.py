"""A user's own data: does the README's default `cmn-export train` beat the plain backbone
on classes no shipped model has seen?

Builds a new dataset from the *test* half of a class-disjoint dataset (caltech97 by default:
no shipped model trained on those classes): its first ``--train-classes`` classes become
the new train split, the rest the new test split. Then runs, as a user would, the anchor
(``benchmarks/anchor.py``) and the README's command with its defaults, whose final test
prints the trained model's recall on the new test classes.

    python benchmarks/own_data.py ../shared/datasets/caltech97 --out /tmp/own
    python benchmarks/own_data.py ../shared/datasets/caltech97 --out /tmp/own-lr \
        --val-fraction 0.3 --lr 1e-5      # options it does not know go to cmn-export train

Needs the training side (``pip install ".[export]"``). The manifest points at the source's
images (relative paths), so nothing is copied.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from cmn_edge.dataset import MANIFEST_COLUMNS, load_samples


def build_split(source: Path, out: Path, train_classes: int) -> tuple[int, int]:
    """Write ``out/manifest.csv``; returns (train images, test images)."""
    samples = load_samples(source, "test")
    classes = sorted({s.label for s in samples})
    if not 2 <= train_classes <= len(classes) - 2:
        raise SystemExit(f"{source}: --train-classes must leave 2+ classes on each side")
    as_train = set(classes[:train_classes])
    out.mkdir(parents=True, exist_ok=True)
    counts = {"train": 0, "test": 0}
    with (out / "manifest.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(MANIFEST_COLUMNS)
        for s in samples:
            split = "train" if s.label in as_train else "test"
            counts[split] += 1
            path = os.path.relpath(Path(s.path).resolve(), out.resolve())
            writer.writerow([path, s.label, s.class_name, split])
    return counts["train"], counts["test"]


def run(command: list[str]) -> str:
    print("$", " ".join(command), flush=True)
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
        raise SystemExit(f"failed ({done.returncode}): {' '.join(command)}")
    print(f"  {time.perf_counter() - started:.0f} s", flush=True)
    return done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="a class-disjoint dataset (manifest.csv)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--train-classes", type=int, default=25)
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    args, train_options = parser.parse_known_args()  # the rest goes to cmn-export train
    data = args.out / "dataset"
    n_train, n_test = build_split(args.source, data, args.train_classes)
    print(f"{data}: {n_train} train images, {n_test} test images", flush=True)
    anchor = run(
        [
            sys.executable,
            str(Path(__file__).with_name("anchor.py")),
            str(data),
            "--backbone",
            args.backbone,
        ]
    )
    print("  test, pretrained backbone:", anchor.strip().splitlines()[-1], flush=True)
    run(
        [
            "cmn-export",
            "train",
            str(data),
            "--out",
            str(args.out / "run"),
            "--backbone",
            args.backbone,
            *train_options,
        ]
    )
    report = json.loads((args.out / "run" / "report.json").read_text())

    def shown(metrics: dict) -> str:
        return ", ".join(f"{k} {v:.2f}" for k, v in metrics.items())

    print("  hold-out, pretrained backbone:", shown(report.get("holdout_anchor", {})))
    print(f"  hold-out, best epoch ({report['best']['epoch']}):", shown(report["best"]["val"]))
    print("  test, trained:", shown(report["test"][data.name]), flush=True)


if __name__ == "__main__":
    main()
