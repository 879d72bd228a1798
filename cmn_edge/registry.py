"""The models shipped with cmn-edge, and where their files are found."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .cpu import CpuInfo, this_cpu

PRECISIONS = ("int8", "fp32")
#: What ``--precision`` accepts: ``auto`` is INT8 where this CPU's INT8 kernels keep FP32-level
#: retrieval (``cmn_edge.cpu``), FP32 elsewhere.
PRECISION_CHOICES = ("auto", *PRECISIONS)


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


#: Where the checkout keeps the bundled files; a wheel ships them as package data of
#: cmn_edge (pyproject maps ``models/`` to ``cmn_edge/_models`` and ``examples/photos/`` to
#: ``cmn_edge/_photos``), so one copy serves both.
_CHECKOUT = Path(__file__).resolve().parent.parent
_PACKAGED_MODELS, _CHECKOUT_MODELS = "_models", _CHECKOUT / "models"
_PACKAGED_PHOTOS, _CHECKOUT_PHOTOS = "_photos", _CHECKOUT / "examples" / "photos"
EXAMPLE_PHOTO = "cat.jpg"


def _package_data(folder: str) -> Path | None:
    """A data folder installed inside the cmn_edge package, found wherever pip put it.

    ``importlib.resources`` and not a prefix such as ``sys.prefix/share``: ``pip install
    --user`` and system pips put data files elsewhere, package data always moves with the
    package. None in a checkout (an editable install), where the files are not copied.
    """
    path = Path(str(resources.files(__package__ or "cmn_edge").joinpath(folder)))
    return path if path.is_dir() else None


def models_dir() -> Path:
    """``$CMN_EDGE_MODELS``, the installed package's models, or the checkout's ``models/``."""
    candidates = []
    if os.environ.get("CMN_EDGE_MODELS"):
        candidates.append(Path(os.environ["CMN_EDGE_MODELS"]))
    packaged = _package_data(_PACKAGED_MODELS)
    if packaged is not None:
        candidates.append(packaged)
    candidates.append(_CHECKOUT_MODELS)
    for candidate in candidates:
        if (candidate / BUNDLED[0].file_for("int8")).is_file():
            return candidate
    return candidates[0]


def example_photo() -> Path:
    """The bundled example photo (a cat, CC0), e.g. what ``cmn-edge bench`` times by default."""
    packaged = _package_data(_PACKAGED_PHOTOS)
    folder = packaged if packaged is not None else _CHECKOUT_PHOTOS
    return folder / EXAMPLE_PHOTO


def get_bundled(name: str) -> BundledModel:
    for model in BUNDLED:
        if model.name == name:
            return model
    known = ", ".join(m.name for m in BUNDLED)
    raise ValueError(f"unknown model '{name}' (bundled: {known}; or give a path to an .onnx file)")


def bundled_name_of(path: str | os.PathLike) -> str | None:
    """The bundled model a file is (any of its precisions), or None."""
    folder = models_dir().resolve()
    resolved = Path(path).resolve()
    for model in BUNDLED:
        if any(resolved == folder / name for _precision, name in model.files):
            return model.name
    return None


def choose_precision(precision: str, cpu: CpuInfo | None = None) -> str:
    """``auto`` -> the precision this CPU runs without losing retrieval quality."""
    if precision not in PRECISION_CHOICES:
        allowed = ", ".join(PRECISION_CHOICES)
        raise ValueError(f"precision must be one of {allowed}, not '{precision}'")
    if precision != "auto":
        return precision
    return "int8" if (cpu or this_cpu()).int8_is_exact else "fp32"


def resolve_model_path(model: str | os.PathLike | None, precision: str = "auto") -> Path:
    """A bundled model name (default when None) or a path to an ``.onnx`` file."""
    precision = choose_precision(precision)
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
