"""Which GEMMs of an INT8 file can saturate onnxruntime's U8S8 kernels on x86 without VNNI.

Those kernels (VPMADDUBSW) add each pair of adjacent u8 x s8 products along the GEMM's inner
dimension in a saturating 16-bit lane. This runs the file exactly (the U8U8 rewrite on)
on images of a dataset, takes every GEMM's u8 input, and computes those pair sums in numpy:
per layer, the largest |pair sum| as a share of 32,767 and how many pairs overflow. No
VNNI or AVX2 machine is needed to read the answer; it is the same on every CPU.

    python benchmarks/saturation.py models/cmn-lite0.int8.onnx ../shared/datasets/cub100

A file quantized with 8-bit GEMM weights overflows in nearly every 1x1 conv; the default
file (7-bit GEMM weights, ``export/gptq.py``) cannot, and its largest share stays below 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cmn_export.calibration import ImageCalibrationReader, pick_images  # noqa: E402
from cmn_export.gptq import as_rows, gemm_inputs, gemm_layers, layer_rows  # noqa: E402
from cmn_export.onnx_export import read_metadata  # noqa: E402

LANE_MAX = 32767


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="an INT8 QDQ .onnx")
    parser.add_argument("dataset", type=Path)
    parser.add_argument("--split", default="test")
    parser.add_argument("--images", type=int, default=32)
    args = parser.parse_args()

    model = onnx.load(str(args.model))
    meta = read_metadata(args.model)
    layers = gemm_layers(model)
    init = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    paths = pick_images([args.dataset], args.split, args.images, 0)
    reader = ImageCalibrationReader(paths, meta.preprocess)
    batches = (reader.batch(i) for i in range(len(reader)))
    largest = {layer.node.name: 0.0 for layer in layers}
    overflows = dict.fromkeys(largest, 0)
    pairs = dict.fromkeys(largest, 0)
    for values in gemm_inputs(model, layers, batches):
        for layer in layers:
            zero = float(init[layer.activation_zero_point])
            a = layer_rows(layer, values[layer.activation].astype(np.float32), zero)
            w = as_rows(init[layer.weight].astype(np.float32), layer.node.op_type)
            if a.shape[1] % 2:  # the kernels pad the inner dimension with zeros
                a, w = np.pad(a, ((0, 0), (0, 1))), np.pad(w, ((0, 0), (0, 1)))
            name = layer.node.name
            for k in range(0, a.shape[1], 2):
                pair = np.abs(a[:, k : k + 2] @ w[:, k : k + 2].T)  # exact in float32
                largest[name] = max(largest[name], float(pair.max()))
                overflows[name] += int((pair > LANE_MAX).sum())
            pairs[name] += a.shape[0] * w.shape[0] * a.shape[1] // 2
    bits = meta.quantization.get("gemm_weight_bits", 8)
    print(f"{args.model.name}: {len(layers)} U8S8 GEMMs, {bits}-bit GEMM weights, "
          f"{len(paths)} {args.split} images of {args.dataset.name}")  # fmt: skip
    print(f"{'layer':60} {'max |pair| / 32767':>18} {'overflowing pairs':>20}")
    for name in largest:
        print(f"{name[:60]:60} {largest[name] / LANE_MAX:18.2f} "
              f"{overflows[name]:>10} / {pairs[name]:.1e}")  # fmt: skip
    hit = sum(1 for n in overflows if overflows[n])
    print(f"{hit} of {len(layers)} GEMMs overflow a 16-bit lane on these images")


if __name__ == "__main__":
    main()
