"""``cmn-edge bench``: runs end to end with tiny repeats; the figures are present and sane.

No timing is asserted (speed lives in the benchmark itself); what is checked is that every
measure bench prints (model latency and throughput per batch size, head share, decode,
end to end, cold start, memory) is reported, consistently, for both precisions.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from cmn_edge.bench import LARGE_SIZE, head_share, make_large_jpeg, time_models
from cmn_edge.cli import main
from cmn_edge.embedder import open_session
from cmn_edge.registry import resolve_model_path

FAST = ["--repeats", "1", "--cold-repeats", "1"]


@pytest.fixture(scope="module")
def bench_json() -> dict:
    result = CliRunner().invoke(main, ["bench", *FAST, "--batch", "1,2", "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_json_has_every_measure_for_both_precisions(bench_json: dict) -> None:
    assert set(bench_json["precisions"]) == {"fp32", "int8"}
    for precision, entry in bench_json["precisions"].items():
        assert Path(entry["path"]).name.endswith(f".{precision}.onnx")
        assert set(entry["batches"]) == {"1", "2"}
        for batch, stats in entry["batches"].items():
            assert stats["batch"] == int(batch)
            assert 0 < stats["p50_ms"] <= stats["p90_ms"]
            assert stats["per_image_p50_ms"] == pytest.approx(stats["p50_ms"] / int(batch))
            assert stats["img_per_s"] == pytest.approx(1000 * int(batch) / stats["p50_ms"])
        assert 0.0 < entry["head_share"] < 1.0
        assert entry["decode_small"]["p50_ms"] > 0
        assert entry["decode_12mp"]["size"] == "x".join(map(str, LARGE_SIZE))
        assert entry["end_to_end"]["p50_ms"] > 0
        assert entry["cold_start"]["p50_ms"] > 0
        # The child's own peak (VmHWM), not the bench process's pages counted before exec.
        assert 10 < entry["cold_start"]["peak_rss_mib"] < bench_json["peak_rss_mib"] + 1
        assert entry["load_ms"] > 0
    assert bench_json["peak_rss_mib"] > 10
    assert bench_json["model"] == "cmn-lite0"
    assert bench_json["cpu"]["cores"] >= 1


def test_speedup_is_fp32_time_over_int8_time(bench_json: dict) -> None:
    fp32 = bench_json["precisions"]["fp32"]["batches"]
    int8 = bench_json["precisions"]["int8"]["batches"]
    assert set(bench_json["speedup"]) == {"1", "2"}
    for batch, ratio in bench_json["speedup"].items():
        assert ratio == pytest.approx(fp32[batch]["p50_ms"] / int8[batch]["p50_ms"])


def test_table_has_one_row_per_measure_and_the_speedup_column() -> None:
    result = CliRunner().invoke(main, ["bench", *FAST, "--batch", "1,3", "--threads", "1"])
    assert result.exit_code == 0, result.output
    table = result.stdout.splitlines()
    header = next(line for line in table if line.startswith("measure"))
    assert "FP32" in header and "INT8" in header and "INT8 speed-up" in header
    for label in (
        "model b1 p50 ms/batch",
        "model b3 img/s",
        "head share of model time",
        "4000x3000 JPEG",
        "end to end",
        "cold start `cmn-edge embed`",
        "cold start peak RSS MiB",
    ):
        assert any(line.startswith(label) or label in line for line in table), label
    speedup_row = next(line for line in table if line.startswith("model b1 p50 ms/batch"))
    assert speedup_row.rstrip().endswith("x")
    assert "threads=1" in table[0]


def test_one_precision_has_no_speedup_column() -> None:
    result = CliRunner().invoke(
        main, ["bench", *FAST, "--batch", "1", "--precision", "int8", "--json"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert list(data["precisions"]) == ["int8"]
    assert data["speedup"] == {}


@pytest.mark.parametrize("value", ["0", "1,x", ""])
def test_bad_batch_list_is_a_usage_error(value: str) -> None:
    result = CliRunner().invoke(main, ["bench", "--batch", value])
    assert result.exit_code == 2
    assert "batch" in result.output


def test_one_onnx_file_cannot_be_timed_at_both_precisions(tmp_path: Path) -> None:
    model = resolve_model_path(None, "int8")
    result = CliRunner().invoke(main, ["bench", "--model", str(model)])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ") and str(model) in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_missing_photo_is_one_line_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jpg"
    result = CliRunner().invoke(main, ["bench", *FAST, "--photo", str(missing)])
    assert result.exit_code == 1
    assert result.stderr.strip() == f"error: {missing}: photo not found"


def test_large_jpeg_is_12_megapixels(tmp_path: Path, photos: dict[str, Path]) -> None:
    target = make_large_jpeg(photos["cat"], tmp_path / "big.jpg")
    with Image.open(target) as image:
        assert image.format == "JPEG"
        assert image.size == LARGE_SIZE


def test_head_share_is_a_fraction_for_both_precisions() -> None:
    for precision in ("fp32", "int8"):
        share = head_share(resolve_model_path(None, precision), threads=1, input_size=224, runs=2)
        assert share is not None and 0.0 < share < 1.0


class _RecordingSession:
    """A real session that notes, in a shared log, whose run came when."""

    def __init__(self, name: str, log: list[str]) -> None:
        self._session = open_session(resolve_model_path(None, "int8"))
        self._name, self._log = name, log

    def run(self, outputs, feed):
        self._log.append(self._name)
        return self._session.run(outputs, feed)


def test_time_models_times_each_session_in_settled_blocks() -> None:
    """Timing one run of each session in turn measured the other's spinning threads (FP32 at
    batch 1 read 9-11 ms instead of 5), so the sessions take turns in blocks that start
    with untimed runs; every requested run is still timed."""
    log: list[str] = []
    sessions = {"a": _RecordingSession("a", log), "b": _RecordingSession("b", log)}
    stats = time_models(sessions, 1, 224, repeats=7, warmup=1, rounds=3, settle_s=0.0)
    assert stats["a"]["runs"] == stats["b"]["runs"] == 7
    turns = [name for i, name in enumerate(log) if i == 0 or log[i - 1] != name]
    assert turns == ["a", "b", "a", "b", "a", "b", "a", "b"]  # warm-up, then three rounds
    # Each block: one untimed settling run, then its share of the 7 timed runs (3, 2, 2).
    assert log.count("a") == 1 + 3 + (3 + 2 + 2)
    assert stats["a"]["per_image_p50_ms"] == stats["a"]["p50_ms"]
