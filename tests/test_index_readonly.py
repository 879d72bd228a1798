"""An index on read-only media (a kiosk's gallery on a read-only mount) can be searched,
inspected and verified; a write is refused in one line and changes nothing. Real mounts: as
root, a read-only bind mount; as another user, a directory without write permission."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
from pathlib import Path

import numpy as np
import pytest
from cli_checks import one_line_error, snapshot
from click.testing import CliRunner

from cmn_edge.cli import main
from cmn_edge.index import Index, IndexCorruptError


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _writable_tree(folder: Path, writable: bool) -> None:
    for path in [folder, *folder.rglob("*")]:
        if path.is_dir():
            path.chmod(0o755 if writable else 0o555)
        else:
            path.chmod(0o644 if writable else 0o444)


@pytest.fixture
def mounted(tmp_path, photos):
    """(the index as built, the same index seen read-only)."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("cat", "coffee", "rocket"):
        shutil.copy(photos[name], folder / f"{name}.jpg")
    source = tmp_path / "src"
    assert (
        run("index", "build", folder, "--index", source / "g.idx", "--threads", "2").exit_code == 0
    )
    if os.geteuid() != 0:
        _writable_tree(source, False)
        yield source / "g.idx", source / "g.idx"
        _writable_tree(source, True)
        return
    view = tmp_path / "ro"
    view.mkdir()
    if subprocess.run(["mount", "--bind", source, view], capture_output=True).returncode:
        pytest.skip("root without the right to mount: no read-only directory can be made")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", view], check=True, capture_output=True)
        yield source / "g.idx", view / "g.idx"
    finally:
        # lazy: a handle the in-process CLI runs left open must not keep the mount busy
        subprocess.run(["umount", "-l", view], capture_output=True)


def test_a_read_only_index_searches_and_verifies_and_refuses_writes(mounted, photos):
    built, read_only = mounted
    before = snapshot(read_only)
    expected = run("search", photos["cat"], "--index", built, "-k", "3", "--exclude-concept", "5")
    got = run("search", photos["cat"], "--index", read_only, "-k", "3", "--exclude-concept", "5")
    assert got.exit_code == 0, got.output
    assert got.stdout.replace(str(read_only), "IDX") == expected.stdout.replace(str(built), "IDX")
    assert run("index", "info", "--index", read_only).exit_code == 0
    verified = run("index", "verify", "--index", read_only)
    assert verified.exit_code == 0 and verified.stdout.strip().endswith("ok"), verified.output
    one_line_error(run("index", "add", photos["cat"], "--index", read_only), "cannot write")
    assert snapshot(read_only) == before

    index = Index.open(read_only)  # the Python API, as the kiosk opens it
    query = index.index.embedding(index.index.ids[0])
    ids = [hit.id for hit in index.search(query, k=3)]
    assert ids[0] == index.index.ids[0] and len(ids) == 3
    with pytest.raises(PermissionError):
        index.add(np.ones((1, len(query)), np.float32), paths=["x.jpg"])
    index.close()
    assert snapshot(read_only) == before


def test_commits_still_in_the_write_ahead_log_are_never_missed_read_only(mounted, tmp_path):
    """An index mounted read-only with commits only in its log (a writer killed before it
    checkpointed) shows them, or is refused in one line saying why; never opened without
    them (the immutable open, which does not read a log, is kept for indexes without one)."""
    built, read_only = mounted
    if os.geteuid() != 0:
        _writable_tree(built.parent, True)
    wal = built / "index.db-wal"
    writer = sqlite3.connect(built / "index.db", isolation_level=None)
    writer.execute("PRAGMA wal_autocheckpoint=0")
    writer.execute("INSERT OR REPLACE INTO info (key, value) VALUES ('note', '\"in the log\"')")
    shutil.copy(wal, tmp_path / "log")  # the log as a killed writer leaves it
    writer.execute("DELETE FROM info WHERE key = 'note'")
    writer.close()  # a clean close copies the log into the database and deletes it
    shutil.copy(tmp_path / "log", wal)
    (built / "index.db-shm").unlink(missing_ok=True)
    if os.geteuid() != 0:
        _writable_tree(built.parent, False)
    try:
        index = Index.open(read_only)
    except IndexCorruptError as exc:
        assert "write-ahead log" in str(exc) and "index.db-wal" in str(exc)
        return
    try:
        assert index.index._store.get_info("note") == "in the log"
    finally:
        index.close()
