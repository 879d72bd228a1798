"""The CPU's INT8 kernel path: read from feature flags, then checked against onnxruntime itself.

The probe graphs multiply u8 255s by s8 127s: exact integer maths gives K * 255 * 127, while
a kernel that adds pairs of products in saturating 16-bit lanes (VPMADDUBSW, x86 without
VNNI) gives K / 2 * 32767. Whatever CPU CI lands on, the flags must predict what the
kernels do, and the session options the runtime uses must give the exact answer.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from cmn_edge.cpu import KERNEL_PATHS, X64_QUANT_PRECISION, detect, this_cpu  # noqa: E402
from cmn_edge.embedder import open_session, session_options, u8u8_rewrite_on  # noqa: E402
from cmn_edge.registry import choose_precision  # noqa: E402

K = 64
EXACT = K * 255 * 127
SATURATED = (K // 2) * 32767

INTEL_VNNI = "model name\t: Intel(R) Xeon(R) 8375C\nflags\t\t: sse4_1 avx2 avx512f avx512_vnni\n"
AMD_AVX2 = "model name\t: AMD EPYC 7763\nflags\t\t: fpu sse4_1 avx2 fma\n"
ALDER_LAKE = "model name\t: 12th Gen Intel(R) Core(TM) i7\nflags\t\t: sse4_1 avx2 avx_vnni\n"
OLD_X86 = "model name\t: Intel(R) Atom\nflags\t\t: sse sse2 ssse3 sse4_1\n"
PI5 = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes crc32 atomics asimdrdm lrcpc asimddp\n"
PI3 = "processor\t: 0\nFeatures\t: fp asimd evtstrm crc32 cpuid\n"


@pytest.mark.parametrize(
    ("text", "machine", "path", "config"),
    [
        (INTEL_VNNI, "x86_64", "x86-vnni", {}),
        (ALDER_LAKE, "x86_64", "x86-vnni", {}),
        (AMD_AVX2, "x86_64", "x86-avx2", {X64_QUANT_PRECISION: "1"}),
        (OLD_X86, "AMD64", "x86-sse", {X64_QUANT_PRECISION: "1"}),
        (PI5, "aarch64", "arm64-dot", {}),
        (PI3, "aarch64", "arm64", {}),
        ("", "riscv64", "unknown", {}),
    ],
)
def test_kernel_path_from_flags(text, machine, path, config, monkeypatch) -> None:
    monkeypatch.delenv("CMN_EDGE_CPU_FLAGS", raising=False)
    cpu = detect(text, machine)
    assert cpu.kernel_path == path
    assert cpu.session_config(saturating_int8=True) == config
    assert cpu.session_config(saturating_int8=False) == {}
    assert path in cpu.describe()


def test_auto_precision_never_picks_an_unvalidated_int8(monkeypatch) -> None:
    monkeypatch.delenv("CMN_EDGE_CPU_FLAGS", raising=False)
    assert choose_precision("auto", detect(AMD_AVX2, "x86_64")) == "int8"
    assert choose_precision("auto", detect(PI5, "aarch64")) == "int8"
    assert choose_precision("auto", detect("", "riscv64")) == "fp32"
    assert not KERNEL_PATHS["unknown"][0]
    assert choose_precision("fp32", detect(INTEL_VNNI, "x86_64")) == "fp32"
    with pytest.raises(ValueError, match="precision must be one of"):
        choose_precision("int4")


def test_flags_override_for_emulators(monkeypatch) -> None:
    monkeypatch.setenv("CMN_EDGE_CPU_FLAGS", "avx2 avx512_vnni")
    cpu = detect(AMD_AVX2, "x86_64")
    assert cpu.kernel_path == "x86-vnni" and cpu.source == "CMN_EDGE_CPU_FLAGS"


def _matmul_integer() -> bytes:
    a = helper.make_tensor_value_info("a", TensorProto.UINT8, [4, K])
    y = helper.make_tensor_value_info("y", TensorProto.INT32, [4, 16])
    weight = numpy_helper.from_array(np.full((K, 16), 127, np.int8), "w")
    node = helper.make_node("MatMulInteger", ["a", "w"], ["y"])
    graph = helper.make_graph([node], "probe", [a], [y], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    return model.SerializeToString()


def _qdq_conv() -> bytes:
    """A 1x1 convolution in the QDQ form `cmn-export quantize` writes (fused to QLinearConv)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, K, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 4, 4])
    inits = [
        numpy_helper.from_array(np.array(1.0, np.float32), "xs"),
        numpy_helper.from_array(np.array(0, np.uint8), "xz"),
        numpy_helper.from_array(np.full((8, K, 1, 1), 127, np.int8), "wq"),
        numpy_helper.from_array(np.ones(8, np.float32), "ws"),
        numpy_helper.from_array(np.zeros(8, np.int8), "wz"),
        numpy_helper.from_array(np.array(10000.0, np.float32), "ys"),
        numpy_helper.from_array(np.array(0, np.uint8), "yz"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
        helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=0),
        helper.make_node("Conv", ["xd", "wd"], ["c"]),
        helper.make_node("QuantizeLinear", ["c", "ys", "yz"], ["cq"]),
        helper.make_node("DequantizeLinear", ["cq", "ys", "yz"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "probe", [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    return model.SerializeToString()


def _run(model: bytes, options: ort.SessionOptions, feed: dict) -> np.ndarray:
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    return session.run(None, feed)[0]


def _plain() -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


def test_runtime_int8_is_exact_on_this_cpu(tmp_path) -> None:
    """What the runtime runs: exact integer results on this machine, whatever its ISA. The
    probes have 8-bit weights and no cmn-edge metadata, so ``open_session`` must treat them
    as saturating (the bundled file's 7-bit weights are ``tests/test_gptq.py``'s)."""
    a = np.full((4, K), 255, np.uint8)
    saturating = session_options(saturating_int8=True)
    assert (_run(_matmul_integer(), saturating, {"a": a}) == EXACT).all()
    x = np.full((1, K, 4, 4), 255.0, np.float32)
    conv = _run(_qdq_conv(), saturating, {"x": x})
    # QLinearConv requantizes to u8 with scale 10000: exact 2072640 -> 207, saturated -> 105
    assert np.allclose(conv, round(EXACT / 10000) * 10000)
    probe = tmp_path / "probe.onnx"
    probe.write_bytes(_qdq_conv())
    session = open_session(probe)
    assert u8u8_rewrite_on(session) == this_cpu().needs_u8u8
    assert np.allclose(session.run(None, {"x": x})[0], round(EXACT / 10000) * 10000)


def test_flags_predict_what_the_kernels_do() -> None:
    """Without the runtime's session config, U8S8 saturates exactly where the flags say."""
    a = np.full((4, K), 255, np.uint8)
    plain = _run(_matmul_integer(), _plain(), {"a": a})
    x = np.full((1, K, 4, 4), 255.0, np.float32)
    conv = _run(_qdq_conv(), _plain(), {"x": x})
    if this_cpu().needs_u8u8:
        assert (plain == SATURATED).all(), "flags say U8S8 saturates here, the kernel did not"
        assert np.allclose(conv, round(SATURATED / 10000) * 10000)
    else:
        assert (plain == EXACT).all(), f"{this_cpu().describe()}, but U8S8 saturated"
        assert np.allclose(conv, round(EXACT / 10000) * 10000)
