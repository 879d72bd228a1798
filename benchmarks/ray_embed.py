"""Batch embedding on one machine: images/s of the local path and of ``--engine ray``.

Photos: the first ``--count / 2`` test-split images of each of cub100 and caltech97 (in
manifest order; see ../shared/datasets/README.md). Measured, each on the same list:

- ``local pipeline``: ``Embedder.iter_paths`` (decode threads ahead of the model), what
  ``index build`` and ``eval`` use;
- ``local embed``: the ``cmn-edge embed`` command itself (``--format parquet``);
- ``ray``: ``embed_with_ray`` on a local Ray started once (its start-up printed apart), for
  each ``--ray ACTORSxTHREADS`` configuration; the Parquet folder is written in every case.
  ``--nodes 2`` runs the same on a two-node ``ray.cluster_utils.Cluster`` on this machine
  (the cores shared out): every batch then crosses between two object stores.

The vectors of every run are compared with the local pipeline's (max abs difference).
Prints figures; it asserts nothing. Ray's token authentication, dashboard and usage stats
are switched off for the run.

    python benchmarks/ray_embed.py --data ../shared/datasets --count 2000
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def test_photos(data: Path, count: int) -> list[Path]:
    """Half from each dataset's test split, in manifest order."""
    names = ("cub100", "caltech97")
    per = count // len(names)
    paths: list[Path] = []
    for name in names:
        with open(data / name / "manifest.csv", newline="") as handle:
            rows = [r for r in csv.DictReader(handle) if r["split"] == "test"]
        paths += [data / name / r["path"] for r in rows[:per]]
    return paths


def vectors_of(folder: Path) -> np.ndarray:
    from cmn_edge.ray_embed import read_embeddings

    table = read_embeddings(folder)
    return np.asarray(table["embedding"].to_pylist(), np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "datasets")
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--ray",
        nargs="*",
        default=["1x2", "2x1"],
        help="ACTORSxTHREADS per configuration (default: 1x2 2x1)",
    )
    parser.add_argument(
        "--nodes",
        type=int,
        default=1,
        help="run Ray as this many nodes on this machine (the cores shared out)",
    )
    args = parser.parse_args()
    os.environ.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")

    from click.testing import CliRunner

    from cmn_edge import Embedder
    from cmn_edge.cli import main as cli
    from cmn_edge.cpu import this_cpu
    from cmn_edge.ray_embed import embed_with_ray

    paths = test_photos(args.data, args.count)
    cores = os.cpu_count()
    embedder = Embedder(precision=args.precision)
    print(f"{len(paths)} photos; {cores} cores; {platform.processor() or platform.machine()}")
    print(f"CPU: {this_cpu().describe()}")
    print(f"model {embedder.model_id} ({embedder.precision}), batch {args.batch_size}")

    started = time.perf_counter()
    reference = np.concatenate(
        [v for _, v in embedder.iter_paths(paths, batch_size=args.batch_size)]
    )
    seconds = time.perf_counter() - started
    print(f"local pipeline      {len(paths) / seconds:7.1f} images/s  ({seconds:.1f} s)")

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "local"
        started = time.perf_counter()
        result = CliRunner().invoke(
            cli,
            ["embed", *map(str, paths), "--format", "parquet", "--out", str(out)]
            + ["--precision", embedder.precision, "--batch-size", str(args.batch_size)],
        )
        seconds = time.perf_counter() - started
        assert result.exit_code == 0, result.output
        diff = np.abs(vectors_of(out) - reference).max()
        print(
            f"local embed command {len(paths) / seconds:7.1f} images/s  ({seconds:.1f} s; "
            f"max |diff| {diff:.1e})"
        )

        import ray

        started = time.perf_counter()
        cluster = None
        if args.nodes > 1:
            from ray.cluster_utils import Cluster

            share = max(1, (cores or 1) // args.nodes)
            head = {"num_cpus": share, "include_dashboard": False}
            cluster = Cluster(initialize_head=True, head_node_args=head)
            for _ in range(args.nodes - 1):
                cluster.add_node(num_cpus=share)
            ray.init(address=cluster.address, logging_level="WARNING")
            where = f"{args.nodes} nodes of {share} CPUs (ray.cluster_utils.Cluster)"
        else:
            ray.init(num_cpus=cores, include_dashboard=False, logging_level="WARNING")
            where = f"local, {cores} CPUs"
        print(f"ray.init            {time.perf_counter() - started:7.1f} s ({where})")
        try:
            for config in args.ray:
                actors, threads = (int(x) for x in config.split("x"))
                out = Path(tmp) / f"ray-{config}"
                started = time.perf_counter()
                job = embed_with_ray(
                    paths,
                    out,
                    precision=embedder.precision,
                    threads=threads,
                    actors=actors,
                    batch_size=args.batch_size,
                )
                seconds = time.perf_counter() - started
                diff = np.abs(vectors_of(out) - reference).max()
                print(
                    f"ray {actors} actor(s) x {threads} thread(s) "
                    f"{len(paths) / seconds:7.1f} images/s  ({seconds:.1f} s incl. actor "
                    f"start; {job.embedded} rows; max |diff| {diff:.1e})"
                )
        finally:
            ray.shutdown()
            if cluster is not None:
                cluster.shutdown()


if __name__ == "__main__":
    main()
