"""Upstream shchen0001/CMN checkpoints (ResNet-50, MLP1/lnorm1/... names) -> ONNX."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from click.testing import CliRunner  # noqa: E402

from cmn_export.checkpoint import UPSTREAM_HEAD_NAMES  # noqa: E402
from cmn_export.cli import main  # noqa: E402
from cmn_export.model import CMN  # noqa: E402

NUM_CONCEPTS = 16  # upstream uses 512; the layout is what matters here

_OUR_TRUNK = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3"}


def to_upstream(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our CMN state dict under the names upstream ``net/CMN.py`` saves."""
    ours_to_upstream = {v: k for k, v in UPSTREAM_HEAD_NAMES.items()}
    out = {}
    for key, value in state.items():
        if key.startswith("backbone.trunk."):
            index, _, rest = key.removeprefix("backbone.trunk.").partition(".")
            out[f"model.{_OUR_TRUNK[index]}.{rest}"] = value
        elif key.startswith("backbone.tail.0."):
            out["model.layer4." + key.removeprefix("backbone.tail.0.")] = value
        elif key.startswith("backbone.classifier."):
            out["model.fc." + key.removeprefix("backbone.classifier.")] = value
        elif key in ours_to_upstream:  # head.concepts -> concept_v
            out[ours_to_upstream[key]] = value
        else:
            module, _, rest = key.rpartition(".")
            out[f"{ours_to_upstream[module]}.{rest}"] = value
    return out


@pytest.fixture(scope="module")
def upstream(tmp_path_factory) -> tuple[CMN, Path, dict]:
    """A ResNet-50 CMN with non-trivial BatchNorm statistics, saved in the upstream layout."""
    torch.manual_seed(0)
    model = CMN("resnet50", NUM_CONCEPTS, pretrained=False).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    state = to_upstream(model.state_dict())
    assert {"concept_v", "MLP1.weight", "lnorm3.bias", "model.layer4.2.conv3.weight"} <= set(state)
    path = tmp_path_factory.mktemp("upstream") / "ckpt.pth"
    torch.save(state, path)
    return model, path, state


@pytest.fixture(scope="module")
def exported(upstream, tmp_path_factory) -> Path:
    _, path, _ = upstream
    out = tmp_path_factory.mktemp("onnx") / "upstream.fp32.onnx"
    args = ["onnx", "--upstream-checkpoint", str(path), "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "resnet50" in result.output and f"C={NUM_CONCEPTS}" in result.output
    return out


def test_upstream_checkpoint_converts_and_matches_pytorch(upstream, exported, photos):
    from cmn_edge import preprocess as pp
    from cmn_export.onnx_export import read_metadata

    model, path, _ = upstream
    meta = read_metadata(exported)
    assert meta.backbone == "resnet50" and meta.num_concepts == NUM_CONCEPTS
    assert meta.preprocess.mean == pytest.approx((123.675, 116.28, 103.53))
    assert meta.attention_grid == (7, 7)
    assert "upstream" in meta.training_data and "ckpt.pth" in meta.training_data
    from cmn_export.checkpoint import file_sha256

    assert meta.source_checkpoint_sha256 == file_sha256(path)
    batch = np.stack([pp.load(photos[n], meta.preprocess) for n in ("cat", "rocket", "coffee")])
    session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    embedding, scores, attention = session.run(
        ["embedding", "concept_scores", "attention"], {"images": batch}
    )
    with torch.no_grad():
        reference = model.explain(torch.from_numpy(batch))
    assert np.abs(embedding - reference["embedding"].numpy()).max() < 1e-4
    assert np.abs(scores - reference["concept_scores"].numpy()).max() < 1e-4
    assert np.abs(attention - reference["attention"].numpy()).max() < 1e-4
    # the three photos are told apart: the parity above is not between constants
    assert (embedding @ embedding.T)[np.triu_indices(3, 1)].max() < 0.999


def test_wrapped_and_dataparallel_upstream_state_converts_the_same(upstream, tmp_path):
    from cmn_export.checkpoint import model_from_upstream

    model, _, state = upstream
    wrapped = {"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}
    path = tmp_path / "wrapped.pth"
    torch.save(wrapped, path)
    loaded = model_from_upstream(path)
    for key, value in model.state_dict().items():
        if not key.startswith("backbone.classifier"):
            assert torch.equal(loaded.state_dict()[key], value), key


def _fails(args: list[str], *expected: str) -> str:
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0
    message = result.output.strip()
    assert message.startswith("error:") and len(message.splitlines()) == 1, message
    for text in expected:
        assert text in message, message
    return message


def test_upstream_checkpoint_missing_a_layer_is_refused(upstream, tmp_path):
    _, _, state = upstream
    broken = {k: v for k, v in state.items() if not k.startswith("model.layer3.5.")}
    path = tmp_path / "partial.pth"
    torch.save(broken, path)
    out = tmp_path / "x.onnx"
    _fails(["onnx", "--upstream-checkpoint", str(path), "--out", str(out)], str(path), "lacks")
    assert not out.exists()


def test_upstream_checkpoint_with_foreign_keys_is_refused(upstream, tmp_path):
    _, _, state = upstream
    path = tmp_path / "foreign.pth"
    torch.save({**state, "classifier_head.weight": torch.zeros(3)}, path)
    _fails(
        ["onnx", "--upstream-checkpoint", str(path), "--out", str(tmp_path / "x.onnx")],
        str(path),
        "classifier_head.weight",
    )


def test_upstream_file_given_as_cmn_export_checkpoint_says_which_flag(upstream, tmp_path):
    _, path, _ = upstream
    _fails(
        ["onnx", "--checkpoint", str(path), "--out", str(tmp_path / "x.onnx")],
        str(path),
        "--upstream-checkpoint",
    )


def test_non_upstream_state_dict_is_refused(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, path)
    _fails(
        ["onnx", "--upstream-checkpoint", str(path), "--out", str(tmp_path / "x.onnx")],
        str(path),
        "not an upstream CMN state dict",
    )


def test_validate_reports_parity_against_the_upstream_checkpoint(
    upstream, exported, labelled_folder
):
    import json

    _, path, _ = upstream
    report = exported.parent / "upstream.validation.json"
    result = CliRunner().invoke(
        main,
        [
            "validate",
            str(exported),
            "--upstream-checkpoint",
            str(path),
            "--data",
            str(labelled_folder),
            "--runs",
            "1",
            "--threads",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["parity"]["ok"] and data["parity"]["max_abs_diff"]["embedding"] < 1e-4
    assert data["images"] == 15 and data["classes"] == 5
    assert "PyTorch vs ONNX" in result.output
