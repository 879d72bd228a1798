"""Why two images match: per-concept contributions to their similarity."""

from __future__ import annotations

import numpy as np


def concept_contributions(query: np.ndarray, item: np.ndarray) -> np.ndarray:
    """Per-concept terms of the cosine of two unit embeddings: they sum to the score.

    Because the embedding is the L2-normalised score vector, ``q . g = sum_i q_i g_i`` and
    term i is exactly what excluding concept i from the query would remove from the score.
    """
    return np.asarray(query, dtype=np.float64) * np.asarray(item, dtype=np.float64)
