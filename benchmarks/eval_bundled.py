"""Measure the bundled model on datasets and write models/metrics.json (the model card's table).

Every figure comes from ``cmn-edge eval --json``, so anyone can re-run one of them alone:

    python benchmarks/eval_bundled.py ../shared/datasets/cub100 ../shared/datasets/caltech97
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("datasets", nargs="+", type=Path)
    parser.add_argument("--split", default="test")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "models" / "metrics.json")
    parser.add_argument(
        "--anchor",
        action="append",
        default=[],
        metavar="DATASET=R@1",
        help="Reference R@1 of the pretrained backbone alone, recorded beside the results.",
    )
    args = parser.parse_args()
    results: dict = {"split": args.split, "protocol": "leave-one-out over the split, cosine"}
    results["anchor_R@1"] = {k: float(v) for k, v in (a.split("=") for a in args.anchor)}
    for dataset in args.datasets:
        for precision in ("fp32", "int8"):
            command = [
                "cmn-edge",
                "eval",
                str(dataset),
                "--split",
                args.split,
                "--precision",
                precision,
                "--threads",
                str(args.threads),
                "--json",
            ]
            print("$", " ".join(command), file=sys.stderr, flush=True)
            report = json.loads(
                subprocess.run(command, check=True, capture_output=True, text=True).stdout
            )
            entry = results.setdefault(dataset.name, {})
            entry[precision] = {k: round(v, 2) for k, v in report["metrics"].items()}
            entry["images"] = report["count"]
            entry["classes"] = report["classes"]
            print(dataset.name, precision, entry[precision], file=sys.stderr, flush=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
