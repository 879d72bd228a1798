"""The PyTorch CMN, the Lite0 ImageNet weights, and `cmn-export onnx`."""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from click.testing import CliRunner  # noqa: E402

from cmn_edge import preprocess as pp  # noqa: E402
from cmn_export.backbones import Backbone, get_spec  # noqa: E402
from cmn_export.checkpoint import CHECKPOINT_FORMAT  # noqa: E402
from cmn_export.cli import main  # noqa: E402
from cmn_export.model import CMN, ExportableCMN  # noqa: E402
from cmn_export.onnx_export import build_metadata, export_onnx, read_metadata  # noqa: E402
from cmn_export.train import TrainConfig  # noqa: E402

SMALL_INPUT = 96  # 3x3 regions: enough for every property, a fraction of the cost of 224
IMAGENET_CATS = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture(scope="module")
def small_model() -> CMN:
    torch.manual_seed(0)
    model = CMN("tf_efficientnet_lite0", num_concepts=16, pretrained=False).eval()
    model.input_size = SMALL_INPUT
    return model


def test_head_outputs_have_the_documented_shapes_and_normalisation(small_model):
    x = torch.randn(3, 3, SMALL_INPUT, SMALL_INPUT, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = small_model.explain(x)
        plain = small_model(x)
    grid = SMALL_INPUT // 32
    assert out["embedding"].shape == (3, 16)
    assert out["concept_scores"].shape == (3, 16)
    assert out["attention"].shape == (3, 16, grid, grid)
    norms = out["embedding"].norm(dim=1)
    assert torch.allclose(norms, torch.ones(3), atol=1e-5)
    # scores are cosines; the embedding is exactly the normalised scores
    assert out["concept_scores"].abs().max() <= 1 + 1e-5
    scores = out["concept_scores"]
    assert torch.allclose(out["embedding"], scores / scores.norm(dim=1, keepdim=True), atol=1e-6)
    # every concept's attention is a distribution over the regions
    attention = out["attention"].flatten(2)
    assert (attention >= 0).all()
    assert torch.allclose(attention.sum(-1), torch.ones(3, 16), atol=1e-5)
    assert torch.allclose(plain, out["embedding"], atol=1e-6)
    # different images, different embeddings
    assert not torch.allclose(out["embedding"][0], out["embedding"][1], atol=1e-3)


def test_exportable_model_computes_what_the_training_model_computes(small_model):
    x = torch.randn(2, 3, SMALL_INPUT, SMALL_INPUT, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = small_model.explain(x)
        embedding, scores, attention = ExportableCMN(small_model).eval()(x)
    assert torch.allclose(embedding, reference["embedding"], atol=1e-6)
    assert torch.allclose(scores, reference["concept_scores"], atol=1e-6)
    assert torch.allclose(attention, reference["attention"], atol=1e-6)


@pytest.mark.parametrize(
    ("variant", "input_size", "resize_size"),
    [(0, 224, 256), (1, 240, 274), (2, 260, 297)],  # each at its native input size
)
def test_lite_imagenet_weights_load_strictly_and_see_a_cat(
    photos, variant, input_size, resize_size
):
    import timm

    from cmn_export.backbones import load_lite_imagenet

    name = f"tf_efficientnet_lite{variant}"
    state = load_lite_imagenet(variant)
    reference = timm.create_model(name, pretrained=False)
    assert set(state) == set(reference.state_dict())
    for key, value in reference.state_dict().items():
        assert state[key].shape == value.shape, key
    reference.load_state_dict(state, strict=True)  # raises on any mismatch

    spec = get_spec(name)
    assert spec.channels == reference.num_features
    preprocess = spec.preprocess(input_size)
    assert preprocess.mean == (127.0, 127.0, 127.0) and preprocess.std == (128.0, 128.0, 128.0)
    assert (preprocess.input_size, preprocess.resize_size) == (input_size, resize_size)
    backbone = Backbone(spec, pretrained=True).eval()
    x = torch.from_numpy(pp.load(photos["cat"], preprocess))[None]
    with torch.no_grad():
        logits = backbone.classify(x)[0]
        untrained = Backbone(spec, pretrained=False).eval().classify(x)[0]
    top3 = set(logits.topk(3).indices.tolist())
    assert top3 & IMAGENET_CATS, f"top-3 ImageNet classes {sorted(top3)} hold no cat"
    assert logits.softmax(0)[sorted(IMAGENET_CATS)].sum() > 0.3
    # the check has teeth: random weights do not find the cat
    assert untrained.softmax(0)[sorted(IMAGENET_CATS)].sum() < 0.05


def test_onnx_export_matches_pytorch_with_a_dynamic_batch(small_model, tmp_path):
    meta = build_metadata(small_model, "tiny", training_data="unit test")
    path = export_onnx(small_model, tmp_path / "tiny.fp32.onnx", meta)
    assert not list(tmp_path.glob(".*.tmp"))
    back = read_metadata(path)
    assert back == dataclasses.replace(meta, region_grid=(3, 3))  # DIML grid clamped to 3x3
    assert back.attention_grid == (3, 3) and back.preprocess.input_size == SMALL_INPUT
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    assert names == ["embedding", "concept_scores", "attention", "regions"]
    for batch in (1, 4):
        seeded = torch.Generator().manual_seed(batch)
        x = torch.randn(batch, 3, SMALL_INPUT, SMALL_INPUT, generator=seeded)
        with torch.no_grad():
            reference = small_model.explain(x)
        embedding, scores, attention, regions = session.run(None, {"images": x.numpy()})
        assert np.abs(embedding - reference["embedding"].numpy()).max() < 1e-4
        with torch.no_grad():  # DIML regions: each concept's cosine with each region's token
            head, features = small_model.head, small_model.backbone(x)
            tokens = head.token_proj(head.token_norm(features.flatten(2).transpose(1, 2)))
            cosine = tokens @ head.concept_queries().t() / tokens.norm(dim=-1, keepdim=True)
            expected = torch.nn.functional.normalize(cosine, dim=-1)  # 3x3 grid: no pooling
        assert np.abs(regions - expected.numpy()).max() < 1e-4
        assert np.abs(scores - reference["concept_scores"].numpy()).max() < 1e-4
        assert np.abs(attention - reference["attention"].numpy()).max() < 1e-4
        assert attention.shape == (batch, 16, 3, 3)


def test_an_input_size_off_the_stride_exports_its_real_grid(tmp_path):
    """240 px (Lite1's native size) is 7.5 strides: 'same' padding makes an 8 x 8 grid, and
    the metadata, the attention maps and DIML's regions must all say 8 x 8. 80 px is the
    same case, small (2.5 strides, a 3 x 3 grid), and catches 80 // 32 = 2."""
    torch.manual_seed(0)
    model = CMN("tf_efficientnet_lite0", num_concepts=16, pretrained=False).eval()
    model.input_size = 80
    meta = build_metadata(model, "odd")
    assert meta.attention_grid == (3, 3)
    path = export_onnx(model, tmp_path / "odd.fp32.onnx", meta)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 3, 80, 80, generator=torch.Generator().manual_seed(3))
    embedding, _scores, attention, regions = session.run(None, {"images": x.numpy()})
    with torch.no_grad():
        reference = model.explain(x)
    assert attention.shape == (2, 16, 3, 3)
    assert regions.shape == (2, 9, 16)
    assert np.abs(embedding - reference["embedding"].numpy()).max() < 1e-4


def test_export_folds_same_padding_into_constants_and_leaves_the_model_alone(small_model, tmp_path):
    import onnx
    from timm.layers.conv2d_same import Conv2dSame

    before = sum(isinstance(m, Conv2dSame) for m in small_model.modules())
    assert before > 0  # tf_ EfficientNets pad stride-2 convs the TensorFlow way
    path = export_onnx(small_model, tmp_path / "m.onnx", build_metadata(small_model, "m"))
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "Ceil" not in ops  # no run-time padding arithmetic left in the graph
    assert sum(isinstance(m, Conv2dSame) for m in small_model.modules()) == before


# --- cmn-export onnx ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(small_model, tmp_path_factory) -> Path:
    """A best.pt as Trainer writes it (weights-only keys), for the small model."""
    config = TrainConfig(
        datasets=["data/birds", "data/objects"],
        num_concepts=16,
        input_size=SMALL_INPUT,
        pretrained=False,
        command="cmn-export train data/birds data/objects --concepts 16",
    )
    state = {
        "format": CHECKPOINT_FORMAT,
        "config": asdict(config),
        "model": small_model.state_dict(),
        "best": {"epoch": 1, "val": {}},
    }
    path = tmp_path_factory.mktemp("ckpt") / "best.pt"
    torch.save(state, path)
    return path


def run_cli(args: list[str]):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_onnx_command_writes_a_self_describing_model(checkpoint, small_model, tmp_path, photos):
    from cmn_edge import Embedder

    names = tmp_path / "names.txt"
    names.write_text("".join(f"concept {i}\n" for i in range(16)) + "\n")
    out = tmp_path / "tiny.fp32.onnx"
    result = run_cli(["onnx", "--checkpoint", checkpoint, "--out", out, "--concept-names", names])
    assert result.exit_code == 0, result.output
    assert "max abs diff" in result.output
    meta = read_metadata(out)
    assert meta.name == "tiny" and meta.precision == "fp32"
    assert meta.backbone == "tf_efficientnet_lite0" and meta.num_concepts == 16
    assert meta.training_data == "data/birds, data/objects"
    assert meta.training_command.startswith("cmn-export train data/birds")
    assert meta.source_checkpoint_sha256 == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert meta.concept_names[0] == "concept 0" and len(meta.concept_names) == 16
    # the runtime takes it as is, and embeds what PyTorch embeds
    embedder = Embedder(out, precision="fp32", threads=1)
    x = embedder.load(photos["cat"])
    with torch.no_grad():
        expected = small_model(torch.from_numpy(x)[None]).numpy()
    assert np.abs(embedder.embed(photos["cat"]) - expected).max() < 1e-4

    other = tmp_path / "b.onnx"
    named = run_cli(["onnx", "--checkpoint", checkpoint, "--out", other, "--name", "x"])
    assert named.exit_code == 0 and read_metadata(other).name == "x"


def _fails(args: list, *expected: str) -> str:
    result = run_cli(args)
    assert result.exit_code != 0
    message = result.output.strip()
    assert message.startswith("error:") and len(message.splitlines()) == 1, message
    assert "Traceback" not in message
    for text in expected:
        assert text in message, message
    return message


def test_onnx_command_refuses_a_missing_checkpoint(tmp_path):
    missing, out = tmp_path / "nope.pt", tmp_path / "m.onnx"
    _fails(["onnx", "--checkpoint", missing, "--out", out], str(missing), "not found")
    assert not out.exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_onnx_command_refuses_a_corrupt_checkpoint(checkpoint, tmp_path, damage):
    data = checkpoint.read_bytes()
    broken = tmp_path / f"{damage}.pt"
    broken.write_bytes(
        {
            "truncated": data[: len(data) // 2],
            "garbage": b"\x80\x02not a pickle" * 50,
            "empty": b"",
        }[damage]
    )
    out = tmp_path / "m.onnx"
    _fails(["onnx", "--checkpoint", broken, "--out", out], str(broken))
    assert not out.exists()


def test_onnx_command_refuses_weights_that_do_not_fit(checkpoint, tmp_path):
    state = torch.load(checkpoint, weights_only=False)
    state["config"]["num_concepts"] = 32  # the weights hold 16
    path = tmp_path / "mismatch.pt"
    torch.save(state, path)
    _fails(["onnx", "--checkpoint", path, "--out", tmp_path / "m.onnx"], str(path), "do not fit")


def test_onnx_command_refuses_wrong_concept_names(checkpoint, tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("a\nb\nc\n")
    out = tmp_path / "m.onnx"
    _fails(
        ["onnx", "--checkpoint", checkpoint, "--out", out, "--concept-names", names],
        str(names),
        "3 concept names",
        "16 concepts",
    )
    assert not out.exists()


def test_onnx_command_needs_exactly_one_checkpoint(checkpoint, tmp_path):
    out = tmp_path / "m.onnx"
    _fails(["onnx", "--out", out], "exactly one")
    _fails(
        ["onnx", "--checkpoint", checkpoint, "--upstream-checkpoint", checkpoint, "--out", out],
        "exactly one",
    )
