"""Which INT8 recipe keeps FP32-level retrieval on THIS CPU, and how fast it runs.

INT8 results depend on the CPU's kernels: on x86-64 without VNNI, onnxruntime's U8S8
kernels saturate (see ``cmn_edge/cpu.py``). This quantizes one FP32 model with several of
``cmn-export quantize``'s options (``cmn_export.quantize.QuantizeOptions``), loads each file
plain and with the session config the runtime uses on this CPU, and prints, per dataset,
the embedding cosine to FP32 and leave-one-out R@1 on a random subset of the test split,
then batch-1 / batch-32 speed against FP32 timed in interleaved rounds:

    python benchmarks/quant_sweep.py ../shared/datasets/cub100 ../shared/datasets/caltech97

Levers: U8S8 with 7-bit GEMM weights by GPTQ (the shipped recipe, ``export/gptq.py``), U8S8
with 8-bit weights, U8U8 (uint8 weights), S8S8, onnxruntime's naive 7-bit weights
(``reduce_range``), each loaded plain and with onnxruntime's ``session.x64quantprecision``.
State the CPU class (printed first) beside any figure you quote.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cmn_edge import preprocess as pp  # noqa: E402
from cmn_edge.cpu import X64_QUANT_PRECISION, this_cpu  # noqa: E402
from cmn_edge.dataset import load_samples  # noqa: E402
from cmn_edge.metadata import INPUT_NAME, OUTPUT_EMBEDDING  # noqa: E402
from cmn_edge.metrics import retrieval_metrics  # noqa: E402
from cmn_edge.registry import resolve_model_path  # noqa: E402
from cmn_export.onnx_export import read_metadata  # noqa: E402
from cmn_export.quantize import QuantizeOptions, quantize  # noqa: E402

RECIPES = {
    "u8s8-gptq7": QuantizeOptions(method="percentile"),  # the default: 7-bit GEMMs by GPTQ
    "u8s8": QuantizeOptions(method="percentile", gemm_weight_bits=8),
    "u8u8": QuantizeOptions(method="percentile", weight_type="uint8"),
    "s8s8": QuantizeOptions(method="percentile", activation_type="int8", gemm_weight_bits=8),
    "u8s8-7bit": QuantizeOptions(method="percentile", reduce_range=True, gemm_weight_bits=8),
}


def session(path: Path, threads: int, exact: bool) -> ort.InferenceSession:
    """``exact``: with onnxruntime's U8U8 rewrite (what the runtime sets where U8S8 saturates)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    if exact:
        options.add_session_config_entry(X64_QUANT_PRECISION, "1")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def embed(sess: ort.InferenceSession, images: np.ndarray) -> np.ndarray:
    out = [sess.run([OUTPUT_EMBEDDING], {INPUT_NAME: images[i : i + 32]})[0] for i in
           range(0, len(images), 32)]  # fmt: skip
    return np.concatenate(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("datasets", nargs="+", type=Path)
    parser.add_argument("--model", type=Path, default=None, help="FP32 .onnx (default: bundled)")
    parser.add_argument("--images", type=int, default=600, help="test images per dataset")
    parser.add_argument("--calibration-count", type=int, default=256)
    parser.add_argument("--only", default=",".join(RECIPES), help="comma-separated recipes")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10, help="timing rounds (b1; b32: /4)")
    args = parser.parse_args()

    fp32 = args.model or resolve_model_path(None, "fp32")
    meta = read_metadata(fp32)
    print(f"CPU: {this_cpu().describe()}; onnxruntime {ort.__version__}")
    variants: dict[str, ort.InferenceSession] = {"fp32": session(fp32, args.threads, False)}
    with tempfile.TemporaryDirectory(prefix="cmn-sweep-") as tmp:
        for name in args.only.split(","):
            out = Path(tmp) / f"{name}.onnx"
            started = time.perf_counter()
            quantize(fp32, out, args.datasets, count=args.calibration_count, check_count=0,
                     options=RECIPES[name])  # fmt: skip
            print(f"quantized {name} in {time.perf_counter() - started:.0f} s", flush=True)
            variants[name] = session(out, args.threads, exact=False)
            variants[f"{name} +{X64_QUANT_PRECISION}"] = session(out, args.threads, exact=True)

    rng = np.random.default_rng(0)
    print(f"\n{'variant':44} {'dataset':10} {'cos mean':>8} {'cos min':>8} {'R@1':>6} {'drop':>6}")
    for root in args.datasets:
        samples = load_samples(root, "test")
        keep = np.sort(rng.choice(len(samples), min(args.images, len(samples)), replace=False))
        samples = [samples[i] for i in keep]
        images = np.stack([pp.load(s.path, meta.preprocess) for s in samples])
        labels = np.array([s.label for s in samples])
        ref = embed(variants["fp32"], images)
        r1_ref = retrieval_metrics(ref, labels, ks=(1,))["R@1"]
        for name, sess in variants.items():
            emb = ref if name == "fp32" else embed(sess, images)
            cos = (emb * ref).sum(1) / np.linalg.norm(emb, axis=1) / np.linalg.norm(ref, axis=1)
            r1 = retrieval_metrics(emb, labels, ks=(1,))["R@1"]
            print(f"{name:44} {root.name:10} {cos.mean():8.4f} {cos.min():8.4f} {r1:6.2f} "
                  f"{r1_ref - r1:6.2f}", flush=True)  # fmt: skip

    print(f"\nspeed, {args.threads} threads, median of interleaved rounds")
    for batch, rounds in ((1, args.rounds), (32, max(2, args.rounds // 4))):
        size = meta.preprocess.input_size
        x = np.random.default_rng(1).standard_normal((batch, 3, size, size)).astype("f4")
        times: dict[str, list[float]] = {name: [] for name in variants}
        for sess in variants.values():
            sess.run([OUTPUT_EMBEDDING], {INPUT_NAME: x})
        for _ in range(rounds):
            for name, sess in variants.items():
                started = time.perf_counter()
                sess.run([OUTPUT_EMBEDDING], {INPUT_NAME: x})
                times[name].append(time.perf_counter() - started)
        base = float(np.median(times["fp32"]))
        for name, ts in times.items():
            med = float(np.median(ts))
            print(f"b{batch:<3} {name:44} {med * 1000 / batch:8.2f} ms/image  "
                  f"{base / med:5.2f}x FP32")  # fmt: skip


if __name__ == "__main__":
    main()
