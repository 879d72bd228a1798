"""The reduced graph space (``--graph-dims``): an uncentred PCA of the gallery.

A graph walk over a large gallery is bound by memory traffic (2 KB a vector at C=512); 64
principal directions cut that eightfold, and the walk's candidates are re-ranked exactly in
concept space. Inner products are kept by a rotation, and the mean direction (large for
these all-positive-ish score vectors) is the first one kept, so no centring.

Alongside the directions P it keeps the gallery's second moments C = E[g g^T] as
C * (P^T P) and diag(C), so how much of a typical item *under a mask w* the graph sees costs
one quadratic form per query: E||P(g*w)||^2 = w (C * P^T P) w, E||g*w||^2 = w^2 . diag C.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

#: Items sampled to fit the directions: more adds little and costs an SVD.
FIT_SAMPLE = 50000


@dataclass(frozen=True)
class Projection:
    matrix: np.ndarray  # [d, C] float32
    capture_weights: np.ndarray  # [C, C]
    second_moments: np.ndarray  # [C]

    @property
    def dims(self) -> int:
        return int(self.matrix.shape[0])

    @classmethod
    def fit(cls, data: np.ndarray, dims: int, seed: int) -> Projection:
        if len(data) > FIT_SAMPLE:
            picked = np.random.default_rng(seed).choice(len(data), FIT_SAMPLE, False)
            data = data[np.sort(picked)]
        _, _, vt = np.linalg.svd(data.astype(np.float64), full_matrices=False)
        matrix = np.ascontiguousarray(vt[:dims], dtype=np.float32)
        unit = data / np.linalg.norm(data, axis=1, keepdims=True)
        moments = unit.T @ unit / len(unit)
        p64 = matrix.astype(np.float64)
        return cls(
            matrix,
            (moments * (p64.T @ p64)).astype(np.float32),
            np.diag(moments).astype(np.float32),
        )

    def to_graph(self, vectors: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(vectors @ self.matrix.T, dtype=np.float32)

    def capture(self, v: np.ndarray) -> float:
        """Share of ``v``'s norm the graph's directions keep."""
        return float(np.linalg.norm(self.matrix @ v)) / (float(np.linalg.norm(v)) + 1e-30)

    def typical_capture(self, w: np.ndarray | None) -> float:
        """Root-mean-square share of a gallery item ``g * w`` the projection keeps."""
        if w is None:
            return self._plain_capture
        else:
            kept = float(w @ self.capture_weights @ w)
            total = float((w * w) @ self.second_moments)
        return math.sqrt(max(kept, 1e-30) / max(total, 1e-30))

    @functools.cached_property
    def _plain_capture(self) -> float:
        # two sums over a [C, C] matrix: ~80 us a query at C=512 if done on every query
        kept, total = float(self.capture_weights.sum()), float(self.second_moments.sum())
        return math.sqrt(max(kept, 1e-30) / max(total, 1e-30))

    # [d + C + 1, C] float32: P, then C * P^T P, then diag C
    def to_bytes(self) -> bytes:
        return np.ascontiguousarray(
            np.concatenate([self.matrix, self.capture_weights, self.second_moments[None, :]]),
            dtype=np.float32,
        ).tobytes()

    @classmethod
    def from_bytes(cls, data: bytes, dims: int, num_concepts: int) -> Projection:
        array = np.frombuffer(data, dtype=np.float32)
        c = num_concepts
        if array.size != (dims + c + 1) * c:
            raise ValueError(f"projection holds {array.size} values, expected {(dims + c + 1) * c}")
        array = array.reshape(dims + c + 1, c)
        return cls(
            np.ascontiguousarray(array[:dims]),
            np.ascontiguousarray(array[dims : dims + c]),
            np.ascontiguousarray(array[dims + c]),
        )


__all__ = ["Projection"]
