"""Every writer goes through ``cmn_edge.files``: whole files or none, FIFOs written through.

Each test drives a real caller (the heatmap PNG, the concept catalogue, a training
checkpoint) on real files; before the callers shared the one writer each behaved differently.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from cmn_edge import catalogue, render

WAIT = 60  # seconds; a bound against a reader that never gets its data, not a timing check


def _write_into_fifo(fifo: Path, write) -> bytes:
    """Run ``write(fifo)`` while another process reads the FIFO; what that process read."""
    os.mkfifo(fifo)
    code = "import sys; sys.stdout.buffer.write(open(sys.argv[1], 'rb').read())"
    reader = subprocess.Popen([sys.executable, "-c", code, str(fifo)], stdout=subprocess.PIPE)
    try:
        write(fifo)
        assert stat.S_ISFIFO(os.stat(fifo).st_mode), "the FIFO was replaced by a file"
        return reader.communicate(timeout=WAIT)[0]
    finally:
        reader.kill()
        reader.wait()


def test_heatmap_png_into_a_fifo_is_written_through(tmp_path: Path) -> None:
    image = Image.new("RGB", (16, 8), (200, 30, 30))
    data = _write_into_fifo(tmp_path / "pipe.png", lambda path: render.save_png(image, path))
    assert data.startswith(b"\x89PNG")
    assert [p.name for p in tmp_path.iterdir()] == ["pipe.png"]


def test_catalogue_page_into_a_fifo_is_written_through(tmp_path: Path) -> None:
    page = catalogue.Catalogue(model_id="m@0123", num_items=0, cards=())
    data = _write_into_fifo(tmp_path / "pipe.html", lambda path: catalogue.write(page, path))
    assert b"Concepts of m@0123" in data
    assert [p.name for p in tmp_path.iterdir()] == ["pipe.html"]


def test_catalogue_files_follow_the_umask(tmp_path: Path) -> None:
    page = catalogue.Catalogue(model_id="m@0123", num_items=0, cards=())
    old = os.umask(0o027)
    try:
        written = catalogue.write(page, tmp_path / "site")
    finally:
        os.umask(old)
    assert stat.S_IMODE(written.stat().st_mode) == 0o640


def test_a_failed_checkpoint_save_keeps_the_old_one_and_leaves_nothing(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from cmn_export.checkpoint import save_atomic

    path = tmp_path / "last.pt"
    save_atomic({"step": 1, "weights": torch.ones(3)}, path)
    before = path.read_bytes()
    with pytest.raises(Exception, match="pickle"):
        save_atomic({"step": 2, "callback": lambda: None}, path)  # a lambda cannot be pickled
    assert path.read_bytes() == before
    assert list(tmp_path.iterdir()) == [path]
    assert torch.load(path, weights_only=True)["step"] == 1


def _folder(path: Path, text: str) -> Path:
    path.mkdir()
    (path / "data.txt").write_text(text)
    return path


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 is Linux's")
def test_publish_folder_swaps_in_one_step_so_the_target_is_never_absent(
    tmp_path: Path, monkeypatch
) -> None:
    """The old folder was moved aside before the new one took its name: a kill between the
    two renames left no index at its path."""
    import shutil

    from cmn_edge import files

    target = _folder(tmp_path / "gallery.idx", "old")
    swapped = files._exchange(_folder(tmp_path / "a", "a"), _folder(tmp_path / "b", "b"))
    assert swapped, "renameat2(RENAME_EXCHANGE) is not available on this file system"
    assert (tmp_path / "a" / "data.txt").read_text() == "b"

    def killed(*args, **kwargs):  # the process dies after the swap, before the clean-up
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        files.publish_folder(_folder(tmp_path / ".new", "new"), target)
    assert (target / "data.txt").read_text() == "new"
    [old] = tmp_path.glob(".gallery.idx.old-*")  # what the next clean-up removes
    assert (old / "data.txt").read_text() == "old"
    monkeypatch.undo()
    files.publish_folder(_folder(tmp_path / ".newer", "newer"), target)
    assert (target / "data.txt").read_text() == "newer"
    assert not list(tmp_path.glob(".gallery.idx.old-*"))  # this one's and the killed one's
    assert not (tmp_path / ".newer").exists()


def test_publish_folder_without_the_swap_still_replaces(tmp_path: Path, monkeypatch) -> None:
    from cmn_edge import files

    monkeypatch.setattr(files, "_exchange", lambda a, b: False)  # macOS, Windows, old kernels
    target = _folder(tmp_path / "out", "old")
    files.publish_folder(_folder(tmp_path / ".tmp", "new"), target)
    assert (target / "data.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
