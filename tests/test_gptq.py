"""7-bit GEMM weights by GPTQ (``export/gptq.py``): the rounding itself on hand-made layers,
and the bundled INT8 file, which must run exactly on this CPU without any rewrite.

On x86 without VNNI, 8-bit weights saturate onnxruntime's U8S8 kernels (``test_cpu.py``);
7-bit weights cannot. So the bundled file, run plainly, must give the same embeddings as the
exact U8U8 rewrite, whatever ISA CI lands on.
"""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime.quantization")

from cmn_edge import preprocess as pp  # noqa: E402
from cmn_edge.cpu import X64_QUANT_PRECISION, this_cpu  # noqa: E402
from cmn_edge.embedder import Embedder, session_options, u8u8_rewrite_on  # noqa: E402
from cmn_edge.registry import resolve_model_path  # noqa: E402
from cmn_export.gptq import QMAX_7BIT, gemm_layers, gptq  # noqa: E402
from cmn_export.onnx_export import read_metadata, write_metadata  # noqa: E402


def _layer(seed: int = 0, rows: int = 24, k: int = 48):
    """Weights and inputs with correlated columns, as a conv's channels are."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(k, k)) * (rng.random(k) < 0.3)[:, None] + np.eye(k)
    x = rng.normal(size=(2000, k)) @ mixing
    return rng.normal(size=(rows, k)), x


def _output_error(weight, q, scale, x) -> float:
    return float(np.linalg.norm(x @ (weight - q * scale[:, None]).T))


def test_gptq_rounds_to_7_bits_with_less_output_error_than_rounding():
    weight, x = _layer()
    q, scale = gptq(weight, x.T @ x)
    assert np.array_equal(q, np.round(q)) and np.abs(q).max() == QMAX_7BIT
    rounded = np.clip(np.round(weight / scale[:, None]), -QMAX_7BIT, QMAX_7BIT)
    assert _output_error(weight, q, scale, x) < 0.7 * _output_error(weight, rounded, scale, x)


def test_columns_never_active_in_calibration_keep_their_weights():
    """Another image may use a channel the calibration never lit: its weights are rounded,
    not zeroed (zeroing them cost one caltech97 class 0.08 of cosine)."""
    weight, x = _layer(1)
    x[:, 5] = 0
    q, scale = gptq(weight, x.T @ x)
    expected = np.clip(np.round(weight[:, 5] / scale), -QMAX_7BIT, QMAX_7BIT)
    assert np.array_equal(q[:, 5], expected) and np.abs(expected).sum() > 0


def test_one_scale_per_tensor_when_asked():
    weight, x = _layer(2)
    q, scale = gptq(weight, x.T @ x, per_row=False)
    assert np.all(scale == scale[0]) and np.abs(q).max() == QMAX_7BIT


@pytest.fixture(scope="module")
def bundled_int8():
    return resolve_model_path(None, "int8")


def test_bundled_int8_gemm_weights_cannot_saturate(bundled_int8):
    meta = read_metadata(bundled_int8)
    assert meta.quantization["gemm_weight_bits"] == 7 and not meta.saturates_u8s8
    model = onnx.load(str(bundled_int8))
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    layers = gemm_layers(model)
    assert len(layers) == meta.quantization["gemms_requantized"] == 36
    assert all(np.abs(weights[layer.weight]).max() <= QMAX_7BIT for layer in layers)


def test_bundled_int8_runs_exactly_without_the_rewrite_on_this_cpu(bundled_int8, photos):
    """Plain kernels (U8S8 wherever onnxruntime picks it) equal the exact rewrite, and the
    runtime loads the file plainly."""
    import onnxruntime as ort

    meta = read_metadata(bundled_int8)
    batch = np.stack([pp.load(p, meta.preprocess) for p in photos.values()])

    def run(options):
        session = ort.InferenceSession(str(bundled_int8), options, ["CPUExecutionProvider"])
        return session.run(["embedding"], {"images": batch})[0]

    exact = session_options(saturating_int8=True)
    exact.add_session_config_entry(X64_QUANT_PRECISION, "1")  # on every CPU, VNNI too
    plain = session_options(saturating_int8=False)
    np.testing.assert_allclose(run(plain), run(exact), atol=1e-6, err_msg=this_cpu().describe())
    assert not u8u8_rewrite_on(Embedder(bundled_int8, precision="int8", threads=1).session)


@pytest.mark.parametrize(("flags", "rewrite"), [("avx2", True), ("avx2 avx512_vnni", False)])
def test_an_8_bit_int8_file_gets_the_rewrite_only_where_u8s8_saturates(
    bundled_int8, tmp_path, monkeypatch, request, flags, rewrite
):
    """Older and user-made INT8 files (8-bit GEMM weights, nothing recorded) still load with
    the exact U8U8 rewrite on x86 without VNNI; a 7-bit file never does."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the flags override describes an x86 CPU")
    model = onnx.load(str(bundled_int8))
    meta = read_metadata(bundled_int8)
    quantization = {k: v for k, v in meta.quantization.items() if k != "gemm_weight_bits"}
    from dataclasses import replace

    write_metadata(model, replace(meta, quantization=quantization))
    older = tmp_path / "older.int8.onnx"
    onnx.save(model, str(older))
    monkeypatch.setenv("CMN_EDGE_CPU_FLAGS", flags)
    this_cpu.cache_clear()  # read once per process; the override is read afresh here
    request.addfinalizer(this_cpu.cache_clear)
    assert u8u8_rewrite_on(Embedder(older, precision="int8", threads=1).session) == rewrite
    assert not u8u8_rewrite_on(Embedder(bundled_int8, precision="int8", threads=1).session)
