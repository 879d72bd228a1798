"""Region maps in the index and DIML's structural re-ranking through search (issue #16)."""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest
from click.testing import CliRunner

from cmn_edge.cli import main
from cmn_edge.index import ConceptIndex, Index
from cmn_edge.index.regions import RegionsError
from cmn_edge.structural import structural_scores, unit_rows

C, GRID, CELLS = 24, (2, 2), 4


def _gallery(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Vectors with region maps that relate to them, as a model's would."""
    rng = np.random.default_rng(seed)
    regions = unit_rows(np.abs(rng.normal(size=(n, CELLS, C))).astype(np.float32))
    vectors = unit_rows(regions.mean(1) + 0.3 * rng.normal(size=(n, C)).astype(np.float32))
    return vectors, regions


@pytest.fixture
def kept(tmp_path):
    index = ConceptIndex(C, "synthetic@1")
    index.keep_regions(GRID)
    index.save(tmp_path / "idx")
    vectors, regions = _gallery(60)
    index.add(vectors, [f"p{i}" for i in range(60)], regions=regions)
    return index, vectors, regions


def _expected(index, q, q_regions, vectors, regions, depth, k, weights=None, **controls):
    """Brute force: exact global top-depth, then sort by global + structural (the index
    stores the maps as float16)."""
    ids, scores = index.search_ids(q, depth, exact=True, **controls)
    stored = regions[ids].astype(np.float16).astype(np.float32)
    structural = structural_scores(q_regions, q, stored, vectors[ids], weights)
    order = np.argsort(-(scores + structural), kind="stable")[:k]
    return ids[order], (scores + structural)[order], structural[order]


def test_rerank_is_global_plus_structural_over_the_top_depth(kept) -> None:
    index, vectors, regions = kept
    q, q_regions = vectors[7] + 0.05, regions[7]
    hits = index.search(
        q, 5, exact=True, rerank="structural", rerank_depth=20, query_regions=q_regions
    )
    ids, total, structural = _expected(index, unit_rows(q), q_regions, vectors, regions, 20, 5)
    assert [h.id for h in hits] == ids.tolist()
    assert [h.score for h in hits] == pytest.approx(total.tolist(), abs=1e-5)
    assert [h.score_structural for h in hits] == pytest.approx(structural.tolist(), abs=1e-5)
    for hit in hits:
        assert hit.score == pytest.approx(hit.score_global + hit.score_structural, abs=1e-6)
        assert {"score_global", "score_structural"} <= set(hit.to_dict())
    plain = index.search(q, 20, exact=True)
    assert all(h.score_structural is None for h in plain)
    assert "score_structural" not in plain[0].to_dict()
    # the re-ranking changes the order somewhere (else this test could not fail)
    assert [h.id for h in hits] != [h.id for h in plain[:5]] or structural.std() > 0


def test_masks_reach_the_region_maps(kept) -> None:
    index, vectors, regions = kept
    excluded = list(range(0, C, 2))
    weights = np.ones(C, np.float32)
    weights[excluded] = 0
    q, q_regions = vectors[3], regions[3]
    hits = index.search(
        q, 5, exact=True, exclude=excluded, rerank="structural", query_regions=q_regions
    )
    ids, total, _ = _expected(
        index, q, q_regions, vectors, regions, 60, 5, weights, exclude=excluded
    )
    assert [h.id for h in hits] == ids.tolist()
    assert [h.score for h in hits] == pytest.approx(total.tolist(), abs=1e-5)
    # what an excluded concept holds in the query's regions cannot change anything
    scrambled = q_regions.copy()
    scrambled[:, excluded] = np.random.default_rng(1).normal(size=(CELLS, len(excluded)))
    again = index.search(
        q, 5, exact=True, exclude=excluded, rerank="structural", query_regions=scrambled
    )
    assert [h.score for h in again] == pytest.approx([h.score for h in hits], abs=1e-5)
    unmasked = index.search(q, 5, exact=True, rerank="structural", query_regions=scrambled)
    assert [h.score for h in unmasked] != pytest.approx([h.score for h in hits], abs=1e-5)


def test_depth_and_k_clamp_to_the_gallery(kept) -> None:
    index, vectors, regions = kept
    hits = index.search(
        vectors[0], 500, rerank="structural", rerank_depth=1000, query_regions=regions[0]
    )
    assert sorted(h.id for h in hits) == list(range(60))
    few = index.search(vectors[0], 3, rerank="structural", rerank_depth=1, query_regions=regions[0])
    assert len(few) == 3  # the depth is at least k


def test_bad_region_input_is_refused_with_one_line(kept, tmp_path) -> None:
    index, vectors, regions = kept
    with pytest.raises(RegionsError, match="keeps region maps"):
        index.add(vectors[:2])
    with pytest.raises(RegionsError, match=r"must be \[2, 4, 24\]"):
        index.add(vectors[:2], regions=regions[:2, :3])
    with pytest.raises(RegionsError, match="query's region maps"):
        index.search(vectors[0], 3, rerank="structural")
    with pytest.raises(RegionsError, match="unknown re-ranking"):
        index.search(vectors[0], 3, rerank="optimal", query_regions=regions[0])
    with pytest.raises(ValueError, match="every concept|no concept"):
        index.search(vectors[0], 3, rerank="structural", query_regions=regions[0], exclude=range(C))
    assert len(index) == 60

    plain = ConceptIndex(C, "synthetic@1")
    plain.save(tmp_path / "plain")
    plain.add(vectors)
    with pytest.raises(RegionsError, match="cmn-edge index regions --index"):
        plain.search(vectors[0], 3, rerank="structural", query_regions=regions[0])
    with pytest.raises(RegionsError, match="keeps no region maps"):
        plain.add(vectors[:1], regions=regions[:1])


def test_maps_follow_their_items_and_verify_checks_them(kept, tmp_path) -> None:
    index, vectors, regions = kept
    index.remove([5, 6])
    index.update(7, vectors[8], regions=regions[8:9])
    reopened = ConceptIndex.open(tmp_path / "idx")
    assert reopened.region_grid == GRID
    stored = reopened.regions_of(7)
    assert np.allclose(stored, regions[8], atol=2e-3)  # float16
    assert reopened.verify() == []
    db = sqlite3.connect(tmp_path / "idx" / "index.db")
    assert db.execute("SELECT COUNT(*) FROM regions").fetchone()[0] == 58
    db.execute("DELETE FROM regions WHERE id = 9")
    db.commit()
    db.close()
    problems = ConceptIndex.open(tmp_path / "idx").verify()
    assert any("1 item(s) have no region maps" in p for p in problems)


def test_an_index_gets_its_maps_later_and_only_when_all_can_be_read(
    tmp_path, labelled_folder, embedder
) -> None:
    runner = CliRunner()
    out = tmp_path / "g.idx"
    result = runner.invoke(main, ["index", "build", str(labelled_folder), "--index", str(out)])
    assert result.exit_code == 0, result.output
    query = next(labelled_folder.glob("cat/*.jpg"))
    refused = runner.invoke(
        main, ["search", str(query), "--index", str(out), "--rerank", "structural"]
    )
    assert refused.exit_code == 1
    assert "cmn-edge index regions --index" in refused.output
    assert len(refused.output.strip().splitlines()) == 1

    gone = labelled_folder / "coffee" / "crop.jpg"
    gone.unlink()
    result = runner.invoke(main, ["index", "regions", "--index", str(out)])
    assert result.exit_code == 1 and "could not be read" in result.output
    assert not Index.open(out).keeps_regions  # left as it was
    result = runner.invoke(main, ["index", "remove", str(gone.resolve()), "--index", str(out)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["index", "regions", "--index", str(out)])
    assert result.exit_code == 0, result.output
    assert Index.open(out).verify() == []

    result = runner.invoke(
        main,
        ["search", str(query), "--index", str(out), "-k", "3", "--rerank", "structural", "--json"],
    )
    assert result.exit_code == 0, result.output
    answer = json.loads(result.output)
    assert answer["rerank"] == {"kind": "structural", "depth": 100}
    top = answer["results"][0]
    assert top["path"] == str(query.resolve())
    assert top["score"] == pytest.approx(top["score_global"] + top["score_structural"])
    # the query's maps come from the same forward pass as the maps stored for that file
    emb, maps = embedder.embed_regions([query])
    assert top["score_structural"] == pytest.approx(
        structural_scores(maps[0], emb[0], maps, emb)[0], abs=2e-3
    )


def test_every_way_in_stores_maps(tmp_path, labelled_folder, embedder, photos) -> None:
    index = Index.create(tmp_path / "r.idx", embedder, regions=True)
    report = index.sync(labelled_folder)
    assert report.added == len(list(labelled_folder.rglob("*.jpg")))
    index.add([photos["cat"]])  # images through the API
    runner = CliRunner()
    result = runner.invoke(
        main, ["index", "add", str(photos["rocket"]), "--index", str(tmp_path / "r.idx")]
    )
    assert result.exit_code == 0, result.output
    assert Index.open(tmp_path / "r.idx").verify() == []
    hits = index.search(photos["rocket"], 2, rerank="structural")
    assert hits[0].path == str(photos["rocket"].resolve())
    emb, maps = embedder.embed_regions([photos["rocket"]])
    itself = structural_scores(maps[0], emb[0], maps, emb)[0]
    assert hits[0].score_global == pytest.approx(1.0, abs=1e-5)
    assert hits[0].score_structural == pytest.approx(itself, abs=2e-3)
    assert hits[0].score_structural > hits[1].score_structural
