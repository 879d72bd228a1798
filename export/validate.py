"""Check an exported CMN before shipping it: parity with PyTorch, INT8 fidelity, retrieval
quality on a held-out split, file sizes and CPU latency, in one JSON report."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from cmn_edge import preprocess as pp
from cmn_edge.dataset import DatasetError, Sample, check_retrieval_ready, load_samples
from cmn_edge.embedder import Embedder
from cmn_edge.files import write_text_atomic
from cmn_edge.metadata import OUTPUT_ATTENTION, OUTPUT_EMBEDDING, OUTPUT_SCORES
from cmn_edge.metrics import retrieval_metrics

#: The parity target: PyTorch vs ONNX FP32 on the embedding.
PARITY_TOLERANCE = 1e-4


def report_path_for(model: str | Path) -> Path:
    """``x.fp32.onnx`` -> ``x.validation.json`` (next to the model)."""
    model = Path(model)
    stem = model.name.removesuffix(".onnx").removesuffix(".fp32").removesuffix(".int8")
    return model.with_name(f"{stem}.validation.json")


def pick_samples(root: str | Path, split: str, limit: int | None) -> list[Sample]:
    """The split in manifest order, cut to ``limit`` images; classes left with a single image
    by the cut are dropped, as leave-one-out retrieval cannot score them."""
    samples = load_samples(root, split)
    if limit:
        samples = samples[:limit]
        counts: dict[int, int] = {}
        for s in samples:
            counts[s.label] = counts.get(s.label, 0) + 1
        samples = [s for s in samples if counts[s.label] > 1]
        if not samples:
            raise DatasetError(f"{root}: --limit {limit} leaves no class with two images")
    check_retrieval_ready(samples, root)
    return samples


def torch_parity(
    checkpoint: str | Path, upstream: bool, batch: np.ndarray, onnx_outputs: list[np.ndarray]
) -> dict[str, Any]:
    """Max abs difference PyTorch vs ONNX on the same preprocessed images."""
    import torch

    from .checkpoint import file_sha256, model_from_checkpoint, model_from_upstream

    model = model_from_upstream(checkpoint) if upstream else model_from_checkpoint(checkpoint)[0]
    model = model.eval()
    with torch.no_grad():
        reference = model.exportable().eval()(torch.from_numpy(batch))
    diffs = {
        name: float(np.abs(ref.numpy() - out).max())
        for name, ref, out in zip(
            (OUTPUT_EMBEDDING, OUTPUT_SCORES, OUTPUT_ATTENTION), reference, onnx_outputs
        )
    }
    return {
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": file_sha256(Path(checkpoint)),
        "images": len(batch),
        "max_abs_diff": diffs,
        "tolerance": PARITY_TOLERANCE,
        "ok": diffs[OUTPUT_EMBEDDING] < PARITY_TOLERANCE,
    }


def latency_ms(embedder: Embedder, batch: np.ndarray, runs: int) -> float:
    """Median wall time per image over ``runs`` runs, after one warm-up run."""
    embedder.run(batch)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        embedder.run(batch)
        times.append(time.perf_counter() - start)
    return 1000.0 * float(np.median(times)) / len(batch)


def _neighbour_agreement(a: np.ndarray, b: np.ndarray, chunk: int = 1024) -> float:
    """Share of queries whose nearest neighbour (leave-one-out) is the same image in both."""
    same = 0
    for start in range(0, len(a), chunk):
        rows = np.arange(min(chunk, len(a) - start))
        sa, sb = a[start : start + chunk] @ a.T, b[start : start + chunk] @ b.T
        sa[rows, start + rows] = -np.inf
        sb[rows, start + rows] = -np.inf
        same += int((sa.argmax(1) == sb.argmax(1)).sum())
    return 100.0 * same / len(a)


def validate(
    model: str | Path,
    data: str | Path,
    int8: str | Path | None = None,
    checkpoint: str | Path | None = None,
    upstream: bool = False,
    split: str = "test",
    limit: int | None = None,
    threads: int | None = None,
    latency_runs: int = 5,
    batch_size: int = 32,
    report: str | Path | None = None,
) -> dict[str, Any]:
    """Validate FP32 ``model`` (and its INT8 twin) on ``split`` of ``data``; write the report."""
    fp32 = Embedder(model, precision="fp32", threads=threads)
    if fp32.metadata.precision != "fp32":
        raise ValueError(f"{model}: expected an FP32 model, found {fp32.metadata.precision}")
    quant = Embedder(int8, precision="int8", threads=threads) if int8 else None
    if quant is not None and quant.preprocess != fp32.preprocess:
        raise ValueError(f"{int8}: preprocessing differs from {model}; not the same model")
    if quant is not None and quant.num_concepts != fp32.num_concepts:
        raise ValueError(f"{int8}: {quant.num_concepts} concepts, {model} has {fp32.num_concepts}")
    samples = pick_samples(data, split, limit)
    labels = np.array([s.label for s in samples])

    emb32, emb8, parity, first = [], [], None, None
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        batch = np.stack([pp.load(s.path, fp32.preprocess) for s in chunk])
        if first is None:
            first = batch
        outputs = fp32.run(batch, (OUTPUT_EMBEDDING, OUTPUT_SCORES, OUTPUT_ATTENTION))
        if checkpoint is not None and parity is None:
            small = min(8, len(batch))
            parity = torch_parity(checkpoint, upstream, batch[:small], [o[:small] for o in outputs])
        emb32.append(outputs[0])
        if quant is not None:
            emb8.append(quant.run(batch)[0])
    e32 = np.concatenate(emb32)

    result: dict[str, Any] = {
        "fp32_model": str(model),
        "int8_model": str(int8) if int8 else None,
        "model_name": fp32.metadata.name,
        "data": str(data),
        "split": split,
        "images": len(samples),
        "classes": int(len(set(labels.tolist()))),
        "limit": limit,
        "parity": parity,
        # INT8 numbers depend on the CPU's kernels: say which ones produced them.
        "cpu": fp32.cpu.to_dict(),
        "retrieval": {"fp32": retrieval_metrics(e32, labels)},
        "size_bytes": {"fp32": os.path.getsize(model)},
        "embedding_norm_max_error": {"fp32": float(np.abs(np.linalg.norm(e32, axis=1) - 1).max())},
    }
    if quant is not None:
        e8 = np.concatenate(emb8)
        cos = (e32 * e8).sum(1) / np.maximum(
            np.linalg.norm(e32, axis=1) * np.linalg.norm(e8, axis=1), 1e-12
        )
        result["int8_vs_fp32"] = {
            "mean_cosine": float(cos.mean()),
            "min_cosine": float(cos.min()),
            "p01_cosine": float(np.percentile(cos, 1)),
            "nearest_neighbour_agreement": _neighbour_agreement(e32, e8),
        }
        result["retrieval"]["int8"] = retrieval_metrics(e8, labels)
        result["size_bytes"]["int8"] = os.path.getsize(int8)
        result["embedding_norm_max_error"]["int8"] = float(
            np.abs(np.linalg.norm(e8, axis=1) - 1).max()
        )
        result["quantization"] = quant.metadata.quantization
        result["int8_session_config"] = quant.cpu.session_config(quant.metadata.saturates_u8s8)

    assert first is not None
    big = np.concatenate([first] * (-(-32 // len(first))))[:32]
    result["latency_ms_per_image"] = {
        "threads": threads or "onnxruntime default",
        "runs": latency_runs,
        "statistic": "median",
        "cpu": platform.processor() or platform.machine(),
        "onnxruntime": ort.__version__,
        "fp32": {
            "batch_1": latency_ms(fp32, first[:1], latency_runs),
            "batch_32": latency_ms(fp32, big, latency_runs),
        },
    }
    if quant is not None:
        result["latency_ms_per_image"]["int8"] = {
            "batch_1": latency_ms(quant, first[:1], latency_runs),
            "batch_32": latency_ms(quant, big, latency_runs),
        }
    out = Path(report) if report else report_path_for(model)
    write_text_atomic(out, json.dumps(result, indent=2) + "\n")
    result["report"] = str(out)
    return result


def table(result: dict[str, Any]) -> str:
    """The report as a small text table for the terminal."""
    columns = ["fp32"] + (["int8"] if result.get("int8_model") else [])
    rows: list[tuple[str, ...]] = []
    for key in ("R@1", "R@2", "R@4", "R@8", "MAP@R"):
        rows.append((key, *(f"{result['retrieval'][c][key]:.2f}" for c in columns)))
    rows.append(("size MB", *(f"{result['size_bytes'][c] / 1e6:.1f}" for c in columns)))
    lat = result["latency_ms_per_image"]
    for b in ("batch_1", "batch_32"):
        rows.append((f"ms/image {b.replace('_', ' ')}", *(f"{lat[c][b]:.2f}" for c in columns)))
    width = max(len(r[0]) for r in rows)
    lines = [
        f"{result['model_name']} on {result['data']} [{result['split']}]: "
        f"{result['images']} images, {result['classes']} classes",
        f"{'':{width}}  " + "  ".join(f"{c:>8}" for c in columns),
    ]
    lines += [f"{r[0]:{width}}  " + "  ".join(f"{v:>8}" for v in r[1:]) for r in rows]
    if result.get("parity"):
        p = result["parity"]
        diff = p["max_abs_diff"][OUTPUT_EMBEDDING]
        verdict = "ok" if p["ok"] else f"ABOVE {p['tolerance']:g}"
        lines.append(f"PyTorch vs ONNX FP32 max abs diff (embedding): {diff:.2e} ({verdict})")
    if result.get("int8_vs_fp32"):
        f = result["int8_vs_fp32"]
        lines.append(
            f"INT8 vs FP32 cosine: mean {f['mean_cosine']:.4f}, min {f['min_cosine']:.4f}; "
            f"same nearest neighbour {f['nearest_neighbour_agreement']:.1f}%"
        )
    cpu = result["cpu"]
    config = result.get("int8_session_config")
    config = ", ".join(f"{k}={v}" for k, v in (config or {}).items()) or "none"
    lines.append(
        f"measured on: {cpu['model'] or cpu['machine']} [{', '.join(cpu['flags'])}], "
        f"INT8 kernel path {cpu['kernel_path']}, INT8 session config {config}"
    )
    lines.append(f"report: {result['report']}")
    return "\n".join(lines)
