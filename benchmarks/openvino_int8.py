"""onnxruntime against OpenVINO on the bundled FP32 and INT8 files: is another CPU runtime a
way past onnxruntime's INT8 kernels (issue #13's speed targets)?

Both runtimes read the same two ONNX files, run with 2 threads, and are timed in turns (each
round times every runtime once, after two untimed runs), on real cub100 test photos; the
cosine of each to onnxruntime FP32 comes first. Prints figures; it asserts nothing.

    pip install openvino
    python benchmarks/openvino_int8.py --data ../shared/datasets/cub100
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import openvino as ov

from cmn_edge import Embedder
from cmn_edge.cpu import this_cpu
from cmn_edge.dataset import load_samples
from cmn_edge.embedder import open_session
from cmn_edge.preprocess import load
from cmn_edge.registry import resolve_model_path


def runners(threads: int) -> dict:
    core = ov.Core()
    out = {}
    for precision in ("fp32", "int8"):
        path = str(resolve_model_path(None, precision))
        session = open_session(path, threads)
        feed = session.get_inputs()[0].name
        out[f"onnxruntime {precision}"] = lambda x, s=session, f=feed: s.run(["embedding"], {f: x})[
            0
        ]
        compiled = core.compile_model(
            core.read_model(path),
            "CPU",
            {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"},
        )
        request, output = compiled.create_infer_request(), compiled.output("embedding")
        out[f"openvino {precision}"] = lambda x, r=request, o=output: r.infer({0: x})[o].copy()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    print(f"this CPU: {this_cpu().describe()}; openvino {ov.__version__}")
    preprocess = Embedder(None, precision="fp32", threads=args.threads).preprocess
    samples = load_samples(args.data, "test")[: args.images]
    images = np.stack([load(s.path, preprocess) for s in samples]).astype(np.float32)
    runs = runners(args.threads)
    reference = np.concatenate(
        [runs["onnxruntime fp32"](images[s : s + 32]) for s in range(0, len(images), 32)]
    )
    for name, run in runs.items():
        got = np.concatenate([run(images[s : s + 32]) for s in range(0, len(images), 32)])
        cos = (got * reference).sum(1) / (
            np.linalg.norm(got, axis=1) * np.linalg.norm(reference, axis=1)
        )
        print(f"{name:<18} cosine to onnxruntime fp32: mean {cos.mean():.5f}, min {cos.min():.5f}")
    for batch in (1, 32):
        times: dict[str, list[float]] = {name: [] for name in runs}
        repeats = 20 if batch == 1 else 2
        for _ in range(args.rounds):
            for name, run in runs.items():
                for _ in range(2):
                    run(images[:batch])
                start = time.perf_counter()
                for _ in range(repeats):
                    run(images[:batch])
                times[name].append(1000 * (time.perf_counter() - start) / repeats / batch)
        ms = {name: float(np.median(v)) for name, v in times.items()}
        shown = ", ".join(f"{name} {value:.2f}" for name, value in ms.items())
        print(
            f"batch {batch}, ms an image: {shown}; INT8 over FP32: onnxruntime "
            f"{ms['onnxruntime fp32'] / ms['onnxruntime int8']:.2f}x, openvino "
            f"{ms['openvino fp32'] / ms['openvino int8']:.2f}x"
        )


if __name__ == "__main__":
    main()
