"""Why two images match: per-part contributions to their similarity.

A CMN embedding is the L2-normalised vector of concept scores, so the similarity of two
images is ``sum_i a_i b_i`` and term ``i`` is exactly what concept ``i`` adds to it. A DGML
embedding's parts are groups (blocks of dimensions, :mod:`cmn_edge.parts`); a group's term is
the sum of its block's products, its cosine over G. This module turns that sum into an
:class:`Explanation` (terms, the top parts, and each image's attention maps per part, so a
figure can show *where* each part was found, as in the CMN, DIML and DGML papers' figures).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from PIL import ExifTags, Image

from . import preprocess as pp
from .parts import Parts

if TYPE_CHECKING:
    from .embedder import Embedder

#: At or below this score, shares (contribution / score) are undefined: reported as None.
SHARE_EPS = 1e-6

ConceptNames = Mapping[int, str] | Sequence[str | None]


def concept_contributions(query: np.ndarray, item: np.ndarray) -> np.ndarray:
    """Per-concept terms of the cosine of two unit embeddings: they sum to the score.

    Because the embedding is the L2-normalised score vector, ``q . g = sum_i q_i g_i`` and
    term i is exactly what excluding concept i from the query would remove from the score.
    """
    return np.asarray(query, dtype=np.float64) * np.asarray(item, dtype=np.float64)


def share_of(contribution: float, score: float) -> float | None:
    """``contribution / score``: the fraction of a positive score one concept accounts for.

    Over all concepts the shares sum to 1. Terms can be negative (concept scores are cosines),
    so a share can be negative (the concept pulls the pair apart) or above 1 (negative terms
    cancel part of it). A share of a score at or below SHARE_EPS would read backwards (a
    "large share" of a negative similarity), so it is undefined there: None.
    """
    if not score > SHARE_EPS:
        return None
    return float(contribution) / float(score)


def top_concepts(
    query: np.ndarray,
    item: np.ndarray,
    weights: np.ndarray | None,
    renormalize: bool,
    names: Mapping[int, str],
    n: int,
    parts: Parts | None = None,
) -> list[dict]:
    """The ``n`` parts (concepts, or a DGML's groups; None: one concept a dimension) that add
    most to one search hit's score, as the search scored it.

    ``weights`` is the query-side per-dimension weight vector of the search's plan (None:
    plain cosine); with ``renormalize`` the score is the cosine over the weighted dimensions,
    so both sides are re-normalised under the weights first. A part's contribution is the sum
    of its block's terms; over all parts they sum to the score.
    """
    g = np.asarray(item, dtype=np.float64)
    qv = np.asarray(query, dtype=np.float64)
    if weights is not None:
        w = np.asarray(weights, dtype=np.float64)
        qv = qv * w
        if renormalize:
            qv = qv / np.linalg.norm(qv)
            g = g * w
            norm = np.linalg.norm(g)
            g = g / norm if norm > 0 else g
    terms = (parts or Parts(qv.shape[0])).contributions(qv, g)
    score = float(terms.sum())
    order = np.argsort(-terms, kind="stable")[:n]
    return [
        {
            "index": int(i),
            "name": names.get(int(i)),
            "contribution": float(terms[i]),
            "share": float(terms[i] / score) if score > 0 else None,
        }
        for i in order
    ]


class ConceptTerm(NamedTuple):
    """One part's (concept's, group's) term of a match."""

    index: int  # the part id
    name: str | None
    contribution: float  # a_i * b_i (a group: summed over its block), in units of the score
    share: float | None  # contribution / score (see share_of)


@dataclass(frozen=True, eq=False)
class Side:
    """One image of the pair: what the model saw, where it came from, where it looked."""

    source: str
    size: tuple[int, int]  # (width, height) of the upright original image
    image: Image.Image  # the input_size x input_size crop the model saw
    crop_box: tuple[float, float, float, float]  # that crop, in original image pixels
    embedding: np.ndarray  # [C] unit vector
    attention: np.ndarray  # [P, h, w]: each part's map (Parts.maps), each sums to 1

    @property
    def grid(self) -> tuple[int, int]:
        return int(self.attention.shape[1]), int(self.attention.shape[2])

    def peak(self, concept: int) -> tuple[int, int]:
        """(row, col) of the grid cell where part ``concept`` attends most."""
        flat = int(np.argmax(self.attention[concept]))
        return divmod(flat, self.grid[1])

    def peak_xy(self, concept: int) -> tuple[float, float]:
        """Centre of the peak cell, in pixels of the crop the model saw."""
        row, col = self.peak(concept)
        h, w = self.grid
        return (col + 0.5) * self.image.width / w, (row + 0.5) * self.image.height / h

    def region(self, concept: int) -> tuple[int, int, int, int]:
        """The peak cell as (x0, y0, x1, y1) in pixels of the original image."""
        row, col = self.peak(concept)
        h, w = self.grid
        left, top, right, bottom = self.crop_box
        sx, sy = (right - left) / w, (bottom - top) / h
        box = (left + col * sx, top + row * sy, left + (col + 1) * sx, top + (row + 1) * sy)
        return tuple(int(round(v)) for v in box)  # type: ignore[return-value]


@dataclass(frozen=True, eq=False)
class Explanation:
    """Why ``a`` and ``b`` have similarity ``score``: ``contributions`` sum to it exactly."""

    score: float
    contributions: np.ndarray  # [P] float64, per part: a_i * b_i summed over its block
    top: tuple[ConceptTerm, ...]  # largest contributions first
    against: tuple[ConceptTerm, ...]  # most negative contributions first (only < 0)
    a: Side
    b: Side
    names: tuple[str | None, ...]  # [P], None where a part has no name
    model_id: str
    parts: Parts | None = None  # None: one concept a dimension (as before parts existed)

    @property
    def part_layout(self) -> Parts:
        """The parts the terms count (concepts, or a DGML's groups)."""
        return self.parts or Parts(int(self.contributions.shape[0]))

    @property
    def num_concepts(self) -> int:
        """Embedding dimensions (for a CMN, its concepts)."""
        return int(self.a.embedding.shape[0])

    @property
    def input_size(self) -> int:
        return int(self.a.image.width)

    def term(self, concept: int) -> ConceptTerm:
        contribution = float(self.contributions[concept])
        return ConceptTerm(
            int(concept), self.names[concept], contribution, share_of(contribution, self.score)
        )

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` shape: stable keys, plain numbers, no arrays of C values."""

        parts = self.part_layout
        values_a, values_b = parts.values(self.a.embedding), parts.values(self.b.embedding)

        def entry(rank: int, term: ConceptTerm) -> dict[str, Any]:
            i = term.index
            return {
                "rank": rank,
                "concept": i,  # the part id: a CMN's concept, a DGML's group
                "part": i,
                "name": term.name,
                "contribution": term.contribution,
                "share": term.share,
                "value_a": float(values_a[i]),
                "value_b": float(values_b[i]),
                "peak_a": list(self.a.peak(i)),
                "peak_b": list(self.b.peak(i)),
                "region_a": list(self.a.region(i)),
                "region_b": list(self.b.region(i)),
            }

        def side(s: Side) -> dict[str, Any]:
            return {"source": s.source, "size": list(s.size), "crop_box": list(s.crop_box)}

        return {
            "score": self.score,
            "model": self.model_id,
            "num_concepts": self.num_concepts,
            "parts": {"kind": f"{parts.noun}s", "count": parts.count, "size": parts.size},
            "input_size": self.input_size,
            "attention_grid": list(self.a.grid),
            "share": f"contribution / score (null when score <= {SHARE_EPS:g})",
            "a": side(self.a),
            "b": side(self.b),
            "top": [entry(r, t) for r, t in enumerate(self.top, 1)],
            "against": [entry(r, t) for r, t in enumerate(self.against, 1)],
        }


def resolve_names(names: ConceptNames | None, num_concepts: int) -> tuple[str | None, ...]:
    """Any of: None, {index: name}, or a sequence of P part names (None/'' = unnamed)."""
    out: list[str | None] = [None] * num_concepts
    if names is None:
        return tuple(out)
    if isinstance(names, Mapping):
        items = names.items()
    else:
        if len(names) not in (0, num_concepts):
            raise ValueError(f"{len(names)} concept names for a model with {num_concepts} concepts")
        items = enumerate(names)
    for index, name in items:
        index = int(index)
        if not 0 <= index < num_concepts:
            raise ValueError(f"concept {index} out of range (model has {num_concepts} concepts)")
        out[index] = str(name) if name else None
    return tuple(out)


def explain(
    a: pp.ImageInput,
    b: pp.ImageInput,
    embedder: Embedder | None = None,
    top: int = 10,
    names: ConceptNames | None = None,
) -> Explanation:
    """Embed both images once (with attention) and split their similarity by part (a
    CMN's concepts, a DGML's groups).

    ``names`` overrides the model's own part names (e.g. names saved in a concept index).
    """
    if embedder is None:
        from .embedder import Embedder

        embedder = Embedder()
    if top < 0:
        raise ValueError(f"--top must be >= 0, not {top}")
    pre = embedder.preprocess
    crops, boxes, sizes = [], [], []
    for source in (a, b):
        decoded = pp.open_image(source, pre)
        crops.append(pp.resize_and_crop(decoded, pre))
        size = _upright_size(source, decoded)
        sizes.append(size)
        boxes.append(_crop_box(size, pre))
    batch = np.stack([pp.to_tensor(crop, pre) for crop in crops])
    result = embedder.embed_arrays(batch, with_scores=False, with_attention=True)
    parts = Parts.of(embedder.metadata)
    emb, att = result.embedding, parts.maps(result.attention)
    contributions = parts.contributions(emb[0], emb[1])
    score = float(contributions.sum())
    num = contributions.shape[0]
    resolved = resolve_names(
        names if names is not None else parts.model_names(embedder.metadata), num
    )
    order = np.argsort(-contributions, kind="stable")
    k = min(int(top), num)

    def term(i: int) -> ConceptTerm:
        c = float(contributions[i])
        return ConceptTerm(int(i), resolved[i], c, share_of(c, score))

    negatives = [int(i) for i in order[::-1][:k] if contributions[i] < 0]
    sides = [
        Side(
            source=_describe(source),
            size=sizes[j],
            image=crops[j],
            crop_box=boxes[j],
            embedding=emb[j],
            attention=att[j],
        )
        for j, source in enumerate((a, b))
    ]
    return Explanation(
        score=score,
        contributions=contributions,
        top=tuple(term(int(i)) for i in order[:k]),
        against=tuple(term(i) for i in negatives),
        a=sides[0],
        b=sides[1],
        names=resolved,
        model_id=embedder.model_id,
        parts=parts,
    )


def _describe(source: object) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return type(source).__name__


def _upright_size(source: pp.ImageInput, decoded: Image.Image) -> tuple[int, int]:
    """The original's (w, h) after EXIF rotation: ``decoded`` may be a reduced JPEG draft."""
    if not isinstance(source, (str, os.PathLike)):
        return decoded.size
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            header = Image.open(source)
        with header:
            width, height = header.size
            orientation = header.getexif().get(ExifTags.Base.Orientation, 1)
    except (OSError, ValueError):
        return decoded.size
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def _crop_box(size: tuple[int, int], pre: pp.Preprocess) -> tuple[float, float, float, float]:
    """Where the model's crop lies in the original: the inverse of resize + centre crop.

    Mirrors ``preprocess.resize_and_crop``; approximate by a fraction of a pixel when the
    JPEG was decoded in draft mode.
    """
    width, height = size
    short = pre.resize_size
    if width <= height:
        new_w, new_h = short, int(short * height / width)
    else:
        new_w, new_h = int(short * width / height), short
    left = int(round((new_w - pre.input_size) / 2.0))
    top = int(round((new_h - pre.input_size) / 2.0))
    sx, sy = width / new_w, height / new_h
    return (
        round(left * sx, 2),
        round(top * sy, 2),
        round((left + pre.input_size) * sx, 2),
        round((top + pre.input_size) * sy, 2),
    )
