"""Static INT8 quantization of a CMN ONNX graph with onnxruntime.quantization.

The backbone's convolutions quantize well (per-channel weights; per-tensor wrecks the
depthwise convs of EfficientNet). In the concept head only the projections with a constant
weight (token, key and query MatMuls: nearly all its MACs and half the model's weights) are
quantized by default; LayerNorm, the Softmax sharpened by the region count, the L2
normalisations and the small MatMuls between two activations stay float: the scores are
cosines whose differences are the whole signal, and LayerNorm/Softmax/ReduceL2 have no
integer kernels on the CPU anyway. Measured on the default model (AVX-512 VNNI): file
15.6 -> 6.8 MB, batch-32 speed-up over FP32 1.7x -> 2.25x, embedding cosine to FP32 on the
test splits 0.9895/0.9908 -> 0.9889/0.9904. On x86 without VNNI the runtime loads INT8 with
onnxruntime's exact U8U8 rewrite (``cmn_edge.cpu``), so the same files give the same cosines.
``head_projections=False`` keeps the whole head float. What stayed float, and how the ranges
were calibrated, goes into the metadata.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from cmn_edge.cpu import this_cpu
from cmn_edge.embedder import session_options
from cmn_edge.metadata import INPUT_NAME, OUTPUT_EMBEDDING, ModelMetadata

from .calibration import ImageCalibrationReader, images_digest, pick_images
from .gptq import requantize_gemms
from .onnx_export import read_metadata, write_metadata
from .regions import NODE_PREFIX as REGION_NODE_PREFIX

#: Op types never quantized anywhere in the graph: LayerNormalization and the ops it
#: decomposes into at older opsets, Softmax, and the reductions of the L2 normalisations.
DEFAULT_FLOAT_OP_TYPES: tuple[str, ...] = (
    "LayerNormalization",
    "Softmax",
    "ReduceMean",
    "ReduceL2",
    "Pow",
    "Sqrt",
)
#: Ops that only move or reshape data: followed back from the head to the backbone's output.
_LAYOUT_OPS = {"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity"}
#: Not "compute": left out of the summary of nodes that run in float.
_NOT_COMPUTE = {
    "QuantizeLinear",
    "DequantizeLinear",
    "Constant",
    "Shape",
    "Gather",
    "Unsqueeze",
    "Concat",
    "Cast",
    "Reshape",
    "Identity",
    "Squeeze",
    "Expand",
    "ConstantOfShape",
}

METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "percentile": CalibrationMethod.Percentile,
    "entropy": CalibrationMethod.Entropy,
}
FORMATS = {"qdq": QuantFormat.QDQ, "qoperator": QuantFormat.QOperator}
TYPES = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}


class QuantizeError(ValueError):
    """A model or calibration set that cannot be quantized; the message names the file."""


@dataclass(frozen=True)
class QuantizeOptions:
    """The quantization knobs (format, types, per-channel, what stays float);
    ``benchmarks/quant_sweep.py`` measures them on the CPU it runs on."""

    method: str = "minmax"  # minmax | percentile | entropy | auto (best of the three)
    quant_format: str = "qdq"  # qdq | qoperator
    activation_type: str = "uint8"  # uint8 (U8S8 with int8 weights) | int8 (S8S8)
    weight_type: str = "int8"
    per_channel: bool = True
    reduce_range: bool = False  # onnxruntime's 7-bit weights (rounded naively, depthwise too)
    #: 7: the GEMMs' weights are GPTQ-rounded to [-64, 64] (``export/gptq.py``), so U8S8
    #: kernels without VNNI cannot saturate and need no slow U8U8 rewrite; 8: as quantized;
    #: None: 7 where it applies (QDQ with int8 weights), else 8
    gemm_weight_bits: int | None = None

    @property
    def gemm_bits(self) -> int:
        if self.gemm_weight_bits is not None:
            return self.gemm_weight_bits
        return 7 if (self.quant_format, self.weight_type) == ("qdq", "int8") else 8

    float_head: bool = True  # keep every node after the backbone's feature map in float
    #: op types quantized inside the head even with float_head (e.g. "MatMul": the head's
    #: projections are most of its weights and MACs; LayerNorm/Softmax stay float regardless)
    head_op_types: tuple[str, ...] = ()
    #: quantize the head's MatMul/Gemm nodes that have a constant weight (the token, key
    #: and query projections: nearly all the head's MACs), leaving the small MatMuls between
    #: two activations (the R x R Gram of the factored head), LayerNorm and Softmax float
    head_projections: bool = True
    float_op_types: tuple[str, ...] = DEFAULT_FLOAT_OP_TYPES
    percentile: float = 99.999
    extra_options: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        choices = {
            "method": (self.method, [*METHODS, "auto"]),
            "quant_format": (self.quant_format, list(FORMATS)),
            "activation_type": (self.activation_type, list(TYPES)),
            "weight_type": (self.weight_type, list(TYPES)),
        }
        for name, (value, allowed) in choices.items():
            if value not in allowed:
                raise ValueError(f"{name} '{value}' is not one of {', '.join(allowed)}")
        if self.gemm_bits not in (7, 8):
            raise ValueError(f"gemm_weight_bits {self.gemm_weight_bits} is not 7 or 8")
        if self.gemm_bits == 7 and (self.quant_format, self.weight_type) != ("qdq", "int8"):
            raise ValueError("7-bit GEMM weights need the QDQ format with int8 weights")


@dataclass
class QuantizeResult:
    path: Path
    metadata: ModelMetadata
    #: method -> mean/min cosine to FP32 on held-out train images (several when method=auto)
    tried: dict[str, dict[str, float]]


# --- which nodes stay float -----------------------------------------------------------------


def backbone_output(graph: onnx.GraphProto) -> str:
    """The backbone's feature map: the tensor the head's first LayerNormalization reads (a
    CMN) or, without one, its first MatMul with a constant weight (a DGML: the folded group
    keys), followed back through pure layout ops; failing both, the last Conv's output."""
    producers = {out: node for node in graph.node for out in node.output}
    constants = {init.name for init in graph.initializer}

    def behind_layout(tensor: str) -> str:
        while tensor in producers and producers[tensor].op_type in _LAYOUT_OPS:
            tensor = producers[tensor].input[0]
        return tensor

    for node in graph.node:
        if node.op_type == "LayerNormalization":
            return behind_layout(node.input[0])
    for node in graph.node:
        if node.op_type not in ("MatMul", "Gemm") or node.input[0] in constants:
            continue
        if constants & set(node.input[1:]):
            return behind_layout(node.input[0])
    convs = [node for node in graph.node if node.op_type == "Conv"]
    if not convs:
        raise QuantizeError("graph has neither a LayerNormalization nor a Conv: not a CMN")
    return convs[-1].output[0]


def nodes_after(graph: onnx.GraphProto, tensor: str) -> list[onnx.NodeProto]:
    """Every node that depends on ``tensor`` (the graph is topologically sorted)."""
    reached, found = {tensor}, []
    for node in graph.node:
        if any(name in reached for name in node.input):
            found.append(node)
            reached.update(node.output)
    return found


def shape_arithmetic_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Nodes that compute from shapes and constants only (e.g. timm's dynamic SAME padding).

    Their float maths yields integer pad sizes; rounding it to 8 bits changes the padding
    and with it the size of every later feature map, so it must never be quantized.
    """
    data = {i.name for i in graph.input} - {i.name for i in graph.initializer}
    found = []
    for node in graph.node:
        if node.op_type in ("Shape", "Size"):
            continue  # outputs metadata, not data
        if any(name in data for name in node.input):
            data.update(node.output)
        elif node.op_type != "Constant":
            found.append(node)
    return found


@dataclass(frozen=True)
class FloatPlan:
    """What quantize_static is told to leave alone, and why."""

    feature: str  # the backbone's feature map tensor
    shape_nodes: list[str]  # shape arithmetic: never quantized
    head_nodes: list[str]  # nodes after the feature map kept float (float_head)
    op_types: list[str]  # op types quantize_static may quantize

    @property
    def excluded(self) -> list[str]:
        return self.shape_nodes + self.head_nodes


def float_plan(model: onnx.ModelProto, options: QuantizeOptions) -> FloatPlan:
    """Decide which nodes stay float; unnamed nodes get names so they can be excluded."""
    graph = model.graph
    unnamed = [n for n in graph.node if not n.name]
    for index, node in enumerate(unnamed):
        node.name = f"{node.op_type}_unnamed_{index}"
    feature = backbone_output(graph)
    shape_nodes = [n.name for n in shape_arithmetic_nodes(graph)]
    head_nodes: list[str] = []
    if options.float_head:
        keep, skip = set(options.head_op_types), set(shape_nodes)
        constants = {i.name for i in graph.initializer}

        def quantized_in_head(node: onnx.NodeProto) -> bool:
            if node.op_type in keep:
                return True
            projection = node.op_type in ("MatMul", "Gemm")
            return options.head_projections and projection and bool(constants & set(node.input))

        head_nodes = [
            n.name
            for n in nodes_after(graph, feature)
            if n.name not in skip and not quantized_in_head(n)
        ]
    # The structural-matching output (pooling and normalising cosines) always stays float;
    # with float_head most of its nodes are listed already.
    listed = set(head_nodes)
    head_nodes += [
        n.name for n in graph.node if n.name.startswith(REGION_NODE_PREFIX) and n.name not in listed
    ]
    present = {n.op_type for n in graph.node}
    op_types = sorted(present - set(options.float_op_types))
    return FloatPlan(feature, shape_nodes, head_nodes, op_types)


def runs_in_int8(node: onnx.NodeProto, producers: dict[str, str], consumers: dict) -> bool:
    """In QDQ form onnxruntime runs a node on integers when it reads DequantizeLinear outputs
    and its results go straight to QuantizeLinear (DQ -> op -> Q is fused), or when it is a
    MatMul/Gemm on dequantized inputs (fused to MatMulIntegerToFloat). A float op that merely
    reads a dequantized tensor still computes in float."""
    if node.op_type.startswith("QLinear") or "Integer" in node.op_type:
        return True  # QOperator form
    if not any(producers.get(name) == "DequantizeLinear" for name in node.input):
        return False
    if node.op_type in ("MatMul", "Gemm"):
        return True
    return all(
        consumers.get(out) and all(kind == "QuantizeLinear" for kind in consumers[out])
        for out in node.output
    )


def float_compute_nodes(model: onnx.ModelProto) -> dict[str, list[str]]:
    """op type -> names of the compute nodes that run in float in a quantized graph."""
    producers = {out: node.op_type for node in model.graph.node for out in node.output}
    consumers: dict[str, list[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.op_type)
    found: dict[str, list[str]] = {}
    for node in model.graph.node:
        if node.op_type in _NOT_COMPUTE or runs_in_int8(node, producers, consumers):
            continue
        found.setdefault(node.op_type, []).append(node.name)
    return found


# --- quantization ---------------------------------------------------------------------------


def _stride(batches: int, most: int = 4) -> int:
    """Largest divisor of ``batches`` up to ``most``: calibrate in slices to bound memory."""
    return max(d for d in range(1, min(most, batches) + 1) if batches % d == 0)


def _quantize_once(
    pre: Path,
    out: Path,
    reader: ImageCalibrationReader,
    method: str,
    options: QuantizeOptions,
    plan: FloatPlan,
) -> dict:
    """quantize_static, then the GEMMs' 7-bit GPTQ weights if asked; returns the latter's
    record."""
    reader.rewind()
    extra: dict[str, Any] = {"CalibStridedMinMax": _stride(len(reader))}
    if method == "percentile":
        extra["CalibPercentile"] = options.percentile
    extra.update(options.extra_options)
    # The histogram calibrators print progress to stdout; keep the CLI's output to its summary.
    with contextlib.redirect_stdout(io.StringIO()):
        quantize_static(
            str(pre),
            str(out),
            reader,
            quant_format=FORMATS[options.quant_format],
            op_types_to_quantize=plan.op_types,
            per_channel=options.per_channel,
            reduce_range=options.reduce_range,
            activation_type=TYPES[options.activation_type],
            weight_type=TYPES[options.weight_type],
            nodes_to_exclude=plan.excluded,
            calibrate_method=METHODS[method],
            extra_options=extra,
        )
    if options.gemm_bits == 7:
        quantized = onnx.load(str(out))
        batches = (reader.batch(i) for i in range(len(reader)))
        record = requantize_gemms(quantized, onnx.load(str(pre)), batches)
        onnx.save(quantized, str(out))
        return record
    return {"gemm_weight_bits": 8}


def _session(path: Path, threads: int | None, saturating: bool) -> ort.InferenceSession:
    """As the runtime loads it, so the check measures what users get on this CPU (the
    metadata, which says whether the GEMM weights saturate U8S8, is written later)."""
    return ort.InferenceSession(
        str(path),
        session_options(threads, saturating_int8=saturating),
        providers=["CPUExecutionProvider"],
    )


def embedding_cosines(
    fp32: ort.InferenceSession, int8: ort.InferenceSession, batches: list[np.ndarray]
) -> np.ndarray:
    """Per-image cosine between the two models' embeddings."""
    out = []
    for batch in batches:
        (a,) = fp32.run([OUTPUT_EMBEDDING], {INPUT_NAME: batch})
        (b,) = int8.run([OUTPUT_EMBEDDING], {INPUT_NAME: batch})
        norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        out.append((a * b).sum(1) / np.maximum(norms, 1e-12))
    return np.concatenate(out)


def quantize(
    fp32_path: str | Path,
    out_path: str | Path,
    calibration: str | Path | Sequence[str | Path],
    split: str = "train",
    count: int = 256,
    check_count: int = 32,
    seed: int = 0,
    options: QuantizeOptions | None = None,
    threads: int | None = None,
) -> QuantizeResult:
    """Quantize ``fp32_path`` to ``out_path``, calibrated on ``count`` images of ``split``.

    ``check_count`` further images of the same split (never test images) measure the
    INT8-vs-FP32 embedding cosine, which picks the method when ``options.method == "auto"``
    and is recorded in the metadata.
    """
    options = options or QuantizeOptions()
    options.check()
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    if not fp32_path.is_file():
        raise QuantizeError(f"{fp32_path}: model not found")
    metadata = read_metadata(fp32_path)
    if metadata.precision != "fp32":
        raise QuantizeError(f"{fp32_path}: model is already {metadata.precision}, not fp32")
    if fp32_path.resolve() == out_path.resolve():
        raise QuantizeError(f"{out_path}: output would overwrite the FP32 input")
    if options.method == "auto" and check_count < 1:
        raise ValueError("method 'auto' needs check images (check_count >= 1)")
    roots = [calibration] if isinstance(calibration, (str, Path)) else list(calibration)
    if not roots:
        raise ValueError("no calibration dataset given")
    paths = pick_images(roots, split, count + check_count, seed)
    if check_count and len(paths) < 2:
        raise QuantizeError(f"{roots[0]}: need at least 2 {split} images to calibrate and check")
    # Calibrate and check on disjoint images; with a small set the check takes at most half.
    held = min(check_count, len(paths) // 2)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(paths))
    check_paths = sorted(paths[i] for i in order[:held])
    calib_paths = sorted(paths[i] for i in order[held:][:count])
    reader = ImageCalibrationReader(calib_paths, metadata.preprocess)
    check_batches = []
    if check_paths:
        checker = ImageCalibrationReader(check_paths, metadata.preprocess)
        check_batches = [checker.batch(i) for i in range(len(checker))]

    methods = list(METHODS) if options.method == "auto" else [options.method]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cmn-quant-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32_path), str(pre))
        pre_model = onnx.load(str(pre))
        plan = float_plan(pre_model, options)
        onnx.save(pre_model, str(pre))  # node names filled in where missing
        fp32_session = _session(fp32_path, threads, False) if check_batches else None
        saturating = options.gemm_bits == 8 and not options.reduce_range
        tried: dict[str, dict[str, float]] = {}
        best: tuple[float, str, Path, dict] | None = None
        for method in methods:
            candidate = Path(tmp) / f"{method}.onnx"
            gemms = _quantize_once(pre, candidate, reader, method, options, plan)
            score = 0.0
            if check_batches:
                session = _session(candidate, threads, saturating)
                cos = embedding_cosines(fp32_session, session, check_batches)
                tried[method] = {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min())}
                score = float(cos.mean())
            if best is None or score > best[0]:
                best = (score, method, candidate, gemms)
        assert best is not None
        _, method, chosen, gemms = best
        quantized = onnx.load(str(chosen))
        floats = float_compute_nodes(quantized)
        record = {
            "tool": f"onnxruntime {ort.__version__} quantize_static after quant_pre_process",
            "format": {"qdq": "QDQ", "qoperator": "QOperator"}[options.quant_format],
            "activation_type": options.activation_type,
            "weight_type": options.weight_type,
            "per_channel": options.per_channel,
            "reduce_range": options.reduce_range,
            **gemms,
            "calibration": {
                "data": ", ".join(str(r) for r in roots),
                "split": split,
                "count": len(calib_paths),
                "method": method,
                "percentile": options.percentile if method == "percentile" else None,
                "seed": seed,
                "images_sha256": images_digest(calib_paths),
            },
            "float_op_types": sorted(options.float_op_types),
            "float_head": options.float_head,
            "head_op_types_quantized": sorted(options.head_op_types),
            "head_projections_quantized": options.head_projections,
            "float_from_tensor": plan.feature if options.float_head else None,
            "float_nodes": {
                "concept_head": plan.head_nodes,
                "shape_arithmetic": plan.shape_nodes,
            },
            "float_compute_nodes": floats,
            "check": {
                "images": len(check_paths),
                "split": split,
                "kernel_path": this_cpu().kernel_path,
                **tried.get(method, {}),
            },
            "tried": tried,
        }
        if options.extra_options:
            record["extra_options"] = {k: str(v) for k, v in options.extra_options.items()}
        new_meta = replace(metadata, precision="int8", quantization=record)
        write_metadata(quantized, new_meta)
        onnx.checker.check_model(quantized)
        from cmn_edge.files import atomic_write

        with atomic_write(out_path) as handle:
            handle.write(quantized.SerializeToString())  # onnx.save takes the handle.name as a path
    return QuantizeResult(out_path, new_meta, tried)


def summary(result: QuantizeResult) -> str:
    """A few lines for the CLI."""
    q = result.metadata.quantization
    calib = q["calibration"]
    lines = [
        f"wrote {result.path} ({result.path.stat().st_size / 1e6:.1f} MB)",
        f"calibration: {calib['count']} {calib['split']} images of {calib['data']}, "
        f"method {calib['method']}",
        f"float op types: {', '.join(q['float_op_types'])}",
        f"float: {len(q['float_nodes']['concept_head'])} head nodes after "
        f"{q['float_from_tensor']}, {len(q['float_nodes']['shape_arithmetic'])} shape-arithmetic "
        "nodes",
        "float compute nodes: "
        + ", ".join(f"{k} x{len(v)}" for k, v in sorted(q["float_compute_nodes"].items())),
        f"GEMM weights: {q.get('gemm_weight_bits', 8)}-bit"
        + (
            f" (GPTQ, {q['gemms_requantized']} GEMMs; U8S8 cannot saturate on any CPU)"
            if q.get("gemm_weight_bits") == 7
            else " (U8S8 saturates on x86 without VNNI: loaded there with the U8U8 rewrite)"
        ),
    ]
    for method, scores in result.tried.items():
        mark = " (kept)" if method == calib["method"] else ""
        lines.append(
            f"check on {q['check']['images']} held-out {calib['split']} images, {method}: "
            f"cosine to FP32 mean {scores['mean_cosine']:.4f} min {scores['min_cosine']:.4f}" + mark
        )
    return "\n".join(lines)


__all__ = [
    "DEFAULT_FLOAT_OP_TYPES",
    "QuantizeError",
    "QuantizeOptions",
    "QuantizeResult",
    "backbone_output",
    "embedding_cosines",
    "float_compute_nodes",
    "float_plan",
    "nodes_after",
    "quantize",
    "summary",
]
