"""The embedding pipeline: threads decode ahead of the model, in order, with bounded memory."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from cmn_edge import Embedder, ImageError
from cmn_edge.pipeline import ThreadBudget, stream_batches


def test_order_errors_and_a_bounded_window() -> None:
    lock = threading.Lock()
    state = {"loaded": 0, "consumed": 0, "most_ahead": 0}

    def load(item: int) -> np.ndarray:
        if item % 7 == 3:
            raise ImageError(f"item{item}.jpg: not an image")
        with lock:
            state["loaded"] += 1
            state["most_ahead"] = max(state["most_ahead"], state["loaded"] - state["consumed"])
        return np.full((2,), item, np.float32)

    def infer(batch: np.ndarray) -> np.ndarray:
        with lock:
            state["consumed"] += len(batch)
        return batch * 10

    errors: list = []
    seen, out = [], []
    for items, values in stream_batches(
        range(500), load, infer, batch_size=8, workers=3, skip_errors=True, errors=errors
    ):
        seen += items
        out.append(values[:, 0])
    expected = [i for i in range(500) if i % 7 != 3]
    assert seen == expected  # input order, bad items left out
    assert np.array_equal(np.concatenate(out), np.array(expected) * 10)
    assert [item for item, _ in errors] == [i for i in range(500) if i % 7 == 3]
    assert "not an image" in errors[0][1]
    assert state["most_ahead"] <= 8 * 4  # the window (3 batches) plus the batch being built


def test_an_error_stops_the_stream_without_skip() -> None:
    def load(item: int) -> np.ndarray:
        if item == 5:
            raise ImageError("five.jpg: truncated")
        return np.zeros(1, np.float32)

    with pytest.raises(ImageError, match="five.jpg"):
        for _ in stream_batches(range(100), load, lambda b: b, batch_size=4, workers=2):
            pass


def test_thread_budget_defaults_and_overrides() -> None:
    default = ThreadBudget.for_machine()
    assert default.inference >= 1 and default.decode >= 1
    assert ThreadBudget.for_machine(3, 5) == ThreadBudget(3, 5)


def test_pipelined_embeddings_equal_one_by_one(photos: dict[str, Path]) -> None:
    paths = list(photos.values()) * 3
    embedder = Embedder(threads=2, decode_workers=3)
    batched = embedder.embed(paths, batch_size=4)
    single = np.concatenate([embedder.embed_batch([p]).embedding for p in paths])
    assert batched.shape == (len(paths), embedder.num_concepts)
    assert np.allclose(batched, single, atol=1e-5)
    got = [p for chunk, _ in embedder.iter_paths(paths, batch_size=4) for p in chunk]
    assert got == paths


def test_bench_pipeline_reports_every_stage(labelled_folder: Path) -> None:
    import json

    from click.testing import CliRunner

    from cmn_edge.cli import main

    result = CliRunner().invoke(
        main, ["bench", "--pipeline", str(labelled_folder), "--batch", "4", "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["images"] == len(list(labelled_folder.rglob("*.jpg")))
    assert set(report["stages_img_per_s"]) == {"read", "decode", "model"}
    assert all(rate > 0 for rate in report["stages_img_per_s"].values())
    assert report["end_to_end_img_per_s"] > 0 and report["peak_rss_mib"] > 0
    assert report["slowest_stage"] in report["stages_img_per_s"]


def test_decode_workers_from_the_command_line_and_the_environment(
    labelled_folder: Path, monkeypatch
) -> None:
    import json

    from click.testing import CliRunner

    from cmn_edge.cli import main
    from cmn_edge.pipeline import DECODE_WORKERS_ENV

    monkeypatch.setenv(DECODE_WORKERS_ENV, "5")  # restored after the test
    assert ThreadBudget.for_machine().decode == 5
    assert ThreadBudget.for_machine(decode_workers=2).decode == 2  # an argument wins
    args = ["--decode-workers", "3", "bench", "--pipeline", str(labelled_folder), "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["threads"]["decode"] == 3
    monkeypatch.setenv(DECODE_WORKERS_ENV, "many")
    with pytest.raises(ValueError, match="not a number"):
        ThreadBudget.for_machine()


def test_the_embed_command_decodes_in_the_pipeline_threads(
    labelled_folder: Path, tmp_path: Path, monkeypatch
) -> None:
    """``cmn-edge embed FOLDER`` decodes in the pipeline's workers (it once decoded every
    file in the main thread), keeps the input order, and lists a bad file in its place."""
    from click.testing import CliRunner

    from cmn_edge.cli import main

    decoded_in: set[str] = set()
    original = Embedder.load

    def load(self, image):
        decoded_in.add(threading.current_thread().name)
        return original(self, image)

    monkeypatch.setattr(Embedder, "load", load)
    bad = labelled_folder / "cat" / "zz-broken.jpg"
    bad.write_bytes(b"not a jpeg")
    out = tmp_path / "rows.npy"
    args = ["embed", str(labelled_folder), "--output", str(out), "--skip-errors"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert decoded_in and all(name.startswith("cmn-decode") for name in decoded_in)
    assert "zz-broken.jpg" in result.output
    files = sorted(p for p in labelled_folder.rglob("*.jpg") if p != bad)
    rows = np.load(out)
    assert np.allclose(rows, Embedder(threads=2).embed(files), atol=1e-6)
