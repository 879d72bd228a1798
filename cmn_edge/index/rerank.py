"""DIML's re-ranking of a global search's best candidates by structural matching.

The global search gives the top ``depth`` candidates (under the same concept controls and
``where`` filter); each is scored ``s_global + s_struct`` and they are re-ordered; the
first ``k`` are returned. Concept weights apply to the region features as they apply to the
vectors (:func:`cmn_edge.structural.masked`), so an excluded concept plays no part in either
score.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..structural import StructuralError, rerank, structural_scores
from .regions import RegionsError

RERANK_CHOICES = ("structural",)
DEFAULT_DEPTH = 100


@dataclass(frozen=True)
class Reranked:
    """Candidates in their new order, with both parts of the score."""

    ids: np.ndarray
    score: np.ndarray
    score_global: np.ndarray
    score_structural: np.ndarray


def check_rerank(rerank_kind: str | None, depth: int) -> None:
    if rerank_kind is not None and rerank_kind not in RERANK_CHOICES:
        raise RegionsError(
            f"unknown re-ranking '{rerank_kind}' (choose from: {', '.join(RERANK_CHOICES)})"
        )
    if int(depth) < 1:
        raise RegionsError(f"re-rank depth must be at least 1, not {depth}")


def structural_rerank(
    ids: np.ndarray,
    global_scores: np.ndarray,
    query: np.ndarray,
    query_regions: np.ndarray,
    vectors: np.ndarray,
    regions: np.ndarray,
    weights: np.ndarray | None,
) -> Reranked:
    """Re-order candidates ``ids`` (with their search scores) by ``s_global + s_struct``."""
    try:
        structural = structural_scores(query_regions, query, regions, vectors, weights)
    except StructuralError as exc:
        raise RegionsError(str(exc)) from None
    order = rerank(global_scores, structural)
    return Reranked(
        ids=ids[order],
        score=(global_scores + structural)[order],
        score_global=global_scores[order],
        score_structural=structural[order],
    )


__all__ = ["DEFAULT_DEPTH", "RERANK_CHOICES", "Reranked", "check_rerank", "structural_rerank"]
