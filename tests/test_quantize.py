"""`cmn-export quantize` and `cmn-export validate` on a CMN with the pretrained Lite0 backbone.

The module builds one model the way a user would: checkpoint -> `onnx` -> `quantize`
(calibrated on variants of the example photos) -> `validate`, and checks what each step
promises: INT8 embeddings close to FP32 on real photos, the concept head left in float and
recorded as such, a report with parity, fidelity, Recall@K, sizes and latency.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from click.testing import CliRunner  # noqa: E402

from cmn_edge import preprocess as pp  # noqa: E402
from cmn_edge.embedder import open_session  # noqa: E402
from cmn_export.checkpoint import CHECKPOINT_FORMAT  # noqa: E402
from cmn_export.cli import main  # noqa: E402
from cmn_export.gptq import gemm_layers  # noqa: E402
from cmn_export.model import CMN  # noqa: E402
from cmn_export.onnx_export import read_metadata  # noqa: E402
from cmn_export.quantize import QuantizeOptions, embedding_cosines, quantize  # noqa: E402
from cmn_export.train import TrainConfig  # noqa: E402

#: A correct INT8 model of a CMN with 512 concepts keeps every photo's embedding this close to
#: FP32 (measured with this module's untrained head and 12 calibration images: mean 0.966,
#: worst 0.897 with the default 7-bit GEMM weights, 0.972 / 0.944 with 8-bit ones; ~0.997
#: once trained and calibrated on 256 images), while per-tensor weights (mean ~0.7) or
#: mis-quantized padding arithmetic (~0.75) fall far below.
MEAN_COSINE = 0.95
MIN_COSINE = 0.88


def _variants(photos: dict[str, Path], root: Path) -> Path:
    """A <class>/<img> tree of altered copies of the photos: calibration never sees the
    originals the fidelity is measured on."""
    from PIL import Image, ImageEnhance, ImageOps

    for name, path in photos.items():
        folder = root / name
        folder.mkdir(parents=True)
        image = Image.open(path).convert("RGB")
        w, h = image.size
        ImageOps.mirror(image).save(folder / "mirrored.jpg", quality=90)
        image.crop((w // 8, h // 8, w - w // 8, h - h // 8)).save(folder / "crop.jpg")
        ImageEnhance.Brightness(image).enhance(0.7).save(folder / "dark.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def bundle(photos, tmp_path_factory) -> dict[str, Path]:
    """checkpoint -> fp32 -> int8 through the CLI, as a user would run it."""
    root = tmp_path_factory.mktemp("quant")
    torch.manual_seed(0)
    model = CMN("tf_efficientnet_lite0", num_concepts=512, pretrained=True).eval()
    config = TrainConfig(datasets=[str(root / "calib")], num_concepts=512, command="unit test")
    checkpoint = root / "best.pt"
    torch.save(
        {
            "format": CHECKPOINT_FORMAT,
            "config": asdict(config),
            "model": model.state_dict(),
            "best": {},
        },
        checkpoint,
    )
    calib = _variants(photos, root / "calib")
    fp32, int8 = root / "cmn.fp32.onnx", root / "cmn.int8.onnx"
    runner = CliRunner()
    result = runner.invoke(main, ["onnx", "--checkpoint", str(checkpoint), "--out", str(fp32)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(
        main, ["quantize", str(fp32), "--calibration", str(calib), "--check-count", "3"]
    )
    assert result.exit_code == 0, result.output
    assert int8.is_file()  # default name: .fp32.onnx -> .int8.onnx
    assert "float" in result.output and "cosine to FP32" in result.output
    return {"root": root, "checkpoint": checkpoint, "calib": calib, "fp32": fp32, "int8": int8}


def _photo_batch(photos: dict[str, Path], model: Path) -> np.ndarray:
    meta = read_metadata(model)
    return np.stack([pp.load(p, meta.preprocess) for p in photos.values()])


def runs_in_int8(node, graph) -> bool:
    """Integer compute in QDQ form: reads dequantized tensors and either is a MatMul/Conv
    (onnxruntime fuses those to integer kernels) or hands its result straight back to
    QuantizeLinear. An op that merely reads a dequantized tensor computes in float."""
    producers = {o: n.op_type for n in graph.node for o in n.output}
    if not any(producers.get(i) == "DequantizeLinear" for i in node.input):
        return False
    if node.op_type in ("MatMul", "Conv"):
        return True
    readers = [n.op_type for n in graph.node if set(n.input) & set(node.output)]
    return bool(readers) and all(kind == "QuantizeLinear" for kind in readers)


def _session(path: Path) -> ort.InferenceSession:
    """As the runtime loads it (on x86 without VNNI, 8-bit GEMM weights with the exact U8U8
    rewrite)."""
    return open_session(path)


def test_int8_embeddings_stay_close_to_fp32_on_real_photos(bundle, photos):
    batch = _photo_batch(photos, bundle["fp32"])
    cos = embedding_cosines(_session(bundle["fp32"]), _session(bundle["int8"]), [batch])
    assert cos.mean() >= MEAN_COSINE and cos.min() >= MIN_COSINE, cos
    assert bundle["int8"].stat().st_size < 0.75 * bundle["fp32"].stat().st_size


def test_the_fidelity_threshold_catches_a_bad_quantization(bundle, photos, tmp_path):
    """Per-tensor weights are known to wreck EfficientNet's depthwise convs: must fail."""
    bad = tmp_path / "bad.int8.onnx"
    quantize(
        bundle["fp32"],
        bad,
        bundle["calib"],
        check_count=0,
        options=QuantizeOptions(per_channel=False),
    )
    batch = _photo_batch(photos, bundle["fp32"])
    cos = embedding_cosines(_session(bundle["fp32"]), _session(bad), [batch])
    assert cos.mean() < MEAN_COSINE or cos.min() < MIN_COSINE, cos


def test_int8_model_quantizes_only_the_heads_projections_and_says_so(bundle):
    meta = read_metadata(bundle["int8"])
    assert meta.precision == "int8"
    q = meta.quantization
    assert {"LayerNormalization", "Softmax"} <= set(q["float_op_types"])
    assert q["calibration"]["split"] == "train" and q["calibration"]["method"] == "minmax"
    assert q["calibration"]["count"] == 15 - 3  # the rest were held out for the check
    assert q["calibration"]["data"] == str(bundle["calib"])
    assert q["format"] == "QDQ" and q["per_channel"] is True
    assert q["head_projections_quantized"] is True
    graph = onnx.load(str(bundle["int8"])).graph
    by_type: dict[str, list] = {}
    for node in graph.node:
        by_type.setdefault(node.op_type, []).append(node)
    head = set(q["float_nodes"]["concept_head"])
    for kind in ("LayerNormalization", "Softmax"):
        assert by_type[kind], kind
        for node in by_type[kind]:
            assert not runs_in_int8(node, graph), node.name
            assert node.name in head and node.name in q["float_compute_nodes"][kind]
    # The factored head: the three projections with a constant weight (tokens, keys,
    # queries) run on integers. The two MatMuls between activations (the R x R Gram of the
    # tokens, and its product with the attention) get no quantization of their own; the one
    # that reads the float attention computes in float.
    initializers = {i.name for i in graph.initializer}
    constant = {
        out
        for n in graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in initializers
        for out in n.output
    }
    regions = [n for n in by_type["MatMul"] if n.name.startswith("/regions")]
    head_matmuls = [n for n in by_type["MatMul"] if n not in regions]
    projections = [n for n in head_matmuls if constant & set(n.input)]
    between_activations = [n for n in head_matmuls if not constant & set(n.input)]
    assert len(projections) == 3 and len(between_activations) == 2
    # DIML's region pooling stays float: it reads float cosines and a float constant
    assert len(regions) == 1 and not runs_in_int8(regions[0], graph)
    assert regions[0].name in head
    assert all(runs_in_int8(n, graph) for n in projections)
    assert all(n.name in head for n in between_activations)
    softmax_out = {o for n in by_type["Softmax"] for o in n.output}
    (reads_attention,) = [n for n in between_activations if softmax_out & set(n.input)]
    assert not runs_in_int8(reads_attention, graph)
    assert reads_attention.name in q["float_compute_nodes"]["MatMul"]
    assert all(runs_in_int8(node, graph) for node in by_type["Conv"])  # the backbone is INT8
    assert len(by_type["Conv"]) == 49


def _gemm_weight_extremes(path: Path) -> list[int]:
    """The largest |weight| of each U8S8 GEMM of an INT8 file."""
    model = onnx.load(str(path))
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    return [int(np.abs(weights[layer.weight]).max()) for layer in gemm_layers(model)]


def test_int8_gemm_weights_are_7_bit_by_default_and_say_so(bundle):
    """The default file cannot saturate U8S8 on x86 without VNNI: every GEMM weight fits
    [-64, 64] (255 * 64 * 2 < 32,767), and the metadata tells the runtime so."""
    meta = read_metadata(bundle["int8"])
    assert meta.quantization["gemm_weight_bits"] == 7 and not meta.saturates_u8s8
    extremes = _gemm_weight_extremes(bundle["int8"])
    assert len(extremes) == meta.quantization["gemms_requantized"] >= 30
    assert max(extremes) == 64  # each row's largest weight sits on the 7-bit limit


def test_8_bit_gemm_weights_on_request_are_marked_saturating(bundle, photos, tmp_path):
    out = tmp_path / "eight.int8.onnx"
    quantize(bundle["fp32"], out, bundle["calib"], check_count=0,
             options=QuantizeOptions(gemm_weight_bits=8))  # fmt: skip
    meta = read_metadata(out)
    assert meta.quantization["gemm_weight_bits"] == 8 and meta.saturates_u8s8
    assert max(_gemm_weight_extremes(out)) == 127
    # as the runtime loads it, it is exact here too (with the U8U8 rewrite where needed)
    batch = _photo_batch(photos, bundle["fp32"])
    cos = embedding_cosines(_session(bundle["fp32"]), _session(out), [batch])
    assert cos.mean() >= MEAN_COSINE and cos.min() >= MIN_COSINE, cos


def test_7_bit_gemm_weights_need_qdq_int8():
    assert QuantizeOptions(quant_format="qoperator").gemm_bits == 8
    assert QuantizeOptions().gemm_bits == 7
    with pytest.raises(ValueError, match="QDQ format with int8 weights"):
        QuantizeOptions(quant_format="qoperator", gemm_weight_bits=7).check()


def test_float_head_projections_option_keeps_the_whole_head_float(bundle, tmp_path):
    out = tmp_path / "floathead.int8.onnx"
    args = [
        "quantize",
        bundle["fp32"],
        "--calibration",
        bundle["calib"],
        "--out",
        out,
        "--check-count",
        "0",
        "--float-head-projections",
    ]
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    graph = onnx.load(str(out)).graph
    matmuls = [n for n in graph.node if n.op_type == "MatMul"]
    assert len(matmuls) == 6 and not any(runs_in_int8(n, graph) for n in matmuls)  # 5 + regions
    assert read_metadata(out).quantization["head_projections_quantized"] is False
    assert out.stat().st_size > 1.5 * bundle["int8"].stat().st_size  # the head's weights


def test_runtime_embedder_runs_the_int8_model(bundle, photos):
    from cmn_edge import Embedder

    embedder = Embedder(bundle["int8"], precision="int8", threads=1)
    out = embedder.embed_batch([photos["cat"], photos["rocket"]], with_attention=True)
    assert out.embedding.shape == (2, 512)
    assert np.allclose(np.linalg.norm(out.embedding, axis=1), 1, atol=1e-5)
    assert out.attention.shape == (2, 512, 7, 7)
    assert np.allclose(out.attention.sum(axis=(2, 3)), 1, atol=1e-4)


def test_validate_writes_a_report_next_to_the_model(bundle, labelled_folder):
    args = [
        "validate",
        str(bundle["fp32"]),
        "--int8",
        str(bundle["int8"]),
        "--checkpoint",
        str(bundle["checkpoint"]),
        "--data",
        str(labelled_folder),
        "--runs",
        "2",
        "--threads",
        "1",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = bundle["root"] / "cmn.validation.json"
    data = json.loads(report.read_text())
    assert data["images"] == 15 and data["classes"] == 5
    assert data["parity"]["ok"] and data["parity"]["max_abs_diff"]["embedding"] < 1e-4
    fidelity = data["int8_vs_fp32"]
    assert MIN_COSINE <= fidelity["min_cosine"] <= fidelity["mean_cosine"] <= 1.0 + 1e-6
    for precision in ("fp32", "int8"):
        metrics = data["retrieval"][precision]
        assert set(metrics) == {"R@1", "R@2", "R@4", "R@8", "MAP@R"}
        assert 0 <= metrics["R@1"] <= metrics["R@2"] <= metrics["R@4"] <= metrics["R@8"] <= 100
        latency = data["latency_ms_per_image"][precision]
        assert latency["batch_1"] > 0 and latency["batch_32"] > 0
        assert data["size_bytes"][precision] == bundle[precision].stat().st_size
    assert data["quantization"]["calibration"]["split"] == "train"
    for text in ("R@1", "MAP@R", "ms/image batch 32", "INT8 vs FP32 cosine", str(report)):
        assert text in result.output


# --- the pad arithmetic of TF-style SAME convolutions ---------------------------------------


def test_run_time_padding_arithmetic_is_never_quantized(bundle, tmp_path):
    """A graph traced with timm's dynamic SAME padding (as any exporter but ours leaves it)
    computes its pads in float from the input shape; rounding that to 8 bits once turned
    the 7x7 attention map into 6x6. The quantizer must leave shape arithmetic alone."""
    import warnings

    from cmn_export.model import ExportableCMN
    from cmn_export.onnx_export import build_metadata, write_metadata
    from cmn_export.quantize import float_plan

    torch.manual_seed(0)
    model = CMN("tf_efficientnet_lite0", num_concepts=16, pretrained=False).eval()
    model.input_size = 224
    raw = tmp_path / "dynamic.fp32.onnx"
    names = ["images", "embedding", "concept_scores", "attention"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            ExportableCMN(model).eval(),
            (torch.randn(2, 3, 224, 224),),
            str(raw),
            input_names=names[:1],
            output_names=names[1:],
            opset_version=17,
            dynamic_axes={n: {0: "batch"} for n in names},
            dynamo=False,
        )
    graph = onnx.load(str(raw))
    assert "Ceil" in {n.op_type for n in graph.graph.node}  # the run-time pad arithmetic
    write_metadata(graph, build_metadata(model, "dynamic"))
    onnx.save(graph, str(raw))
    plan = float_plan(onnx.load(str(raw)), QuantizeOptions())
    kinds = {n.name: n.op_type for n in graph.graph.node}
    assert "Ceil" in {kinds[name] for name in plan.shape_nodes}
    assert not {"Conv", "Pad", "MatMul"} & {kinds[name] for name in plan.shape_nodes}

    out = tmp_path / "dynamic.int8.onnx"
    quantize(raw, out, bundle["calib"], check_count=0)
    x = np.random.default_rng(0).normal(size=(1, 3, 224, 224)).astype(np.float32)
    expected = _session(raw).run(None, {"images": x})
    got = _session(out).run(None, {"images": x})
    shapes = [(1, 16), (1, 16), (1, 16, 7, 7)]
    assert [g.shape for g in got] == [e.shape for e in expected] == shapes


# --- errors ---------------------------------------------------------------------------------


def _fails(args: list, *expected: str) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code != 0
    message = result.output.strip()
    assert message.startswith("error:") and len(message.splitlines()) == 1, result.output
    for text in expected:
        assert text in message, message
    return message


def test_quantize_refuses_a_missing_model(tmp_path, labelled_folder):
    missing = tmp_path / "nope.fp32.onnx"
    _fails(["quantize", missing, "--calibration", labelled_folder], str(missing), "not found")
    assert not (tmp_path / "nope.int8.onnx").exists()


def test_quantize_refuses_an_onnx_file_that_is_not_a_cmn(tmp_path, labelled_folder):
    plain = tmp_path / "plain.onnx"
    torch.onnx.export(
        torch.nn.Conv2d(3, 4, 3), (torch.randn(1, 3, 8, 8),), str(plain), dynamo=False
    )
    _fails(
        ["quantize", plain, "--calibration", labelled_folder, "--out", tmp_path / "q.onnx"],
        str(plain),
        "not a cmn-edge model",
    )
    assert not (tmp_path / "q.onnx").exists()


def test_quantize_refuses_an_int8_input_and_overwriting_the_input(bundle, tmp_path):
    _fails(
        [
            "quantize",
            bundle["int8"],
            "--calibration",
            bundle["calib"],
            "--out",
            tmp_path / "again.onnx",
        ],
        str(bundle["int8"]),
        "already int8",
    )
    _fails(
        ["quantize", bundle["fp32"], "--calibration", bundle["calib"], "--out", bundle["fp32"]],
        "overwrite",
    )


def test_quantize_refuses_an_empty_calibration_set(bundle, tmp_path):
    empty = tmp_path / "empty"
    (empty / "cats").mkdir(parents=True)
    out = tmp_path / "q.onnx"
    _fails(["quantize", bundle["fp32"], "--calibration", empty, "--out", out], str(empty), "empty")
    manifest = tmp_path / "m" / "manifest.csv"
    manifest.parent.mkdir()
    manifest.write_text("path,label,class_name,split\nx.jpg,0,a,test\n")
    _fails(
        ["quantize", bundle["fp32"], "--calibration", manifest.parent, "--out", out],
        str(manifest),
        "split 'train'",
    )
    assert not out.exists()


def test_validate_refuses_an_int8_model_of_another_network(bundle, tmp_path, labelled_folder):
    from cmn_export.onnx_export import build_metadata, export_onnx

    other = CMN("tf_efficientnet_lite0", num_concepts=8, pretrained=False).eval()
    other.input_size = 224
    path = export_onnx(other, tmp_path / "other.fp32.onnx", build_metadata(other, "other"))
    _fails(
        ["validate", bundle["fp32"], "--int8", path, "--data", labelled_folder],
        str(path),
        "concepts",
    )
    _fails(["validate", bundle["fp32"], "--data", tmp_path / "nowhere"], "nowhere", "not found")


def test_calibration_images_are_a_seeded_sample_across_datasets(bundle, labelled_folder):
    from cmn_export.calibration import pick_images

    both = [bundle["calib"], labelled_folder]
    picked = pick_images(both, "train", count=20, seed=0)
    assert len(picked) == 20 == len(set(picked))
    assert {p.parents[1] for p in picked} == {bundle["calib"], labelled_folder}
    assert picked == pick_images(both, "train", count=20, seed=0)
    assert picked != pick_images(both, "train", count=20, seed=1)
    assert len(pick_images(both, "train", count=1000)) == 15 + 15  # all when fewer


def test_quantize_head_matmuls_option_keeps_layernorm_and_softmax_float(bundle, tmp_path):
    out = tmp_path / "head.int8.onnx"
    args = [
        "quantize",
        bundle["fp32"],
        "--calibration",
        bundle["calib"],
        "--out",
        out,
        "--check-count",
        "0",
        "--quantize-head-matmuls",
    ]
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    graph = onnx.load(str(out)).graph
    integer = {n.op_type for n in graph.node if runs_in_int8(n, graph)}
    assert {"MatMul", "Conv"} <= integer
    assert not {"LayerNormalization", "Softmax", "ReduceL2"} & integer
    meta = read_metadata(out)
    assert meta.quantization["head_op_types_quantized"] == ["MatMul"]
    assert out.stat().st_size <= 1.05 * bundle["int8"].stat().st_size  # weights INT8 as well
