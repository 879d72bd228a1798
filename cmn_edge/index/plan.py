"""Query plans: concept controls (exclude, only, weights, renormalize) as one weight vector.

Every embedding dimension is one concept. For inner product, scaling the *query* alone gives
the exact masked score ``(q * w) . g``, so a masked search goes through the same graph;
``renormalize`` (cosine over the kept concepts only) over-fetches and re-ranks exactly.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from .errors import ConceptError

ConceptRef = int | str


@dataclass(frozen=True)
class Plan:
    """A resolved concept control: the query-side weight vector and the score kind."""

    weights: np.ndarray | None  # float32 [C]; None = plain cosine
    renormalize: bool = False
    described: dict = field(default_factory=dict)


def check_concept_name(name: str) -> str:
    """Names are unique, never look like an index, and survive the CLI's ``,`` and ``=``."""
    if not isinstance(name, str) or not name.strip():
        raise ConceptError("a concept name must be a non-empty string")
    name = name.strip()
    if re.fullmatch(r"-?\d+", name):
        raise ConceptError(f"concept name '{name}' looks like an index; use letters")
    if any(c in name for c in "=,\n"):
        raise ConceptError(f"concept name '{name}' may not contain '=', ',' or a newline")
    return name


class PlanMixin:
    """Concept resolution and planning; needs ``num_concepts``, ``concept_names``, ``_where``."""

    num_concepts: int

    def resolve_concept(self, concept: ConceptRef) -> int:
        """A concept index from an index or a name; the error lists what would have worked."""
        if isinstance(concept, (bool, np.bool_)):
            raise ConceptError(f"{self._where()}: {concept!r} is not a concept")
        if isinstance(concept, str) and re.fullmatch(r"\s*-?\d+\s*", concept):
            concept = int(concept)
        if isinstance(concept, (int, np.integer)):
            if not 0 <= int(concept) < self.num_concepts:
                raise ConceptError(
                    f"{self._where()}: concept {int(concept)} is out of range "
                    f"(this index has concepts 0-{self.num_concepts - 1})"
                )
            return int(concept)
        if isinstance(concept, str):
            names = self.concept_names
            for index, name in names.items():
                if name == concept.strip():
                    return index
            known = sorted(names.values())
            shown = ", ".join(known[:10]) + (" ..." if len(known) > 10 else "")
            raise ConceptError(
                f"{self._where()}: unknown concept name '{concept}' "
                f"(named concepts: {shown or 'none; name them with `cmn-edge index name-concept`'})"
            )
        raise ConceptError(f"{self._where()}: {concept!r} is not a concept index or name")

    def _resolve_many(self, concepts: Iterable[ConceptRef]) -> np.ndarray:
        """Indices of many concepts; a plain integer list or array skips the per-item path."""
        if isinstance(concepts, (str, bytes)):
            concepts = [concepts]
        values = concepts if isinstance(concepts, np.ndarray) else list(concepts)
        array = np.asarray(values) if len(values) else np.zeros(0, dtype=np.int64)
        if array.dtype.kind in "iu" and array.ndim == 1:
            if len(array) and (array.min() < 0 or array.max() >= self.num_concepts):
                bad = next(int(c) for c in array if not 0 <= c < self.num_concepts)
                self.resolve_concept(bad)  # raises the usual message
            return array.astype(np.int64)
        return np.asarray([self.resolve_concept(c) for c in values], dtype=np.int64)

    def plan(
        self,
        exclude: Iterable[ConceptRef] = (),
        only: Iterable[ConceptRef] | None = None,
        weights: Mapping[ConceptRef, float] | None = None,
        renormalize: bool = False,
    ) -> Plan:
        """Turn concept controls (indices or names) into one query-side weight vector."""
        exclude = self._resolve_many(exclude)
        only_list = None if only is None else self._resolve_many(only)
        weight_map = {}
        for concept, value in (weights or {}).items():
            value = float(value)
            if not math.isfinite(value) or value < 0:
                raise ConceptError(
                    f"{self._where()}: weight of concept {concept} must be a finite number "
                    f">= 0, not {value}"
                )
            weight_map[self.resolve_concept(concept)] = value
        if only_list is not None and not len(only_list):
            raise ConceptError(f"{self._where()}: 'only' names no concept")
        described = {
            "exclude": sorted(set(exclude.tolist())),
            "only": None if only_list is None else sorted(set(only_list.tolist())),
            "weights": {str(k): v for k, v in sorted(weight_map.items())},
            "renormalize": bool(renormalize),
        }
        if not len(exclude) and only_list is None and not weight_map:
            return Plan(None, False, described)  # renormalising over every concept: plain
        w = np.ones(self.num_concepts, dtype=np.float32)
        if only_list is not None:
            w[:] = 0
            w[only_list] = 1
        w[exclude] = 0
        for index, value in weight_map.items():
            w[index] *= value
        if not w.any():
            raise ConceptError(f"{self._where()}: the concept controls leave no concept")
        return Plan(w, bool(renormalize), described)


__all__ = ["ConceptRef", "Plan", "PlanMixin", "check_concept_name"]
