"""The models shipped with cmn-edge, and where their files are found."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

PRECISIONS = ("int8", "fp32")


@dataclass(frozen=True)
class BundledModel:
    name: str
    description: str
    files: tuple[tuple[str, str], ...]  # (precision, file name) pairs
    card: str = "MODEL_CARD.md"
    metrics: str = "metrics.json"

    def file_for(self, precision: str) -> str:
        for prec, filename in self.files:
            if prec == precision:
                return filename
        raise ValueError(f"model '{self.name}' has no {precision} file")


BUNDLED: tuple[BundledModel, ...] = (
    BundledModel(
        name="cmn-lite0",
        description="CMN, 512 concepts on EfficientNet-Lite0, 224 px; birds + everyday objects",
        files=(("int8", "cmn-lite0.int8.onnx"), ("fp32", "cmn-lite0.fp32.onnx")),
    ),
)
DEFAULT_MODEL = BUNDLED[0].name


def models_dir() -> Path:
    """``$CMN_EDGE_MODELS``, the checkout's ``models/``, or the installed data folder."""
    candidates = []
    if os.environ.get("CMN_EDGE_MODELS"):
        candidates.append(Path(os.environ["CMN_EDGE_MODELS"]))
    candidates.append(Path(__file__).resolve().parent.parent / "models")
    candidates.append(Path(sys.prefix) / "share" / "cmn-edge" / "models")
    for candidate in candidates:
        if (candidate / BUNDLED[0].file_for("int8")).is_file():
            return candidate
    return candidates[0]


def get_bundled(name: str) -> BundledModel:
    for model in BUNDLED:
        if model.name == name:
            return model
    known = ", ".join(m.name for m in BUNDLED)
    raise ValueError(f"unknown model '{name}' (bundled: {known}; or give a path to an .onnx file)")


def resolve_model_path(model: str | os.PathLike | None, precision: str) -> Path:
    """A bundled model name (default when None) or a path to an ``.onnx`` file."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not '{precision}'")
    if model is not None and (
        str(model).endswith(".onnx") or os.sep in str(model) or Path(model).exists()
    ):
        path = Path(model)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: model file not found")
        return path
    bundled = get_bundled(DEFAULT_MODEL if model is None else str(model))
    path = models_dir() / bundled.file_for(precision)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: bundled model file missing (set CMN_EDGE_MODELS to the models folder)"
        )
    return path


def bundled_metrics(model: BundledModel) -> dict:
    path = models_dir() / model.metrics
    if not path.is_file():
        return {}
    return json.loads(path.read_text())
