"""``cmn-edge bench --pipeline FOLDER``: is a folder embedded at the speed of its slowest stage?

Each stage is timed alone with every core it may use (reading the files, decoding and
preprocessing them in the decode workers, the model on ready batches), then the whole
pipeline (``Embedder.iter_paths``). End to end over the slowest stage says how well
decoding overlaps with inference: 100% is the most a pipeline can do.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .bench import peak_rss_mib
from .embedder import Embedder, list_images


def _rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


def run_pipeline_bench(
    folder: str | os.PathLike,
    model: str | None = None,
    precision: str = "auto",
    threads: int | None = None,
    decode_workers: int | None = None,
    batch_size: int = 32,
    limit: int | None = None,
    progress: Callable[[str], None] = lambda _m: None,
) -> dict:
    paths = list_images(folder)[:limit] if limit else list_images(folder)
    if not paths:
        raise FileNotFoundError(f"{folder}: no images to embed")
    embedder = Embedder(model, precision=precision, threads=threads, decode_workers=decode_workers)
    workers = embedder.threads.decode
    stages: dict[str, float] = {}

    def read(path: Path) -> int:
        return len(path.read_bytes())

    with ThreadPoolExecutor(workers) as pool:
        progress("read")
        list(pool.map(read, paths[: min(64, len(paths))]))  # warm-up
        started = time.perf_counter()
        total_bytes = sum(pool.map(read, paths))
        stages["read"] = _rate(len(paths), time.perf_counter() - started)
        progress("decode + preprocess")
        started = time.perf_counter()
        sample = None
        for array in pool.map(embedder.load, paths):
            sample = array if sample is None else sample
        stages["decode"] = _rate(len(paths), time.perf_counter() - started)

    progress("model")
    assert sample is not None
    batch = np.stack([sample] * batch_size)
    embedder.embed_arrays(batch)  # warm-up
    runs = max(2, min(len(paths) // batch_size, 20))
    started = time.perf_counter()
    for _ in range(runs):
        embedder.embed_arrays(batch)
    stages["model"] = _rate(runs * batch_size, time.perf_counter() - started)

    progress("end to end")
    started = time.perf_counter()
    done = sum(len(chunk) for chunk, _ in embedder.iter_paths(paths, batch_size))
    end_to_end = _rate(done, time.perf_counter() - started)
    slowest = min(stages, key=stages.get)
    return {
        "folder": str(folder),
        "images": len(paths),
        "mean_file_kib": total_bytes / len(paths) / 1024,
        "model": str(embedder.path),
        "precision": embedder.precision,
        "cpu": embedder.cpu.describe(),
        "cores": os.cpu_count(),
        "threads": {"inference": embedder.threads.inference, "decode": workers},
        "batch_size": batch_size,
        "stages_img_per_s": stages,
        "end_to_end_img_per_s": end_to_end,
        "slowest_stage": slowest,
        "end_to_end_over_slowest": end_to_end / stages[slowest],
        "peak_rss_mib": peak_rss_mib(),
        "load_average": list(os.getloadavg()),
    }


def format_pipeline(result: dict) -> str:
    s = result["stages_img_per_s"]
    return "\n".join(
        [
            f"cmn-edge bench --pipeline: {result['images']} images in {result['folder']} "
            f"(mean {result['mean_file_kib']:.0f} KiB), {result['precision']}, batch "
            f"{result['batch_size']}, {result['threads']['inference']} model threads, "
            f"{result['threads']['decode']} decode workers, {result['cores']} cores",
            f"CPU: {result['cpu']}",
            f"read                 {s['read']:9.1f} img/s",
            f"decode + preprocess  {s['decode']:9.1f} img/s",
            f"model                {s['model']:9.1f} img/s",
            f"end to end           {result['end_to_end_img_per_s']:9.1f} img/s = "
            f"{100 * result['end_to_end_over_slowest']:.0f}% of the slowest stage "
            f"({result['slowest_stage']})",
            f"peak RSS {result['peak_rss_mib']:.0f} MiB, load average "
            + " ".join(f"{v:.2f}" for v in result["load_average"]),
        ]
    )


__all__ = ["format_pipeline", "run_pipeline_bench"]
