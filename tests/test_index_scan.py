"""The projected scan (cmn_edge/index/scan.py): the path a deep query takes instead of a walk.

Which path a query takes depends on this process's timings, so each test sets the walk's
timed cost high (the scan then pays) or leaves it, and checks which copy was built.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_index import DIM, MASKS, brute, clustered, weight_vector

from cmn_edge.index import ConceptIndex
from cmn_edge.index.scan import CODE_MAX, SCAN_AFTER, _best, _session

GRAPH_DIMS = 32


def served(idx: ConceptIndex, searches: int = SCAN_AFTER) -> None:
    """As a long-running process (a kiosk) whose view has served searches (a view loaded
    anew, after another process's checkpoint, counts from zero)."""
    idx.load_view()
    idx._searches = max(idx._searches, searches)


def walks_cost_a_lot(idx: ConceptIndex) -> None:
    idx._costs.walk_per_ef = 1.0  # a second per unit of depth: any scan pays


@pytest.fixture(scope="module")
def gallery() -> np.ndarray:
    return clustered(4000, seed=11)


@pytest.fixture(scope="module")
def queries() -> np.ndarray:
    return clustered(40, seed=12)


def reduced(gallery: np.ndarray) -> ConceptIndex:
    idx = ConceptIndex(DIM, "m@1", exact_below=0, graph_dims=GRAPH_DIMS, ef=40)
    idx.add(gallery, num_threads=1)
    assert idx.graph_dims == GRAPH_DIMS
    return idx


@pytest.mark.parametrize("mask", list(MASKS))
def test_the_scan_finds_at_least_what_a_walk_as_deep_does_with_exact_scores(gallery, queries, mask):
    idx = reduced(gallery)
    served(idx)
    controls, w = MASKS[mask], weight_vector(MASKS[mask])
    recall = {}
    for path in ("walk", "scan"):
        found = 0
        for q in queries:
            # timed walks update the cost each time: at 4,000 rows a scan really is cheaper
            idx._costs.walk_per_ef = 1.0 if path == "scan" else 1e-12
            ids, scores = idx.search_ids(q, 10, **controls)
            truth, truth_scores = brute(gallery, q, 10, w, controls.get("renormalize", False))
            found += len(set(ids.tolist()) & set(truth.tolist()))
            exact = dict(zip(truth.tolist(), truth_scores.tolist()))
            for item, score in zip(ids.tolist(), scores.tolist()):
                if item in exact:  # re-ranked exactly: the very score brute force gives
                    assert score == pytest.approx(exact[item], abs=1e-5)
        recall[path] = found / (10 * len(queries))
        assert (idx._scan is not None) == (path == "scan")
    assert idx._scan.rows == len(gallery)
    # the scan ranks every row in the graph's space; the walk only approximates that order
    assert recall["scan"] >= recall["walk"] - 0.01 and recall["scan"] >= 0.6, recall


def test_a_process_that_has_served_few_searches_walks_and_builds_no_copy(gallery, queries):
    idx = reduced(gallery)
    walks_cost_a_lot(idx)
    for q in queries[: SCAN_AFTER - 1]:
        idx.search_ids(q, 10, exclude=list(range(0, DIM, 2)))
    assert idx._scan is None  # a one-shot `cmn-edge search` never reads every vector
    idx.search_ids(queries[-1], 10, exclude=list(range(0, DIM, 2)))
    assert idx._scan is not None


def test_a_cheap_walk_is_taken_when_the_timings_say_so(gallery, queries):
    idx = reduced(gallery)
    served(idx)
    idx._costs.walk_per_ef = 1e-12  # walks all but free: no depth makes a scan pay
    idx.search_ids(queries[0], 10, exclude=list(range(0, DIM, 2)))
    assert idx._scan is None


def test_removed_updated_and_excluded_items_are_never_returned_by_the_scan(gallery):
    idx = reduced(gallery)
    served(idx)
    walks_cost_a_lot(idx)
    target = gallery[123]
    assert idx.search_ids(target, 1)[0][0] == 123
    idx.remove([123])
    assert 123 not in idx.search_ids(target, 10)[0].tolist()
    idx.update(200, gallery[7])  # item 200 now holds item 7's vector
    ids, scores = idx.search_ids(gallery[7], 3)
    assert set(ids[:2].tolist()) == {7, 200} and scores[0] == pytest.approx(1.0, abs=1e-5)
    assert ids.tolist().count(200) == 1  # its old row is dead, not a second hit
    excluded = idx.search_ids(gallery[7], 5, exclude_ids={7, 200})[0].tolist()
    assert 7 not in excluded and 200 not in excluded and len(excluded) == 5
    assert idx._scan is not None


def test_the_scan_reads_the_tail_of_an_on_disk_index_and_follows_new_rows(tmp_path, gallery):
    idx = ConceptIndex.create(
        tmp_path / "idx", DIM, "m@1", exact_below=0, graph_dims=GRAPH_DIMS, ef=40
    )
    idx.add(gallery[:3000], num_threads=1)
    idx.checkpoint()
    idx.auto_checkpoint = False
    served(idx)  # after the checkpoint: it starts a new view
    walks_cost_a_lot(idx)
    masked = {"exclude": list(range(0, DIM, 2))}
    idx.search_ids(gallery[0], 10, **masked)
    assert idx._scan.rows == 3000
    idx.add(gallery[3000:3100])  # after the checkpoint: in the tail, not in the graph
    served(idx)
    assert len(idx._tail_rows()) == 100
    ids, _ = idx.search_ids(gallery[3050], 1, **masked)
    assert ids[0] == 3050 and idx._scan.rows == 3100
    rows = idx._rows.gather(np.arange(3100))
    projected = rows @ idx._projection.matrix.T
    coded = idx._scan.coded
    high = coded.low + 2 * CODE_MAX * coded.step  # rows appended later are clipped to it
    decoded = (coded.codes[:, :3100].T.astype(np.float32) + CODE_MAX) * coded.step + coded.low
    error = np.abs(decoded - np.clip(projected, coded.low, high))
    assert (error <= coded.step / 2 + 1e-6).all()
    assert not coded.codes[:, 3100:].any()  # the spare columns score zero


def test_the_codes_are_fitted_again_when_the_rows_have_doubled(gallery):
    idx = reduced(gallery[:1000])
    served(idx)
    walks_cost_a_lot(idx)
    masked = {"exclude": list(range(0, DIM, 2))}
    idx.search_ids(gallery[0], 10, **masked)
    first = idx._scan.coded
    assert first.fitted_rows == 1000 and first.capacity == 1000 + 1000 // 8
    idx.add(gallery[1000:1100], num_threads=1)
    idx.search_ids(gallery[0], 10, **masked)
    assert idx._scan.coded.codes is first.codes  # coded in the spare columns, in place
    idx.add(gallery[1100:2000], num_threads=1)
    ids, _ = idx.search_ids(gallery[1500], 1, **masked)
    assert ids[0] == 1500 and idx._scan.coded.fitted_rows == 2000


def test_the_int8_scan_is_exact_at_the_codes_extremes():
    """The case that saturates 16-bit pair sums on x86 without VNNI (cmn_edge.cpu): every
    query code 255 or 1, every row code +-CODE_MAX, so onnxruntime must give numpy's
    integers on every CPU. It can fail only where the kernels add pairs in 16 bits (x86
    without VNNI); on a VNNI CPU it passes whatever the codes' range."""
    rng = np.random.default_rng(5)
    codes = rng.choice([-CODE_MAX, CODE_MAX], size=(64, 3000)).astype(np.int8)
    query = rng.choice([1, 255], size=(1, 64)).astype(np.uint8)
    got = _session().run(None, {"query": query, "codes": codes})[0]
    want = query.astype(np.int64) @ codes.astype(np.int64)
    np.testing.assert_array_equal(got, want)


def test_the_shipped_scan_graph_is_the_one_export_builds():
    from cmn_export.scan_graph import SHIPPED, build

    assert SHIPPED.read_bytes() == build(), "run python -m cmn_export.scan_graph"


def test_calibration_tunes_the_walk_and_leaves_the_scan_off(gallery, queries):
    idx = reduced(gallery)
    served(idx)
    walks_cost_a_lot(idx)
    idx.calibrate(queries=queries, target=0.9)
    assert idx._scan is None and not idx._walk_only


@pytest.mark.parametrize("kind", ["random", "sorted", "ties", "short"])
def test_best_keeps_the_largest_scores_whatever_their_order(kind):
    rng = np.random.default_rng(3)
    scores = {
        "random": rng.standard_normal(50000),
        "sorted": np.sort(rng.standard_normal(50000)),  # the threshold falls back
        "ties": np.round(rng.standard_normal(50000), 1),
        "short": rng.standard_normal(100),
    }[kind].astype(np.float32)
    for fetch in (1, 10, 333, 2000, len(scores)):
        got = np.sort(scores[_best(scores, fetch)])
        assert len(got) == min(fetch, len(scores))
        np.testing.assert_array_equal(got, np.sort(scores)[len(scores) - len(got) :])
