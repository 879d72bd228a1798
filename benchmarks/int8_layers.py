"""Where INT8 gains speed over FP32 and where it does not: kernel time by kind of layer.

Both files run as the runtime runs them (``cmn_edge.embedder.open_session``); onnxruntime's
own profiler times every kernel. The backbone's convolutions are classed from the FP32
file's graph (stem, depthwise k x k, 1 x 1) and paired with the kernels of each session in
execution order, since onnxruntime renames fused nodes differently in the two graphs; the
head's MatMuls, and everything else (layout transposes, quantize / dequantize steps, the
head's float operators) are summed apart. Ratios are FP32 / INT8 kernel time: above 1 the
INT8 kernels are faster.

    python benchmarks/int8_layers.py --batch 1 --batch 32

The profiler adds its own overhead to every kernel, so the totals read higher than
``cmn-edge bench``; compare the ratios of one class with another, in one run. Needs the
``onnx`` package (the export extra) to read the graph; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx

from cmn_edge.bench import random_batch
from cmn_edge.cpu import this_cpu
from cmn_edge.embedder import open_session
from cmn_edge.metadata import INPUT_NAME, OUTPUT_EMBEDDING
from cmn_edge.registry import resolve_model_path

CONV_OPS = ("Conv", "QLinearConv", "FusedConv", "NchwcConv")


def conv_classes(fp32_path: Path) -> list[str]:
    """The class of each Conv of the float graph, in graph order: 'stem', 'depthwise kxk',
    '1x1' or 'conv kxk'."""
    model = onnx.load(str(fp32_path))
    shapes = {init.name: list(init.dims) for init in model.graph.initializer}
    classes = []
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        weight = shapes.get(node.input[1], [])
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        size = "x".join(str(d) for d in weight[2:]) or "?"
        if not classes:
            classes.append("stem")
        elif group > 1:
            classes.append(f"depthwise {size}")
        elif weight[2:] == [1, 1]:
            classes.append("1x1")
        else:
            classes.append(f"conv {size}")
    return classes


def kernel_times(path: Path, batch: int, input_size: int, runs: int, threads: int | None):
    """[(op, node name, mean ms per run)] in execution order, from onnxruntime's profiler;
    the first run (allocations) is left out."""
    with tempfile.TemporaryDirectory(prefix="cmn-layers-") as tmp:
        session = open_session(path, threads, profile_prefix=str(Path(tmp) / "profile"))
        feed = {INPUT_NAME: random_batch(batch, input_size)}
        for _ in range(runs + 1):
            session.run([OUTPUT_EMBEDDING], feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    per_run: list[list[tuple[str, str, float]]] = [[]]
    for event in events:
        if event.get("cat") == "Session" and event.get("name") == "model_run":
            per_run.append([])
        elif event.get("cat") == "Node" and str(event.get("name", "")).endswith("_kernel_time"):
            name = str(event["name"])[: -len("_kernel_time")]
            per_run[-1].append((event["args"].get("op_name", ""), name, float(event["dur"])))
    measured = [run for run in per_run if run][1:]
    order = measured[0]
    total = np.zeros(len(order))
    for run in measured:
        total += [d for _, _, d in run[: len(order)]]
    return [(op, name, t / len(measured) / 1000.0) for (op, name, _), t in zip(order, total)]


def by_class(kernels, classes: list[str]) -> dict[str, float]:
    """Kernel ms per class: convolutions by ``classes`` (in order), the head's MatMuls, and
    the rest."""
    out: dict[str, float] = defaultdict(float)
    convs = [k for k in kernels if k[0] in CONV_OPS]
    paired = len(convs) == len(classes)
    conv_index = 0
    for op, name, ms in kernels:
        if op in CONV_OPS:
            out[classes[conv_index] if paired else "conv (unpaired)"] += ms
            conv_index += 1
        elif "MatMul" in op and "/backbone/" not in name:
            out["head MatMul"] += ms
        else:
            out["other (layout, (de)quantize, float ops)"] += ms
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fp32", type=Path, help="default: the bundled FP32 model")
    parser.add_argument("--int8", type=Path, help="default: the bundled INT8 model")
    parser.add_argument("--batch", type=int, action="append", default=[])
    parser.add_argument("--runs", type=int, default=0, help="default: 60 at batch 1, else 8")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--input-size", type=int, default=224)
    args = parser.parse_args()
    fp32 = args.fp32 or resolve_model_path(None, "fp32")
    int8 = args.int8 or resolve_model_path(None, "int8")
    classes = conv_classes(fp32)
    print(f"CPU: {this_cpu().describe()}")
    for batch in args.batch or [1, 32]:
        runs = args.runs or (60 if batch == 1 else 8)
        timed = {
            name: by_class(kernel_times(path, batch, args.input_size, runs, args.threads), classes)
            for name, path in (("fp32", fp32), ("int8", int8))
        }
        rows = sorted(set(timed["fp32"]) | set(timed["int8"]), key=lambda k: -timed["fp32"][k])
        print(f"\nbatch {batch}, {runs} runs: kernel ms per run (profiler)")
        print(f"{'layers':42s} {'FP32':>8s} {'INT8':>8s} {'FP32/INT8':>10s} {'INT8 share':>10s}")
        int8_total = sum(timed["int8"].values())
        for row in rows + ["total"]:
            f = sum(timed["fp32"].values()) if row == "total" else timed["fp32"][row]
            i = int8_total if row == "total" else timed["int8"][row]
            ratio = f"{f / i:.2f}x" if i > 0 else "-"
            print(f"{row:42s} {f:8.2f} {i:8.2f} {ratio:>10s} {100 * i / int8_total:9.1f}%")


if __name__ == "__main__":
    main()
