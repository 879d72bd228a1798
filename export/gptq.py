"""7-bit GEMM weights by GPTQ: an INT8 file that is exact on every CPU and as fast as U8S8.

Why: on x86-64 without VNNI, onnxruntime's U8S8 GEMM kernels add pairs of u8 x s8 products
in 16-bit lanes (VPMADDUBSW). With 8-bit weights a pair can reach 255 * 127 * 2 = 64,770
and saturates at 32,767; ``benchmarks/saturation.py`` finds it in every 1x1 conv of the
shipped model. With weights in [-64, 64] a pair is at most 32,640, so the integer results
are exact on every kernel path, and no load-time U8U8 rewrite (half the speed) is needed.
Rounding to 7 bits naively costs fidelity (embedding cosine 0.981); GPTQ (Frantar et al.,
ICLR 2023) rounds one input column at a time and moves each column's rounding error onto the
columns not yet rounded, weighted by the layer's input Hessian X^T X from calibration images,
which brings it back to the 8-bit level (0.997).

Only the GEMMs are requantized: 1x1 and regular convs and MatMuls with a constant weight.
Depthwise convs run on a kernel that widens to 32 bits, so they keep their 8-bit weights.

Written by hand: onnxruntime's GPTQ (``matmul_4bits_quantizer``) only writes 4-bit
MatMulNBits nodes, and neither it nor a maintained library requantizes QDQ convs.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from cmn_edge.cpu import X64_QUANT_PRECISION
from cmn_edge.metadata import INPUT_NAME

#: the largest |weight| that cannot saturate a VPMADDUBSW pair: 255 * 64 * 2 = 32,640
QMAX_7BIT = 64
_INT32_MAX = 2**31 - 1


@dataclass
class GemmLayer:
    """A U8S8 GEMM of a QDQ graph and the initializers that hold its quantized weights."""

    node: onnx.NodeProto
    weight: str  # int8 initializer
    weight_scale: str
    activation: str  # the u8 tensor the GEMM reads
    activation_scale: str
    activation_zero_point: str
    bias: str | None = None  # int32 initializer (convs)
    bias_scale: str | None = None

    @property
    def float_weight(self) -> str:
        """The float initializer's name in the pre-processed model (quantize_static's rule)."""
        return self.weight.removesuffix("_quantized")


def gemm_layers(model: onnx.ModelProto) -> list[GemmLayer]:
    """Every Conv (not depthwise) and MatMul whose weight is a dequantized int8 constant and
    whose input is a dequantized u8 activation."""
    initializers = {i.name: i for i in model.graph.initializer}
    producer = {out: node for node in model.graph.node for out in node.output}
    layers = []
    for node in model.graph.node:
        if node.op_type not in ("Conv", "MatMul"):
            continue
        weight_dq, input_dq = producer.get(node.input[1]), producer.get(node.input[0])
        if not (weight_dq and input_dq):
            continue
        if weight_dq.op_type != "DequantizeLinear" or input_dq.op_type != "DequantizeLinear":
            continue
        weight = initializers.get(weight_dq.input[0])
        if weight is None or weight.data_type != onnx.TensorProto.INT8:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Conv" and attrs.get("group", 1) != 1:
            continue  # depthwise: no 16-bit pair sums
        layer = GemmLayer(
            node=node,
            weight=weight_dq.input[0],
            weight_scale=weight_dq.input[1],
            activation=input_dq.input[0],
            activation_scale=input_dq.input[1],
            activation_zero_point=input_dq.input[2],
        )
        if node.op_type == "Conv" and len(node.input) > 2 and node.input[2]:
            bias_dq = producer.get(node.input[2])
            if bias_dq is not None and bias_dq.op_type == "DequantizeLinear":
                layer.bias, layer.bias_scale = bias_dq.input[0], bias_dq.input[1]
        layers.append(layer)
    return layers


def im2col(x: np.ndarray, node: onnx.NodeProto, pad_value: float = 0.0) -> np.ndarray:
    """[B, C, H, W] -> [positions, C * kh * kw], in the order of the conv weight's columns."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    kh, kw = attrs.get("kernel_shape", [1, 1])
    sh, sw = attrs.get("strides", [1, 1])
    if attrs.get("dilations", [1, 1]) != [1, 1]:
        raise ValueError(f"{node.name}: dilated convs are not supported")
    if (kh, kw, sh, sw) == (1, 1, 1, 1):
        return x.transpose(0, 2, 3, 1).reshape(-1, x.shape[1])
    top, left, bottom, right = attrs.get("pads", [0, 0, 0, 0])
    x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)), constant_values=pad_value)
    windows = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))
    windows = windows[:, :, ::sh, ::sw]  # B, C, Ho, Wo, kh, kw
    return windows.transpose(0, 2, 3, 1, 4, 5).reshape(-1, x.shape[1] * kh * kw)


def gemm_inputs(
    model: onnx.ModelProto, layers: list[GemmLayer], batches: Iterable[np.ndarray]
) -> Iterator[dict[str, np.ndarray]]:
    """Per batch, each layer's u8 input as the 8-bit graph computes it exactly (the U8U8
    rewrite on, so the values are the ones a VNNI machine computes)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    names = sorted({layer.activation for layer in layers})
    outputs = {o.name for o in probe.graph.output}
    for name in names:
        if name not in outputs:
            probe.graph.output.append(
                onnx.helper.make_tensor_value_info(name, onnx.TensorProto.UINT8, None)
            )
    options = ort.SessionOptions()
    options.add_session_config_entry(X64_QUANT_PRECISION, "1")
    # keep the Q/DQ pairs whose u8 tensors are read out
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        probe.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    for batch in batches:
        yield dict(zip(names, session.run(names, {INPUT_NAME: batch})))


def layer_rows(layer: GemmLayer, x: np.ndarray, pad_value: float = 0.0) -> np.ndarray:
    """A layer's input [.., K] as the rows its GEMM multiplies by the weight's columns."""
    if layer.node.op_type == "Conv":
        return im2col(x, layer.node, pad_value)
    return x.reshape(-1, x.shape[-1])


def input_hessians(
    model: onnx.ModelProto, layers: list[GemmLayer], batches: Iterable[np.ndarray]
) -> dict[str, np.ndarray]:
    """X^T X of each layer's dequantized input over the calibration batches."""
    initializers = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    hessians: dict[str, np.ndarray] = {}
    for values in gemm_inputs(model, layers, batches):
        for layer in layers:
            scale = initializers[layer.activation_scale].astype(np.float64)
            zero = initializers[layer.activation_zero_point].astype(np.float64)
            rows = layer_rows(layer, (values[layer.activation].astype(np.float64) - zero) * scale)
            gram = rows.T @ rows
            name = layer.node.name
            hessians[name] = hessians[name] + gram if name in hessians else gram
    return hessians


def gptq(
    weight: np.ndarray,
    hessian: np.ndarray,
    qmax: int = QMAX_7BIT,
    damp: float = 0.01,
    per_row: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Integer weights in [-qmax, qmax] and per-row scales for ``weight`` [rows, K] (rows:
    output channels), given the input Hessian [K, K]: GPTQ with columns in decreasing order
    of their Hessian diagonal ("act order") and ``damp`` times the mean diagonal added.
    With ``per_row`` False every row gets the one scale of a per-tensor quantization.

    Columns never active in calibration are rounded as they are (their error is not spread,
    and they are not zeroed: other images do use them).
    """
    weight = np.asarray(weight, dtype=np.float64)
    hessian = np.array(hessian, dtype=np.float64)
    rows, k = weight.shape
    scale = np.abs(weight).max(axis=1) / qmax
    if not per_row:
        scale[:] = scale.max()
    scale[scale == 0] = 1.0  # an all-zero row stays zero at any scale
    dead = np.diag(hessian) == 0
    hessian[dead, dead] = 1.0
    order = np.argsort(-np.diag(hessian), kind="stable")
    work = weight[:, order].copy()
    hessian = hessian[order][:, order]
    hessian += damp * np.mean(np.diag(hessian)) * np.eye(k)
    # upper Cholesky factor of H^-1: row j holds how column j's error moves later columns
    upper = np.linalg.cholesky(np.linalg.inv(hessian)).T
    quantized = np.zeros_like(work)
    for j in range(k):
        column = work[:, j]
        q = np.clip(np.round(column / scale), -qmax, qmax)
        quantized[:, j] = q
        error = (column - q * scale) / upper[j, j]
        work[:, j + 1 :] -= np.outer(error, upper[j, j + 1 :])
    return quantized[:, np.argsort(order)], scale


def as_rows(weight: np.ndarray, op_type: str) -> np.ndarray:
    """Conv [O, I, kh, kw] and MatMul [K, N] weights as [outputs, inputs]."""
    return weight.reshape(weight.shape[0], -1) if op_type == "Conv" else weight.T


def requantize_gemms(
    quantized: onnx.ModelProto,
    float_model: onnx.ModelProto,
    batches: Iterable[np.ndarray],
    qmax: int = QMAX_7BIT,
) -> dict:
    """Rewrite, in place, the int8 weights (and scales, and the int32 biases that depend on
    them) of every GEMM of ``quantized`` as GPTQ ``qmax`` weights of ``float_model``'s float
    weights. Returns what goes in the quantization record."""
    layers = gemm_layers(quantized)
    floats = {i.name: i for i in float_model.graph.initializer}
    missing = [layer.float_weight for layer in layers if layer.float_weight not in floats]
    if missing:
        raise ValueError(f"float weights not found for {', '.join(missing[:3])}")
    hessians = input_hessians(quantized, layers, batches)
    initializers = {i.name: i for i in quantized.graph.initializer}

    def array(name: str) -> np.ndarray:
        return numpy_helper.to_array(initializers[name])

    def put(name: str, value: np.ndarray) -> None:
        initializers[name].CopyFrom(numpy_helper.from_array(value, name))

    widened = 0
    for layer in layers:
        op = layer.node.op_type
        weight = numpy_helper.to_array(floats[layer.float_weight]).astype(np.float64)
        rows = as_rows(weight, op)
        old_scale = array(layer.weight_scale)
        q, scale = gptq(rows, hessians[layer.node.name], qmax, per_row=old_scale.size > 1)
        if layer.bias is not None:
            float_bias = array(layer.bias).astype(np.float64) * array(layer.bias_scale)
            input_scale = float(array(layer.activation_scale))
            # the int32 bias holds b / (s_x * s_w): a near-dead channel with a large bias
            # needs a wider weight scale (its weights round to about zero either way)
            floor = np.abs(float_bias) / (input_scale * _INT32_MAX) * 1.01
            narrow = scale < floor
            if narrow.any():
                widened += int(narrow.sum())
                if old_scale.size == 1:  # one scale for the tensor: widen it for every row
                    narrow[:] = True
                    floor[:] = max(floor.max(), scale.max())
                scale = np.where(narrow, floor, scale)
                q[narrow] = np.clip(np.round(rows[narrow] / scale[narrow, None]), -qmax, qmax)
            bias_scale = (input_scale * scale).astype(array(layer.bias_scale).dtype)
            put(layer.bias, np.round(float_bias / bias_scale).astype(np.int32))
            put(layer.bias_scale, bias_scale)
        q_weight = q.reshape(weight.shape) if op == "Conv" else q.T
        put(layer.weight, q_weight.astype(np.int8))
        kept = scale if old_scale.size > 1 else scale[:1]
        put(layer.weight_scale, kept.astype(old_scale.dtype).reshape(old_scale.shape))
    return {
        "gemm_weight_bits": 7,
        "gemm_weight_range": [-qmax, qmax],
        "gemm_rounding": "GPTQ (act order, damp 0.01) on the calibration images",
        "gemms_requantized": len(layers),
        "channels_widened_for_int32_bias": widened,
    }
