"""Checks the CLI tests share: what a refused command printed, and what an index directory
holds (so a test can say a refusal changed nothing)."""

from __future__ import annotations

import hashlib
from pathlib import Path


def one_line_error(result, *needles: str) -> str:
    """Exit 1 and one stderr line, ``error: ...``, naming every needle; returns the line."""
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under an index directory and its sha256."""
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
        # SQLite's shared-memory file, and an empty write-ahead log, are how a reader opens
        # a WAL database: no content
        and not p.name.endswith("-shm")
        and not (p.name.endswith("-wal") and p.stat().st_size == 0)
    }
