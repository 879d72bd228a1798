"""`cmn-export pack`: a split re-encoded small enough to carry, read back like the original."""

from __future__ import annotations

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
    args = ["pack", str(labelled_folder), "--out", str(out), "--split", "all",
            "--quality", "60", "--max-side", "128"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    original, packed = load_samples(labelled_folder), load_samples(out, "all")
    assert [(s.label, s.class_name) for s in packed] == [
        (s.label, s.class_name) for s in original
    ]
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
