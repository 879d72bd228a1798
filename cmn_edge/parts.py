"""A model's parts: the units that masking, weighting, naming and explaining work on.

A CMN embedding gives every dimension one concept, so a part is one dimension. A DGML
embedding (attentive grouping) is G unit-length groups of D dimensions, concatenated and
divided by sqrt(G), so a part is one group: a block of D dimensions, and the inner product of
two embeddings is the mean of the groups' cosines. The index's query plan, the PostgreSQL
search, explain, the catalogue and the kiosk ask this module what a part is; none of them
looks at the head.

Excluding a part zeroes its block in the query, and ``(q * w) . g`` is then exactly the inner
product over the kept blocks, so masked searches stay exact on the same graph. Weights and
``renormalize`` act per block in the same way (for DGML, the renormalised score is the
weighted mean of the kept groups' cosines).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .metadata import HEAD_TYPES, ModelMetadata

#: What one part of each head is called (errors, tables, the catalogue).
NOUNS = {"cmn": "concept", "dgml": "group"}


@dataclass(frozen=True)
class Parts:
    """``count`` parts of ``size`` consecutive embedding dimensions each, in order."""

    count: int
    size: int = 1
    head: str = "cmn"

    def __post_init__(self) -> None:
        if self.head not in HEAD_TYPES:
            raise ValueError(f"head '{self.head}' is not one of {', '.join(HEAD_TYPES)}")
        if int(self.count) < 1 or int(self.size) < 1:
            raise ValueError(f"{self.count} parts of {self.size} dimensions: both must be >= 1")
        if self.head == "cmn" and self.size != 1:
            raise ValueError(f"a CMN part is one dimension, not {self.size}")

    # ------------------------------------------------------------------ construction
    @classmethod
    def of(cls, meta: ModelMetadata) -> Parts:
        """The parts of the model a metadata block describes."""
        if meta.head == "dgml":
            return cls(meta.groups, meta.group_dim, "dgml")
        return cls(meta.num_concepts)

    @classmethod
    def from_info(cls, info: Mapping[str, Any] | None, dims: int) -> Parts:
        """What an index or a gallery stored with :meth:`to_info`; absent (one built before
        parts existed) reads as CMN: one concept per dimension."""
        if not info or info.get("head", "cmn") == "cmn":
            parts = cls(int(dims))
        else:
            parts = cls(int(info["groups"]), int(info["group_dim"]), str(info["head"]))
        if parts.dims != int(dims):
            raise ValueError(f"{parts.describe()} do not fill a {dims}-d embedding")
        return parts

    def to_info(self) -> dict[str, Any]:
        """The JSON an index or a gallery stores (the metadata's own keys)."""
        if self.head == "cmn":
            return {"head": "cmn"}
        return {"head": self.head, "groups": self.count, "group_dim": self.size}

    # ------------------------------------------------------------------ description
    @property
    def dims(self) -> int:
        return self.count * self.size

    @property
    def noun(self) -> str:
        """What one part is called: "concept" or "group"."""
        return NOUNS[self.head]

    def describe(self) -> str:
        """``512 concepts`` or ``3 groups of 8 dimensions``."""
        text = f"{self.count} {self.noun}{'s' if self.count != 1 else ''}"
        return text if self.size == 1 else f"{text} of {self.size} dimensions"

    @property
    def naming_command(self) -> str:
        """The CLI command that names one part (``index name-part`` names any kind)."""
        return "cmn-edge index name-concept" if self.head == "cmn" else "cmn-edge index name-part"

    def label(self, part: int, name: str | None = None) -> str:
        """``group 2`` or ``group 2 (head)``."""
        return f"{self.noun} {part}" + (f" ({name})" if name else "")

    def block(self, part: int) -> slice:
        """The embedding dimensions of one part."""
        return slice(part * self.size, (part + 1) * self.size)

    def model_names(self, meta: ModelMetadata) -> tuple[str | None, ...]:
        """Part names a model file carries (its ``concept_names``, where they name parts)."""
        names = tuple(meta.concept_names)
        return names if len(names) == self.count else (None,) * self.count

    # ------------------------------------------------------------------ arithmetic
    def expand(self, per_part: np.ndarray) -> np.ndarray:
        """[..., P] -> [..., C]: every dimension takes its part's value."""
        return np.repeat(np.asarray(per_part), self.size, axis=-1)

    def sums(self, per_dim: np.ndarray) -> np.ndarray:
        """[..., C] -> [..., P]: each part's sum over its block."""
        x = np.asarray(per_dim)
        return x.reshape(*x.shape[:-1], self.count, self.size).sum(-1)

    def contributions(self, query: np.ndarray, item: np.ndarray) -> np.ndarray:
        """Each part's term of ``query . item`` (float64 [P]): they sum to the score, and a
        term is exactly what excluding that part from the query removes from it."""
        q = np.asarray(query, dtype=np.float64)
        g = np.asarray(item, dtype=np.float64)
        return self.sums(q * g)

    def maps(self, attention: np.ndarray) -> np.ndarray:
        """[..., C, h, w] per-dimension attention -> [..., P, h, w] per part (a block's
        dimensions all carry their group's map; the mean is that map)."""
        a = np.asarray(attention)
        lead, (h, w) = a.shape[:-3], a.shape[-2:]
        return a.reshape(*lead, self.count, self.size, h, w).mean(axis=-3)

    def values(self, embedding: np.ndarray) -> np.ndarray:
        """[..., C] -> [..., P]: a part's value in one embedding (a concept's dimension;
        a group's length, the same 1/sqrt(G) for every group of a DGML embedding)."""
        x = np.asarray(embedding)
        if self.size == 1:
            return x
        return np.linalg.norm(x.reshape(*x.shape[:-1], self.count, self.size), axis=-1)

    def strength(self, embeddings: np.ndarray) -> np.ndarray:
        """[N, C] -> [N, P]: how strongly each row shows each part, for choosing the rows
        that show a part best. A concept: its dimension ("how present"). A group has no such
        value (every group is unit length): the cosine of its block with the block's mean
        over the rows, so the rows first are the group's most typical appearances."""
        x = np.asarray(embeddings, dtype=np.float32)
        if self.size == 1:
            return x
        blocks = x.reshape(x.shape[0], self.count, self.size)
        mean = blocks.mean(axis=0)
        mean /= np.maximum(np.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)
        norms = np.maximum(np.linalg.norm(blocks, axis=-1), 1e-12)
        return np.einsum("npd,pd->np", blocks, mean) / norms

    def weights(
        self,
        exclude: Iterable[int] = (),
        only: Sequence[int] | None = None,
        weights: Mapping[int, float] | None = None,
    ) -> np.ndarray | None:
        """Resolved part controls (part ids) as the per-dimension query weights that the
        index and the PostgreSQL search apply: zero for an excluded part's whole block, the
        part's weight on each of its dimensions. None: no control (a plain search)."""
        exclude = list(exclude)
        if not exclude and only is None and not weights:
            return None
        w = np.ones(self.count, dtype=np.float32)
        if only is not None:
            w[:] = 0
            w[list(only)] = 1
        w[exclude] = 0
        for part, value in (weights or {}).items():
            w[int(part)] *= float(value)
        return self.expand(w).astype(np.float32)


__all__ = ["NOUNS", "Parts"]
