"""Explanations on real photos: exact decomposition, figures, concept names, CLI errors."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, ImageOps

from cmn_edge import render
from cmn_edge.cli import main
from cmn_edge.explain import concept_contributions, explain, resolve_names, share_of


@pytest.fixture(scope="module")
def mirrored_cat(photos: dict[str, Path], tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("mirror") / "cat_mirrored.jpg"
    ImageOps.mirror(Image.open(photos["cat"]).convert("RGB")).save(path, quality=92)
    return path


@pytest.fixture(scope="module")
def cat_coffee(photos, embedder):
    return explain(photos["cat"], photos["coffee"], embedder, top=10)


def test_terms_sum_to_the_score_of_independent_embeddings(photos, embedder, cat_coffee) -> None:
    a, b = embedder.embed([photos["cat"], photos["coffee"]])
    cosine = float(np.dot(a.astype(np.float64), b.astype(np.float64)))
    assert cat_coffee.contributions.shape == (embedder.num_concepts,)
    assert cat_coffee.score == pytest.approx(cosine, abs=1e-5)
    assert float(cat_coffee.contributions.sum()) == pytest.approx(cosine, abs=1e-5)
    assert np.allclose(cat_coffee.contributions, concept_contributions(a, b), atol=1e-6)


def test_top_are_the_largest_terms_and_shares_are_fractions_of_the_score(cat_coffee) -> None:
    x = cat_coffee
    values = [t.contribution for t in x.top]
    assert len(x.top) == 10 and values == sorted(values, reverse=True)
    assert values[0] == pytest.approx(float(x.contributions.max()))
    assert values[-1] >= float(np.sort(x.contributions)[-10]) - 1e-12
    for t in x.top:
        assert t.contribution == pytest.approx(float(x.contributions[t.index]))
        assert t.share == (pytest.approx(t.contribution / x.score) if x.score > 1e-6 else None)
    if x.score > 1e-6:
        all_shares = [share_of(float(c), x.score) for c in x.contributions]
        assert sum(all_shares) == pytest.approx(1.0, abs=1e-6)
    else:
        assert all(t.share is None for t in x.top)
    assert all(t.contribution < 0 for t in x.against)
    against = [t.contribution for t in x.against]
    assert against == sorted(against)
    if x.against:
        assert against[0] == pytest.approx(float(x.contributions.min()))
    assert share_of(0.1, 0.0) is None and share_of(-0.1, -0.5) is None
    assert share_of(-0.1, 0.5) == pytest.approx(-0.2)


def test_excluding_the_top_concept_lowers_the_score_by_its_contribution(
    photos, embedder, mirrored_cat
) -> None:
    for other in (mirrored_cat, photos["coffee"], photos["rocket"]):
        x = explain(photos["cat"], other, embedder, top=1)
        best = x.top[0]
        query = embedder.embed(photos["cat"])[0].astype(np.float64)
        item = embedder.embed(other)[0].astype(np.float64)
        query[best.index] = 0.0  # what excluding a concept from the query does
        assert float(query @ item) == pytest.approx(x.score - best.contribution, abs=1e-5)
        assert (float(query @ item) < x.score) == (best.contribution > 0)


def test_attention_maps_peaks_and_regions(cat_coffee, embedder) -> None:
    h, w = embedder.metadata.attention_grid
    size = embedder.preprocess.input_size
    for side in (cat_coffee.a, cat_coffee.b):
        assert side.attention.shape == (embedder.num_concepts, h, w)
        assert np.allclose(side.attention.sum(axis=(1, 2)), 1.0, atol=1e-4)
        assert side.image.size == (size, size)
        width, height = side.size
        for t in cat_coffee.top:
            row, col = side.peak(t.index)
            assert side.attention[t.index, row, col] == pytest.approx(
                float(side.attention[t.index].max())
            )
            x0, y0, x1, y1 = side.region(t.index)
            assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
    assert cat_coffee.a.size == Image.open(cat_coffee.a.source).size


def test_pair_figure_size_follows_the_layout_and_shows_lines(cat_coffee) -> None:
    for top, scale in ((10, 2), (3, 1)):
        figure = render.pair_figure(cat_coffee, top=top, scale=scale)
        panel = cat_coffee.input_size * scale
        rows = math.ceil(top / (2 if panel >= 300 else 1))
        assert figure.size == (
            2 * render.MARGIN + 2 * panel + render.GAP,
            render.HEADER + panel + render.MARGIN + rows * render.LEGEND_ROW + render.MARGIN,
        )
        pixels = np.asarray(figure)
        # The gap between the two panels is background except for the peak-to-peak lines;
        # the first concept's line is drawn last, so its colour is there.
        gap = pixels[render.HEADER : render.HEADER + panel,
                     render.MARGIN + panel : render.MARGIN + panel + render.GAP]
        first = np.all(gap == np.asarray(render.colour(0), dtype=np.uint8), axis=-1)
        assert first.sum() >= render.GAP  # a 3 px wide line crosses the whole gap
        # Overlays are visible: the panel is not just the enlarged crop.
        plain = np.asarray(
            cat_coffee.a.image.resize((panel, panel), Image.Resampling.BICUBIC), dtype=np.int16
        )
        shown = pixels[render.HEADER : render.HEADER + panel,
                       render.MARGIN : render.MARGIN + panel].astype(np.int16)
        changed = np.abs(shown - plain).max(axis=-1) > 30
        assert 0.02 < changed.mean() < 0.95


def test_resolve_names_forms_and_errors() -> None:
    assert resolve_names(None, 3) == (None, None, None)
    assert resolve_names({1: "fur"}, 3) == (None, "fur", None)
    assert resolve_names(["a", "", None], 3) == ("a", None, None)
    with pytest.raises(ValueError, match="out of range"):
        resolve_names({3: "x"}, 3)
    with pytest.raises(ValueError, match="2 concept names"):
        resolve_names(["a", "b"], 3)


def test_names_given_to_explain_reach_terms_and_json(photos, embedder, cat_coffee) -> None:
    best = cat_coffee.top[0].index
    x = explain(photos["cat"], photos["coffee"], embedder, top=3, names={best: "tabby fur"})
    assert x.top[0].name == "tabby fur" and x.top[1].name is None
    document = json.loads(json.dumps(x.to_dict()))
    assert document["top"][0]["name"] == "tabby fur"
    assert document["top"][0]["concept"] == best


# --- command line -------------------------------------------------------------------------


def _run(*args: str):
    return CliRunner().invoke(main, ["explain", *args, "--threads", "2"])


def test_cli_text_json_and_heatmap(photos, mirrored_cat, tmp_path, embedder) -> None:
    out = tmp_path / "pair.png"
    result = _run(str(photos["cat"]), str(mirrored_cat), "--top", "4", "--json",
                  "--heatmap", str(out), "--scale", "1")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert set(document) == {
        "score", "model", "num_concepts", "input_size", "attention_grid", "share", "a", "b",
        "top", "against", "heatmap", "parts",
    }
    # what the terms count: one concept a dimension on a CMN
    assert document["parts"] == {"kind": "concepts", "count": embedder.num_concepts, "size": 1}
    assert len(document["top"]) == 4 and document["heatmap"] == str(out)
    assert [t["rank"] for t in document["top"]] == [1, 2, 3, 4]
    x = explain(photos["cat"], mirrored_cat, embedder)
    assert document["score"] == pytest.approx(x.score, abs=1e-5)
    assert [t["concept"] for t in document["top"]] == [t.index for t in x.top[:4]]
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # an ordinary file, not mkstemp's 0600
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left over
    with Image.open(out) as image:
        assert image.format == "PNG"
        assert image.size == render.figure_size(x.input_size, 4, scale=1)
        image.verify()

    text = _run(str(photos["cat"]), str(mirrored_cat), "--top", "3")
    assert text.exit_code == 0, text.output
    assert f"score {x.score:+.5f}" in text.stdout
    rows = [line.split() for line in text.stdout.splitlines() if line.startswith("  ")]
    assert [int(r[1]) for r in rows[1:4]] == [t.index for t in x.top[:3]]


@pytest.mark.parametrize("bad", ["missing", "text", "folder"])
def test_cli_errors_are_one_line(photos, tmp_path, bad: str) -> None:
    if bad == "missing":
        target = tmp_path / "nope.jpg"
    elif bad == "text":
        target = tmp_path / "notes.jpg"
        target.write_text("these are notes, not a JPEG\n")
    else:
        target = tmp_path
    out = tmp_path / "never.png"
    result = _run(str(photos["cat"]), str(target), "--heatmap", str(out))
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(target) in lines[0]
    assert not out.exists()


def test_cli_heatmap_into_missing_folder_is_refused(photos, tmp_path) -> None:
    out = tmp_path / "no" / "such" / "pair.png"
    result = _run(str(photos["cat"]), str(photos["coffee"]), "--heatmap", str(out))
    assert result.exit_code != 0 and "does not exist" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# --- with a concept index: exclusion, names, catalogue --------------------------------------


@pytest.fixture(scope="module")
def gallery(photos, mirrored_cat, embedder, tmp_path_factory):
    """A saved index of the real photos (and a mirrored cat): (dir, paths, embeddings)."""
    from cmn_edge.index import ConceptIndex

    folder = tmp_path_factory.mktemp("gallery")
    paths = []
    for name, path in sorted(photos.items()):
        copy = folder / f"{name}.jpg"
        copy.write_bytes(path.read_bytes())
        paths.append(copy)
    mirrored = folder / "cat_mirrored.jpg"
    mirrored.write_bytes(mirrored_cat.read_bytes())
    paths.append(mirrored)
    embeddings = embedder.embed(paths)
    index = ConceptIndex.for_embedder(embedder)
    index.add(embeddings, [str(p) for p in paths])
    root = tmp_path_factory.mktemp("index") / "idx"
    index.save(root)
    return root, paths, embeddings


def test_index_exclusion_of_the_top_concept_removes_exactly_its_term(
    photos, embedder, gallery
) -> None:
    from cmn_edge.index import ConceptIndex

    root, paths, _ = gallery
    index = ConceptIndex.load(root)
    query = embedder.embed(photos["cat"])[0]
    for target in paths:
        x = explain(photos["cat"], target, embedder, top=1)
        best = x.top[0]
        hits = index.search(query, k=len(paths), exact=True, exclude=[best.index])
        score = next(h.score for h in hits if h.path == str(target))
        assert score == pytest.approx(x.score - best.contribution, abs=1e-5)


def _cli(*args: str):
    return CliRunner().invoke(main, list(args))


def test_concept_names_round_trip_through_the_index(photos, gallery) -> None:
    from cmn_edge.index import ConceptIndex

    root, paths, _ = gallery
    pair = (str(photos["cat"]), str(paths[-1]))  # the cat and its mirror image
    plain = json.loads(_cli("explain", *pair, "--json", "--top", "2", "--threads", "2").stdout)
    best = plain["top"][0]["concept"]
    assert plain["top"][0]["name"] is None

    # one naming command under two names: `concepts name` is `index name-concept`
    assert main.commands["concepts"].commands["name"] is main.commands["index"].commands[
        "name-concept"
    ]
    named = _cli("concepts", "name", "--index", str(root), str(best), "tabby fur")
    assert named.exit_code == 0, named.output
    assert ConceptIndex.load(root).concept_names[best] == "tabby fur"
    # the name now stands for the concept wherever the index takes one
    assert ConceptIndex.load(root).resolve_concept("tabby fur") == best

    document = json.loads(
        _cli("explain", *pair, "--json", "--top", "2", "--index", str(root)).stdout
    )
    assert document["top"][0]["concept"] == best
    assert document["top"][0]["name"] == "tabby fur"
    assert document["top"][1]["name"] is None
    text = _cli("explain", *pair, "--top", "2", "--index", str(root))
    assert text.exit_code == 0, text.output
    assert any(line.split()[1] == str(best) and line.endswith("tabby fur")
               for line in text.stdout.splitlines() if line.startswith("  "))

    renamed = _cli("concepts", "name", "--index", str(root), "tabby fur", "fur")
    assert renamed.exit_code == 0 and ConceptIndex.load(root).concept_names[best] == "fur"
    cleared = _cli("concepts", "name", "--index", str(root), str(best), "--clear")
    assert cleared.exit_code == 0 and best not in ConceptIndex.load(root).concept_names


def test_strongest_rows_and_concept_specs(gallery) -> None:
    from cmn_edge.catalogue import parse_concepts, strongest

    _, _, embeddings = gallery
    for concept in (0, 7, embeddings.shape[1] - 1):
        rows = strongest(embeddings, concept, 3)
        column = embeddings[:, concept]
        assert list(column[rows]) == sorted(column, reverse=True)[:3]
    assert len(strongest(embeddings, 0, 100)) == len(embeddings)
    assert parse_concepts("3", 512) == [0, 1, 2]
    assert parse_concepts("17,", 512) == [17]
    assert parse_concepts("5,2-4,5", 512) == [5, 2, 3, 4]
    assert parse_concepts(None, 4) == [0, 1, 2, 3]
    for bad in ("600", "0", "x", "3-a", ","):
        if bad == "600":
            assert parse_concepts(bad, 512) == list(range(512))  # a count is capped
            continue
        with pytest.raises(ValueError, match="--concepts"):
            parse_concepts(bad, 512)
    with pytest.raises(ValueError, match="out of range"):
        parse_concepts("510-512", 512)


def test_catalogue_html_file_and_folder(gallery, tmp_path) -> None:
    import re

    from cmn_edge.index import ConceptIndex

    root, paths, embeddings = gallery
    index = ConceptIndex.load(root)
    index.set_concept_name(4, "orange things")
    index.save()

    page = tmp_path / "catalogue.html"
    result = _cli("concepts", "--index", str(root), "--out", str(page), "--per-concept", "2",
                  "--concepts", "3,4,9", "--threads", "2")
    assert result.exit_code == 0, result.output
    text = page.read_text(encoding="utf-8")
    assert re.findall(r"<section id=c(\d+)>", text) == ["3", "4", "9"]
    assert text.count("data:image/jpeg;base64,") == 3 * 2 * 2  # view + peak window per tile
    assert "concept 4 &mdash; orange things" in text
    assert "src=\"http" not in text and "<link" not in text  # nothing outside the file
    for concept in (3, 4, 9):  # each concept's strongest items, strongest first
        section = text.split(f"<section id=c{concept}>")[1].split("</section>")[0]
        shown = [float(v) for v in re.findall(r"<figcaption>([+-]\d+\.\d{4})", section)]
        expected = sorted(embeddings[:, concept].tolist(), reverse=True)[:2]
        assert shown == pytest.approx(expected, abs=6e-5)

    folder = tmp_path / "catalogue"
    result = _cli("concepts", "--index", str(root), "--out", str(folder), "--per-concept", "3",
                  "--concepts", "2", "--unnamed")
    assert result.exit_code == 0, result.output
    images = sorted((folder / "images").glob("*.jpg"))
    assert len(images) == 2 * 3 * 2
    for image in images:
        with Image.open(image) as opened:
            assert opened.format == "JPEG"
    html_text = (folder / "index.html").read_text(encoding="utf-8")
    assert all(f"images/{p.name}" in html_text for p in images)


def test_catalogue_lists_an_image_gone_since_indexing(gallery, photos, embedder, tmp_path):
    from cmn_edge.index import ConceptIndex

    root, paths, _ = gallery
    index = ConceptIndex.load(root)
    gone = tmp_path / "gone.jpg"
    gone.write_bytes(photos["rocket"].read_bytes())
    index.add(embedder.embed(gone), [str(gone)])
    copy = tmp_path / "idx"
    index.save(copy)
    gone.unlink()
    concept = int(np.argmax(embedder.embed(photos["rocket"])[0]))
    page = tmp_path / "c.html"
    result = _cli("concepts", "--index", str(copy), "--out", str(page), "--per-concept", "7",
                  "--concepts", f"{concept},")
    assert result.exit_code == 0, result.output
    assert f"{gone}: file not found" in result.stderr
    text = page.read_text(encoding="utf-8")
    assert "class=missing" in text and text.count("data:image/jpeg") == 2 * 6


@pytest.mark.parametrize(
    "args, expected",
    [
        (["concepts", "--index", "{missing}"], "index directory not found"),
        (["concepts"], "--index DIR is required"),
        (["concepts", "--index", "{root}", "--concepts", "9999,"], "out of range"),
        (["concepts", "--index", "{root}", "--out", "{missing}/c.html"], "does not exist"),
        (["concepts", "name", "--index", "{root}", "9999", "x"], "out of range"),
        (["concepts", "name", "--index", "{root}", "3"], "--clear"),
        (["explain", "{cat}", "{cat}", "--index", "{missing}"], "index directory not found"),
    ],
)
def test_concepts_cli_errors_are_one_line(gallery, photos, tmp_path, args, expected) -> None:
    root = gallery[0]
    values = {"missing": tmp_path / "nope", "root": root, "cat": photos["cat"]}
    result = _cli(*(a.format(**values) for a in args))
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0]
    assert not (tmp_path / "nope").exists()
