"""`cmn-edge index build/sync/add` on folders a user really has: file names in another
encoding than UTF-8 (a Latin-1 name from an old camera, a zip or a Windows share)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from cli_checks import one_line_error, snapshot
from click.testing import CliRunner

from cmn_edge.cli import main
from cmn_edge.index import ConceptIndex

LATIN1 = b"caf\xe9"  # "café" in Latin-1: not UTF-8, Python keeps it as a lone surrogate


def run(*args):
    return CliRunner().invoke(main, [os.fsdecode(a) for a in args], catch_exceptions=False)


def contents(index_dir: Path) -> tuple[dict, list[str]]:
    """What an index holds (its items' stamps) and its files, read through a fresh open."""
    index = ConceptIndex.load(index_dir)
    try:
        files = sorted(p.name for p in index_dir.iterdir() if not p.name.endswith(("-shm", "-wal")))
        return index.file_stamps(), files
    finally:
        index.close()


def latin1_path(folder: Path, name: bytes) -> Path:
    """``folder / name`` with a name that is not UTF-8; skips where the file system refuses."""
    path = Path(os.fsdecode(os.path.join(os.fsencode(folder), name)))
    try:
        path.touch()
        path.unlink()
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system refuses names that are not UTF-8")
    return path


@pytest.fixture
def mixed_folder(tmp_path: Path, photos: dict[str, Path]) -> tuple[Path, Path]:
    """(folder, the Latin-1-named photo in it) beside an ordinary photo."""
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(photos["cat"], folder / "cat.jpg")
    odd = latin1_path(folder, LATIN1 + b".jpg")
    shutil.copy(photos["coffee"], odd)
    return folder, odd


def test_build_and_sync_skip_a_file_name_that_is_not_utf8(tmp_path, mixed_folder) -> None:
    folder, odd = mixed_folder
    built = tmp_path / "built.idx"
    result = run("index", "build", folder, "--index", built, "--threads", "2")
    assert result.exit_code == 0, result.output
    assert "skipped" in result.stderr and "not valid UTF-8" in result.stderr
    assert "caf" in result.stderr
    assert len(ConceptIndex.load(built)) == 1
    assert run("index", "verify", "--index", built).exit_code == 0

    strict = tmp_path / "strict.idx"
    one_line_error(
        run("index", "build", folder, "--index", strict, "--strict", "--threads", "2"),
        "caf",
        "not valid UTF-8",
    )
    assert not strict.exists()

    synced = tmp_path / "synced.idx"
    result = run("index", "sync", folder, "--index", synced, "--threads", "2")
    assert result.exit_code == 0, result.output
    assert "skipped 1" in result.stdout and "not valid UTF-8" in result.stderr
    assert run("index", "verify", "--index", synced).exit_code == 0
    # the next sync lists it again, and keeps the rest
    again = run("index", "sync", folder, "--index", synced, "--threads", "2")
    assert again.exit_code == 0 and "unchanged 1, skipped 1" in again.stdout, again.output
    assert len(ConceptIndex.load(synced)) == 1


def test_add_refuses_a_file_name_that_is_not_utf8(tmp_path, mixed_folder) -> None:
    folder, odd = mixed_folder
    index_dir = tmp_path / "gallery.idx"
    assert run("index", "sync", folder, "--index", index_dir, "--threads", "2").exit_code == 0
    before = snapshot(index_dir)
    one_line_error(run("index", "add", odd, "--index", index_dir), "caf", "not valid UTF-8")
    one_line_error(run("index", "add", folder, "--index", index_dir), "caf", "not valid UTF-8")
    assert snapshot(index_dir) == before
    kept = run("index", "add", folder, "--index", index_dir, "--skip-errors")
    assert kept.exit_code == 0, kept.output
    assert "not valid UTF-8" in kept.stderr and "updated 1" in kept.stdout
    assert run("index", "verify", "--index", index_dir).exit_code == 0


def test_a_folder_name_that_is_not_utf8_is_refused_before_anything_is_written(
    tmp_path, photos
) -> None:
    folder = latin1_path(tmp_path, LATIN1)
    folder.mkdir()
    shutil.copy(photos["cat"], folder / "cat.jpg")
    for command in ("build", "sync"):
        target = tmp_path / f"{command}.idx"
        one_line_error(
            run("index", command, folder, "--index", target), "caf", "folder name", "UTF-8"
        )
        assert not target.exists()


def two_photo_index(tmp_path: Path, photos, folder_name: str, command: str) -> tuple[Path, Path]:
    """A folder of two photos and an index made of it by ``index build`` or ``index sync``."""
    folder = tmp_path / folder_name
    folder.mkdir()
    for name in ("cat", "coffee"):
        shutil.copy(photos[name], folder / f"{name}.jpg")
    index_dir = tmp_path / "gallery.idx"
    assert run("index", command, folder, "--index", index_dir, "--threads", "2").exit_code == 0
    return folder, index_dir


def test_a_failed_force_build_keeps_the_index_it_would_replace(tmp_path, photos) -> None:
    """`index build --force` deleted the old index first: a replacement that then failed
    (nothing readable, or --strict at a bad file) left an empty directory."""
    _, index_dir = two_photo_index(tmp_path, photos, "good", "build")
    before = contents(index_dir)

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "notes.jpg").write_text("a shopping list, not a photo\n")
    refused = run("index", "build", bad, "--index", index_dir, "--force")
    assert refused.exit_code == 1, refused.output
    assert refused.stderr.splitlines()[-1].endswith("no readable images (all 1 were skipped)")
    shutil.copy(photos["rocket"], bad / "rocket.jpg")
    one_line_error(
        run("index", "build", bad, "--index", index_dir, "--force", "--strict"),
        "notes.jpg",
        "not an image",
    )
    assert contents(index_dir) == before
    assert run("index", "verify", "--index", index_dir).exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "gallery.idx", "good"]

    # a replacement that succeeds is the new index, with nothing left beside it
    (bad / "notes.jpg").unlink()
    done = run("index", "build", bad, "--index", index_dir, "--force", "--threads", "2")
    assert done.exit_code == 0, done.output
    assert "indexed 1 images" in done.stdout
    assert run("index", "verify", "--index", index_dir).exit_code == 0
    paths = [str(p) for p in ConceptIndex.load(index_dir).file_stamps()]
    assert paths == ["rocket.jpg"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "gallery.idx", "good"]


@pytest.mark.parametrize("command", ["build", "sync"])
def test_a_file_given_as_the_folder_says_so(tmp_path, photos, command) -> None:
    """The photo given where the folder belongs was reported as 'folder not found'."""
    target = tmp_path / "new.idx"
    one_line_error(
        run("index", command, photos["cat"], "--index", target),
        str(photos["cat"]),
        "is a file, not a folder",
    )
    assert not target.exists()


def test_sync_of_an_empty_folder_keeps_the_index(tmp_path, photos) -> None:
    """An unmounted drive is an empty folder: syncing it removed every item of the index."""
    folder, index_dir = two_photo_index(tmp_path, photos, "mnt", "sync")
    before = contents(index_dir)
    for photo in folder.iterdir():
        photo.unlink()
    one_line_error(
        run("index", "sync", folder, "--index", index_dir),
        str(folder),
        "no images found",
        "would remove all 2 items",
    )
    assert contents(index_dir) == before
    assert run("index", "verify", "--index", index_dir).exit_code == 0


@pytest.mark.parametrize("command", ["build", "sync"])
def test_a_dangling_symlink_as_the_index_says_so(tmp_path, photos, command) -> None:
    """--index a link to a folder that is gone (an unmounted disk) said only 'File exists'."""
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(photos["cat"], folder / "cat.jpg")
    link = tmp_path / "gallery.idx"
    link.symlink_to(tmp_path / "gone" / "gallery.idx")
    one_line_error(
        run("index", command, folder, "--index", link), str(link), "symbolic link", "not exist"
    )
    assert link.is_symlink() and not (tmp_path / "gone").exists()


def test_force_build_replaces_the_index_in_the_current_directory(
    tmp_path, photos, monkeypatch
) -> None:
    """`--index .` from inside the index: the replacement is built beside it all the same."""
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(photos["cat"], folder / "cat.jpg")
    index_dir = tmp_path / "gallery.idx"
    assert run("index", "build", folder, "--index", index_dir, "--threads", "2").exit_code == 0
    shutil.copy(photos["rocket"], folder / "rocket.jpg")
    monkeypatch.chdir(index_dir)
    done = run("index", "build", folder, "--index", ".", "--force", "--threads", "2")
    assert done.exit_code == 0, done.output
    assert sorted(ConceptIndex.load(index_dir).file_stamps()) == ["cat.jpg", "rocket.jpg"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gallery.idx", "photos"]


def test_the_python_api_refuses_a_path_that_is_not_utf8_and_writes_nothing(
    tmp_path, embedder, mixed_folder
) -> None:
    """Index.add(paths=...) raised a bare UnicodeEncodeError from inside the database."""
    from cmn_edge.index import ConceptIndexError, Index

    folder, odd = mixed_folder
    index = Index.create(tmp_path / "api.idx", embedder=embedder)
    vector = embedder.embed(folder / "cat.jpg")
    index.add(vector, paths=[folder / "cat.jpg"])
    before = snapshot(tmp_path / "api.idx")
    for call in (lambda: index.add(vector, paths=[odd]), lambda: index.add(odd)):
        with pytest.raises(ConceptIndexError, match="caf.*not valid UTF-8"):
            call()
    assert snapshot(tmp_path / "api.idx") == before and len(index) == 1


@pytest.mark.parametrize("skip_errors", [False, True])
def test_embed_to_parquet_refuses_a_file_name_that_is_not_utf8_before_embedding(
    tmp_path, mixed_folder, skip_errors
) -> None:
    """Parquet's strings are UTF-8: the name reached pyarrow and the command exited 70."""
    folder, _odd = mixed_folder
    out = tmp_path / "vectors"
    flags = ["--skip-errors"] if skip_errors else []
    result = run("embed", folder, "--format", "parquet", "-o", out, *flags)
    one_line_error(result, "caf", "not valid UTF-8", "--format json or npy")
    assert not out.exists()
    json_out = tmp_path / "vectors.json"  # JSON keeps the name (surrogate escapes)
    assert run("embed", folder, "-o", json_out).exit_code == 0 and json_out.exists()


def test_a_force_build_killed_with_9_leaves_debris_the_next_one_removes(tmp_path, photos):
    """A --force build killed mid-way left its hidden half-built replacement (up to a whole
    index's size) beside the index for ever."""
    import signal
    import socket
    import subprocess
    import sys
    import time

    folder, index_dir = two_photo_index(tmp_path, photos, "good", "build")
    before = contents(index_dir)
    many = tmp_path / "many"
    many.mkdir()
    for n in range(300):  # a build long enough to be killed in the middle of
        shutil.copy(photos["coffee" if n % 2 else "cat"], many / f"{n:03d}.jpg")
    build = subprocess.Popen(
        [sys.executable, "-c", "from cmn_edge.cli import main; main()", "index", "build"]
        + [str(many), "--index"]
        + [str(index_dir), "--force", "--threads", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".gallery.idx.new-*/*")) and time.monotonic() < deadline:
        assert build.poll() is None, "the build ended before it could be killed"
        time.sleep(0.01)
    build.send_signal(signal.SIGKILL)
    build.wait()
    [debris] = tmp_path.glob(".gallery.idx.new-*")
    host = socket.gethostname()
    assert debris.name.startswith(f".gallery.idx.new-{build.pid}@{host}-")
    assert contents(index_dir) == before  # the old index was never touched

    live = tmp_path / f".gallery.idx.new-{os.getpid()}@{host}-0000abcd"  # a build running
    elsewhere = tmp_path / f".gallery.idx.new-{build.pid}@other-host-1-0000abcd"  # a share's
    for kept in (live, elsewhere):
        kept.mkdir()
    done = run("index", "build", folder, "--index", index_dir, "--force", "--threads", "2")
    assert done.exit_code == 0, done.output
    assert not debris.exists() and live.is_dir() and elsewhere.is_dir()
    assert run("index", "verify", "--index", index_dir).exit_code == 0
