"""`cmn-edge index ...` and `cmn-edge search` on real photos; bad input; kills during save."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from cli_checks import snapshot
from click.testing import CliRunner

from cmn_edge.cli import main
from cmn_edge.index import ConceptIndex

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def assert_one_line_error(result, *needles: str) -> None:
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture
def metadata_csv(labelled_folder: Path) -> Path:
    csv = labelled_folder / "labels.csv"
    rows = ["path,label,kind"]
    for image in sorted(labelled_folder.rglob("*.jpg")):
        kind = "vehicle" if image.parent.name in ("rocket", "motorcycle") else "other"
        rows.append(f"{image.relative_to(labelled_folder)},{image.parent.name},{kind}")
    csv.write_text("\n".join(rows) + "\n")
    return csv


@pytest.fixture
def built(tmp_path: Path, labelled_folder: Path, embedder) -> Path:
    """The labelled photos indexed through the API with the session's embedder (the CLI
    build has its own test): a model load per test would dominate the run time."""
    paths = sorted(labelled_folder.rglob("*.jpg"))
    index = ConceptIndex.for_embedder(embedder, precision="int8")
    kinds = {"rocket": "vehicle", "motorcycle": "vehicle"}
    index.add(
        embedder.embed(paths),
        [str(p.resolve()) for p in paths],
        [{"label": p.parent.name, "kind": kinds.get(p.parent.name, "other")} for p in paths],
    )
    return index.save(tmp_path / "gallery.idx")


def search_json(folder: Path, *args: str) -> dict:
    result = run("search", *args, "--index", folder, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_build_info_and_search(tmp_path, labelled_folder, metadata_csv, embedder):
    built = tmp_path / "cli.idx"
    result = run(
        "index",
        "build",
        labelled_folder,
        "--index",
        built,
        "--metadata",
        metadata_csv,
        "--threads",
        "2",
    )
    assert result.exit_code == 0, result.output
    assert "indexed 15 images" in result.stdout and result.stderr == ""
    info = run("index", "info", "--index", built, "--json")
    assert info.exit_code == 0, info.output
    manifest = json.loads(info.stdout)
    assert manifest["counts"]["items"] == 15
    assert manifest["model"]["id"] == embedder.model_id
    assert manifest["num_concepts"] == embedder.num_concepts
    assert manifest["metadata_keys"] == ["kind", "label"]
    text = run("index", "info", "--index", built)
    assert "items:     15" in text.stdout

    cat = labelled_folder / "cat" / "original.jpg"
    out = search_json(built, cat, "-k", "4", "--threads", "2")
    assert set(out) == {"query", "query_kind", "model", "index", "k", "exact", "control", "results"}
    assert out["query_kind"] == "image" and out["model"] == embedder.model_id
    results = out["results"]
    assert [r["rank"] for r in results] == [1, 2, 3, 4]
    assert set(results[0]) == {"rank", "id", "score", "path", "metadata"}
    assert results[0]["path"] == str(cat.resolve()) and results[0]["score"] == pytest.approx(
        1, abs=1e-4
    )
    assert results[0]["metadata"] == {"kind": "other", "label": "cat"}
    assert [r["score"] for r in results] == sorted((r["score"] for r in results), reverse=True)
    assert (
        search_json(built, "id:0", "-k", "4", "--exact")["results"]
        == search_json(built, "id:0", "-k", "4")["results"]
    )

    plain = run("search", cat, "--index", built, "-k", "2", "--threads", "2")
    assert plain.exit_code == 0
    lines = plain.stdout.splitlines()
    assert len(lines) == 2 and str(cat.resolve()) in lines[0] and "label=cat" in lines[0]


def test_id_query_where_filter_and_concept_controls(built):
    out = search_json(built, "id:0", "-k", "3", "--where", "kind=vehicle")
    assert out["query_kind"] == "id" and out["query_id"] == 0
    assert all(r["metadata"]["kind"] == "vehicle" for r in out["results"])
    assert all(r["id"] != 0 for r in out["results"])
    bare = search_json(built, "0", "-k", "3", "--where", "kind=vehicle")
    assert bare["results"] == out["results"]

    masked = search_json(
        built,
        "id:3",
        "-k",
        "5",
        "--exclude-concept",
        "1,2",
        "--exclude-concept",
        "7",
        "--concept-weight",
        "9=2.5",
    )
    assert masked["control"]["exclude"] == [1, 2, 7]
    assert masked["control"]["weights"] == {"9": 2.5}
    index = ConceptIndex.load(built)
    q = index.embedding(3)
    w = np.ones(index.num_concepts)
    w[[1, 2, 7]] = 0
    w[9] = 2.5
    for r in masked["results"]:
        assert r["score"] == pytest.approx(float((q * w) @ index.embedding(r["id"])), abs=1e-5)

    renorm = search_json(
        built, "id:3", "-k", "2", "--only-concept", "0,1,2,3,4,5,6,7", "--renormalize"
    )
    for r in renorm["results"]:
        qm, gm = q[:8], index.embedding(r["id"])[:8]
        cosine = float(qm @ gm / np.linalg.norm(qm) / np.linalg.norm(gm))
        assert r["score"] == pytest.approx(cosine, abs=1e-5)

    few = run("search", "id:0", "--index", built, "-k", "5", "--where", "label=rocket")
    assert few.exit_code == 0
    assert len(few.stdout.splitlines()) == 3 and "only 3 item(s) match" in few.stderr


def test_name_concept_and_explain(built):
    named = run("index", "name-concept", "--index", built, "11", "beak")
    assert named.exit_code == 0, named.output
    assert ConceptIndex.load(built).concept_names == {11: "beak"}
    by_name = search_json(
        built, "id:2", "-k", "3", "--exclude-concept", "beak", "--concept-weight", "beak=0"
    )
    by_index = search_json(built, "id:2", "-k", "3", "--exclude-concept", "11")
    assert by_name["results"] == by_index["results"]

    out = search_json(built, "id:2", "-k", "2", "--explain", "--explain-top", "512")
    for r in out["results"]:
        top = r["top_concepts"]
        assert sum(c["contribution"] for c in top) == pytest.approx(r["score"], abs=1e-4)
        assert [c["name"] for c in top if c["index"] == 11] == ["beak"]
        assert set(top[0]) == {"index", "name", "contribution", "share"}
    text = run("search", "id:2", "--index", built, "-k", "1", "--explain")
    assert "concepts:" in text.stdout.splitlines()[1]

    cleared = run("index", "name-concept", "--index", built, "beak", "--clear")
    assert cleared.exit_code == 0 and ConceptIndex.load(built).concept_names == {}


def test_add_update_and_remove(built, labelled_folder, photos, tmp_path):
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "coffee-copy.jpg").write_bytes(photos["coffee"].read_bytes())
    (extra / "meta.csv").write_text("path,label,shop\ncoffee-copy.jpg,coffee,corner\n")
    added = run("index", "add", extra, "--index", built, "--metadata", extra / "meta.csv")
    assert added.exit_code == 0, added.output
    assert "added 1, updated 0; 16 items" in added.stdout
    again = run("index", "add", extra / "coffee-copy.jpg", "--index", built)
    assert "added 0, updated 1; 16 items" in again.stdout
    top = search_json(built, photos["coffee"], "-k", "1", "--where", "shop=corner")["results"][0]
    assert top["score"] == pytest.approx(1, abs=1e-4)
    assert top["metadata"] == {"label": "coffee", "shop": "corner"}
    assert top["path"] == str((extra / "coffee-copy.jpg").resolve())

    index = ConceptIndex.load(built)
    copy_id = index.id_for_path(str((extra / "coffee-copy.jpg").resolve()))
    crop = labelled_folder / "cat" / "crop.jpg"
    crop.unlink()  # an image deleted from disk can still be removed by its path
    removed = run("index", "remove", f"id:{copy_id}", crop, "--index", built)
    assert removed.exit_code == 0, removed.output
    index = ConceptIndex.load(built)
    assert len(index) == 14 and copy_id not in index
    assert index.id_for_path(str(crop.resolve())) is None


def test_build_skips_unreadable_images_and_lists_them(tmp_path, labelled_folder):
    broken = labelled_folder / "cat" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    folder = tmp_path / "skip.idx"
    result = run("index", "build", labelled_folder, "--index", folder, "--strict")
    assert_one_line_error(result, "broken.jpg")
    assert not folder.exists()  # refused: nothing left behind
    result = run(
        "index",
        "build",
        labelled_folder,
        "--index",
        folder,
        "--exact-below",
        "0",
        "--graph-dims",
        "8",
        "--threads",
        "2",
    )
    assert result.exit_code == 0, result.output
    assert "skipped" in result.stderr and "broken.jpg" in result.stderr
    assert "1 unreadable image(s) left out" in result.stderr
    assert "indexed 15 images" in result.stdout
    # with brute force off, the build tuned the graph search on images held back from it
    assert "calibrated search depth" in result.stderr and "3 held-back images" in result.stderr
    index = ConceptIndex.load(folder)
    assert len(index) == 15 and index.exact_below == 0
    # the reduced graph is remembered; 15 images are too few to fit its directions yet
    assert index.manifest()["hnsw"]["graph_dims"] == 8 and index.graph_dims is None
    for item in index.ids:
        assert index.search_ids(index.embedding(item), 1)[0][0] == item
    # paths are stored relative to the folder, shown as file paths
    assert all(not Path(index.item(i)[0]).is_absolute() for i in index.ids)
    hit = search_json(folder, labelled_folder / "cat" / "original.jpg", "-k", "1")["results"][0]
    assert hit["path"] == str((labelled_folder / "cat" / "original.jpg").resolve())


def test_sync_adds_changes_and_removes_and_a_moved_folder_still_matches(
    tmp_path, labelled_folder, photos
):
    folder = tmp_path / "sync.idx"
    first = run("index", "sync", labelled_folder, "--index", folder, "--threads", "2")
    assert first.exit_code == 0, first.output
    assert "added 15, updated 0, removed 0, unchanged 0, skipped 0; 15 items" in first.stdout
    again = run("index", "sync", labelled_folder, "--index", folder)
    assert "added 0, updated 0, removed 0, unchanged 15" in again.stdout
    cat = labelled_folder / "cat" / "original.jpg"
    before_id = ConceptIndex.load(folder).id_for_path("cat/original.jpg")
    os.utime(cat)  # touched, same bytes: not re-embedded
    (labelled_folder / "cat" / "crop.jpg").write_bytes(photos["rocket"].read_bytes())  # changed
    (labelled_folder / "cat" / "mirrored.jpg").unlink()  # vanished
    (labelled_folder / "new.jpg").write_bytes(photos["coffee"].read_bytes())  # new
    changed = run("index", "sync", labelled_folder, "--index", folder)
    assert changed.exit_code == 0, changed.output
    assert "added 1, updated 1, removed 1, unchanged 13" in changed.stdout
    index = ConceptIndex.load(folder)
    assert index.id_for_path("cat/original.jpg") == before_id
    assert index.id_for_path("cat/mirrored.jpg") is None and len(index) == 15
    crop = index.id_for_path("cat/crop.jpg")
    rocket = search_json(folder, photos["rocket"], "-k", "2")["results"]
    assert crop in [r["id"] for r in rocket] and rocket[0]["score"] == pytest.approx(1, abs=1e-4)
    # the folder moves: relative paths still match, nothing is embedded again
    moved = tmp_path / "moved"
    labelled_folder.rename(moved)
    after = run("index", "sync", moved, "--index", folder)
    assert "added 0, updated 0, removed 0, unchanged 15" in after.stdout
    hit = search_json(folder, moved / "new.jpg", "-k", "1")["results"][0]
    assert hit["path"] == str((moved / "new.jpg").resolve())


def test_interrupted_build_resumes(tmp_path, labelled_folder):
    """A build killed part-way keeps its committed batches; run again, it does the rest."""
    folder = tmp_path / "resume.idx"
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from cmn_edge.cli import main; main()",
            "index",
            "build",
            str(labelled_folder),
            "--index",
            str(folder),
            "--batch-size",
            "4",
            "--threads",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # kill once the first batches are committed
        if (folder / "index.db").is_file():
            try:
                if 4 <= len(ConceptIndex.open(folder)) < 15:
                    break
            except Exception:  # noqa: BLE001 - the database may be mid-creation
                pass
        if child.poll() is not None:
            break
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.communicate()
    partial = len(ConceptIndex.open(folder))
    resumed = run("index", "build", labelled_folder, "--index", folder, "--threads", "2")
    assert resumed.exit_code == 0, resumed.output
    if partial < 15:
        assert "resuming the interrupted build" in resumed.stderr
    assert "indexed 15 images" in resumed.stdout
    index = ConceptIndex.load(folder)
    assert len(index) == 15 and index.verify() == []
    finished = run("index", "build", labelled_folder, "--index", folder)
    assert_one_line_error(finished, "already holds an index")


BAD_SEARCHES = [
    # (extra arguments, text the one-line error must hold)
    (["--exclude-concept", "100000"], "concept 100000 is out of range"),
    (["--only-concept", "wing"], "unknown concept name 'wing'"),
    (["--concept-weight", "3=heavy"], "weight is not a number"),
    (["--concept-weight", "3"], "expected KEY=VALUE"),
    (["--where", "colour=red"], "no item has metadata key 'colour'"),
    (["-k", "0"], "k must be at least 1"),
]


def test_k_larger_than_the_gallery_lists_all_with_a_note(built):
    result = run("search", "id:0", "--index", built, "-k", "99", "--json")
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["results"]) == 14  # all but the query item
    assert "note: the index holds only 14 item(s)" in result.stderr


def test_where_splits_on_the_first_equals_sign(built):
    ConceptIndex.load(built).update(5, metadata={"note": "ratio=4:3", "label": "x"})
    out = search_json(built, "id:0", "-k", "3", "--where", "note=ratio=4:3")
    assert [r["id"] for r in out["results"]] == [5]
    assert out["control"]["where"] == {"note": "ratio=4:3"}


@pytest.mark.parametrize("extra,needle", BAD_SEARCHES)
def test_bad_search_arguments(built, extra, needle):
    before = snapshot(built)
    result = run("search", "id:0", "--index", built, *extra)
    assert_one_line_error(result, needle)
    assert snapshot(built) == before


def test_bad_queries(built, tmp_path):
    assert_one_line_error(run("search", "id:999", "--index", built), "id:999", "no item")
    assert_one_line_error(
        run("search", tmp_path / "nope.jpg", "--index", built), "nope.jpg", "no such image"
    )
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not an image")
    assert_one_line_error(run("search", junk, "--index", built), "junk.jpg")


def test_broken_index_directories(built, tmp_path, labelled_folder):
    cat = labelled_folder / "cat" / "original.jpg"
    missing = tmp_path / "missing.idx"
    for args in (
        ["search", cat],
        ["index", "info"],
        ["index", "add", cat],
        ["index", "remove", "1"],
        ["index", "name-concept", "1", "x"],
    ):
        assert_one_line_error(run(*args, "--index", missing), str(missing), "not found")
    assert not missing.exists()

    empty = tmp_path / "empty.idx"
    empty.mkdir()
    assert_one_line_error(run("search", cat, "--index", empty), str(empty), "not a cmn-edge index")

    # a tampered graph is refused by everything that would parse it, and nothing changes
    copy = tmp_path / "tampered"
    ConceptIndex.load(built).save(copy)
    graph = next(copy.glob("graph-*.bin"))
    data = bytearray(graph.read_bytes())
    data[-1] ^= 0x01
    graph.write_bytes(bytes(data))
    before = snapshot(copy)
    for args in (["search", "id:0"], ["index", "info"]):
        assert_one_line_error(run(*args, "--index", copy), graph.name, "checksum mismatch")
    assert snapshot(copy) == before
    verified = run("index", "verify", "--index", copy)
    assert verified.exit_code == 1 and "checksum mismatch" in verified.stderr
    repaired = run("index", "optimize", "--rebuild-graph", "--index", copy)
    assert repaired.exit_code == 0, repaired.output
    assert run("index", "verify", "--index", copy).exit_code == 0
    assert search_json(copy, "id:0", "-k", "1")["results"]
    # a database that is not one: one line from every command
    broken = tmp_path / "broken-db"
    ConceptIndex.load(built).save(broken)
    (broken / "index.db").write_bytes(b"garbage" * 1000)
    for args in (["search", "id:0"], ["index", "info"], ["index", "add", cat]):
        assert_one_line_error(run(*args, "--index", broken), "index.db", "not a readable index")


def test_model_mismatch(built, other_model, labelled_folder):
    before = snapshot(built)
    cat = labelled_folder / "cat" / "original.jpg"
    for args in (["search", cat], ["index", "add", cat]):
        result = run(*args, "--index", built, "--model", other_model)
        assert_one_line_error(result, str(built), "built with model", "query model")
    assert snapshot(built) == before


def test_bad_builds_write_nothing(tmp_path, labelled_folder, built):
    empty = tmp_path / "no-images"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    target = tmp_path / "new.idx"
    assert_one_line_error(run("index", "build", empty, "--index", target), "no images found")
    assert_one_line_error(
        run("index", "build", tmp_path / "nowhere", "--index", target), "nowhere", "not found"
    )
    assert not target.exists()

    before = snapshot(built)
    assert_one_line_error(
        run("index", "build", labelled_folder, "--index", built),
        str(built),
        "already holds an index",
    )
    assert snapshot(built) == before

    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("file,label\ncat/original.jpg,cat\n")
    assert_one_line_error(
        run("index", "build", labelled_folder, "--index", target, "--metadata", bad_csv),
        "bad.csv",
        "'path' column",
    )
    bad_csv.write_text(f"path,label\n{labelled_folder}/cat/nope.jpg,cat\n")
    assert_one_line_error(
        run("index", "build", labelled_folder, "--index", target, "--metadata", bad_csv),
        "bad.csv:2",
        "not found",
    )
    assert not target.exists()


def test_bad_changes_write_nothing(built, tmp_path, labelled_folder):
    before = snapshot(built)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    assert_one_line_error(run("index", "add", broken, "--index", built), "broken.jpg")
    assert_one_line_error(
        run("index", "add", tmp_path / "absent.jpg", "--index", built), "absent.jpg"
    )
    assert_one_line_error(
        run("index", "remove", "3", "12345", "--index", built), "12345", "not in the index"
    )
    assert_one_line_error(
        run("index", "name-concept", "--index", built, "99999", "x"), "out of range"
    )
    assert_one_line_error(
        run("index", "name-concept", "--index", built, "4", "17"), "looks like an index"
    )
    assert snapshot(built) == before
    assert len(ConceptIndex.load(built)) == 15
