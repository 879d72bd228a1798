"""Training: a few steps on real photos lower the loss, resuming continues exactly, and bad
datasets or checkpoints stop `cmn-export train` with one line naming the file."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from click.testing import CliRunner  # noqa: E402

from cmn_edge import preprocess as pp  # noqa: E402
from cmn_export.cli import main  # noqa: E402
from cmn_export.train import TrainConfig, Trainer, relational_distillation  # noqa: E402

INPUT = 96


def config(folder: Path, out: Path, **overrides) -> TrainConfig:
    """Tiny but real: 15 photos of 5 classes, 3 steps an epoch, no held-out classes."""
    settings = dict(
        datasets=[str(folder)],
        out_dir=str(out),
        num_concepts=16,
        input_size=INPUT,
        epochs=4,
        warmup_epochs=1,
        batch_size=5,
        lr=1e-3,
        distill_weight=0.0,
        val_fraction=0.0,
        workers=0,
        device="cpu",
        final_test=False,
        pretrained=False,
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def fixed_loss(trainer: Trainer) -> float:
    """The training objective on the un-augmented training images: comparable across steps."""
    preprocess = trainer.preprocess
    x = torch.from_numpy(np.stack([pp.load(p, preprocess) for p in trainer.train_set.paths]))
    y = torch.tensor(trainer.train_set.labels)
    trainer.model.eval()
    with torch.no_grad():
        return float(trainer.criterion(trainer.model(x), y))


@pytest.mark.parametrize(("mode", "amp"), [("tail", False), ("full", False), ("full", True)])
def test_a_few_steps_lower_the_loss(labelled_folder, tmp_path, mode, amp):
    """9 steps from the ImageNet backbone (measured: loss x0.11 in tail mode, x0.53 in full
    mode, x0.62 with bfloat16 autocast; the random-init runs elsewhere in this file only need
    to run)."""
    trainer = Trainer(
        config(labelled_folder, tmp_path / "run", mode=mode, pretrained=True, epochs=3, amp=amp)
    )
    assert len(trainer.train_set) == 15 and trainer.num_classes == 5
    before = fixed_loss(trainer)
    best = trainer.fit()
    after = fixed_loss(trainer)
    assert after < 0.8 * before, (before, after)
    assert best.is_file() and (tmp_path / "run" / "last.pt").is_file()
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert len(report["history"]) == 3
    assert all(np.isfinite(h["loss"]) for h in report["history"])
    if mode == "tail":  # the early stages are frozen, and their features were cached once
        assert list((tmp_path / "run" / "cache").glob("trunk-*.pt"))
    # autocast computes in bfloat16 but the weights it trains stay float32
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())


@pytest.mark.parametrize("mode", ["tail", "full"])
def test_the_hold_out_anchor_is_the_pretrained_backbone_before_tuning(
    labelled_folder, tmp_path, mode, capsys
):
    """The report carries what plain pooled features score on the held-out classes, taken
    before any weight moved (a fresh trainer computes the same figures), and the run warns
    when its best epoch falls below them."""
    settings = dict(mode=mode, pretrained=True, epochs=2, val_fraction=0.4)
    fresh = Trainer(config(labelled_folder, tmp_path / "fresh", **settings))
    expected = fresh.validate(pooled_backbone=True)
    assert set(expected) >= {"R@1", "MAP@R"} and len(fresh.val_set) == 6
    trainer = Trainer(config(labelled_folder, tmp_path / "run", **settings))
    trainer.fit()
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["holdout_anchor"] == pytest.approx(expected, abs=1e-6)
    best = report["best"]["val"]["MAP@R"]
    below = best < expected["MAP@R"]
    assert ("is below the plain pretrained backbone" in capsys.readouterr().out) == below
    # an anchor the model cannot reach: the run says so
    beaten = Trainer(config(labelled_folder, tmp_path / "beaten", **settings))
    beaten.holdout_anchor = {k: 100.5 for k in expected}
    beaten.fit()
    out = capsys.readouterr().out
    assert "warning: the best epoch's hold-out MAP@R" in out and "(100.50)" in out


def test_relational_distillation_compares_similarity_order_not_scale():
    g = torch.Generator().manual_seed(0)
    teacher = torch.rand(12, 40, generator=g)  # all positive, like pooled ReLU6 features
    same_order = teacher @ torch.linalg.qr(torch.randn(40, 40, generator=g))[0]  # rotated
    assert float(relational_distillation(teacher, teacher)) == pytest.approx(0, abs=1e-6)
    assert float(relational_distillation(same_order, teacher)) == pytest.approx(0, abs=1e-5)
    unrelated = torch.randn(12, 16, generator=g, requires_grad=True)
    loss = relational_distillation(unrelated, teacher)
    assert float(loss) > 0.5
    loss.backward()
    assert unrelated.grad is not None and float(unrelated.grad.abs().sum()) > 0


@pytest.mark.parametrize("mode", ["tail", "full"])
def test_distillation_term_is_trained_against_a_frozen_copy(labelled_folder, tmp_path, mode):
    trainer = Trainer(
        config(labelled_folder, tmp_path / "run", mode=mode, epochs=2, distill_weight=1.0)
    )
    teacher = {k: v.clone() for k, v in trainer.teacher.state_dict().items()}
    trainer.fit()
    assert all(h["distill"] > 0 for h in trainer.history)
    assert all(torch.equal(teacher[k], v) for k, v in trainer.teacher.state_dict().items())
    tuned = trainer.model.backbone.tail if mode == "tail" else trainer.model.backbone
    assert any(not torch.equal(teacher[k], v) for k, v in tuned.state_dict().items())
    assert Trainer(config(labelled_folder, tmp_path / "off")).teacher is None


def test_tail_mode_leaves_the_trunk_untouched(labelled_folder, tmp_path):
    trainer = Trainer(config(labelled_folder, tmp_path / "run", epochs=2))
    trunk = {k: v.clone() for k, v in trainer.model.backbone.trunk.state_dict().items()}
    tail = {k: v.clone() for k, v in trainer.model.backbone.tail.state_dict().items()}
    trainer.fit()
    after = trainer.model.backbone.trunk.state_dict()
    assert all(torch.equal(trunk[k], after[k]) for k in trunk)
    changed = trainer.model.backbone.tail.state_dict()
    assert any(not torch.equal(tail[k], changed[k]) for k in tail)


def test_resuming_continues_exactly_where_training_stopped(labelled_folder, tmp_path, monkeypatch):
    train_epoch = Trainer.train_epoch

    def crash_in_epoch_2(self):
        if self.epoch == 1:
            raise KeyboardInterrupt  # as if the machine went away mid-run
        return train_epoch(self)

    first = Trainer(config(labelled_folder, tmp_path / "a", epochs=3))
    monkeypatch.setattr(Trainer, "train_epoch", crash_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    monkeypatch.undo()
    resumed = Trainer(config(labelled_folder, tmp_path / "b", epochs=3))
    resumed.resume(tmp_path / "a" / "last.pt")
    assert resumed.epoch == 1 and len(resumed.history) == 1
    resumed.fit()
    straight = Trainer(config(labelled_folder, tmp_path / "c", epochs=3))
    straight.fit()
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    for key, value in straight.model.state_dict().items():
        assert torch.allclose(resumed.model.state_dict()[key], value, atol=1e-6), key
    assert resumed.history[-1]["loss"] == pytest.approx(straight.history[-1]["loss"], rel=1e-5)


# --- the CLI --------------------------------------------------------------------------------


def train_args(*datasets: Path, out: Path, extra: tuple[str, ...] = ()) -> list[str]:
    return [
        "train",
        *map(str, datasets),
        "--out",
        str(out),
        "--concepts",
        "16",
        "--input-size",
        str(INPUT),
        "--epochs",
        "1",
        "--warmup-epochs",
        "0",
        "--batch-size",
        "5",
        "--val-fraction",
        "0",
        "--workers",
        "0",
        "--no-final-test",
        "--no-pretrained",
        "--device",
        "cpu",
        *extra,
    ]


def test_train_command_then_export(labelled_folder, tmp_path):
    out = tmp_path / "run"
    args = train_args(labelled_folder, out=out, extra=("--mode", "full"))
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "best checkpoint" in result.output
    model = tmp_path / "m.fp32.onnx"
    exported = CliRunner().invoke(
        main, ["onnx", "--checkpoint", str(out / "best.pt"), "--out", str(model)]
    )
    assert exported.exit_code == 0, exported.output
    from cmn_export.onnx_export import read_metadata

    meta = read_metadata(model)
    assert meta.training_data == str(labelled_folder)
    assert meta.num_concepts == 16 and meta.preprocess.input_size == INPUT


def _fails(args: list[str], *expected: str) -> str:
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0
    message = result.output.strip().splitlines()[-1] if result.output.strip() else ""
    assert message.startswith("error:"), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    for text in expected:
        assert text in message, message
    return message


def _copy_tree(labelled_folder: Path, dest: Path) -> Path:
    shutil.copytree(labelled_folder, dest)
    return dest


def test_manifest_with_unknown_columns_is_refused(labelled_folder, tmp_path):
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    manifest = root / "manifest.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "class_name", "split", "photographer"])
        for label, folder in enumerate(sorted(labelled_folder.iterdir())):
            for image in sorted(folder.iterdir()):
                shutil.copy(image, root / "images" / f"{folder.name}_{image.name}")
                writer.writerow(
                    [f"images/{folder.name}_{image.name}", label, folder.name, "train", "me"]
                )
    _fails(train_args(root, out=tmp_path / "run"), str(manifest), "unknown columns", "photographer")
    assert not (tmp_path / "run" / "best.pt").exists()


def test_empty_dataset_is_refused(tmp_path):
    root = tmp_path / "empty"
    (root / "cats").mkdir(parents=True)
    (root / "cats" / "notes.txt").write_text("no images here")
    _fails(train_args(root, out=tmp_path / "run"), str(root), "empty")


def test_manifest_without_a_train_split_is_refused(labelled_folder, tmp_path):
    root = tmp_path / "testonly"
    root.mkdir()
    manifest = root / "manifest.csv"
    rows = ["path,label,class_name,split"]
    for label, folder in enumerate(sorted(labelled_folder.iterdir())):
        for image in sorted(folder.iterdir()):
            rows.append(f"{image},{label},{folder.name},test")
    manifest.write_text("\n".join(rows) + "\n")
    _fails(train_args(root, out=tmp_path / "run"), str(manifest), "split 'train'", "empty")


def test_class_with_a_single_image_is_refused(labelled_folder, tmp_path):
    root = _copy_tree(labelled_folder, tmp_path / "ds")
    lonely = root / "rocket"
    for extra in sorted(lonely.iterdir())[1:]:
        extra.unlink()
    _fails(train_args(root, out=tmp_path / "run"), str(root), "single image", "rocket")


@pytest.mark.parametrize("problem", ["missing", "garbage", "weights-only"])
def test_resume_from_a_bad_checkpoint_is_refused(labelled_folder, tmp_path, problem):
    path = tmp_path / "last.pt"
    if problem == "garbage":
        path.write_bytes(b"PK\x03\x04 this is no zip" * 20)
    elif problem == "weights-only":
        torch.save({"format": "cmn-export-checkpoint/1", "model": {}, "config": {}}, path)
    args = train_args(labelled_folder, out=tmp_path / "run", extra=("--resume", str(path)))
    _fails(args, str(path))


# --- --backbone-weights: start from a state dict file (torchvision ResNet-50, carried copies)


def test_backbone_weights_file_loads_the_same_network_as_the_table(tmp_path):
    from cmn_export.backbones import Backbone, get_spec

    spec = get_spec("tf_efficientnet_lite0")
    reference = Backbone(spec, pretrained=True)
    import timm

    net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    net.load_state_dict(spec.weights())
    half = tmp_path / "lite0.fp16.pt"
    torch.save(
        {k: v.half() if v.is_floating_point() else v for k, v in net.state_dict().items()}, half
    )
    loaded = Backbone(spec, pretrained=False, weights_file=half)
    for (name, a), b in zip(reference.state_dict().items(), loaded.state_dict().values()):
        assert b.dtype == a.dtype, name
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-4), name  # fp16 rounding only


def test_backbone_weights_file_fits_torchvision_resnet50(tmp_path):
    import torchvision

    from cmn_export.backbones import Backbone, get_spec

    source = torchvision.models.resnet50(weights=None)
    path = tmp_path / "resnet50.pth"
    torch.save(source.state_dict(), path)
    loaded = Backbone(get_spec("resnet50"), pretrained=False, weights_file=path)
    assert torch.equal(loaded.tail[-1][-1].conv3.weight, source.layer4[-1].conv3.weight)
    assert torch.equal(loaded.trunk[0].weight, source.conv1.weight)


@pytest.mark.parametrize("problem", ["missing", "foreign", "wrong-network", "garbage"])
def test_train_refuses_bad_backbone_weights(labelled_folder, tmp_path, problem):
    path = tmp_path / "weights.pt"
    expected = {
        "missing": "not found",
        "foreign": "not a state dict of tensors",
        "wrong-network": "does not fit",
        "garbage": "not a readable state dict",
    }[problem]
    if problem == "foreign":
        torch.save({"epoch": 3}, path)
    elif problem == "wrong-network":
        torch.save(torch.nn.Linear(3, 2).state_dict(), path)
    elif problem == "garbage":
        path.write_bytes(b"\x00not a torch file" * 10)
    extra = ("--backbone-weights", str(path))
    args = train_args(labelled_folder, out=tmp_path / "run", extra=extra)
    _fails(args, str(path), expected)
    assert not (tmp_path / "run" / "best.pt").exists()
