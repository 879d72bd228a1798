"""`cmn-edge embed` on input a user really has, made for real with Pillow: no mocks."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from cmn_edge.cli import main


def run(*args):
    return CliRunner().invoke(main, [os.fsdecode(a) for a in args], catch_exceptions=False)


def latin1_folder(tmp_path: Path, photos) -> tuple[Path, bytes]:
    """A folder of cat.jpg and b"caf\\xe9.jpg" (Latin-1, not UTF-8), and that name's path."""
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(photos["cat"], folder / "cat.jpg")
    odd = os.path.join(os.fsencode(folder), b"caf\xe9.jpg")
    try:
        shutil.copy(photos["coffee"], odd)
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system refuses names that are not UTF-8")
    return folder, odd


def test_embed_to_csv_keeps_a_file_name_that_is_not_utf8(tmp_path: Path, photos) -> None:
    """A Latin-1 name (b"caf\\xe9.jpg") failed the run at its end with an internal error;
    the CSV now holds the name's own bytes, as the file system has it."""
    folder, odd = latin1_folder(tmp_path, photos)
    out = tmp_path / "out.csv"
    result = run("embed", folder, "--threads", "2", "-o", out)
    assert result.exit_code == 0, result.output
    rows = out.read_bytes().splitlines()
    assert len(rows) == 3
    assert rows[1].startswith(odd + b",")
    assert rows[2].startswith(os.fsencode(folder / "cat.jpg") + b",")


def test_embed_csv_to_a_strict_stdout_keeps_a_file_name_that_is_not_utf8(
    tmp_path: Path, photos
) -> None:
    """Under a UTF-8 locale (en_US.UTF-8; here PYTHONIOENCODING) stdout is strict: the CSV
    stopped half-written at the Latin-1 name with an internal error."""
    folder, odd = latin1_folder(tmp_path, photos)
    result = subprocess.run(
        [sys.executable, "-c", "from cmn_edge.cli import main; main()", "embed", folder]
        + ["--format", "csv", "--threads", "2"],
        capture_output=True,
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    rows = result.stdout.splitlines()
    assert len(rows) == 3 and rows[1].startswith(odd + b",")


def damaged_exif_jpeg(path: Path, photos) -> Path:
    """A JPEG whose EXIF orientation tag claims 2,000 bytes past the end of its block."""
    from PIL import Image

    ifd = struct.pack("<HHHII", 1, 0x0112, 3, 1000, 0x7000) + struct.pack("<I", 0)
    exif = b"Exif\x00\x00" + b"II*\x00" + struct.pack("<I", 8) + ifd
    Image.open(photos["cat"]).convert("RGB").resize((64, 48)).save(path, exif=exif)
    return path


def test_damaged_exif_adds_no_pillow_warnings_to_stderr(tmp_path: Path, photos) -> None:
    """Pillow's 'Tag data larger than file' came out as two lines naming a file of Pillow's
    own: noise on a run that succeeds, and three lines where one was due when it fails."""
    good = damaged_exif_jpeg(tmp_path / "exif.jpg", photos)
    truncated = tmp_path / "exif-truncated.jpg"
    data = good.read_bytes()
    truncated.write_bytes(data[: len(data) * 2 // 3])
    cmn_edge = [sys.executable, "-c", "from cmn_edge.cli import main; main()"]

    ok = subprocess.run(
        [*cmn_edge, "embed", str(good), "--threads", "2"], capture_output=True, text=True
    )
    assert ok.returncode == 0 and ok.stderr == "", ok.stderr
    failed = subprocess.run(
        [*cmn_edge, "embed", str(truncated), "--threads", "2"], capture_output=True, text=True
    )
    assert failed.returncode == 1
    assert failed.stderr.startswith(f"error: {truncated}: corrupt or truncated image")
    assert failed.stderr.count("\n") == 1, failed.stderr


def test_a_reader_that_goes_away_ends_the_command_quietly(photos):
    """`cmn-edge embed ... | head`: no "error: Broken pipe" line, SIGPIPE's status."""
    program = "from cmn_edge.cli import main; main()"
    command = [sys.executable, "-c", program, "embed", str(photos["cat"])]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # the reader is gone before anything is written
    stderr = process.stderr.read()
    assert process.wait() == 141 and stderr == b""


def test_output_through_a_symbolic_link_writes_its_target_and_keeps_the_link(
    tmp_path: Path, photos
) -> None:
    """`-o latest.json`, a link to this run's file, replaced the link with a plain file."""
    real = tmp_path / "runs" / "today.json"
    real.parent.mkdir()
    real.write_text("old")
    link = tmp_path / "latest.json"
    link.symlink_to(real)
    result = run("embed", photos["cat"], "-o", link)
    assert result.exit_code == 0, result.output
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert '"embedding"' in real.read_text()
    assert not [p for p in tmp_path.rglob(".*") if p.is_file()]  # no temporary debris


def test_avif_photos_are_embedded_and_indexed_where_pillow_reads_them(tmp_path: Path, photos):
    """Phones save AVIF; a folder of them was skipped without a word, though Pillow reads it."""
    from PIL import Image, features

    from cmn_edge import Embedder
    from cmn_edge.dataset import IMAGE_SUFFIXES

    assert (".avif" in IMAGE_SUFFIXES) == features.check("avif")  # listed only where read
    if not features.check("avif"):  # Pillow < 11.2: nothing more to check
        return
    folder = tmp_path / "phone"
    folder.mkdir()
    Image.open(photos["cat"]).save(folder / "IMG_0001.avif", quality=90)
    index_dir = tmp_path / "phone.idx"
    built = run("index", "build", folder, "--index", index_dir, "--threads", "2")
    assert built.exit_code == 0 and "indexed 1 images" in built.stdout, built.output
    embedder = Embedder()
    same = embedder.embed(folder / "IMG_0001.avif")[0] @ embedder.embed(photos["cat"])[0]
    assert same > 0.95  # the same photo, through a lossy codec


def test_photos_pillow_cannot_decode_are_counted_not_passed_over_silently(tmp_path: Path, photos):
    """An iPhone folder's .heic photos were left out of embed, build and sync without a word."""
    folder = tmp_path / "iphone"
    folder.mkdir()
    shutil.copy(photos["cat"], folder / "IMG_0001.jpg")
    for n in (2, 3):
        (folder / f"IMG_000{n}.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic")  # not read
    (folder / "notes.txt").write_text("not a photo, not counted")
    note = "left out 2 photo(s) in formats Pillow cannot decode here (2 .heic)"
    embedded = run("embed", folder, "-o", tmp_path / "v.json")
    assert embedded.exit_code == 0 and note in embedded.stderr, embedded.output
    built = run("index", "build", folder, "--index", tmp_path / "i.idx", "--threads", "2")
    assert built.exit_code == 0 and "indexed 1 images" in built.stdout, built.output
    assert built.stderr.count(note) == 1 and "IMG_0002.HEIC" in built.stderr
    synced = run("index", "sync", folder, "--index", tmp_path / "i.idx")
    assert synced.exit_code == 0 and note in synced.stderr
    (folder / "IMG_0001.jpg").unlink()
    emptied = run("index", "sync", folder, "--index", tmp_path / "i.idx")
    assert emptied.exit_code == 1 and "would remove all 1 items" in emptied.stderr
    assert note in emptied.stderr and len(emptied.stderr.strip().splitlines()) == 1
    only_heic = run("index", "build", folder, "--index", tmp_path / "j.idx")
    assert only_heic.exit_code == 1 and not (tmp_path / "j.idx").exists()
    assert only_heic.stderr.strip().splitlines() == [
        f"error: {folder}: no images found; {note}, e.g. {folder / 'IMG_0002.HEIC'}; "
        "convert them to JPEG to include them"
    ]


@pytest.mark.skipif(not Path("/dev/stdout").is_symlink(), reason="needs Linux's /dev/stdout link")
def test_output_to_dev_stdout_goes_through_a_pipe_and_keeps_what_an_append_kept(
    tmp_path: Path, photos
) -> None:
    """Following -o's links resolved /dev/stdout to /proc/PID/fd/pipe:[N] (no such file),
    and a file redirected with >> was renamed over."""
    cli = [sys.executable, "-c", "from cmn_edge.cli import main; main()"]
    args = ["embed", str(photos["cat"]), "-o", "/dev/stdout"]
    piped = subprocess.run(cli + args, capture_output=True, text=True)
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout.startswith('{"model"')
    log = tmp_path / "log.txt"
    log.write_text("kept\n")
    with open(log, "a") as handle:
        appended = subprocess.run(cli + args, stdout=handle, stderr=subprocess.PIPE, text=True)
    assert appended.returncode == 0, appended.stderr
    assert log.read_text().startswith('kept\n{"model"')
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.txt"]
