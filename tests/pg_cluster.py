"""A throwaway PostgreSQL server for the tests and benchmarks: initdb in a temp dir, started
on 127.0.0.1 on a free port, stopped and deleted at the end.

PostgreSQL refuses to run as root, so as root the cluster belongs to the ``postgres`` user
(``runuser``). Missing binaries or a missing vector extension raise :class:`SetupMissing`
with one line naming the setup script: the tests fail on it, they never skip.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

SETUP = "bash .ci/postgres.sh"


class SetupMissing(RuntimeError):
    pass


def server_bin() -> Path:
    """The newest installed server's bin directory with the vector extension beside it."""
    found = sorted(
        (Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/postgres")),
        key=lambda p: [int(x) for x in p.parent.name.split(".") if x.isdigit()],
    )
    if not found:
        raise SetupMissing(f"PostgreSQL server binaries not found; run `{SETUP}` (as root)")
    bindir = found[-1]
    share = (
        subprocess.run(
            [str(bindir / "pg_config"), "--sharedir"], capture_output=True, text=True, check=False
        ).stdout.strip()
        or f"/usr/share/postgresql/{bindir.parent.name}"
    )
    if not Path(share, "extension", "vector.control").exists():
        raise SetupMissing(
            f"pgvector is not installed for PostgreSQL {bindir.parent.name}; run `{SETUP}`"
        )
    return bindir


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """``with Cluster() as url:`` a superuser URL of a fresh server."""

    def __init__(self) -> None:
        self.bindir = server_bin()
        self.root = Path(tempfile.mkdtemp(prefix="cmn-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode:
            log = (self.root / "log").read_text() if (self.root / "log").exists() else ""
            raise RuntimeError(f"{' '.join(args[:1])} failed: {done.stderr.strip()} {log[-2000:]}")

    def start(self) -> str:
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
            "--locale=C",
        )
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c shared_buffers=256MB"
        )
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.root / "log"),
            "-o",
            options,
            "-w",
            "-t",
            "60",
            "start",
        )
        return self.url

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> str:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
