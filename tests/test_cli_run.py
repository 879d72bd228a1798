"""``cmn-edge embed``, ``eval`` and ``models`` on real files, good and bad."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cmn_edge.cli import main
from cmn_edge.dataset import load_samples
from cmn_edge.metrics import retrieval_metrics

DATA = Path(__file__).resolve().parent / "data"
BAD_FILES = ["empty.jpg", "truncated.jpg", "corrupt.jpg", "text.jpg", "bomb.png", "missing.jpg"]


_LOADED: dict = {}


@pytest.fixture(autouse=True)
def _reuse_the_bundled_model(monkeypatch):
    """Load the bundled model once for all CLI calls here; model paths still load for real."""
    from cmn_edge import cli_run

    real = cli_run.Embedder

    def embedder(model=None, precision="int8", threads=None):
        if model is not None:
            return real(model, precision=precision, threads=threads)
        if precision not in _LOADED:
            _LOADED[precision] = real(None, precision=precision, threads=threads)
        return _LOADED[precision]

    monkeypatch.setattr(cli_run, "Embedder", embedder)


def run(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, *fragments: str) -> None:
    """Exit 1 through the error handler (not a crash), one stderr line naming the culprit."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0]


def bad_path(name: str) -> Path:
    return DATA / name  # missing.jpg is not there on purpose


# --- embed ----------------------------------------------------------------------------------


def test_embed_json(embedder, photos):
    paths = [photos["cat"], photos["rocket"]]
    result = run("embed", *paths)
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["model"] == embedder.model_id
    assert document["precision"] == embedder.metadata.precision
    assert document["num_concepts"] == embedder.num_concepts
    assert document["errors"] == []
    assert [item["path"] for item in document["items"]] == [str(p) for p in paths]
    x = np.asarray([item["embedding"] for item in document["items"]], dtype=np.float32)
    assert np.allclose(x, embedder.embed(paths), atol=1e-6)
    assert result.stderr == ""


def test_embed_folder_recursive_to_npy(embedder, labelled_folder, tmp_path):
    out = tmp_path / "vectors.npy"
    result = run("embed", labelled_folder, "--output", out, "--batch-size", 4)
    assert result.exit_code == 0, result.output
    x = np.load(out)
    assert x.dtype == np.float32 and x.shape == (15, embedder.num_concepts)
    expected = embedder.embed(sorted(labelled_folder.rglob("*.jpg")))
    assert np.allclose(x, expected, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gallery", "vectors.npy"]


def test_embed_npy_to_stdout(embedder, photos):
    result = run("embed", photos["cat"], "--format", "npy")
    assert result.exit_code == 0, result.output
    x = np.load(io.BytesIO(result.stdout_bytes))
    assert np.allclose(x, embedder.embed(photos["cat"]), atol=1e-6)


def test_embed_csv_with_scores(embedder, photos, tmp_path):
    out = tmp_path / "vectors.csv"  # format taken from the suffix
    result = run("embed", photos["cat"], photos["coffee"], "-o", out, "--scores")
    assert result.exit_code == 0, result.output
    with out.open(newline="") as handle:
        rows = list(csv.reader(handle))
    count = embedder.num_concepts
    assert len(rows) == 3 and len(rows[0]) == 1 + 2 * count and rows[0][0] == "path"
    assert [r[0] for r in rows[1:]] == [str(photos["cat"]), str(photos["coffee"])]
    values = np.asarray([r[1:] for r in rows[1:]], dtype=np.float32)
    embedding, scores = values[:, :count], values[:, count:]
    assert np.allclose(embedding, embedder.embed([photos["cat"], photos["coffee"]]), atol=1e-6)
    normalised = scores / np.linalg.norm(scores, axis=1, keepdims=True)
    assert np.allclose(embedding, normalised, atol=1e-5)


def test_embed_json_scores(embedder, photos):
    result = run("embed", photos["astronaut"], "--scores", "--format", "json")
    item = json.loads(result.stdout)["items"][0]
    assert len(item["scores"]) == len(item["embedding"]) == embedder.num_concepts


def test_embed_npy_scores_is_a_usage_error(photos, tmp_path):
    result = run("embed", photos["cat"], "-o", tmp_path / "x.npy", "--scores")
    assert result.exit_code == 2
    assert not (tmp_path / "x.npy").exists()


@pytest.mark.parametrize("name", BAD_FILES)
@pytest.mark.parametrize("fmt", ["json", "npy"])
def test_embed_bad_input_writes_nothing(photos, tmp_path, name, fmt):
    out = tmp_path / f"out.{fmt}"
    # The bad file comes last with batch size 1, so good images were embedded before it.
    result = run(
        "embed", photos["cat"], photos["coffee"], bad_path(name), "-o", out, "--batch-size", 1
    )
    assert_one_line_error(result, str(bad_path(name)))
    assert list(tmp_path.iterdir()) == []  # neither the output nor a temporary file


def test_embed_failure_keeps_the_previous_output(photos, tmp_path):
    out = tmp_path / "out.json"
    out.write_text("previous run\n")
    result = run("embed", photos["cat"], DATA / "truncated.jpg", "-o", out)
    assert_one_line_error(result, "truncated.jpg", "truncated")
    assert out.read_text() == "previous run\n"
    assert list(tmp_path.iterdir()) == [out]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002], ids=oct)
@pytest.mark.parametrize("fmt", ["json", "npy"])
def test_embed_output_mode_follows_the_umask(photos, tmp_path, umask, fmt):
    """A new --output file is 0666 less the umask, like any file a shell redirect writes."""
    import os
    import stat

    out = tmp_path / f"out.{fmt}"
    old = os.umask(umask)
    try:
        result = run("embed", photos["cat"], "-o", out)
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask


def test_embed_bad_input_reasons(tmp_path):
    expected = {
        "empty.jpg": "empty",
        "truncated.jpg": "truncated",
        "corrupt.jpg": "not an image",
        "text.jpg": "not an image",
        "bomb.png": "decompression bomb",
        "missing.jpg": "not found",
    }
    for name, reason in expected.items():
        assert_one_line_error(run("embed", bad_path(name)), name, reason)


def test_embed_skip_errors(embedder, photos, tmp_path):
    out = tmp_path / "out.json"
    bad = [bad_path(n) for n in BAD_FILES]
    result = run("embed", photos["cat"], *bad, photos["rocket"], "-o", out, "--skip-errors")
    assert result.exit_code == 0, result.output
    document = json.loads(out.read_text())
    assert [i["path"] for i in document["items"]] == [str(photos["cat"]), str(photos["rocket"])]
    assert [e["path"] for e in document["errors"]] == [str(p) for p in bad]
    assert all(e["error"] and str(e["path"]) not in e["error"] for e in document["errors"])
    x = np.asarray([i["embedding"] for i in document["items"]], dtype=np.float32)
    assert np.allclose(x, embedder.embed([photos["cat"], photos["rocket"]]), atol=1e-6)
    lines = result.stderr.splitlines()
    assert len(lines) == len(bad) + 1
    for line, path in zip(lines, bad):
        assert line.startswith(f"error: {path}: ")
    assert lines[-1] == f"embedded 2 of {len(bad) + 2} images; {len(bad)} skipped"


def test_embed_skip_errors_with_nothing_left_fails(tmp_path):
    out = tmp_path / "out.npy"
    bad = [bad_path(n) for n in ("empty.jpg", "corrupt.jpg")]
    result = run("embed", *bad, "-o", out, "--skip-errors")
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1] == "error: no image could be embedded (2 failed)"
    assert list(tmp_path.iterdir()) == []


def test_embed_skip_errors_in_a_folder(labelled_folder, tmp_path):
    shutil.copy(DATA / "corrupt.jpg", labelled_folder / "cat" / "zz_corrupt.jpg")
    result = run("embed", labelled_folder, "--format", "csv")
    assert_one_line_error(result, "zz_corrupt.jpg")
    result = run("embed", labelled_folder, "--format", "csv", "--skip-errors")
    assert result.exit_code == 0
    assert len(result.stdout.splitlines()) == 1 + 15


def test_embed_bad_output_target(photos, tmp_path):
    assert_one_line_error(run("embed", photos["cat"], "-o", tmp_path / "no" / "x.json"), "no")
    assert_one_line_error(run("embed", photos["cat"], "-o", tmp_path), "is a directory")
    assert_one_line_error(run("embed", tmp_path / "empty_folder_missing"), "not found")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(run("embed", empty), "no images found")


# --- models that are not CMN bundles --------------------------------------------------------


def _plain_onnx(path: Path) -> Path:
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
    onnx.save(model, path)
    return path


def test_model_that_is_not_a_cmn_bundle(photos, tmp_path):
    plain = _plain_onnx(tmp_path / "plain.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(np.random.default_rng(1).bytes(4096))
    out = tmp_path / "out.json"
    cases = [
        (plain, ["plain.onnx", "not a cmn-edge model"]),
        (junk, ["junk.onnx", "not a loadable ONNX model"]),
        (tmp_path / "missing.onnx", ["missing.onnx", "not found"]),
        ("no-such-model", ["no-such-model", "unknown model"]),
    ]
    for model, fragments in cases:
        result = run("embed", photos["cat"], "--model", model, "-o", out)
        assert_one_line_error(result, *fragments)
        assert not out.exists()


def test_eval_with_a_bad_model(labelled_folder, tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00" * 100)
    assert_one_line_error(run("eval", labelled_folder, "--model", junk), "junk.onnx")


# --- eval -----------------------------------------------------------------------------------


def test_eval_image_folder_json(embedder, labelled_folder):
    result = run("eval", labelled_folder, "--json", "--batch-size", 8)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["model"] == embedder.model_id
    assert report["precision"] == embedder.metadata.precision
    assert report["split"] == "all" and report["count"] == 15 and report["classes"] == 5
    assert report["seconds"] > 0
    metrics = report["metrics"]
    assert list(metrics) == ["R@1", "R@2", "R@4", "R@8", "MAP@R"]
    assert metrics["R@1"] <= metrics["R@2"] <= metrics["R@4"] <= metrics["R@8"] <= 100
    samples = load_samples(labelled_folder)
    expected = retrieval_metrics(
        embedder.embed([s.path for s in samples]), np.asarray([s.label for s in samples])
    )
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-3)


def _manifest(labelled_folder: Path) -> Path:
    """A manifest.csv over the same tree: three classes test, two train."""
    rows = ["path,label,class_name,split"]
    for label, folder in enumerate(sorted(p for p in labelled_folder.iterdir() if p.is_dir())):
        split = "test" if label < 3 else "train"
        for image in sorted(folder.glob("*.jpg")):
            rows.append(f"{image.relative_to(labelled_folder)},{label},{folder.name},{split}")
    (labelled_folder / "manifest.csv").write_text("\n".join(rows) + "\n")
    return labelled_folder


def test_eval_manifest_split_and_limit(labelled_folder):
    root = _manifest(labelled_folder)
    report = json.loads(run("eval", root, "--json").stdout)
    assert report["split"] == "test" and report["count"] == 9 and report["classes"] == 3
    report = json.loads(run("eval", root, "--json", "--split", "train").stdout)
    assert report["split"] == "train" and report["count"] == 6
    report = json.loads(run("eval", root, "--json", "--limit-per-class", 2).stdout)
    assert report["count"] == 6 and report["classes"] == 3


def test_eval_table(labelled_folder, embedder):
    result = run("eval", labelled_folder)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert embedder.model_id in lines[0] and "15 images, 5 classes" in lines[0]
    assert lines[1].split() == ["R@1", "R@2", "R@4", "R@8", "MAP@R"]
    assert all(0 <= float(v) <= 100 for v in lines[2].split())


def test_eval_errors(labelled_folder, tmp_path):
    assert_one_line_error(run("eval", tmp_path / "nowhere"), "nowhere", "not found")
    root = _manifest(labelled_folder)
    assert_one_line_error(run("eval", root, "--split", "val"), "split 'val'", "empty")
    lonely = tmp_path / "lonely"
    (lonely / "a").mkdir(parents=True)
    (lonely / "b").mkdir()
    shutil.copy(labelled_folder / "cat" / "crop.jpg", lonely / "a" / "1.jpg")
    shutil.copy(labelled_folder / "cat" / "crop.jpg", lonely / "a" / "2.jpg")
    shutil.copy(labelled_folder / "coffee" / "crop.jpg", lonely / "b" / "1.jpg")
    assert_one_line_error(run("eval", lonely), "single image", "b")
    (root / "manifest.csv").unlink()  # back to an ImageFolder tree, now with a broken image
    shutil.copy(DATA / "truncated.jpg", labelled_folder / "cat" / "zz.jpg")
    assert_one_line_error(run("eval", labelled_folder), "zz.jpg", "truncated")


# --- models ---------------------------------------------------------------------------------


def test_models_json_without_metrics(monkeypatch, tmp_path, embedder):
    folder = tmp_path / "models"
    folder.mkdir()
    for name in ("cmn-lite0.int8.onnx", "cmn-lite0.fp32.onnx"):
        (folder / name).symlink_to(embedder.path.parent / name)
    monkeypatch.setenv("CMN_EDGE_MODELS", str(folder))
    result = run("models", "--json")
    assert result.exit_code == 0, result.output
    listing = json.loads(result.stdout)
    assert listing["models_dir"] == str(folder)
    (entry,) = [m for m in listing["models"] if m["name"] == "cmn-lite0"]
    assert entry["default"] is True
    assert {f["precision"] for f in entry["files"]} == {"int8", "fp32"}
    for f in entry["files"]:
        assert f["exists"] and f["bytes"] == (folder / f["file"]).stat().st_size > 0
    assert entry["metrics"] == {} and entry["metrics_error"] is None
    text = run("models")
    assert text.exit_code == 0 and "none recorded" in text.stdout


def test_models_with_metrics_and_broken_metrics(monkeypatch, tmp_path, embedder):
    folder = tmp_path / "models"
    folder.mkdir()
    for name in ("cmn-lite0.int8.onnx", "cmn-lite0.fp32.onnx"):
        (folder / name).symlink_to(embedder.path.parent / name)
    monkeypatch.setenv("CMN_EDGE_MODELS", str(folder))
    recorded = {"cub100": {"int8": {"R@1": 61.5}, "fp32": {"R@1": 62.0}}}
    (folder / "metrics.json").write_text(json.dumps(recorded))
    listing = json.loads(run("models", "--json").stdout)
    assert listing["models"][0]["metrics"] == recorded
    text = run("models").stdout
    assert "cub100.int8.R@1: 61.5" in text and "cub100.fp32.R@1: 62.0" in text

    (folder / "metrics.json").write_text("{broken")
    result = run("models")
    assert result.exit_code == 0
    assert "metrics.json: unreadable" in result.stdout


def test_models_prints_what_each_file_says_about_itself(embedder, embedder_fp32):
    """Name, concepts, input size, precision and the INT8 recipe, read from each ONNX file."""
    listing = json.loads(run("models", "--json").stdout)
    files = {f["precision"]: f for f in listing["models"][0]["files"]}
    for precision, loaded in (("int8", embedder), ("fp32", embedder_fp32)):
        meta = files[precision]["metadata"]
        assert meta["name"] == loaded.metadata.name and meta["precision"] == precision
        assert meta["num_concepts"] == loaded.num_concepts
        assert meta["input_size"] == loaded.preprocess.input_size
        assert meta["named_concepts"] == len(loaded.metadata.concept_names)
    recipe = embedder.metadata.quantization
    quant = files["int8"]["metadata"]["quantization"]
    assert quant["format"] == recipe["format"] and quant["per_channel"] == recipe["per_channel"]
    assert quant["calibration"]["method"] == recipe["calibration"]["method"]
    assert quant["calibration"]["count"] == recipe["calibration"]["count"]
    assert quant["float_compute_nodes"] == {
        op: len(nodes) for op, nodes in recipe["float_compute_nodes"].items()
    }
    assert files["fp32"]["metadata"]["quantization"] is None
    text = run("models").stdout
    size = embedder.preprocess.input_size
    assert f"{embedder.metadata.name}: {embedder.num_concepts} concepts" in text
    assert f"input {size}x{size}" in text
    assert f"{recipe['format']}, activations {recipe['activation_type']}" in text
    assert f"calibration: {recipe['calibration']['method']}" in text


def test_models_with_an_unreadable_model_file(monkeypatch, tmp_path, embedder):
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "cmn-lite0.int8.onnx").symlink_to(embedder.path)
    (folder / "cmn-lite0.fp32.onnx").write_bytes(b"not an onnx file")
    monkeypatch.setenv("CMN_EDGE_MODELS", str(folder))
    result = run("models", "--json")
    assert result.exit_code == 0, result.output
    files = {f["precision"]: f for f in json.loads(result.stdout)["models"][0]["files"]}
    assert files["int8"]["metadata"]["precision"] == "int8"
    assert files["fp32"]["metadata"] is None
    assert "cmn-lite0.fp32.onnx" in files["fp32"]["metadata_error"]
    text = run("models")
    assert text.exit_code == 0 and "metadata: " in text.stdout and "unreadable" in text.stdout


def test_progress_bar_goes_to_stderr_only(monkeypatch, labelled_folder, embedder):
    """On a terminal a long job shows a bar; it must never end up in the data on stdout."""
    from cmn_edge import cli_run

    monkeypatch.setattr(cli_run, "_interactive", lambda: True)
    monkeypatch.setattr(cli_run, "PROGRESS_MIN_ITEMS", 4)
    result = run("embed", labelled_folder, "--format", "npy", "--batch-size", 4)
    assert result.exit_code == 0, result.output
    assert "embedding" in result.stderr
    assert np.load(io.BytesIO(result.stdout_bytes)).shape == (15, embedder.num_concepts)
    result = run("eval", labelled_folder, "--json")
    assert "evaluating" in result.stderr
    assert json.loads(result.stdout)["count"] == 15
    monkeypatch.setattr(cli_run, "_interactive", lambda: False)
    assert run("embed", labelled_folder, "--format", "npy").stderr == ""


def test_output_to_a_fifo_writes_through_it_and_leaves_it_a_fifo(tmp_path, photos) -> None:
    """A FIFO (or a device) --output is written through, never renamed over: an earlier
    version replaced /dev/null with a file. A FIFO in a temporary folder tests the same path
    without touching the machine's real devices."""
    import os
    import stat
    import subprocess
    import sys

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    reader = subprocess.Popen(
        [sys.executable, "-c", f"print(len(open({str(fifo)!r}).read()))"],
        stdout=subprocess.PIPE,
        text=True,
    )
    result = subprocess.run(
        ["cmn-edge", "embed", str(photos["cat"]), "--output", str(fifo), "--format", "json"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert int(reader.communicate(timeout=60)[0]) > 1000
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
