"""A model's parts (issue #18's runtime side): a CMN's concepts, a DGML model's groups.

Masking, weighting, naming and explaining work on parts. For DGML a part is a block of D
dimensions: excluding it zeroes the block in the query, which is exact for inner product, so
a masked search must equal brute force over the gallery with those blocks zeroed, and a
hit's per-part contributions must sum to its score. The first half runs on synthetic DGML
embeddings (numpy only); the second on a real tiny DGML ONNX file (exported with torch, as
tests/test_dgml.py does) and the real CLI.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from cli_checks import one_line_error
from click.testing import CliRunner

from cmn_edge.index import ConceptError, ConceptIndex
from cmn_edge.metadata import ModelMetadata
from cmn_edge.parts import Parts

G, D = 4, 6  # synthetic: 4 groups of 6 dimensions
DGML_PARTS = Parts(G, D, "dgml")


def dgml_vectors(n: int, seed: int) -> np.ndarray:
    """Embeddings shaped as DGML's: G unit blocks of D dims, concatenated, over sqrt(G)."""
    rng = np.random.default_rng(seed)
    blocks = rng.standard_normal((n, G, D)).astype(np.float32)
    blocks /= np.linalg.norm(blocks, axis=-1, keepdims=True)
    return (blocks.reshape(n, G * D) / math.sqrt(G)).astype(np.float32)


def cosines(q: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """[N, G]: each group's cosine between the query and every gallery row."""
    qb = q.reshape(G, D) * math.sqrt(G)
    gb = gallery.reshape(len(gallery), G, D) * math.sqrt(G)
    return np.einsum("gd,ngd->ng", qb, gb)


@pytest.fixture(scope="module")
def gallery() -> np.ndarray:
    return dgml_vectors(3000, seed=1)


@pytest.fixture(scope="module")
def dgml_index(gallery) -> ConceptIndex:
    index = ConceptIndex(G * D, "dgml-test@0", parts=DGML_PARTS, exact_below=0, seed=3)
    index.add(gallery)
    return index


def brute_force(q: np.ndarray, gallery: np.ndarray, w_dims: np.ndarray, k: int):
    scores = gallery @ (q * w_dims)
    order = np.argsort(-scores, kind="stable")[:k]
    return order, scores[order]


# --- the Parts description -----------------------------------------------------------------


def test_parts_of_each_head_and_what_an_index_stores():
    cmn = ModelMetadata(name="m", backbone="b", num_concepts=5, attention_grid=(3, 3))
    assert Parts.of(cmn) == Parts(5) and Parts.of(cmn).noun == "concept"
    dgml = ModelMetadata(
        name="m",
        backbone="b",
        num_concepts=24,
        attention_grid=(3, 3),
        head="dgml",
        groups=4,
        group_dim=6,
    )
    parts = Parts.of(dgml)
    assert (parts.count, parts.size, parts.noun, parts.dims) == (4, 6, "group", 24)
    assert parts.describe() == "4 groups of 6 dimensions"
    assert parts.block(2) == slice(12, 18)
    assert Parts.from_info(parts.to_info(), 24) == parts
    assert Parts.from_info(None, 24) == Parts(24)  # an index from before parts: CMN
    with pytest.raises(ValueError, match="do not fill a 20-d embedding"):
        Parts.from_info(parts.to_info(), 20)
    w = parts.weights(exclude=[1], weights={3: 2.0})
    assert w.tolist() == [1.0] * 6 + [0.0] * 6 + [1.0] * 6 + [2.0] * 6
    assert parts.weights() is None
    # a DGML file's concept_names (one per dimension) do not name its groups
    assert parts.model_names(dgml) == (None,) * 4


# --- masking, weights, renormalising: exact ------------------------------------------------


@pytest.mark.parametrize("exact", [True, False])
def test_excluding_groups_equals_brute_force_with_zeroed_blocks(dgml_index, gallery, exact):
    queries = dgml_vectors(12, seed=7)
    for n, q in enumerate(queries):
        excluded = [n % G, (n + 1) % G] if n % 3 == 0 else [n % G]
        w = np.ones(G * D, np.float32)
        for j in excluded:
            w[j * D : (j + 1) * D] = 0
        ids, scores = dgml_index.search_ids(q, 10, exact=exact, exclude=excluded)
        want_ids, want_scores = brute_force(q, gallery, w, 10)
        assert ids.tolist() == want_ids.tolist(), (n, excluded)
        assert np.allclose(scores, want_scores, atol=1e-5)
        # the masked score is the sum of the kept groups' cosines over G
        kept = [j for j in range(G) if j not in excluded]
        expected = cosines(q, gallery[ids])[:, kept].sum(1) / G
        assert np.allclose(scores, expected, atol=1e-5)


def test_part_weights_and_only_scale_whole_blocks(dgml_index, gallery):
    q = dgml_vectors(1, seed=11)[0]
    weights = {0: 2.0, 2: 0.5}
    ids, scores = dgml_index.search_ids(q, 8, exact=True, weights=weights)
    factor = np.array([2.0, 1.0, 0.5, 1.0])
    per_group = cosines(q, gallery) @ factor / G
    assert ids.tolist() == np.argsort(-per_group, kind="stable")[:8].tolist()
    assert np.allclose(scores, per_group[ids], atol=1e-5)
    ids, scores = dgml_index.search_ids(q, 8, exact=True, only=[3])
    assert np.allclose(scores, cosines(q, gallery[ids])[:, 3] / G, atol=1e-5)


def test_renormalising_is_the_weighted_mean_of_the_kept_groups_cosines(dgml_index, gallery):
    q = dgml_vectors(1, seed=12)[0]
    hits = dgml_index.search(q, 6, exclude=[1], weights={2: 3.0}, renormalize=True, exact=True)
    w2 = np.array([1.0, 0.0, 9.0, 1.0])  # the cosine over the weighted blocks weighs by w^2
    per_group = cosines(q, gallery) @ w2 / w2.sum()
    assert [h.id for h in hits] == np.argsort(-per_group, kind="stable")[:6].tolist()
    assert np.allclose([h.score for h in hits], per_group[[h.id for h in hits]], atol=1e-5)


# --- names and errors ----------------------------------------------------------------------


def test_groups_are_named_and_resolved_by_name_and_bad_ones_say_so(dgml_index):
    dgml_index.set_concept_name(1, "head")
    try:
        assert dgml_index.resolve_part("head") == 1 and dgml_index.resolve_part("2") == 2
        a = dgml_index.search_ids(dgml_vectors(1, 5)[0], 5, exact=True, exclude=["head"])
        b = dgml_index.search_ids(dgml_vectors(1, 5)[0], 5, exact=True, exclude=[1])
        assert a[0].tolist() == b[0].tolist()
        with pytest.raises(
            ConceptError, match=r"group 4 is out of range \(this index has groups 0-3\)"
        ):
            dgml_index.plan(exclude=[4])
        with pytest.raises(ConceptError, match="unknown group name 'tail'.*head"):
            dgml_index.plan(only=["tail"])
        dgml_index.set_concept_name(1, None)
        with pytest.raises(ConceptError, match="none; name them with `cmn-edge index name-part`"):
            dgml_index.plan(only=["tail"])
        dgml_index.set_concept_name(1, "head")
        with pytest.raises(ConceptError, match="the group controls leave no group"):
            dgml_index.plan(exclude=[0, 1, 2, 3])
        with pytest.raises(ConceptError, match="group 1 is already named 'head'"):
            dgml_index.set_concept_name(2, "head")
    finally:
        dgml_index.set_concept_name(1, None)


# --- explanations --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "controls",
    [{}, {"exclude": [2]}, {"weights": {0: 2.5}}, {"exclude": [0], "renormalize": True}],
)
def test_search_contributions_are_per_group_and_sum_to_the_score(dgml_index, gallery, controls):
    q = dgml_vectors(1, seed=21)[0]
    hits = dgml_index.search(q, 5, exact=True, explain=G, **controls)
    for hit in hits:
        terms = {c["index"]: c["contribution"] for c in hit.top_concepts}
        assert sorted(terms) == list(range(G))  # one term a group, not one a dimension
        assert sum(terms.values()) == pytest.approx(hit.score, abs=1e-5)
        for j in controls.get("exclude", []):
            assert terms[j] == 0
    if not controls:  # unmasked: a group's term is its cosine over G
        hit = hits[0]
        cos = cosines(q, gallery[[hit.id]])[0]
        terms = {c["index"]: c["contribution"] for c in hit.top_concepts}
        assert [terms[j] for j in range(G)] == pytest.approx(list(cos / G), abs=1e-5)


def test_cmn_contributions_and_masks_are_per_dimension_as_before():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((200, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    index = ConceptIndex(16, "cmn-test@0")
    index.add(x)
    assert index.parts == Parts(16)
    hits = index.search(x[0], 3, exact=True, exclude=[3, 5], explain=16)
    w = np.ones(16, np.float32)
    w[[3, 5]] = 0
    assert [h.id for h in hits] == brute_force(x[0], x, w, 3)[0].tolist()
    terms = {c["index"]: c["contribution"] for c in hits[1].top_concepts}
    assert len(terms) == 16 and terms[3] == terms[5] == 0
    assert terms[7] == pytest.approx(float(x[0, 7] * x[hits[1].id, 7]), abs=1e-6)
    with pytest.raises(ConceptError, match="concept 16 is out of range"):
        index.plan(exclude=[16])


def test_calibration_masks_whole_groups(gallery):
    """The mask-depth calibration draws its masks as controls: part ids, not dimensions."""
    index = ConceptIndex(G * D, "dgml-test@0", parts=DGML_PARTS, exact_below=0)
    index.add(gallery[:1500])
    done = index.calibrate(sample=20)
    assert set(done["masked_recall"]) == {"0.1", "0.5", "0.1 renormalized", "0.5 renormalized"}
    assert all(0.9 <= r <= 1 for r in done["masked_recall"].values()), done


def test_an_index_keeps_its_parts_on_disk(dgml_index, tmp_path, gallery):
    index = ConceptIndex(G * D, "dgml-test@0", parts=DGML_PARTS)
    index.add(gallery[:50])
    index.save(tmp_path / "idx")
    index.close()
    again = ConceptIndex.load(tmp_path / "idx")
    assert again.parts == DGML_PARTS
    manifest = again.manifest()
    assert manifest["parts"]["kind"] == "groups" and manifest["parts"]["count"] == G
    again.close()


# --- a real DGML ONNX file, its index and the CLI ------------------------------------------

INPUT, GROUPS, GROUP_DIM = 96, 3, 8


def cli(*args):
    from cmn_edge.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def dgml_file(tmp_path_factory) -> Path:
    """A tiny DGML exported by ``cmn-export onnx`` (random weights, 3 groups of 8)."""
    torch = pytest.importorskip("torch")
    from cmn_export.checkpoint import CHECKPOINT_FORMAT
    from cmn_export.cli import main as export_main
    from cmn_export.dgml import DGML
    from cmn_export.train import TrainConfig

    torch.manual_seed(0)
    model = DGML("tf_efficientnet_lite0", GROUPS, GROUP_DIM, pretrained=False).eval()
    root = tmp_path_factory.mktemp("dgml-parts")
    config = TrainConfig(
        datasets=["data/birds"],
        input_size=INPUT,
        command="unit test",
        head="dgml",
        head_options={"groups": GROUPS, "group_dim": GROUP_DIM, "diversity_weight": 0.01},
    )
    state = {"format": CHECKPOINT_FORMAT, "config": asdict(config), "model": model.state_dict()}
    torch.save({**state, "best": {}}, root / "best.pt")
    out = root / "dgml.fp32.onnx"
    result = CliRunner().invoke(
        export_main, ["onnx", "--checkpoint", str(root / "best.pt"), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def dgml_embedder(dgml_file):
    from cmn_edge import Embedder

    return Embedder(dgml_file, precision="fp32", threads=1)


@pytest.fixture(scope="module")
def dgml_gallery(dgml_file, tmp_path_factory, photos) -> Path:
    """The example photos and their mirror images, indexed by the CLI with the DGML file."""
    from PIL import Image, ImageOps

    folder = tmp_path_factory.mktemp("dgml-photos")
    for name, path in photos.items():
        image = Image.open(path).convert("RGB")
        image.save(folder / f"{name}.jpg", quality=92)
        ImageOps.mirror(image).save(folder / f"{name}-mirrored.jpg", quality=92)
    index_dir = folder.parent / (folder.name + ".idx")
    built = cli(
        "index", "build", folder, "--index", index_dir, "--model", dgml_file, "--precision", "fp32"
    )
    assert built.exit_code == 0, built.output
    return index_dir


def stored(index_dir: Path) -> tuple[list[int], np.ndarray]:
    index = ConceptIndex.load(index_dir)
    try:
        ids = index.ids
        return ids, np.stack([index.embedding(i) for i in ids])
    finally:
        index.close()


def search(index_dir: Path, query: Path, *args) -> dict:
    result = cli("search", query, "--index", index_dir, "-k", "6", "--json", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_the_runtime_reads_a_dgml_file_as_groups(dgml_file, dgml_embedder, dgml_gallery):
    assert Parts.of(dgml_embedder.metadata) == Parts(GROUPS, GROUP_DIM, "dgml")
    index = ConceptIndex.load(dgml_gallery)
    assert index.parts == Parts(GROUPS, GROUP_DIM, "dgml") and len(index) == 10
    index.close()
    info = cli("index", "info", "--index", dgml_gallery)
    assert "groups:    3 groups of 8 dimensions (0 named)" in info.stdout


def test_cli_group_masks_and_weights_equal_brute_force(dgml_gallery, dgml_embedder, photos):
    ids, vectors = stored(dgml_gallery)
    q = dgml_embedder.embed([photos["cat"]])[0]
    cases = [
        (["--exclude-part", "1"], [1.0, 0.0, 1.0]),
        (["--exclude-part", "0,2"], [0.0, 1.0, 0.0]),
        (["--only-part", "2"], [0.0, 0.0, 1.0]),
        (["--part-weight", "0=2", "--part-weight", "1=0.5"], [2.0, 0.5, 1.0]),
    ]
    for args, per_group in cases:
        w = np.repeat(np.asarray(per_group, np.float32), GROUP_DIM)
        scores = vectors @ (q * w)
        order = np.argsort(-scores, kind="stable")[:6]
        for exact in ([], ["--exact"]):
            out = search(dgml_gallery, photos["cat"], *args, *exact)
            assert [r["id"] for r in out["results"]] == [ids[i] for i in order], args
            assert [r["score"] for r in out["results"]] == pytest.approx(
                scores[order].tolist(), abs=1e-5
            )
            assert out["control"]["parts"] == "groups"


def test_cli_explain_gives_one_term_a_group_summing_to_the_score(dgml_gallery, photos):
    out = search(
        dgml_gallery, photos["rocket"], "--exclude-part", "2", "--explain", "--explain-top", "3"
    )
    for hit in out["results"]:
        terms = {t["index"]: t["contribution"] for t in hit["top_concepts"]}
        assert sorted(terms) == [0, 1, 2] and terms[2] == 0
        assert sum(terms.values()) == pytest.approx(hit["score"], abs=1e-5)
    text = cli("search", photos["rocket"], "--index", dgml_gallery, "--explain", "-k", "2")
    assert "groups: #" in text.stdout


def test_bad_part_options_are_one_line_errors(dgml_gallery, photos):
    def run(*args):
        return cli("search", photos["cat"], "--index", dgml_gallery, *args)

    line = one_line_error(run("--exclude-concept", "1"), "--exclude-concept", "--exclude-part")
    assert "groups" in line and "DGML" in line
    one_line_error(run("--concept-weight", "1=2"), "--part-weight")
    one_line_error(run("--exclude-part", "3"), "group 3 is out of range", "groups 0-2")
    one_line_error(run("--only-part", "wing"), "unknown group name 'wing'")
    one_line_error(run("--part-weight", "0=heavy"), "--part-weight 0=heavy", "not a number")
    one_line_error(run("--exclude-part", "0,1,2"), "the group controls leave no group")


def test_groups_are_named_listed_and_searched_by_name(
    dgml_gallery, dgml_embedder, photos, tmp_path
):
    named = cli("index", "name-part", "--index", dgml_gallery, "1", "head")
    assert named.exit_code == 0 and "group 1 named 'head'" in named.stdout
    try:
        by_name = search(dgml_gallery, photos["cat"], "--exclude-part", "head")
        by_id = search(dgml_gallery, photos["cat"], "--exclude-part", "1")
        assert by_name["results"] == by_id["results"]
        info = cli("index", "info", "--index", dgml_gallery).stdout
        assert "(1 named)" in info and "group 1: head" in info
        page = tmp_path / "groups.html"
        made = cli("concepts", "--index", dgml_gallery, "--out", page, "--per-concept", "2")
        assert made.exit_code == 0, made.output
        assert "3 groups, 6 images" in made.stdout
        html = page.read_text()
        assert "Groups of" in html and "group 1 &mdash; head" in html
        assert "group 2 <span class=unnamed>" in html and "concept 0" not in html
        one_line_error(
            cli("concepts", "--index", dgml_gallery, "--parts", "3,", "--out", page),
            "group 3 out of range",
        )
    finally:
        cli("index", "name-part", "--index", dgml_gallery, "1", "--clear")


def test_pair_explanation_and_heatmaps_are_per_group(dgml_file, dgml_embedder, photos, tmp_path):
    from cmn_edge.explain import explain
    from cmn_edge.metadata import OUTPUT_GROUP_ATTENTION
    from cmn_edge.render import figure_size, pair_figure

    result = explain(photos["cat"], photos["coffee"], dgml_embedder, top=3)
    a, b = dgml_embedder.embed([photos["cat"], photos["coffee"]])
    assert result.contributions.shape == (GROUPS,)
    assert result.score == pytest.approx(float(a @ b), abs=1e-5)
    assert result.contributions.sum() == pytest.approx(result.score, abs=1e-6)
    ga, gb = a.reshape(GROUPS, GROUP_DIM), b.reshape(GROUPS, GROUP_DIM)
    cos = (ga * gb).sum(1) / (np.linalg.norm(ga, axis=1) * np.linalg.norm(gb, axis=1))
    assert result.contributions == pytest.approx(cos / GROUPS, abs=1e-5)
    # each group's heatmap is the model's own group_attention map
    batch = dgml_embedder.load(photos["cat"])[None]
    (maps,) = dgml_embedder.run(batch, (OUTPUT_GROUP_ATTENTION,))
    assert result.a.attention.shape == maps[0].shape == (GROUPS, 3, 3)
    assert np.allclose(result.a.attention, maps[0], atol=1e-6)
    figure = pair_figure(result, scale=1)
    assert figure.size == figure_size(INPUT, len(result.top), scale=1)

    out = tmp_path / "pair.png"
    cli_result = cli(
        "explain",
        photos["cat"],
        photos["coffee"],
        "--model",
        dgml_file,
        "--precision",
        "fp32",
        "--json",
        "--heatmap",
        out,
        "--scale",
        "1",
    )
    assert cli_result.exit_code == 0, cli_result.output
    document = json.loads(cli_result.stdout)
    assert document["parts"] == {"kind": "groups", "count": GROUPS, "size": GROUP_DIM}
    assert document["num_concepts"] == GROUPS * GROUP_DIM
    assert sorted(t["part"] for t in document["top"] + document["against"]) == [0, 1, 2]
    total = sum(t["contribution"] for t in document["top"] + document["against"])
    assert total == pytest.approx(document["score"], abs=1e-5)
    assert out.is_file()


def test_kiosk_chips_toggle_and_explain_groups(dgml_gallery, dgml_embedder, photos):
    pytest.importorskip("flask")
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "examples" / "kiosk" / "app.py"
    spec = importlib.util.spec_from_file_location("kiosk_app_parts", path)
    kiosk = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = kiosk  # its dataclasses look their module up
    spec.loader.exec_module(kiosk)
    app = kiosk.create_app(dgml_gallery, threads=1, k=4)
    try:
        client = app.test_client()
        assert "Groups</h2>" in client.get("/").get_data(as_text=True)
        with open(photos["cat"], "rb") as handle:
            reply = client.post("/api/query", data={"photo": (handle, "cat.jpg")})
        assert reply.status_code == 200, reply.get_json()
        chips = reply.get_json()["concepts"]
        assert chips and {c["index"] for c in chips} <= set(range(GROUPS))
        token, off = reply.get_json()["token"], chips[0]["index"]
        plain = client.get(f"/api/search?q={token}").get_json()["results"]
        masked = client.get(f"/api/search?q={token}&off={off}").get_json()["results"]
        ids, vectors = stored(dgml_gallery)
        q = dgml_embedder.embed([photos["cat"]])[0]
        w = np.ones(GROUPS * GROUP_DIM, np.float32)
        w[off * GROUP_DIM : (off + 1) * GROUP_DIM] = 0
        by_id = dict(zip(ids, vectors @ (q * w)))
        assert [r["score"] for r in masked] == pytest.approx(
            [float(by_id[r["id"]]) for r in masked], abs=1e-5
        )
        assert [r["score"] for r in masked] != [r["score"] for r in plain]
        png = client.get(f"/explain/{token}/{masked[0]['id']}.png?off={off}")
        assert png.status_code == 200 and png.mimetype == "image/png"
        bad = client.get(f"/api/search?q={token}&off=7")
        assert bad.status_code == 400 and "group 7 is out of range" in bad.get_json()["error"]
    finally:
        import shutil

        shutil.rmtree(app.config["UPLOADS"], ignore_errors=True)
        sys.modules.pop(spec.name, None)


def test_on_a_cmn_index_part_options_are_the_concept_options(tmp_path, embedder, photos):
    from cmn_edge.index import Index

    index = Index.create(tmp_path / "cmn.idx", embedder)
    index.add(sorted(photos.values()))
    index.close()
    root = tmp_path / "cmn.idx"
    by_part = search(root, photos["cat"], "--exclude-part", "3,17", "--part-weight", "5=2")
    by_concept = search(root, photos["cat"], "--exclude-concept", "3,17", "--concept-weight", "5=2")
    assert by_part["results"] == by_concept["results"]
    assert by_part["control"]["exclude"] == [3, 17] and by_part["control"]["parts"] == "concepts"
    mixed = search(
        root,
        photos["cat"],
        "--exclude-part",
        "3",
        "--exclude-concept",
        "17",
        "--concept-weight",
        "5=2",
    )
    assert mixed["results"] == by_part["results"]
    one_line_error(
        cli("search", photos["cat"], "--index", root, "--exclude-part", str(embedder.num_concepts)),
        f"concept {embedder.num_concepts} is out of range",
    )
    one_line_error(  # the option the user typed, not its other name
        cli("search", photos["cat"], "--index", root, "--concept-weight", "5=x"),
        "--concept-weight 5=x: weight is not a number",
    )
