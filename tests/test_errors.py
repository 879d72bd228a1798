"""Errors: the user's are one line and exit 1, bugs point to --debug, a full disk is the user's.

A full disk is made for real: a 64 KiB tmpfs (root), else a file-size limit on the child
process (RLIMIT_FSIZE), which fails the same write with EFBIG instead of ENOSPC.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner

from cmn_edge.cli import main
from cmn_edge.cli_common import DEBUG_ENV, EXIT_INTERNAL, debug_option, user_errors
from cmn_edge.metrics import retrieval_metrics

LIMIT = 64 * 1024
WAIT = 300  # seconds; a bound against a hung child, not a timing assertion
CMN_EDGE = [sys.executable, "-c", "from cmn_edge.cli import main; main()"]


@contextlib.contextmanager
def small_disk(folder: Path) -> Iterator[bool]:
    """Mount a 64 KiB tmpfs on ``folder``; yields False where mounting is not allowed."""
    folder.mkdir()
    mounted = (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={LIMIT}", "tmpfs", str(folder)],
            capture_output=True,
        ).returncode
        == 0
        if os.geteuid() == 0
        else False
    )
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", str(folder)], check=True)


def _file_size_limit() -> None:
    """In the child: writes past LIMIT bytes fail with EFBIG (instead of a SIGXFSZ kill)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def test_full_disk_during_embed_output_is_one_line_and_keeps_the_old_file(
    labelled_folder: Path, tmp_path: Path
) -> None:
    disk = tmp_path / "disk"
    with small_disk(disk) as mounted:
        out = disk / "out.json"
        out.write_text("the previous run\n")
        # 15 photos with their scores: about 180 KB of JSON, far more than the disk holds.
        result = subprocess.run(
            [*CMN_EDGE, "embed", str(labelled_folder), "--scores", "--threads", "2", "-o", out],
            capture_output=True,
            text=True,
            timeout=WAIT,
            preexec_fn=None if mounted else _file_size_limit,
        )
        assert result.returncode == 1, result.stderr
        reason = "No space left on device" if mounted else "File too large"
        assert result.stderr == f"error: {out}: {reason}\n"
        assert out.read_text() == "the previous run\n"
        assert sorted(p.name for p in disk.iterdir()) == ["out.json"]  # no temporary file


# --- user error or bug: the same decorator every command wears, on real project code ----------


@click.group()
@debug_option
def cli() -> None:
    """A stand-in for cmn-edge's group: the same --debug and the same error handling."""


@cli.command()
@click.argument("count", type=int)
@user_errors
def metrics(count: int) -> None:
    """retrieval_metrics on COUNT embeddings: below two is the user's mistake."""
    retrieval_metrics(np.eye(max(count, 1), 4, dtype=np.float32), np.zeros(count, dtype=int))


@cli.command()
@user_errors
def shapes() -> None:
    """A programming error: a stack of matrices where rows belong (numpy's ValueError from a
    line of cmn_edge.metrics that is not a ``raise``)."""
    retrieval_metrics(np.ones((2, 3, 4), dtype=np.float32), np.zeros(2, dtype=int))


def test_a_value_error_raised_on_purpose_is_one_line() -> None:
    result = CliRunner().invoke(cli, ["metrics", "1"])
    assert result.exit_code == 1
    assert result.stderr == "error: retrieval metrics need at least two embeddings\n"


def test_a_numpy_error_inside_the_code_is_a_bug_that_points_to_debug() -> None:
    result = CliRunner().invoke(cli, ["shapes"])
    assert result.exit_code == EXIT_INTERNAL
    lines = result.stderr.splitlines()
    assert lines[0].startswith("internal error: ValueError: "), lines
    assert "--debug" in result.stderr and DEBUG_ENV in result.stderr
    assert "Traceback" not in result.stderr and len(lines) == 2


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_prints_the_traceback(how: str, monkeypatch) -> None:
    if how == "env":
        monkeypatch.setenv(DEBUG_ENV, "1")
    args = ["--debug", "shapes"] if how == "flag" else ["shapes"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == EXIT_INTERNAL
    assert result.stderr.startswith("Traceback (most recent call last):")
    assert "retrieval_metrics" in result.stderr and "internal error:" in result.stderr


def test_debug_on_the_real_command_shows_where_a_user_error_came_from(tmp_path: Path) -> None:
    missing = tmp_path / "missing.jpg"
    plain = CliRunner().invoke(main, ["embed", str(missing)])
    assert plain.exit_code == 1 and plain.stderr.count("\n") == 1
    debug = CliRunner().invoke(main, ["--debug", "embed", str(missing)])
    assert debug.exit_code == 1
    assert debug.stderr.startswith("Traceback (most recent call last):")
    assert debug.stderr.splitlines()[-1] == plain.stderr.strip()


def test_cmn_export_has_the_same_debug_flag(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from cmn_export.cli import main as export_main

    args = ["pack", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]
    plain = CliRunner().invoke(export_main, args)
    assert plain.exit_code == 1 and plain.stderr.startswith("error: ")
    assert plain.stderr.count("\n") == 1
    debug = CliRunner().invoke(export_main, ["--debug", *args])
    assert debug.exit_code == 1 and debug.stderr.startswith("Traceback")
