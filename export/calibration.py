"""Calibration images for static INT8 quantization.

Activation ranges are measured on images of the TRAIN split (the test classes are only ever
used to report results), preprocessed exactly as the runtime will preprocess them: the
model's own metadata drives :func:`cmn_edge.preprocess.load`.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from cmn_edge import preprocess as pp
from cmn_edge.dataset import load_samples
from cmn_edge.metadata import INPUT_NAME, Preprocess


def pick_images(
    roots: str | Path | Sequence[str | Path], split: str = "train", count: int = 256, seed: int = 0
) -> list[Path]:
    """A seeded random sample of ``count`` images of one split of one or more datasets (all
    of them if fewer), so a model trained on several datasets is calibrated on all of them.

    Random rather than the first N so that every class has a chance to be represented.
    """
    if count < 1:
        raise ValueError(f"calibration count must be at least 1 (got {count})")
    if isinstance(roots, (str, Path)):
        roots = [roots]
    paths = [s.path for root in roots for s in load_samples(root, split)]
    chosen = paths if len(paths) <= count else random.Random(seed).sample(paths, count)
    return sorted(chosen)


def images_digest(paths: list[Path]) -> str:
    """sha256 over the file names and bytes, so a calibration set can be recognised later."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


class ImageCalibrationReader(CalibrationDataReader):
    """Batches of preprocessed images for onnxruntime's calibrators.

    Supports ``set_range`` so that quantize_static can calibrate in slices: histogram
    calibrators otherwise hold every intermediate tensor of every image in memory at once.
    """

    def __init__(self, paths: list[Path], preprocess: Preprocess, batch_size: int = 8) -> None:
        if not paths:
            raise ValueError("no calibration images")
        self.paths = list(paths)
        self.preprocess = preprocess
        self.batch_size = batch_size
        self.batches = [
            self.paths[i : i + batch_size] for i in range(0, len(self.paths), batch_size)
        ]
        self._cache: dict[int, np.ndarray] = {}
        self.set_range(0, len(self.batches))

    def __len__(self) -> int:
        return len(self.batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._order = iter(range(start_index, min(end_index, len(self.batches))))

    def rewind(self) -> None:
        self.set_range(0, len(self.batches))

    def batch(self, index: int) -> np.ndarray:
        if index not in self._cache:
            arrays = [pp.load(path, self.preprocess) for path in self.batches[index]]
            self._cache[index] = np.stack(arrays).astype(np.float32)
        return self._cache[index]

    def get_next(self) -> dict[str, np.ndarray] | None:
        index = next(self._order, None)
        if index is None:
            return None
        return {INPUT_NAME: self.batch(index)}
