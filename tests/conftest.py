"""Shared fixtures: the committed example photos and the bundled default model."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PHOTOS = ROOT / "examples" / "photos"
SHARED_DATASETS = ROOT.parent / "shared" / "datasets"


@pytest.fixture(scope="session")
def photos() -> dict[str, Path]:
    """name -> path of the real, CC0/public-domain photos in examples/photos."""
    found = {p.stem: p for p in sorted(PHOTOS.glob("*.jpg"))}
    assert {"cat", "coffee", "rocket", "astronaut", "motorcycle"} <= set(found)
    return found


@pytest.fixture(scope="session")
def embedder():
    """The bundled default model, INT8, two threads."""
    from cmn_edge import Embedder

    return Embedder(precision="int8", threads=2)


@pytest.fixture(scope="session")
def embedder_fp32():
    from cmn_edge import Embedder

    return Embedder(precision="fp32", threads=2)


@pytest.fixture
def labelled_folder(tmp_path: Path, photos: dict[str, Path]) -> Path:
    """An ImageFolder tree of real photos: each class holds a photo and variants of it."""
    from PIL import Image, ImageOps

    for name, path in photos.items():
        folder = tmp_path / "gallery" / name
        folder.mkdir(parents=True)
        image = Image.open(path).convert("RGB")
        image.save(folder / "original.jpg", quality=92)
        ImageOps.mirror(image).save(folder / "mirrored.jpg", quality=92)
        w, h = image.size
        image.crop((w // 10, h // 10, w - w // 10, h - h // 10)).save(folder / "crop.jpg")
    return tmp_path / "gallery"


@pytest.fixture(scope="session")
def other_model(tmp_path_factory) -> Path:
    """The bundled model with one byte of its doc string changed: a different model file."""
    onnx = pytest.importorskip("onnx")
    from cmn_edge.registry import resolve_model_path

    model = onnx.load(str(resolve_model_path(None, "int8")))
    model.doc_string = (model.doc_string or "") + " (a copy)"
    path = tmp_path_factory.mktemp("models") / "other.onnx"
    onnx.save(model, str(path))
    return path
