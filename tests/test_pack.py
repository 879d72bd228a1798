"""`cmn-export pack`: a split re-encoded small enough to carry, read back like the original."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

pytest.importorskip("torch")

from cmn_edge.dataset import load_samples  # noqa: E402
from cmn_export.cli import main  # noqa: E402


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_pack_keeps_labels_and_classes_and_shrinks_the_images(labelled_folder, tmp_path):
    out = tmp_path / "packed"
    args = [
        "pack",
        str(labelled_folder),
        "--out",
        str(out),
        "--split",
        "all",
        "--quality",
        "60",
        "--max-side",
        "128",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    original, packed = load_samples(labelled_folder), load_samples(out, "all")
    assert [(s.label, s.class_name) for s in packed] == [(s.label, s.class_name) for s in original]
    for sample in packed:
        with Image.open(sample.path) as image:
            assert image.format == "WEBP" and min(image.size) <= 128
    assert _size(out) < _size(labelled_folder) / 2
    assert f"{len(original)} images" in result.output


def test_pack_of_a_missing_dataset_fails_in_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "packed"
    result = CliRunner().invoke(main, ["pack", str(tmp_path / "nowhere"), "--out", str(out)])
    assert result.exit_code != 0
    assert "nowhere" in result.output and "not found" in result.output
    assert not out.exists() and list(tmp_path.iterdir()) == []


def _pack(dataset: Path, out: Path):
    return CliRunner().invoke(
        main, ["pack", str(dataset), "--out", str(out), "--split", "all", "--max-side", "64"]
    )


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("where", ["dataset", "parent", "grandparent"])
def test_pack_never_replaces_the_dataset_or_a_folder_holding_it(labelled_folder, tmp_path, where):
    dataset = tmp_path / "a" / "b" / "gallery"
    dataset.parent.mkdir(parents=True)
    shutil.move(labelled_folder, dataset)
    out = {"dataset": dataset, "parent": dataset.parent, "grandparent": tmp_path / "a"}[where]
    before = _files(dataset)
    result = _pack(dataset, out)
    assert result.exit_code == 1
    assert result.output.startswith("error: ") and len(result.output.strip().splitlines()) == 1
    assert str(out) in result.output
    assert _files(dataset) == before


def test_pack_refuses_a_folder_that_is_not_an_earlier_pack(labelled_folder, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    result = _pack(labelled_folder, out)
    assert result.exit_code == 1
    assert result.output.startswith(f"error: {out}: ") and "not an earlier pack" in result.output
    assert (out / "notes.txt").read_text() == "keep me" and len(list(out.iterdir())) == 1
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_pack_refuses_a_file(labelled_folder, tmp_path):
    out = tmp_path / "file.txt"
    out.write_text("keep me")
    result = _pack(labelled_folder, out)
    assert result.exit_code == 1 and str(out) in result.output
    assert out.read_text() == "keep me"


def test_pack_replaces_an_earlier_pack_but_not_the_pack_it_reads(labelled_folder, tmp_path):
    out = tmp_path / "packed"
    assert _pack(labelled_folder, out).exit_code == 0
    stale = out / "images" / "stale.webp"
    stale.write_bytes(b"old")
    result = _pack(labelled_folder, out)
    assert result.exit_code == 0, result.output
    assert not stale.exists()
    assert len(load_samples(out, "all")) == len(load_samples(labelled_folder))
    # An earlier pack is a dataset too: packing it onto itself would delete what it reads.
    before = _files(out)
    result = _pack(out, out)
    assert result.exit_code == 1 and str(out) in result.output
    assert _files(out) == before
