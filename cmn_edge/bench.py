"""How fast is the embed path on this CPU: model, decoding, end to end, cold start, memory.

Everything here measures what a user of :class:`~cmn_edge.embedder.Embedder` gets (the same
sessions, the same preprocessing); no timing is asserted anywhere, the numbers are reported.

The CMN head's share of the model time is measured with onnxruntime's own profiler: every
kernel that runs after the backbone's last node (names under ``/backbone/``) belongs to the
head. No graph surgery (and so no ``onnx`` package) is needed, and the figure holds for FP32
and INT8 graphs alike, whatever onnxruntime fused.
"""

from __future__ import annotations

import functools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from . import preprocess as pp
from .cpu import this_cpu
from .embedder import Embedder, open_session, u8u8_rewrite_on
from .metadata import INPUT_NAME, OUTPUT_EMBEDDING, Preprocess
from .registry import choose_precision, example_photo

#: The small JPEG every checkout has; the 12 MP one is made from it once per run.
LARGE_SIZE = (4000, 3000)
BACKBONE_PREFIX = "/backbone/"


def summarise(seconds: Sequence[float]) -> dict[str, float]:
    """p50/p90/mean in milliseconds of a list of wall times in seconds."""
    ms = np.asarray(seconds, dtype=np.float64) * 1000.0
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "mean_ms": float(ms.mean()),
        "runs": int(ms.size),
    }


def time_calls(fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    """Wall time of ``repeats`` calls after ``warmup`` untimed ones (caches, arenas, pages)."""
    for _ in range(max(0, warmup)):
        fn()
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def random_batch(batch_size: int, input_size: int, seed: int = 0) -> np.ndarray:
    """Inputs in the normalised range the model sees; convolution cost does not depend on it."""
    rng = np.random.default_rng(seed)
    shape = (batch_size, 3, input_size, input_size)
    return rng.uniform(-1.0, 1.0, size=shape).astype(np.float32)


def time_models(
    sessions: dict[str, ort.InferenceSession],
    batch_size: int,
    input_size: int,
    repeats: int,
    warmup: int = 2,
    rounds: int = 4,
    settle_s: float = 0.15,
) -> dict[str, dict[str, float]]:
    """Latency of one ``session.run`` on a batch for each session, and what it means per
    image. The sessions take turns in ``rounds`` blocks, so a shared or throttled machine's
    drift slows them alike (two back-to-back INT8 benches here: 8.7 and 11.8 ms at batch 1).

    Each block first runs untimed for ``settle_s``: right after another session has run, a
    session's runs are up to twice as slow for about 50 ms (measured at batch 1 on a 2-core
    VNNI Xeon; the other pool's threads are still spinning). Timing one run of each in turn
    made FP32 look 9-11 ms instead of 5 and INT8's speed-up 2.2-2.4x instead of 1.7x."""
    feed = {INPUT_NAME: random_batch(batch_size, input_size)}
    for session in sessions.values():
        for _ in range(max(0, warmup)):
            session.run([OUTPUT_EMBEDDING], feed)
    repeats, rounds = max(1, repeats), max(1, min(rounds, repeats))
    per_round = [repeats // rounds + (i < repeats % rounds) for i in range(rounds)]
    seconds: dict[str, list[float]] = {name: [] for name in sessions}
    for count in per_round:
        for name, session in sessions.items():
            run = functools.partial(session.run, [OUTPUT_EMBEDDING], feed)
            settle_until = time.perf_counter() + settle_s
            run()
            while time.perf_counter() < settle_until:
                run()
            seconds[name].extend(time_calls(run, count, warmup=0))
    out = {}
    for name, times in seconds.items():
        stats = summarise(times)
        stats["batch"] = batch_size
        stats["per_image_p50_ms"] = stats["p50_ms"] / batch_size
        stats["per_image_p90_ms"] = stats["p90_ms"] / batch_size
        stats["img_per_s"] = 1000.0 * batch_size / stats["p50_ms"]
        out[name] = stats
    return out


def head_share(
    path: str | os.PathLike, threads: int | None, input_size: int, runs: int = 21
) -> float | None:
    """Fraction of kernel time spent after the backbone's last node, from ORT's profiler.

    None when the graph names no ``/backbone/`` node (a model exported by other means).
    """
    with tempfile.TemporaryDirectory(prefix="cmn-bench-") as tmp:
        session = open_session(path, threads, profile_prefix=str(Path(tmp) / "profile"))
        feed = {INPUT_NAME: random_batch(1, input_size)}
        for _ in range(max(1, runs) + 1):
            session.run([OUTPUT_EMBEDDING], feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    return _head_share_from_events(events)


def _head_share_from_events(events: list[dict]) -> float | None:
    """Kernel events come in execution order within each run; split each run at its last
    backbone kernel. The first run (session warm-up, allocations) is left out."""
    runs: list[list[tuple[str, float]]] = []
    current: list[tuple[str, float]] = []
    for event in events:
        if event.get("cat") == "Session" and event.get("name") == "model_run":
            runs.append(current)
            current = []
        elif event.get("cat") == "Node" and str(event.get("name", "")).endswith("_kernel_time"):
            current.append((str(event["name"]), float(event.get("dur", 0.0))))
    runs = [run for run in runs if run][1:] or [run for run in runs if run]
    shares = []
    for run in runs:
        last = max((i for i, (name, _) in enumerate(run) if BACKBONE_PREFIX in name), default=None)
        if last is None:
            return None
        total = sum(d for _, d in run)
        if total > 0:
            shares.append(sum(d for _, d in run[last + 1 :]) / total)
    # the median run: one run where a head kernel waited for a core swung a pooled sum
    # from 20% to 55% between two bench runs
    return float(np.median(shares)) if shares else None


def make_large_jpeg(source: str | os.PathLike, target: str | os.PathLike) -> Path:
    """A 12 MP camera-sized JPEG (4000x3000, quality 90) made by upscaling a real photo."""
    from PIL import Image

    with Image.open(source) as image:
        large = image.convert("RGB").resize(LARGE_SIZE, Image.Resampling.BICUBIC)
    target = Path(target)
    large.save(target, "JPEG", quality=90)
    return target


def time_decode(path: Path, preprocess: Preprocess, repeats: int) -> dict[str, float]:
    """File on disk -> model-ready float32 array (decode, EXIF, resize, crop, normalise)."""
    stats = summarise(time_calls(lambda: pp.load(path, preprocess), repeats, warmup=1))
    with open(path, "rb") as handle:
        from PIL import Image

        stats["size"] = "x".join(str(v) for v in Image.open(handle).size)
    stats["bytes"] = path.stat().st_size
    return stats


def time_end_to_end(embedder: Embedder, path: Path, repeats: int) -> dict[str, float]:
    """``embedder.embed(path)``: decode, preprocess and the graph, one image."""
    return summarise(time_calls(lambda: embedder.embed(path), repeats, warmup=1))


#: Runs ``cmn-edge`` exactly as its console script does, then reports the process's own peak
#: RSS. The kernel's figure for a child (wait4) also counts the parent's pages from before
#: exec, so the child must read its own high-water mark (VmHWM, reset by exec).
_CHILD = """
import atexit, sys

def _report():
    try:
        with open("/proc/self/status") as status:
            peak = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        import resource
        scale = 1024 if sys.platform == "darwin" else 1
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // scale
    sys.stderr.write(f"\\ncmn-bench-peak-rss-kib {peak}\\n")

atexit.register(_report)
sys.argv[0] = "cmn-edge"
from cmn_edge.cli import main
main()
"""


def cold_start(
    photo: Path, model: str | None, precision: str, threads: int | None, repeats: int = 1
) -> dict[str, float]:
    """Wall time and peak RSS of a fresh ``cmn-edge embed photo`` process (import, load, embed).

    The output goes to a file in a temporary folder, so the write is timed as users get it.
    """
    times, peaks = [], []
    with tempfile.TemporaryDirectory(prefix="cmn-bench-") as tmp:
        command = [sys.executable, "-c", _CHILD, "embed", str(photo), "--precision", precision]
        command += ["--format", "npy", "--output", str(Path(tmp) / "embedding.npy")]
        if model is not None:
            command += ["--model", str(model)]
        if threads:
            command += ["--threads", str(threads)]
        for _ in range(max(1, repeats)):
            start = time.perf_counter()
            done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            elapsed = time.perf_counter() - start
            lines = done.stderr.decode(errors="replace").strip().splitlines()
            if done.returncode != 0:
                reason = [line for line in lines if not line.startswith("cmn-bench-")]
                raise RuntimeError(
                    f"cmn-edge embed {photo} failed ({reason[-1] if reason else done.returncode})"
                )
            times.append(elapsed)
            peak = [line.split()[1] for line in lines if line.startswith("cmn-bench-peak-rss")]
            if peak:
                peaks.append(int(peak[-1]) / 1024.0)
    stats = summarise(times)
    stats["peak_rss_mib"] = max(peaks) if peaks else None
    return stats


def _maxrss_mib(value: int) -> float:
    """ru_maxrss is KiB on Linux, bytes on macOS."""
    return value / (1024.0 * 1024.0) if sys.platform == "darwin" else value / 1024.0


def peak_rss_mib() -> float:
    return _maxrss_mib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def run_bench(
    model: str | None = None,
    precisions: Sequence[str] = ("fp32", "int8"),
    batches: Sequence[int] = (1, 8, 32),
    threads: int | None = None,
    repeats: int = 20,
    photo: str | os.PathLike | None = None,
    cold_repeats: int = 3,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Every figure of ``cmn-edge bench`` as one JSON-ready dict."""
    say = progress or (lambda message: None)
    photo = Path(photo) if photo is not None else example_photo()
    if not photo.is_file():
        raise FileNotFoundError(f"{photo}: photo not found")
    result: dict = {
        "model": None,
        "threads": threads,
        "repeats": repeats,
        "cpu": _cpu_description(),
        "precision_auto": choose_precision("auto"),
        "load_average": list(os.getloadavg()),
        "onnxruntime": ort.__version__,
        "precisions": {},
    }
    embedders: dict[str, Embedder] = {}
    for precision in precisions:
        say(f"{precision}: loading")
        start = time.perf_counter()
        embedder = Embedder(model, precision=precision, threads=threads)
        load_s = time.perf_counter() - start
        embedders[precision] = embedder
        result["model"] = embedder.metadata.name
        result["precisions"][precision] = {
            "path": str(embedder.path),
            "load_ms": load_s * 1000.0,
            "int8_kernels": int8_kernels(embedder),
            "batches": {},
        }
    size = next(iter(embedders.values())).preprocess.input_size
    for batch in batches:
        say(f"batch {batch}: {', '.join(precisions)} in alternating rounds")
        runs = repeats if batch <= 8 else max(3, repeats // 4)
        sessions = {p: e.session for p, e in embedders.items()}
        for precision, stats in time_models(sessions, batch, size, runs).items():
            result["precisions"][precision]["batches"][str(batch)] = stats
    with tempfile.TemporaryDirectory(prefix="cmn-bench-") as tmp:
        say("making a 12 MP JPEG")
        large = make_large_jpeg(photo, Path(tmp) / "large-12mp.jpg")
        for precision, embedder in embedders.items():
            entry = result["precisions"][precision]
            say(f"{precision}: head share")
            entry["head_share"] = head_share(embedder.path, threads, size)
            say(f"{precision}: decode")
            entry["decode_small"] = time_decode(photo, embedder.preprocess, repeats)
            entry["decode_12mp"] = time_decode(large, embedder.preprocess, max(3, repeats // 2))
            say(f"{precision}: end to end")
            entry["end_to_end"] = time_end_to_end(embedder, photo, repeats)
            say(f"{precision}: cold start")
            entry["cold_start"] = cold_start(photo, model, precision, threads, cold_repeats)
    del embedders
    result["peak_rss_mib"] = peak_rss_mib()
    result["speedup"] = _speedups(result["precisions"])
    return result


def int8_kernels(embedder: Embedder) -> str | None:
    """How this CPU runs the loaded INT8 graph: plain U8S8 kernels, or onnxruntime's U8U8
    rewrite (an INT8 file with 8-bit GEMM weights, where U8S8 would saturate)."""
    if embedder.metadata.precision != "int8":
        return None
    if u8u8_rewrite_on(embedder.session):
        return "U8U8 rewrite (8-bit GEMM weights would saturate U8S8 here)"
    bits = embedder.metadata.quantization.get("gemm_weight_bits", 8)
    return f"as quantized ({bits}-bit GEMM weights, {embedder.cpu.kernel_path})"


def _speedups(entries: dict) -> dict[str, float]:
    """INT8 speed-up over FP32 (FP32 time / INT8 time), per batch size."""
    if "fp32" not in entries or "int8" not in entries:
        return {}
    fp32, int8 = entries["fp32"]["batches"], entries["int8"]["batches"]
    return {
        batch: fp32[batch]["p50_ms"] / int8[batch]["p50_ms"]
        for batch in fp32
        if batch in int8 and int8[batch]["p50_ms"] > 0
    }


def _cpu_description() -> dict:
    """The CPU's INT8-relevant features and the kernel path they imply (``cmn_edge.cpu``)."""
    cpu = this_cpu()
    return {"cores": os.cpu_count(), **cpu.to_dict(), "describe": cpu.describe()}


def format_table(result: dict) -> str:
    """One table: a row per measure, a column per precision, and the INT8 speed-up."""
    precisions = list(result["precisions"])
    entries = [result["precisions"][p] for p in precisions]
    both = len(precisions) == 2 and set(precisions) == {"fp32", "int8"}
    header = ["measure", *[p.upper() for p in precisions]]
    if both:
        header.append("INT8 speed-up")
    rows: list[list[str]] = []

    def row(label: str, values: list[float | None], fmt: str, ratio: bool = False) -> None:
        cells = ["-" if v is None else format(v, fmt) for v in values]
        if both:
            by = dict(zip(precisions, values))
            if ratio and by["fp32"] and by["int8"]:
                cells.append(f"{by['fp32'] / by['int8']:.2f}x")
            else:
                cells.append("")
        rows.append([label, *cells])

    for batch in entries[0]["batches"]:
        stats = [e["batches"].get(batch) for e in entries]
        row(f"model b{batch} p50 ms/batch", [s and s["p50_ms"] for s in stats], ".1f", True)
        row(f"model b{batch} p90 ms/batch", [s and s["p90_ms"] for s in stats], ".1f", True)
        row(
            f"model b{batch} p50 ms/image",
            [s and s["per_image_p50_ms"] for s in stats],
            ".2f",
            True,
        )
        row(f"model b{batch} img/s", [s and s["img_per_s"] for s in stats], ".1f")
    row(
        "head share of model time (b1)",
        [None if e["head_share"] is None else 100.0 * e["head_share"] for e in entries],
        ".1f",
    )
    small = entries[0]["decode_small"]
    large = entries[0]["decode_12mp"]
    row(
        f"decode+preprocess {small['size']} JPEG p50 ms",
        [e["decode_small"]["p50_ms"] for e in entries],
        ".1f",
    )
    row(
        f"decode+preprocess {large['size']} JPEG p50 ms",
        [e["decode_12mp"]["p50_ms"] for e in entries],
        ".1f",
    )
    row(
        "  ... / model b1 p50",
        [
            e["decode_12mp"]["p50_ms"] / e["batches"]["1"]["p50_ms"]
            if "1" in e["batches"]
            else None
            for e in entries
        ],
        ".2f",
    )
    row(
        "end to end, file -> embedding p50 ms",
        [e["end_to_end"]["p50_ms"] for e in entries],
        ".1f",
        True,
    )
    row("model load ms", [e["load_ms"] for e in entries], ".0f")
    row(
        "cold start `cmn-edge embed` p50 s",
        [e["cold_start"]["p50_ms"] / 1000.0 for e in entries],
        ".2f",
    )
    row("cold start peak RSS MiB", [e["cold_start"]["peak_rss_mib"] for e in entries], ".0f")

    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        f"cmn-edge bench: {result['model']}, threads={result['threads'] or 'default'}, "
        f"onnxruntime {result['onnxruntime']}, {result['cpu'].get('model', '?')} "
        f"({result['cpu'].get('cores')} cores), load average "
        + " ".join(f"{v:.2f}" for v in result["load_average"]),
        "  ".join(
            h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths))
        ),
        "  ".join("-" * w for w in widths),
    ]
    for r in rows:
        lines.append(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))
            )
        )
    lines.append(f"peak RSS of this bench process: {result['peak_rss_mib']:.0f} MiB")
    lines.append(f"CPU: {result['cpu'].get('describe', '?')}")
    if result.get("precision_auto"):
        lines.append(f"--precision auto (the default) loads {result['precision_auto']} here")
    for precision, entry in result["precisions"].items():
        if entry.get("int8_kernels"):
            lines.append(f"{precision.upper()} runs {entry['int8_kernels']}")
    return "\n".join(lines)
