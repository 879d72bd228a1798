"""Query plans: part controls (exclude, only, weights, renormalize) as one weight vector.

Controls name the model's parts (:mod:`cmn_edge.parts`): a CMN's concepts (one dimension
each) or a DGML's groups (a block of dimensions each), by id or by name. They become one
per-dimension query weight vector; for inner product, scaling the *query* alone gives the
exact masked score ``(q * w) . g``, so a masked search goes through the same graph;
``renormalize`` (cosine over the kept parts only) over-fetches and re-ranks exactly.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from ..parts import Parts
from .errors import ConceptError, ConceptIndexError

#: A part (a CMN concept, a DGML group) by id or by name.
ConceptRef = int | str
PartRef = ConceptRef


@dataclass(frozen=True)
class Plan:
    """A resolved concept control: the query-side weight vector and the score kind."""

    weights: np.ndarray | None  # float32 [C], per dimension; None = plain cosine
    renormalize: bool = False
    described: dict = field(default_factory=dict)

    def walk_vector(self, q: np.ndarray) -> np.ndarray:
        """The query a graph walks with: ``q`` itself for plain cosine (callers test for
        that by identity), else masked; for a renormalised mask the masked cosine's
        numerator, whose direction is all a walk needs."""
        if self.weights is None:
            return q
        if self.renormalize:
            return q * self.weights * self.weights
        return q * self.weights


def checked_k(k: int) -> int:
    """How many hits were asked for, refused below one: the same rule for every backend."""
    k = int(k)
    if k < 1:
        raise ConceptIndexError(f"k must be at least 1, not {k}")
    return k


def check_concept_name(name: str) -> str:
    """Names (of concepts or groups) are unique, never look like an index, and survive the
    CLI's ``,`` and ``=``."""
    if not isinstance(name, str) or not name.strip():
        raise ConceptError("a concept name must be a non-empty string")
    name = name.strip()
    if re.fullmatch(r"-?\d+", name):
        raise ConceptError(f"concept name '{name}' looks like an index; use letters")
    if any(c in name for c in "=,\n"):
        raise ConceptError(f"concept name '{name}' may not contain '=', ',' or a newline")
    return name


class PlanMixin:
    """Part resolution and planning; needs ``parts``, ``concept_names`` (part names) and
    ``_where``."""

    num_concepts: int
    parts: Parts

    def resolve_part(self, part: PartRef) -> int:
        """A part id from an id or a name; the error lists what would have worked."""
        noun, count = self.parts.noun, self.parts.count
        if isinstance(part, (bool, np.bool_)):
            raise ConceptError(f"{self._where()}: {part!r} is not a {noun}")
        if isinstance(part, str) and re.fullmatch(r"\s*-?\d+\s*", part):
            part = int(part)
        if isinstance(part, (int, np.integer)):
            if not 0 <= int(part) < count:
                raise ConceptError(
                    f"{self._where()}: {noun} {int(part)} is out of range "
                    f"(this index has {noun}s 0-{count - 1})"
                )
            return int(part)
        if isinstance(part, str):
            names = self.concept_names
            for index, name in names.items():
                if name == part.strip():
                    return index
            known = sorted(names.values())
            shown = ", ".join(known[:10]) + (" ..." if len(known) > 10 else "")
            how = f"none; name them with `{self.parts.naming_command}`"
            raise ConceptError(
                f"{self._where()}: unknown {noun} name '{part}' (named {noun}s: {shown or how})"
            )
        raise ConceptError(f"{self._where()}: {part!r} is not a {noun} index or name")

    def resolve_concept(self, concept: ConceptRef) -> int:
        """The CMN name of :meth:`resolve_part` (a DGML index resolves its groups)."""
        return self.resolve_part(concept)

    def _resolve_many(self, parts: Iterable[PartRef]) -> np.ndarray:
        """Ids of many parts; a plain integer list or array skips the per-item path."""
        if isinstance(parts, (str, bytes)):
            parts = [parts]
        values = parts if isinstance(parts, np.ndarray) else list(parts)
        array = np.asarray(values) if len(values) else np.zeros(0, dtype=np.int64)
        count = self.parts.count
        if array.dtype.kind in "iu" and array.ndim == 1:
            if len(array) and (array.min() < 0 or array.max() >= count):
                bad = next(int(c) for c in array if not 0 <= c < count)
                self.resolve_part(bad)  # raises the usual message
            return array.astype(np.int64)
        return np.asarray([self.resolve_part(c) for c in values], dtype=np.int64)

    def plan(
        self,
        exclude: Iterable[PartRef] = (),
        only: Iterable[PartRef] | None = None,
        weights: Mapping[PartRef, float] | None = None,
        renormalize: bool = False,
    ) -> Plan:
        """Turn part controls (ids or names) into one per-dimension query weight vector
        (:meth:`Parts.weights <cmn_edge.parts.Parts.weights>`: a part's whole block)."""
        noun = self.parts.noun
        exclude = self._resolve_many(exclude)
        only_list = None if only is None else self._resolve_many(only)
        weight_map = {}
        for part, value in (weights or {}).items():
            value = float(value)
            if not math.isfinite(value) or value < 0:
                raise ConceptError(
                    f"{self._where()}: weight of {noun} {part} must be a finite number "
                    f">= 0, not {value}"
                )
            weight_map[self.resolve_part(part)] = value
        if only_list is not None and not len(only_list):
            raise ConceptError(f"{self._where()}: 'only' names no {noun}")
        described = {
            "exclude": sorted(set(exclude.tolist())),
            "only": None if only_list is None else sorted(set(only_list.tolist())),
            "weights": {str(k): v for k, v in sorted(weight_map.items())},
            "renormalize": bool(renormalize),
            "parts": f"{noun}s",  # what the ids above count: concepts or groups
        }
        w = self.parts.weights(exclude.tolist(), only_list, weight_map)
        if w is None:
            return Plan(None, False, described)  # renormalising over every part: plain
        if not w.any():
            raise ConceptError(f"{self._where()}: the {noun} controls leave no {noun}")
        return Plan(w, bool(renormalize), described)

    def _walk_vector(self, q: np.ndarray, plan: Plan) -> np.ndarray:
        """:meth:`Plan.walk_vector`, refused when the controls leave this query nothing:
        every score would be zero, so any order would be a made-up answer."""
        qh = plan.walk_vector(q)
        if not np.any(qh):
            raise ConceptError(
                f"{self._where()}: the concept controls remove everything this query has"
            )
        return qh


__all__ = ["ConceptRef", "PartRef", "Plan", "PlanMixin", "check_concept_name", "checked_k"]
