"""`cmn-edge index rebuild` / `Index.rebuild`: every item re-embedded with another model file,
in place, on real photos; unreadable items, an interrupted run, a kill, a concurrent writer."""

from __future__ import annotations

import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_index_cli import assert_one_line_error, run

from cmn_edge.index import ConceptIndex, Index, ModelMismatchError
from cmn_edge.registry import resolve_model_path


def gallery(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.jpg"))


@pytest.fixture
def fp32_index(tmp_path, labelled_folder, embedder_fp32) -> Path:
    """The labelled photos indexed with the FP32 model, with metadata and a concept name."""
    index = Index.create(tmp_path / "fp32.idx", embedder_fp32)
    paths = gallery(labelled_folder)
    index.add(paths, metadata=[{"label": p.parent.name} for p in paths])
    index.name_concept(7, "stripes")
    index.close()
    return tmp_path / "fp32.idx"


def contents(folder: Path) -> dict[int, tuple]:
    """id -> (path, metadata) of every item."""
    index = ConceptIndex.open(folder)
    try:
        return {i: index.item(i) for i in index.ids}
    finally:
        index.close()


def staged_rows(folder: Path) -> int:
    conn = sqlite3.connect(f"file:{folder / 'index.db'}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT COUNT(*) FROM restaged").fetchone()[0]
    except sqlite3.OperationalError:
        return 0
    finally:
        conn.close()


def test_rebuild_to_another_precision_keeps_items_and_names(fp32_index, embedder, embedder_fp32):
    before = contents(fp32_index)
    reader = Index.open(fp32_index, embedder_fp32)  # a kiosk that opened it earlier
    unloaded = ConceptIndex.open(fp32_index)  # a camera that has not searched yet
    cat = before[0][0]
    assert reader.search(cat, k=1)[0].id == 0

    report = Index.open(fp32_index).rebuild(embedder)
    assert report.swapped and report.embedded == 15 and report.resumed == 0
    assert not report.unreadable and report.names_cleared == 0

    index = ConceptIndex.load(fp32_index)
    assert index.model_id == embedder.model_id and index.precision == "int8"
    assert contents(fp32_index) == before  # ids, paths, metadata
    assert index.concept_names == {7: "stripes"}
    for item_id, (path, _meta) in before.items():
        expected = embedder.embed([path])[0]
        assert np.allclose(index.embedding(item_id), expected, atol=1e-6)
    assert index.verify() == []
    assert index.manifest()["checkpoint"]["vector_rows"] == 15  # the graph built anew

    # the reader's model is no longer the index's: refused, not silently wrong, for an
    # image it embeds, a vector it was given (a kiosk embeds itself), and an add (a camera)
    with pytest.raises(ModelMismatchError, match="cmn-edge index rebuild"):
        reader.search(cat, k=1)
    stale = embedder_fp32.embed([cat])[0]
    with pytest.raises(ModelMismatchError, match="re-embedded with model"):
        reader.index.search(stale, k=1)
    with pytest.raises(ModelMismatchError, match="re-embedded with model"):
        reader.index.add(stale[None, :], ["elsewhere.jpg"])
    with pytest.raises(ModelMismatchError, match="re-embedded with model"):
        unloaded.search(stale, k=1)
    assert len(ConceptIndex.open(fp32_index)) == 15
    hits = Index.open(fp32_index).search(cat, k=3)
    assert hits[0].id == 0 and hits[0].score == pytest.approx(1.0, abs=1e-5)

    again = Index.open(fp32_index).rebuild(embedder)
    assert not again.swapped and "nothing to re-embed" in again.summary()


def test_cli_rebuild_after_the_model_file_was_replaced(tmp_path, labelled_folder):
    """The upgrade case: the file the index names was replaced (a re-quantized model)."""
    model = tmp_path / "model.onnx"
    shutil.copy(resolve_model_path(None, "int8"), model)
    folder = tmp_path / "g.idx"
    built = run("index", "build", labelled_folder, "--index", folder, "--model", model)
    assert built.exit_code == 0, built.output
    before = contents(folder)
    onnx = pytest.importorskip("onnx")
    replaced = onnx.load(str(model))
    replaced.doc_string = (replaced.doc_string or "") + " (upgraded)"
    onnx.save(replaced, str(model))

    cat = labelled_folder / "cat" / "original.jpg"
    refused = run("search", cat, "--index", folder)
    assert_one_line_error(refused, "built with model", "cmn-edge index rebuild")

    rebuilt = run("index", "rebuild", "--index", folder)
    assert rebuilt.exit_code == 0, rebuilt.output
    assert "re-embedded 15 items" in rebuilt.stdout
    assert contents(folder) == before
    found = run("search", cat, "--index", folder, "-k", "1")
    assert found.exit_code == 0, found.output
    assert str(cat.resolve()) in found.stdout


def test_unreadable_items_stop_the_rebuild_and_a_second_run_resumes(
    fp32_index, labelled_folder, embedder
):
    fp32_model = ConceptIndex.open(fp32_index).model_id
    hidden = labelled_folder / "rocket" / "crop.jpg"
    moved = hidden.with_name("away.bin")
    hidden.rename(moved)
    stopped = run("index", "rebuild", "--index", fp32_index, "--precision", "int8")
    assert stopped.exit_code == 1
    assert "cannot re-embed" in stopped.stderr and str(hidden) in stopped.stderr
    assert "the index is unchanged" in stopped.stderr
    index = ConceptIndex.open(fp32_index)
    assert index.model_id == fp32_model and len(index) == 15
    assert staged_rows(fp32_index) == 14  # kept for the next run

    moved.rename(hidden)
    resumed = run("index", "rebuild", "--index", fp32_index, "--precision", "int8")
    assert resumed.exit_code == 0, resumed.output
    assert "re-embedded 15 items with" in resumed.stdout
    assert "(14 from the interrupted run)" in resumed.stdout
    index = ConceptIndex.load(fp32_index)
    assert index.model_id == embedder.model_id and len(index) == 15
    assert staged_rows(fp32_index) == 0
    hidden_id = index.id_for_path(str(hidden.resolve()))
    assert np.allclose(index.embedding(hidden_id), embedder.embed([hidden])[0], atol=1e-6)

    # --drop-unreadable: back to FP32 without the missing photo
    hidden.unlink()
    dropped = run(
        "index", "rebuild", "--index", fp32_index, "--precision", "fp32", "--drop-unreadable"
    )
    assert dropped.exit_code == 0, dropped.output
    assert "removed 1 unreadable" in dropped.stdout and "warning: removed" in dropped.stderr
    index = ConceptIndex.load(fp32_index)
    assert index.model_id == fp32_model and len(index) == 14 and index.verify() == []


def test_an_item_changed_during_the_rebuild_is_embedded_again(fp32_index, embedder):
    other = ConceptIndex.open(fp32_index)
    changed = []

    def progress(done: int) -> None:  # another writer, between two batches
        if not changed:
            other.update(0, embedding=np.ones(other.num_concepts, dtype=np.float32))
            changed.append(0)

    report = Index.open(fp32_index).rebuild(embedder, batch_size=4, progress=progress)
    assert report.swapped and changed
    index = ConceptIndex.load(fp32_index)
    path = index.item(0)[0]
    assert np.allclose(index.embedding(0), embedder.embed([path])[0], atol=1e-6)


def test_a_rebuild_killed_at_any_point_leaves_an_index_that_opens(fp32_index):
    """kill -9 during staging: the old index, whole; the next run finishes the job."""
    before = contents(fp32_index)
    fp32_model = ConceptIndex.open(fp32_index).model_id
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from cmn_edge.cli import main; main()",
            "index",
            "rebuild",
            "--index",
            str(fp32_index),
            "--precision",
            "int8",
            "--batch-size",
            "1",
            "--threads",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and child.poll() is None:
        if staged_rows(fp32_index) >= 2:
            break
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.communicate()
    assert child.returncode == -signal.SIGKILL  # killed mid-staging, not finished
    assert staged_rows(fp32_index) >= 2  # what it staged survives, for the next run
    index = ConceptIndex.load(fp32_index)
    assert index.model_id == fp32_model and len(index) == 15 and index.verify() == []
    assert Index.open(fp32_index).search(before[0][0], k=1)[0].id == 0
    finished = run("index", "rebuild", "--index", fp32_index, "--precision", "int8")
    assert finished.exit_code == 0, finished.output
    index = ConceptIndex.load(fp32_index)
    assert index.model_id != fp32_model and contents(fp32_index) == before
    assert index.verify() == []


def test_a_model_of_another_size_is_refused(fp32_index, tmp_path):
    folder = tmp_path / "small.idx"
    small = ConceptIndex.create(folder, 8, "tiny@0")
    small.close()
    result = run("index", "rebuild", "--index", folder, "--precision", "int8")
    assert_one_line_error(result, str(folder), "512 concepts, the index 8")


def test_an_index_with_region_maps_gets_the_new_models_maps(
    tmp_path, labelled_folder, embedder, embedder_fp32
):
    from cmn_edge.index import regions as db_regions

    folder = tmp_path / "regions.idx"
    index = Index.create(folder, embedder_fp32, regions=True)
    paths = gallery(labelled_folder)[:6]
    index.add(paths)
    index.close()
    report = Index.open(folder).rebuild(embedder)
    assert report.swapped and report.items == 6
    rebuilt = ConceptIndex.load(folder)
    _vectors, expected = embedder.embed_regions(paths)
    ids = [rebuilt.id_for_path(str(p.resolve())) for p in paths]
    with rebuilt._store.read() as conn:
        stored = db_regions.read(conn, ids, expected.shape[1], expected.shape[2])
    assert np.allclose(stored, expected, atol=2e-3)  # float16 storage
    assert rebuilt.verify() == []
    hits = Index.open(folder).search(paths[0], k=2, rerank="structural")
    assert hits[0].path == str(paths[0].resolve())


def test_a_second_rebuild_started_meanwhile_wins_and_the_first_stops(
    tmp_path, labelled_folder, embedder, embedder_fp32, other_model
):
    """Never two models in one gallery: the first rebuild notices and stops."""
    from cmn_edge import Embedder
    from cmn_edge.index import ConceptIndexError

    folder = tmp_path / "int8.idx"
    index = Index.create(folder, embedder)
    paths = gallery(labelled_folder)
    index.add(paths)
    index.close()
    other = Embedder(other_model, precision="int8", threads=2)
    started = []

    def progress(done: int) -> None:
        if not started:  # while the first stages FP32 vectors, a second run takes over
            started.append(Index.open(folder).rebuild(other))

    with pytest.raises(ConceptIndexError, match="another rebuild"):
        Index.open(folder).rebuild(embedder_fp32, batch_size=4, progress=progress)
    assert started[0].swapped
    final = ConceptIndex.load(folder)
    assert final.model_id == other.model_id and final.verify() == []
    for item_id in final.ids:
        expected = other.embed([final.item(item_id)[0]])[0]
        assert np.allclose(final.embedding(item_id), expected, atol=1e-6)


def test_an_unreadable_item_another_writer_removed_is_not_counted_twice(
    fp32_index, labelled_folder, embedder
):
    hidden = labelled_folder / "coffee" / "crop.jpg"
    hidden_id = ConceptIndex.open(fp32_index).id_for_path(str(hidden.resolve()))
    hidden.unlink()
    other = ConceptIndex.open(fp32_index)
    removed = []

    def progress(done: int) -> None:
        if not removed:  # a sync elsewhere drops the vanished file meanwhile
            other.remove([hidden_id])
            removed.append(hidden_id)

    report = Index.open(fp32_index).rebuild(
        embedder, batch_size=4, drop_unreadable=True, progress=progress
    )
    assert report.swapped and report.dropped == 0 and report.items == 14
    index = ConceptIndex.load(fp32_index)
    assert len(index) == 14 == len(contents(fp32_index)) and index.verify() == []


def test_a_rebuild_with_a_model_file_records_it_for_the_next_open(
    fp32_index, tmp_path, labelled_folder
):
    from cmn_edge import Embedder

    copy = tmp_path / "mine.int8.onnx"
    shutil.copy(resolve_model_path(None, "int8"), copy)
    Index.open(fp32_index).rebuild(Embedder(copy, precision="int8", threads=2))
    assert ConceptIndex.open(fp32_index).model_ref == str(copy.resolve())
    cat = labelled_folder / "cat" / "original.jpg"
    hits = Index.open(fp32_index).search(cat, k=1)  # loads the recorded file, not the default
    assert hits[0].path == str(cat.resolve())
