"""The PostgreSQL backend's error: a ``ConceptIndexError``, so the CLI shows it as one line."""

from __future__ import annotations

from ..index.errors import ConceptIndexError


class PostgresError(ConceptIndexError):
    """A server, table or extension that cannot be used as asked; names the target and why."""


#: What a missing optional dependency says: the runtime stays light without the extra.
INSTALL_HINT = 'the PostgreSQL backend needs its extra: pip install "cmn-edge[postgres]"'

__all__ = ["INSTALL_HINT", "PostgresError"]
