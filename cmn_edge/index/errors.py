"""The index's error classes: each is a ``ValueError`` so the CLI shows it as one line."""

from __future__ import annotations


class ConceptIndexError(ValueError):
    """An index that cannot be used as asked; the message names the directory or file."""


class IndexCorruptError(ConceptIndexError):
    """A missing, truncated, tampered or foreign file inside an index directory."""


class ModelMismatchError(ConceptIndexError):
    """Embeddings of one model compared with an index built by another: meaningless scores."""


class ConceptError(ConceptIndexError):
    """A concept index out of range or a name the index does not know."""


__all__ = ["ConceptError", "ConceptIndexError", "IndexCorruptError", "ModelMismatchError"]
