"""DGML (attentive grouping) as the second head: its shapes and normalisation, the diversity
loss, a tiny training run, ONNX parity and metadata, INT8, qat, and that CMN checkpoints and
files from before heads existed still read as CMN."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

import torch.nn.functional as F  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from cmn_edge import preprocess as pp  # noqa: E402
from cmn_edge.metadata import MetadataError, ModelMetadata  # noqa: E402
from cmn_export.checkpoint import CHECKPOINT_FORMAT, model_from_checkpoint  # noqa: E402
from cmn_export.cli import main  # noqa: E402
from cmn_export.dgml import DGML, diversity_loss  # noqa: E402
from cmn_export.model import CMN  # noqa: E402
from cmn_export.onnx_export import read_metadata  # noqa: E402
from cmn_export.train import TrainConfig, Trainer  # noqa: E402

INPUT = 96  # a 3 x 3 attention grid
GROUPS, GROUP_DIM = 3, 8


@pytest.fixture(scope="module")
def small_dgml() -> DGML:
    torch.manual_seed(0)
    model = DGML("tf_efficientnet_lite0", GROUPS, GROUP_DIM, pretrained=False).eval()
    model.input_size = INPUT
    return model


def _images(batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, 3, INPUT, INPUT, generator=torch.Generator().manual_seed(seed))


# --- the head -------------------------------------------------------------------------------


def test_head_shapes_and_normalisation(small_dgml):
    with torch.no_grad():
        out = small_dgml.explain(_images(4, 1))
        plain = small_dgml(_images(4, 1))
    assert out["embedding"].shape == (4, GROUPS * GROUP_DIM)
    assert out["groups"].shape == (4, GROUPS, GROUP_DIM)
    assert out["attention"].shape == (4, GROUPS, 3, 3)
    assert small_dgml.num_concepts == GROUPS * GROUP_DIM
    # each group is unit length; the embedding is their concatenation over sqrt(G)
    assert torch.allclose(out["groups"].norm(dim=-1), torch.ones(4, GROUPS), atol=1e-5)
    concatenated = out["groups"].flatten(1) / math.sqrt(GROUPS)
    assert torch.allclose(out["embedding"], concatenated, atol=1e-6)
    assert torch.allclose(plain, out["embedding"], atol=1e-6)
    # so the inner product of two embeddings is the mean of the per-group cosines
    a, b = out["groups"][0], out["groups"][1]
    per_group = F.cosine_similarity(a, b, dim=-1)
    assert float(out["embedding"][0] @ out["embedding"][1]) == pytest.approx(
        float(per_group.sum()) / GROUPS, abs=1e-6
    )
    # each group's attention is a distribution over the positions, and the groups differ
    attention = out["attention"].flatten(2)
    assert (attention >= 0).all()
    assert torch.allclose(attention.sum(-1), torch.ones(4, GROUPS), atol=1e-5)
    assert not torch.allclose(attention[:, 0], attention[:, 1], atol=1e-4)


def test_the_keys_are_an_eighth_of_the_channels_and_the_values_shared(small_dgml):
    head = small_dgml.head
    assert head.key_proj.weight.shape == (1280 // 8, 1280)  # 2048 -> 256 upstream
    assert head.value_proj.weight.shape == (GROUP_DIM, 1280)  # one projection for all groups
    assert head.queries.weight.shape == (GROUPS, 1280 // 8)  # one query vector per group
    assert all(m.bias is None for m in (head.key_proj, head.value_proj, head.queries))
    resnet = DGML("resnet50", 2, 4, pretrained=False).head
    assert resnet.key_proj.weight.shape == (256, 2048)


def test_the_folded_inference_head_computes_what_the_training_head_computes(small_dgml):
    features = torch.randn(2, 1280, 3, 3, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        groups, attention = small_dgml.head(features)
        keys = small_dgml.head.group_keys()
        folded, folded_attention = small_dgml.head.attend_folded(features, keys)
    assert torch.allclose(groups, folded, atol=1e-5)
    assert torch.allclose(attention, folded_attention, atol=1e-6)


# --- the diversity loss ---------------------------------------------------------------------


def test_diversity_loss_on_hand_made_groups():
    def loss(*vectors: list[float]) -> float:
        return float(diversity_loss(torch.tensor([vectors], dtype=torch.float32)))

    softplus = lambda x: math.log1p(math.exp(x))  # noqa: E731
    # orthogonal groups cost almost nothing, identical ones softplus(25); the scale of a
    # group does not matter (cosines)
    assert loss([1, 0], [0, 1]) == pytest.approx(softplus(-25), rel=1e-3)
    assert loss([1, 0], [3, 0]) == pytest.approx(softplus(25), rel=1e-6)
    # cosine 0.5 is the margin: softplus(0) = ln 2
    assert loss([1, 0], [0.5, math.sqrt(3) / 2]) == pytest.approx(math.log(2), rel=1e-5)
    # three groups: the mean over the three pairs (cosines 0, 1, 0)
    expected = (softplus(-25) + softplus(25) + softplus(-25)) / 3
    assert loss([1, 0], [0, 1], [2, 0]) == pytest.approx(expected, rel=1e-6)
    # averaged over images; one group has no pair
    batch = torch.tensor([[[1.0, 0], [0, 1]], [[1, 0], [1, 0]]])
    assert float(diversity_loss(batch)) == pytest.approx((softplus(-25) + softplus(25)) / 2)
    assert float(diversity_loss(torch.randn(4, 1, 5))) == 0.0
    # it pushes the groups apart
    groups = torch.tensor([[[1.0, 0.2], [1.0, 0.0]]], requires_grad=True)
    diversity_loss(groups).backward()
    step = groups.detach() - 0.01 * groups.grad
    assert float(diversity_loss(step)) < float(diversity_loss(groups.detach()))


# --- training -------------------------------------------------------------------------------


def _config(folder: Path, out: Path, **overrides) -> TrainConfig:
    settings = dict(
        datasets=[str(folder)],
        out_dir=str(out),
        head="dgml",
        head_options={"groups": GROUPS, "group_dim": GROUP_DIM},
        input_size=INPUT,
        epochs=3,
        warmup_epochs=1,
        batch_size=5,
        lr=1e-3,
        distill_weight=0.0,
        val_fraction=0.0,
        workers=0,
        device="cpu",
        final_test=False,
        pretrained=True,
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def _fixed_loss(trainer: Trainer) -> float:
    """The per-group Proxy-Anchor loss on the un-augmented training images."""
    preprocess = trainer.preprocess
    x = torch.from_numpy(np.stack([pp.load(p, preprocess) for p in trainer.train_set.paths]))
    y = torch.tensor(trainer.train_set.labels)
    trainer.model.eval()
    with torch.no_grad():
        _, parts, _ = trainer.model.training_terms(trainer.model.backbone(x))
        return float(trainer.criterion(parts, y))


def test_a_tiny_dgml_run_lowers_the_loss(labelled_folder, tmp_path):
    trainer = Trainer(_config(labelled_folder, tmp_path / "run"))
    assert isinstance(trainer.model, DGML)
    assert trainer.config.head_options["diversity_weight"] == 0.01  # the table's default
    assert len(trainer.criterion.losses) == GROUPS  # Proxy-Anchor per group, own proxies
    before = _fixed_loss(trainer)
    best = trainer.fit()
    after = _fixed_loss(trainer)
    assert after < 0.8 * before, (before, after)
    assert all(h["diversity"] > 0 and np.isfinite(h["loss"]) for h in trainer.history)
    assert "separation" not in trainer.history[0]
    model, config = model_from_checkpoint(best)
    assert isinstance(model, DGML) and config["head"] == "dgml"
    assert (model.head.groups, model.head.group_dim) == (GROUPS, GROUP_DIM)


def test_train_command_takes_the_head_and_its_options(labelled_folder, tmp_path):
    common = [
        "train",
        str(labelled_folder),
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
        "--max-steps-per-epoch",
        "1",
    ]
    out = tmp_path / "run"
    args = [*common, "--out", str(out), "--head", "dgml", "--groups", "2", "--group-dim", "4"]
    result = CliRunner().invoke(main, [*args, "--diversity-weight", "0.03"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["head"] == "dgml"
    assert report["config"]["head_options"] == {
        "groups": 2,
        "group_dim": 4,
        "diversity_weight": 0.03,
    }
    refused = CliRunner().invoke(main, [*common, "--out", str(tmp_path / "x"), "--groups", "4"])
    assert refused.exit_code != 0
    assert "--groups applies to --head dgml" in refused.output
    assert not (tmp_path / "x" / "best.pt").exists()


# --- export ---------------------------------------------------------------------------------


def _save_checkpoint(model, path: Path, **config) -> Path:
    settings = TrainConfig(datasets=["data/birds"], input_size=INPUT, command="unit test", **config)
    state = {
        "format": CHECKPOINT_FORMAT,
        "config": asdict(settings),
        "model": model.state_dict(),
        "best": {},
    }
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def exported(small_dgml, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dgml")
    checkpoint = _save_checkpoint(
        small_dgml,
        root / "best.pt",
        head="dgml",
        head_options={"groups": GROUPS, "group_dim": GROUP_DIM, "diversity_weight": 0.01},
    )
    fp32 = root / "dgml.fp32.onnx"
    result = CliRunner().invoke(main, ["onnx", "--checkpoint", str(checkpoint), "--out", str(fp32)])
    assert result.exit_code == 0, result.output
    assert "max abs diff" in result.output
    return {"root": root, "checkpoint": checkpoint, "fp32": fp32}


def test_export_parity_and_outputs(small_dgml, exported):
    session = ort.InferenceSession(str(exported["fp32"]), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    assert names == ["embedding", "concept_scores", "attention", "group_attention"]
    for batch in (1, 3):
        x = _images(batch, 10 + batch)
        with torch.no_grad():
            reference = small_dgml.explain(x)
        embedding, scores, attention, groups = session.run(None, {"images": x.numpy()})
        assert np.abs(embedding - reference["embedding"].numpy()).max() < 1e-4
        assert np.abs(groups - reference["attention"].numpy()).max() < 1e-4
        assert groups.shape == (batch, GROUPS, 3, 3)
        assert np.abs(np.linalg.norm(embedding, axis=1) - 1).max() < 1e-5
        # the scores are the unit groups side by side: sqrt(G) x the embedding
        assert np.abs(scores - math.sqrt(GROUPS) * embedding).max() < 1e-4
        # every dimension carries the map of its group
        per_dim = attention.reshape(batch, GROUPS, GROUP_DIM, 3, 3)
        assert np.array_equal(per_dim, np.broadcast_to(groups[:, :, None], per_dim.shape))


def test_exported_metadata_carries_the_head_groups_and_dims(exported):
    meta = read_metadata(exported["fp32"])
    assert (meta.head, meta.groups, meta.group_dim) == ("dgml", GROUPS, GROUP_DIM)
    assert meta.num_concepts == GROUPS * GROUP_DIM
    assert meta.region_grid == (0, 0)  # no DIML regions: no concept head to take them from
    import onnx

    props = {p.key: p.value for p in onnx.load(str(exported["fp32"])).metadata_props}
    assert props["cmn_edge.head"] == "dgml"
    assert (props["cmn_edge.groups"], props["cmn_edge.group_dim"]) == ("3", "8")


def test_the_runtime_embeds_and_searches_with_a_dgml_file(small_dgml, exported, photos):
    from cmn_edge import Embedder

    embedder = Embedder(exported["fp32"], precision="fp32", threads=1)
    assert embedder.num_concepts == GROUPS * GROUP_DIM
    vectors = embedder.embed([photos["cat"], photos["rocket"], photos["cat"]])
    x = torch.from_numpy(embedder.load(photos["cat"]))[None]
    with torch.no_grad():
        expected = small_dgml(x).numpy()
    assert np.abs(vectors[0] - expected[0]).max() < 1e-4
    assert vectors[0] @ vectors[2] == pytest.approx(1.0, abs=1e-5)
    assert vectors[0] @ vectors[1] < 1 - 1e-4


def test_regions_refuses_a_dgml_file(exported, tmp_path):
    result = CliRunner().invoke(
        main, ["regions", str(exported["fp32"]), "--out", str(tmp_path / "r.onnx")]
    )
    assert result.exit_code != 0
    assert "DGML model has no concept head" in result.output
    assert not (tmp_path / "r.onnx").exists()


def test_quantize_and_validate_a_dgml_file(exported, labelled_folder):
    import onnx

    from cmn_export.quantize import QuantizeOptions, backbone_output, float_plan

    fp32, int8 = exported["fp32"], exported["root"] / "dgml.int8.onnx"
    runner = CliRunner()
    result = runner.invoke(
        main, ["quantize", str(fp32), "--calibration", str(labelled_folder), "--check-count", "3"]
    )
    assert result.exit_code == 0, result.output
    meta = read_metadata(int8)
    assert (meta.precision, meta.head, meta.groups, meta.group_dim) == ("int8", "dgml", 3, 8)
    # the head starts at the backbone's feature map, not at a head projection
    graph = onnx.load(str(fp32)).graph
    feature = backbone_output(graph)
    producer = next(n for n in graph.node if feature in n.output)
    assert producer.op_type != "MatMul"
    plan = float_plan(onnx.load(str(fp32)), QuantizeOptions())
    assert plan.feature == feature and plan.head_nodes  # the head stays float ...
    named = onnx.load(str(fp32)).graph  # ... but not the backbone's convolutions
    convs = {n.name for n in named.node if n.op_type == "Conv"}
    assert convs and not convs & set(plan.head_nodes)
    report = exported["root"] / "v.json"
    result = runner.invoke(
        main,
        [
            "validate",
            str(fp32),
            "--int8",
            str(int8),
            "--checkpoint",
            str(exported["checkpoint"]),
            "--data",
            str(labelled_folder),
            "--split",
            "train",
            "--runs",
            "1",
            "--report",
            str(report),
        ],
    )
    assert result.exit_code == 0, result.output
    document = json.loads(report.read_text())
    assert document["parity"]["ok"] and document["parity"]["max_abs_diff"]["embedding"] < 1e-4
    assert 0.5 < document["int8_vs_fp32"]["mean_cosine"] <= 1 + 1e-6


def test_qat_simulation_on_a_dgml_head_leaves_no_trace():
    from cmn_export.qat import simulate_int8

    torch.manual_seed(0)
    model = DGML("tf_efficientnet_lite0", GROUPS, GROUP_DIM, pretrained=True).eval()
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        before = model(x)
        sim = simulate_int8(model)
        simulated = model(x)
        sim.enabled = False
        switched_off = model(x)
        sim.remove()
        after = model(x)
    assert torch.equal(before, after) and torch.allclose(before, switched_off, atol=1e-6)
    cos = F.cosine_similarity(simulated, before).min()
    assert 0.8 < cos < 0.99999, cos  # rounded, but still the same embedding
    assert not any("parametrizations" in k for k in model.state_dict())


def test_qat_command_fine_tunes_a_dgml_checkpoint_that_exports(exported, labelled_folder, tmp_path):
    out = tmp_path / "qat.pt"
    args = ["qat", exported["checkpoint"], labelled_folder, "--out", out, "--epochs", "1"]
    args += ["--batch-size", "5", "--workers", "0", "--device", "cpu"]
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    assert "simulated INT8" in result.output
    tuned, config = model_from_checkpoint(out)
    assert isinstance(tuned, DGML) and config["qat"]["epochs"] == 1
    before = torch.load(exported["checkpoint"], weights_only=True)["model"]
    assert not torch.equal(before["head.value_proj.weight"], tuned.head.value_proj.weight)
    onnx_path = tmp_path / "qat.fp32.onnx"
    result = CliRunner().invoke(main, ["onnx", "--checkpoint", str(out), "--out", str(onnx_path)])
    assert result.exit_code == 0, result.output
    assert "DGML G=3 x D=8" in result.output
    meta = read_metadata(onnx_path)
    assert meta.head == "dgml" and "cmn-export qat" in meta.training_command


# --- CMN files and checkpoints from before heads existed ------------------------------------


def test_a_checkpoint_without_a_head_loads_as_cmn(tmp_path):
    torch.manual_seed(0)
    model = CMN("tf_efficientnet_lite0", num_concepts=16, pretrained=False)
    path = _save_checkpoint(model, tmp_path / "old.pt", num_concepts=16)
    state = torch.load(path, weights_only=True)
    del state["config"]["head"], state["config"]["head_options"]  # as written before heads
    torch.save(state, path)
    loaded, config = model_from_checkpoint(path)
    assert isinstance(loaded, CMN) and loaded.num_concepts == 16
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())


def test_metadata_without_a_head_reads_as_cmn_and_unknown_heads_are_refused():
    meta = ModelMetadata(name="m", backbone="b", num_concepts=6, attention_grid=(7, 7))
    raw = json.loads(meta.to_json())
    for key in ("head", "groups", "group_dim"):
        del raw[key]  # a file written before heads existed
    old = ModelMetadata.from_json(json.dumps(raw))
    assert (old.head, old.groups, old.group_dim) == ("cmn", 0, 0)
    with pytest.raises(MetadataError, match="head 'vit' is not supported by this runtime"):
        ModelMetadata.from_json(json.dumps({**raw, "head": "vit"}))
    with pytest.raises(MetadataError, match="4 groups of 2 dimensions for a 6-d embedding"):
        ModelMetadata.from_json(json.dumps({**raw, "head": "dgml", "groups": 4, "group_dim": 2}))
    good = ModelMetadata.from_json(json.dumps({**raw, "head": "dgml", "groups": 3, "group_dim": 2}))
    assert (good.head, good.groups, good.group_dim) == ("dgml", 3, 2)
