"""The Embedder: input kinds, shapes, batching, folders, skipped files and unusable models."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cmn_edge import Embedder, ImageError, ModelError
from cmn_edge.embedder import list_images
from cmn_edge.metadata import METADATA_KEY

DATA = Path(__file__).resolve().parent / "data"
BAD_FILES = ["empty.jpg", "truncated.jpg", "corrupt.jpg", "text.jpg", "bomb.png"]


def _assert_unit_rows(x: np.ndarray, count: int, embedder: Embedder) -> None:
    assert x.dtype == np.float32
    assert x.shape == (count, embedder.num_concepts)
    assert np.allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)


def test_embed_paths_gives_unit_float32_rows(embedder, photos):
    paths = list(photos.values())
    x = embedder.embed(paths)
    _assert_unit_rows(x, len(paths), embedder)
    # Different photos are different points (a constant output would pass the norm check).
    sims = x @ x.T
    assert (sims[~np.eye(len(paths), dtype=bool)] < 0.9999).all()


def test_path_pil_and_array_give_the_same_embedding(embedder, photos):
    path = photos["coffee"]
    pil = Image.open(path)
    array = np.asarray(Image.open(path).convert("RGB"))
    by_path = embedder.embed(path)
    by_str = embedder.embed(str(path))
    by_pil = embedder.embed(pil)
    by_array = embedder.embed(array)
    for other in (by_str, by_pil, by_array):
        _assert_unit_rows(other, 1, embedder)
        assert np.allclose(by_path, other, atol=1e-6)


def test_batch_of_arrays_and_mixed_list(embedder, photos):
    images = [np.asarray(Image.open(p).convert("RGB").resize((320, 240))) for p in photos.values()]
    stacked = embedder.embed(np.stack(images))  # a 4-D array is a batch, not one image
    _assert_unit_rows(stacked, len(images), embedder)
    mixed = embedder.embed([images[0], Image.fromarray(images[1]), images[2]])
    assert np.allclose(mixed, stacked[:3], atol=1e-6)


def test_batch_size_does_not_change_results(embedder, photos):
    paths = list(photos.values())
    assert np.allclose(embedder.embed(paths, batch_size=2), embedder.embed(paths), atol=1e-5)


def test_empty_input(embedder):
    x = embedder.embed([])
    assert x.shape == (0, embedder.num_concepts) and x.dtype == np.float32


def test_embedding_is_the_normalised_concept_scores(embedder, photos):
    """dim i is concept i's score: the embedding is the score vector, L2-normalised."""
    result = embedder.embed_batch(list(photos.values()), with_scores=True)
    assert result.scores.shape == result.embedding.shape
    expected = result.scores / np.linalg.norm(result.scores, axis=1, keepdims=True)
    assert np.allclose(result.embedding, expected, atol=1e-5)
    assert result.attention is None


def test_model_identity(embedder):
    assert re.fullmatch(rf"{re.escape(embedder.metadata.name)}@[0-9a-f]{{16}}", embedder.model_id)
    assert Embedder(embedder.path, threads=1).model_id == embedder.model_id
    assert embedder.preprocess == embedder.metadata.preprocess


def test_iter_folder_matches_embed(embedder, labelled_folder):
    paths = list_images(labelled_folder)
    assert len(paths) == 15 and paths == sorted(paths)
    seen, chunks = [], []
    for batch_paths, batch in embedder.iter_folder(labelled_folder, batch_size=4):
        assert len(batch_paths) == len(batch) <= 4
        seen += batch_paths
        chunks.append(batch)
    assert seen == paths
    assert np.allclose(np.concatenate(chunks), embedder.embed(paths), atol=1e-5)


def test_list_images_skips_hidden_and_non_images(labelled_folder):
    (labelled_folder / "cat" / "notes.txt").write_text("not an image")
    (labelled_folder / "cat" / ".hidden.jpg").write_bytes(b"")
    nested = labelled_folder / "cat" / "deeper"
    nested.mkdir()
    shutil.copy(labelled_folder / "cat" / "crop.jpg", nested / "again.JPG")
    paths = list_images(labelled_folder)
    assert nested / "again.JPG" in paths
    assert all(p.suffix.lower() in {".jpg", ".png"} and not p.name.startswith(".") for p in paths)
    with pytest.raises(FileNotFoundError):
        list_images(labelled_folder / "missing")


def test_iter_folder_bad_files(embedder, labelled_folder):
    bad_folder = labelled_folder / "zz_bad"
    bad_folder.mkdir()
    for name in BAD_FILES:
        shutil.copy(DATA / name, bad_folder / name)
    with pytest.raises(ImageError, match=re.escape(str(bad_folder))):
        list(embedder.iter_folder(labelled_folder))

    errors: list = []
    kept = [p for paths, _ in embedder.iter_folder(labelled_folder, 4, True, errors) for p in paths]
    assert len(kept) == 15
    assert sorted(p.name for p, _ in errors) == sorted(BAD_FILES)
    assert all(str(path) in message for path, message in errors)


# --- models that are not CMN bundles --------------------------------------------------------


def _identity_onnx(path: Path, metadata: dict[str, str] | None = None) -> Path:
    """A valid ONNX graph that is not a CMN model (built with the onnx package)."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["images"], ["embedding"])],
        "not_cmn",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, 224, 224])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", 3, 224, 224])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for key, value in (metadata or {}).items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def test_onnx_without_cmn_metadata_is_refused(tmp_path):
    path = _identity_onnx(tmp_path / "plain.onnx")
    with pytest.raises(ModelError, match="not a cmn-edge model") as info:
        Embedder(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_onnx_with_metadata_but_wrong_graph_is_refused(tmp_path, embedder):
    props = {METADATA_KEY: embedder.metadata.to_json()}
    path = _identity_onnx(tmp_path / "impostor.onnx", props)
    with pytest.raises(ModelError, match="lacks the CMN"):
        Embedder(path)


def test_malformed_and_future_metadata_are_refused(tmp_path, embedder):
    path = _identity_onnx(tmp_path / "broken.onnx", {METADATA_KEY: "{not json"})
    with pytest.raises(ModelError, match="malformed"):
        Embedder(path)
    future = json.loads(embedder.metadata.to_json())
    future["format_version"] = 999
    path = _identity_onnx(tmp_path / "future.onnx", {METADATA_KEY: json.dumps(future)})
    with pytest.raises(ModelError, match="upgrade"):
        Embedder(path)


def test_random_bytes_and_missing_model(tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(np.random.default_rng(0).bytes(2048))
    with pytest.raises(ModelError, match="not a loadable ONNX model") as info:
        Embedder(junk)
    assert str(junk) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(FileNotFoundError, match="model file not found"):
        Embedder(tmp_path / "missing.onnx")
    with pytest.raises(ValueError, match="unknown model 'no-such-model'"):
        Embedder("no-such-model")
    with pytest.raises(ValueError, match="precision"):
        Embedder(precision="fp16")
