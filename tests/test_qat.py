"""`cmn-export qat`: INT8 rounding simulated in PyTorch, removed without a trace, and a
fine-tuning run that writes a checkpoint `cmn-export onnx` exports."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from cmn_export.cli import main  # noqa: E402
from cmn_export.model import CMN  # noqa: E402
from cmn_export.qat import fake_quantize_rows, simulate_int8  # noqa: E402


def test_per_row_weight_rounding_is_symmetric_int8():
    w = torch.randn(4, 3, 3, 3)
    q = fake_quantize_rows(w)
    scale = w.abs().amax(dim=(1, 2, 3), keepdim=True) / 127
    steps = q / scale
    assert torch.allclose(steps, steps.round(), atol=1e-4)  # on each row's own grid
    assert steps.abs().max() <= 127 + 1e-4
    assert (q - w).abs().max() <= scale.max() / 2 + 1e-6


def test_simulation_perturbs_like_int8_and_leaves_no_trace_when_removed():
    torch.manual_seed(0)
    model = CMN("tf_efficientnet_lite0", num_concepts=32, pretrained=True).eval()
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        before = model(x)
        sim = simulate_int8(model)
        simulated = model(x)
        sim.enabled = False
        switched_off = model(x)
        sim.remove()
        after = model(x)
    assert torch.equal(before, after) and torch.equal(before, switched_off)
    cos = F.cosine_similarity(simulated, before).min()
    assert 0.9 < cos < 0.99999, cos  # rounded, but still the same embedding
    assert not any("parametrizations" in k for k in model.state_dict())


def test_qat_command_writes_a_checkpoint_that_exports(labelled_folder, tmp_path):
    torch.manual_seed(0)
    source = tmp_path / "best.pt"
    model = CMN("tf_efficientnet_lite0", num_concepts=16, pretrained=False)
    model.input_size = 96
    from dataclasses import asdict

    from cmn_export.checkpoint import CHECKPOINT_FORMAT
    from cmn_export.train import TrainConfig

    config = TrainConfig(datasets=[str(labelled_folder)], num_concepts=16, input_size=96)
    torch.save(
        {"format": CHECKPOINT_FORMAT, "config": asdict(config), "model": model.state_dict(),
         "best": {}},
        source,
    )
    out = tmp_path / "qat" / "qat.pt"
    args = ["qat", str(source), str(labelled_folder), "--out", str(out), "--epochs", "1",
            "--batch-size", "5", "--workers", "0", "--device", "cpu"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "simulated INT8" in result.output
    onnx_path = tmp_path / "qat.fp32.onnx"
    exported = CliRunner().invoke(main, ["onnx", "--checkpoint", str(out), "--out", str(onnx_path)])
    assert exported.exit_code == 0, exported.output
    from cmn_export.onnx_export import read_metadata

    assert "cmn-export qat" in read_metadata(onnx_path).training_command


def test_qat_of_a_missing_checkpoint_fails_in_one_line(labelled_folder, tmp_path):
    args = ["qat", str(tmp_path / "none.pt"), str(labelled_folder), "--out", str(tmp_path / "o.pt")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0
    assert result.output.startswith("error:") and "none.pt" in result.output
    assert not (tmp_path / "o.pt").exists()
