"""`--token-norm none --head-init features`: a CMN head that starts at the pretrained
features (real Lite0 ImageNet weights, real photos), trains, reloads and exports."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from click.testing import CliRunner  # noqa: E402

from cmn_edge import preprocess as pp  # noqa: E402
from cmn_export import data as D  # noqa: E402
from cmn_export.checkpoint import load_checkpoint  # noqa: E402
from cmn_export.cli import main  # noqa: E402
from cmn_export.heads import build_model  # noqa: E402
from cmn_export.model import CMN  # noqa: E402
from cmn_export.onnx_export import build_metadata, export_onnx  # noqa: E402
from cmn_export.train import TrainConfig, Trainer  # noqa: E402

INPUT = 96  # a 3 x 3 grid


def photo_batch(folder, model) -> torch.Tensor:
    paths = sorted(folder.rglob("*.jpg"))
    preprocess = model.spec.preprocess(INPUT)
    return torch.from_numpy(np.stack([pp.load(p, preprocess) for p in paths]))


def test_a_head_started_from_the_features_embeds_them_along_their_principal_directions(
    labelled_folder,
):
    """The embedding at the start is the average-pooled features projected on their first C
    principal directions (computed here apart, with numpy), and every concept attends
    almost evenly: the head starts where the plain backbone is."""
    torch.manual_seed(0)
    concepts = 8
    model = CMN(num_concepts=concepts, token_norm="none").eval()  # ImageNet weights
    x = photo_batch(labelled_folder, model)
    with torch.no_grad():
        features = model.backbone(x)
        random_start = model.embed_features(features).numpy()
        done = model.head.init_from_features(features)
        out = model.explain_features(features)
    assert done["images"] == len(x) == 15 and 0.5 < done["variance_explained"] <= 1.0

    pooled = features.mean(dim=(2, 3)).double().numpy()
    _, _, vt = np.linalg.svd(pooled, full_matrices=False)
    projected = pooled @ vt[:concepts].T
    expected = projected / np.linalg.norm(projected, axis=1, keepdims=True)
    embedding = out["embedding"].double().numpy()
    # directions are signed freely by the SVD: compare the similarities, which do not care
    assert np.abs(embedding @ embedding.T - expected @ expected.T).max() < 0.02
    # the check has teeth: the random head's similarities are far from these
    assert np.abs(random_start @ random_start.T - expected @ expected.T).max() > 0.1
    regions = out["attention"].shape[-1] * out["attention"].shape[-2]
    attention = out["attention"].flatten(2)
    assert attention.min() > 0.5 / regions and attention.max() < 2.0 / regions


def features_config(folder, out) -> TrainConfig:
    return TrainConfig(
        datasets=[str(folder)],
        out_dir=str(out),
        num_concepts=8,
        head_options={"token_norm": "none", "init": "features"},
        input_size=INPUT,
        epochs=2,
        warmup_epochs=1,
        batch_size=5,
        lr=1e-4,
        val_fraction=0.0,
        workers=0,
        device="cpu",
        final_test=False,
    )


def test_the_proxies_start_at_the_class_means_of_the_started_head(labelled_folder, tmp_path):
    trainer = Trainer(features_config(labelled_folder, tmp_path / "run"))
    trainer.initialise_head()
    crop = D.center_crop(trainer._cached("train", trainer.train_set).float(), trainer._trunk_grid())
    with torch.no_grad():
        embedding = trainer.model.eval().forward_tail(crop)
    labels = torch.tensor(trainer.train_set.labels)
    means = torch.stack([embedding[labels == c].mean(0) for c in range(trainer.num_classes)])
    proxies = trainer.criterion.proxies.detach()
    cosine = (
        torch.nn.functional.normalize(proxies, dim=1)
        @ torch.nn.functional.normalize(means, dim=1).t()
    )
    assert cosine.diagonal().min() > 0.999
    assert (cosine - 2 * torch.eye(len(cosine))).max() < 0.999  # each near its own class only


def test_training_from_the_features_reloads_and_exports_with_its_head_options(
    labelled_folder, tmp_path
):
    out = tmp_path / "run"
    trainer = Trainer(features_config(labelled_folder, out))
    identity = torch.eye(1280)
    assert (trainer.model.head.token_proj.weight - identity).abs().max() > 0.5  # random
    best = trainer.fit()
    # set from the features before the first step (identity projection), then trained
    moved = (trainer.model.head.token_proj.weight - identity).abs().max()
    assert 0 < moved < 0.1, moved
    report = json.loads((out / "report.json").read_text())
    expected = {"token_norm": "none", "init": "features", "train": "all"}
    assert report["config"]["head_options"] == expected

    state = load_checkpoint(best)
    model = build_model(state["config"])
    model.load_state_dict(state["model"])  # strict: no LayerNorm weights expected or left
    assert isinstance(model.head.token_norm, torch.nn.Identity)
    model.eval().input_size = INPUT
    path = export_onnx(
        model, tmp_path / "m.fp32.onnx", build_metadata(model, "m", training_data="unit test")
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = photo_batch(labelled_folder, model)[:4]
    (embedding,) = session.run(["embedding"], {"images": x.numpy()})
    with torch.no_grad():
        assert np.abs(embedding - model(x).numpy()).max() < 1e-4


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--token-norm", "batch"], "'batch' is not one of 'layer', 'none'"),
        (["--head-init", "pca"], "'pca' is not one of 'random', 'features'"),
        (["--head", "dgml", "--head-init", "features"], "--head-init applies to --head cmn"),
        (["--head-train", "attention"], "--head-train attention needs --head-init features"),
        (["--head-train", "keys"], "'keys' is not one of 'all', 'attention', 'none'"),
    ],
)
def test_train_refuses_head_options_it_cannot_honour(labelled_folder, tmp_path, extra, expected):
    args = ["train", str(labelled_folder), "--out", str(tmp_path / "run"), *extra]
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0
    assert expected in result.output, result.output
    assert not (tmp_path / "run" / "last.pt").exists()


def test_a_start_that_no_epoch_beats_on_the_hold_out_stays_best(labelled_folder, tmp_path):
    """With the learning rate at 0 no epoch can beat the start on the held-out classes, so
    best.pt is the head as it was initialised (epoch 0), not the last epoch."""
    config = features_config(labelled_folder, tmp_path / "run")
    config.val_fraction, config.lr, config.epochs, config.warmup_epochs = 0.4, 0.0, 1, 0
    trainer = Trainer(config)
    best = trainer.fit()
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["best"]["epoch"] == 0
    assert report["history"][0]["val"]["MAP@R"] <= report["best"]["val"]["MAP@R"]
    saved = load_checkpoint(best)["model"]
    assert torch.equal(saved["head.token_proj.weight"], torch.eye(1280))


@pytest.mark.parametrize(
    ("train", "moving"),
    [("attention", {"head.key_norm", "head.key_proj"}), ("none", set()), ("all", None)],
)
def test_head_train_keeps_what_each_concept_measures_where_the_features_put_it(
    labelled_folder, tmp_path, train, moving
):
    """``--head-train attention``: the concept vectors, queries and token projection stay at
    the features start (what each concept measures) and only the keys (where it looks) and
    the backbone move; ``none``: the backbone alone. ``all`` moves every group, so the
    comparison can tell them apart."""
    config = features_config(labelled_folder, tmp_path / "run")
    config.head_options = {**config.head_options, "train": train}  # warm-up: 1 of 2 epochs
    trainer = Trainer(config)
    trainer.initialise_head()
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.fit()
    after = trainer.model.state_dict()
    moved = {
        k for k in start if start[k].is_floating_point() and not torch.equal(start[k], after[k])
    }
    head_groups = {
        k.rsplit(".", 1)[0] if "." in k[5:] else k for k in moved if k.startswith("head.")
    }
    if moving is None:
        every = {"head.concepts", "head.query_proj", "head.token_proj", "head.key_proj"}
        assert every <= head_groups
    else:
        assert head_groups == moving
    assert any(k.startswith("backbone.tail") for k in moved)
