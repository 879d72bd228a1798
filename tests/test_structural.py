"""DIML structural matching: the region output, the Sinkhorn plan, explanations that add up."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cmn_edge import Embedder
from cmn_edge.embedder import ModelError
from cmn_edge.index import Index
from cmn_edge.metrics import retrieval_metrics
from cmn_edge.registry import resolve_model_path
from cmn_edge.structural import (
    StructuralError,
    marginals,
    match,
    sinkhorn,
    structural_scores,
    unit_rows,
)

ot = pytest.importorskip("ot")  # POT, the oracle: tests only
onnx = pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def regions(photos: dict[str, Path]) -> tuple[np.ndarray, np.ndarray]:
    return Embedder(threads=2).embed_regions(list(photos.values()))


def test_region_output_shape_and_units(regions) -> None:
    emb, reg = regions
    assert reg.shape == (len(emb), 16, emb.shape[1])
    assert np.allclose(np.linalg.norm(reg, axis=-1), 1.0, atol=1e-4)
    # the regions describe the same image as the global vector: their mean points its way
    mean = unit_rows(reg.mean(1))
    assert ((mean * emb).sum(1) > 0.5).all()


def test_sinkhorn_matches_pot(regions) -> None:
    emb, reg = regions
    similarity = reg[0] @ reg[1].T
    u, v = marginals(reg[0], emb[1]), marginals(reg[1], emb[0])
    plan = sinkhorn(similarity, u, v, tolerance=1e-10, max_iterations=20000)
    oracle = ot.sinkhorn(
        u.astype(np.float64), v.astype(np.float64), 1.0 - similarity.astype(np.float64), 0.05,
        numItermax=20000, stopThr=1e-12,
    )  # fmt: skip
    assert np.abs(plan - oracle).max() < 1e-5
    assert plan.sum() == pytest.approx(1.0, abs=1e-4)


def test_contributions_sum_to_the_structural_score(regions) -> None:
    emb, reg = regions
    result = match(reg[0], emb[0], reg[2], emb[2])
    assert result.contributions().sum() == pytest.approx(result.score, abs=1e-5)
    pairs = result.top_pairs(256)
    assert sum(c for _, _, c in pairs) == pytest.approx(result.score, abs=1e-5)
    assert pairs[0][2] >= pairs[-1][2]
    batched = structural_scores(reg[0], emb[0], reg[[2, 3]], emb[[2, 3]])
    assert batched[0] == pytest.approx(result.score, abs=1e-5)


def test_negative_correlations_fall_back_to_uniform_mass() -> None:
    regions = unit_rows(np.abs(np.random.default_rng(0).standard_normal((16, 8))))
    other = -unit_rows(np.ones(8, np.float32))  # every cross-correlation negative
    mass = marginals(regions, other)
    assert np.allclose(mass, 1 / 16) and not np.isnan(mass).any()
    result = match(regions, -other, regions, other)
    assert np.isfinite(result.score)


def test_a_mask_that_removes_every_concept_is_refused(regions) -> None:
    emb, reg = regions
    with pytest.raises(StructuralError, match="every concept"):
        match(reg[0], emb[0], reg[1], emb[1], weights=np.zeros(emb.shape[1], np.float32))
    weights = np.ones(emb.shape[1], np.float32)
    weights[:100] = 0
    masked = match(reg[0], emb[0], reg[1], emb[1], weights=weights)
    assert masked.score != pytest.approx(match(reg[0], emb[0], reg[1], emb[1]).score)


def test_identity_rerank_changes_nothing(regions) -> None:
    emb, _ = regions
    emb = np.concatenate([emb, emb + 0.01])
    labels = np.arange(len(emb)) % (len(emb) // 2)
    keep = retrieval_metrics(emb, labels, rerank=lambda q, c, s: np.arange(len(c)))
    assert keep == retrieval_metrics(emb, labels)
    flipped = retrieval_metrics(emb, labels, rerank=lambda q, c, s: np.arange(len(c))[::-1])
    assert flipped["R@1"] < keep["R@1"]


def test_an_old_file_says_how_to_add_regions_and_the_upgrade_keeps_outputs(tmp_path, photos):
    from click.testing import CliRunner

    from cmn_export.cli import main

    shipped = resolve_model_path(None, "int8")
    model = onnx.load(str(shipped))
    keep = [n for n in model.graph.node if not n.name.startswith("/regions")]
    del model.graph.node[:]
    model.graph.node.extend(keep)
    inits = [i for i in model.graph.initializer if not i.name.startswith("/regions")]
    del model.graph.initializer[:]
    model.graph.initializer.extend(inits)
    outputs = [o for o in model.graph.output if o.name != "regions"]
    del model.graph.output[:]
    model.graph.output.extend(outputs)
    old = tmp_path / "old.int8.onnx"
    from dataclasses import replace

    from cmn_export.onnx_export import read_metadata, write_metadata

    write_metadata(model, replace(read_metadata(shipped), region_grid=(0, 0)))
    old.write_bytes(model.SerializeToString())

    legacy = Embedder(old, threads=2)
    with pytest.raises(ModelError, match="cmn-export regions"):
        legacy.embed_regions([photos["cat"]])
    with pytest.raises(ModelError, match="cmn-export regions"):
        Index.create(tmp_path / "kept.idx", legacy, regions=True)
    assert not (tmp_path / "kept.idx").exists()
    result = CliRunner().invoke(main, ["regions", str(old), "--out", str(tmp_path / "new.onnx")])
    assert result.exit_code == 0, result.output
    upgraded = Embedder(tmp_path / "new.onnx", threads=2)
    paths = list(photos.values())
    emb, reg = upgraded.embed_regions(paths)
    ref_emb, ref_reg = Embedder(shipped, threads=2).embed_regions(paths)
    assert np.array_equal(emb, legacy.embed(paths)) and np.array_equal(emb, ref_emb)
    assert np.allclose(reg, ref_reg, atol=1e-6)


def test_structural_figure_draws_the_top_pairs(regions, photos) -> None:
    from cmn_edge import preprocess as pp
    from cmn_edge.render import structural_figure

    emb, reg = regions
    embedder = Embedder(threads=1)
    crops = [
        pp.resize_and_crop(pp.open_image(photos[n], embedder.preprocess), embedder.preprocess)
        for n in ("cat", "coffee")
    ]
    result = match(reg[0], emb[0], reg[1], emb[1])
    few = np.asarray(structural_figure(*crops, result, (4, 4), top=1))
    many = np.asarray(structural_figure(*crops, result, (4, 4), top=12))
    assert few.shape == many.shape and few.shape[1] > 2 * crops[0].width
    assert (few != many).any(axis=-1).sum() > 500  # more pairs, more lines drawn


def test_explain_structural_cli(photos, tmp_path) -> None:
    import json

    from click.testing import CliRunner
    from PIL import Image

    from cmn_edge.cli import main

    pair = [str(photos["cat"]), str(photos["coffee"])]
    result = CliRunner().invoke(main, ["explain", *pair, "--structural", "--json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.output)["structural"]
    assert document["grid"] == [4, 4] and len(document["pairs"]) == 256
    total = sum(p["contribution"] for p in document["pairs"])
    assert total == pytest.approx(document["score"], abs=1e-5)
    shares = [p["contribution"] for p in document["pairs"]]
    assert shares == sorted(shares, reverse=True)
    plain, both = tmp_path / "plain.png", tmp_path / "both.png"
    for args, out in (([], plain), (["--structural"], both)):
        done = CliRunner().invoke(main, ["explain", *pair, "--heatmap", str(out), *args])
        assert done.exit_code == 0, done.output
    assert Image.open(both).height > Image.open(plain).height  # the region view below
    text = CliRunner().invoke(main, ["explain", *pair, "--structural"]).output
    assert "structural similarity" in text and "<->" in text
