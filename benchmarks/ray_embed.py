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
    python benchmarks/ray_embed.py --count 2000 --ray 2x1 --nodes 2

Measured 2026-12-01 on the 2-core AMD EPYC (AVX2, no VNNI: exact INT8) build machine, INT8,
2,000 photos, while other jobs shared the machine (load average 7-9, then 16-22: the
absolute figures are low and noisy, the same-run comparisons are what counts):

    load 7-9    local pipeline 24.8 images/s, local embed command 24.6,
                ray.init 17.9 s, then Ray 1 actor x 2 threads 21.1, 2 actors x 1 thread 24.1
    load 16-22  local pipeline 13.9, local embed command 14.8; two-node Cluster (1 CPU each,
                one actor per node) ray.init 28.7 s, then 13.6 images/s

Every Ray run gave the local vectors exactly (max |diff| 0). Once Ray is up, a job on one
machine runs at the local engine's speed (the decode and the model are the same code, each
actor overlapping its decode thread with the model); Ray's start-up (about 18 s here) and
the actors' model load (a few seconds) are a fixed cost, so below a few hundred photos the
local engine is faster.

Beyond one machine. The job is embarrassingly parallel: an actor needs only its file bytes
in (tens of kB for these photos, a few MB for a camera JPEG) and sends 4 x C bytes out
(2 kB a photo for the bundled model), so throughput should grow with the number of actors
until the file system or the driver limits it. Here an actor did about 12 images/s per
core of this AVX2 machine under that load (24 on 2 cores); a VNNI CPU runs the INT8 model faster
(see the model card), and decoding then dominates. The driver receives every row and writes
the Parquet parts itself: at 2 kB a row that is 2 MB/s per 1,000 images/s, far below a
disk's rate, so one driver should keep up with hundreds of cores; past that, the rows could
be written by the workers (``write_parquet``) to shared storage. What could not be tested
here: a second machine (the two-node Cluster shares one machine's cores and memory, so it
checks the scheduling, object transfer between two raylets and equality, not network
throughput), a shared or object-store file system for the inputs (the driver lists and
checks the paths locally, and every node must see them at the same path; ``s3://`` URIs
are not accepted yet), nodes with different CPUs (the driver's precision is sent to every
actor and INT8 gives the same integers on every validated kernel path, but that was not run
across machines), autoscaling, node failure mid-job (Ray retries a failed task; a job that
still fails publishes nothing) and token authentication against a remote cluster.
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
