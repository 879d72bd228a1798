"""Where INT8 loses fidelity: signal-to-quantization-noise ratio along the network.

For each block output of the backbone and each head tensor, the SQNR (dB) of the INT8
graph's activation against the FP32 graph's on the same images, from onnxruntime's own
``qdq_loss_debug``. A single sensitive layer shows as a cliff (keep it float); a steady
slope means the error builds up everywhere, which only quantization-aware training fixes.

    python benchmarks/quant_sqnr.py --data ../shared/datasets/cub100 --images 24

Prints a table; asserts nothing.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import onnx
from onnxruntime.quantization.qdq_loss_debug import (
    collect_activations,
    compute_activation_error,
    create_activation_matching,
    modify_model_output_intermediate_tensors,
)

from cmn_edge.registry import resolve_model_path
from cmn_export.calibration import ImageCalibrationReader, pick_images
from cmn_export.onnx_export import read_metadata


class Batches(ImageCalibrationReader):
    """The calibration reader, iterable as qdq_loss_debug wants it."""

    def __iter__(self):
        self.rewind()
        while (batch := self.get_next()) is not None:
            yield batch


def is_reported(tensor: str) -> bool:
    """Block outputs (residual adds, projections) and the head: one row a block, not a conv."""
    head = not tensor.startswith("/backbone/")
    return head or tensor.endswith(("Add_output_0", "conv_pwl/Conv_output_0", "act/Clip_output_0"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fp32", type=Path, help="default: the bundled FP32 model")
    parser.add_argument("--int8", type=Path, help="default: the bundled INT8 model")
    parser.add_argument("--data", required=True, nargs="+", help="dataset(s) to draw images from")
    parser.add_argument("--split", default="test")
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    fp32 = args.fp32 or resolve_model_path(None, "fp32")
    int8 = args.int8 or resolve_model_path(None, "int8")
    preprocess = read_metadata(fp32).preprocess
    paths = pick_images(args.data, args.split, args.images, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        activations = {}
        for name, model in (("fp32", fp32), ("int8", int8)):
            tapped = Path(tmp) / f"{name}.onnx"
            modify_model_output_intermediate_tensors(str(model), str(tapped))
            activations[name] = collect_activations(str(tapped), Batches(paths, preprocess))
    errors = compute_activation_error(
        create_activation_matching(activations["int8"], activations["fp32"])
    )
    order = [out for node in onnx.load(str(fp32)).graph.node for out in node.output]
    print(f"{fp32.name} vs {int8.name}: {len(paths)} {args.split} images of {', '.join(args.data)}")
    print(f"{'tensor':72s} {'SQNR dB':>8s}")
    for tensor in order:
        if tensor in errors and "xmodel_err" in errors[tensor] and is_reported(tensor):
            print(f"{tensor[:72]:72s} {errors[tensor]['xmodel_err']:8.2f}")


if __name__ == "__main__":
    main()
