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
