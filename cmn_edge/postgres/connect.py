"""Connecting: the URL check, the lazy psycopg import, and the vector extension's version.

Every failure is a :class:`PostgresError` naming the server (password hidden) and the reason.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from .errors import INSTALL_HINT, PostgresError

#: pgvector's first release with iterative index scans (filters under HNSW keep recall).
MIN_VECTOR = (0, 8)
CONNECT_TIMEOUT_S = 10
DEFAULT_TABLE = "cmn_gallery"
VERSION_SQL = "SELECT extversion FROM pg_extension WHERE extname = 'vector'"


def is_postgres_url(target: str) -> bool:
    """Whether ``--backend``/``--to`` names a server rather than something else."""
    return str(target).startswith(("postgresql://", "postgres://"))


def display_url(url: str) -> str:
    """The URL without its password: safe in error messages and JSON output."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "postgresql://?"
    netloc = parts.netloc
    if "@" in netloc:
        user, _, host = netloc.rpartition("@")
        netloc = f"{user.split(':', 1)[0]}@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def check_table_name(table: str) -> str:
    """A plain lower-case identifier: the three table names are derived from it."""
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,39}", table or ""):
        raise PostgresError(
            f"table name {table!r}: use lower-case letters, digits and _ (at most 40)"
        )
    return table


def psycopg_modules() -> tuple[Any, Any]:
    """(psycopg, pgvector.psycopg), imported here so the extra stays optional."""
    try:
        import psycopg
        from pgvector import psycopg as pgvector_psycopg
    except ImportError:
        raise PostgresError(INSTALL_HINT) from None
    return psycopg, pgvector_psycopg


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def connect(url: str, *, create_extension: bool = False):
    """A psycopg connection with the vector type registered (not autocommit).

    ``create_extension``: an exporter may create the extension in its database; a searcher
    only needs it to be there.
    """
    if not is_postgres_url(url):
        raise PostgresError(f"{url}: not a PostgreSQL URL (postgresql://user@host:port/db)")
    psycopg, pgvector_psycopg = psycopg_modules()
    shown = display_url(url)
    try:
        conn = psycopg.connect(url, connect_timeout=CONNECT_TIMEOUT_S)
    except (psycopg.Error, ValueError) as exc:
        raise PostgresError(f"{shown}: cannot connect: {first_line(exc)}") from None
    try:
        check_vector(conn, shown, create_extension)
        pgvector_psycopg.register_vector(conn)
        conn.commit()
    except BaseException:
        conn.close()
        raise
    return conn


def check_vector(conn, shown: str, create: bool) -> None:
    """The vector extension, at least :data:`MIN_VECTOR`, is in the database."""
    psycopg, _ = psycopg_modules()
    need = ".".join(map(str, MIN_VECTOR))
    try:
        row = conn.execute(
            "SELECT extversion FROM pg_extension WHERE extname = 'vector'"
        ).fetchone()
        if row is None and create:
            available = conn.execute(
                "SELECT 1 FROM pg_available_extensions WHERE name = 'vector'"
            ).fetchone()
            if available is not None:
                conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
                row = conn.execute(VERSION_SQL).fetchone()
    except psycopg.Error as exc:
        raise PostgresError(
            f"{shown}: cannot set up the vector extension: {first_line(exc)}"
        ) from None
    if row is None:
        raise PostgresError(
            f"{shown}: the vector extension (pgvector >= {need}) is not "
            + ("installed on the server" if create else "created in this database")
        )
    version = tuple(int(p) for p in re.findall(r"\d+", row[0])[:2])
    if version < MIN_VECTOR:
        raise PostgresError(
            f"{shown}: pgvector {row[0]} is too old (>= {need} has iterative index scans)"
        )


__all__ = [
    "DEFAULT_TABLE",
    "MIN_VECTOR",
    "check_table_name",
    "connect",
    "display_url",
    "first_line",
    "is_postgres_url",
    "psycopg_modules",
]
