"""Retrieval metrics in the class-disjoint protocol: leave-one-out over one split."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

DEFAULT_KS = (1, 2, 4, 8)


#: (query row, candidate rows best first, their global scores) -> a new order of the candidates
Reranker = Callable[[int, np.ndarray, np.ndarray], np.ndarray]


def retrieval_metrics(
    embeddings: np.ndarray,
    labels: np.ndarray,
    ks: tuple[int, ...] = DEFAULT_KS,
    chunk: int = 1024,
    rerank: Reranker | None = None,
    rerank_depth: int = 100,
) -> dict[str, float]:
    """Recall@K and MAP@R (Musgrave et al.) by cosine similarity, each query left out.

    Values are percentages. Rows are L2-normalised here, so any embedding may be passed.
    ``rerank`` reorders each query's first ``rerank_depth`` candidates (e.g. structural
    matching); the rest keep the cosine order.
    """
    x = np.asarray(embeddings, dtype=np.float32)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    labels = np.asarray(labels)
    n = len(x)
    if n < 2:
        raise ValueError("retrieval metrics need at least two embeddings")
    class_sizes = {lab: int(c) for lab, c in zip(*np.unique(labels, return_counts=True))}
    max_r = max(class_sizes.values()) - 1
    depth = min(n - 1, max(max(ks), max_r))
    hits = {k: 0 for k in ks}
    map_sum = 0.0
    for start in range(0, n, chunk):
        sims = x[start : start + chunk] @ x.T
        rows = np.arange(sims.shape[0])
        sims[rows, start + rows] = -np.inf
        top = np.argpartition(-sims, depth - 1, axis=1)[:, :depth]
        order = np.take_along_axis(sims, top, axis=1).argsort(axis=1)[:, ::-1]
        top = np.take_along_axis(top, order, axis=1)
        if rerank is not None:
            head = min(rerank_depth, depth)
            scores = np.take_along_axis(sims, top[:, :head], axis=1)
            for i in range(len(top)):
                top[i, :head] = top[i, :head][rerank(start + i, top[i, :head], scores[i])]
        match = labels[top] == labels[start + rows][:, None]
        for k in ks:
            hits[k] += int(match[:, :k].any(axis=1).sum())
        for i, row in enumerate(match):
            r = class_sizes[labels[start + i]] - 1
            if r == 0:
                continue
            rel = row[:r]
            precision_at = np.cumsum(rel) / np.arange(1, r + 1)
            map_sum += float((precision_at * rel).sum() / r)
    result = {f"R@{k}": 100.0 * hits[k] / n for k in ks}
    result["MAP@R"] = 100.0 * map_sum / n
    return result
