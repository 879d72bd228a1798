"""The index on disk: changes cost what they change, a kill loses nothing committed, readers
in other processes never fail while a writer adds, calibration follows the data, a full
disk is one clean error. Real processes throughout; bounded in time, never timed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from cmn_edge.index import ConceptIndex, ConceptIndexError, Index

ROOT = Path(__file__).resolve().parent.parent
DIM = 64
WAIT = 300  # seconds; a ceiling only (the CPU is shared)


def clustered(n: int, seed: int, dim: int = DIM, clusters: int = 40) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[rng.integers(clusters, size=n)] + 0.35 * rng.standard_normal((n, dim)) / 8
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def python(code: str, *args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        **kwargs,
    )


def written_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def test_an_add_writes_what_it_adds_not_the_index(tmp_path):
    """Bytes that reach the directory for one add: the same at 200 and at 4,000 items."""
    folder = tmp_path / "grow.idx"
    index = ConceptIndex(DIM, "m@1", exact_below=0)
    index.add(clustered(4000, 1), [f"p{i}" for i in range(4000)])
    index.save(folder)
    index = ConceptIndex.open(folder)
    graph_before = {p.name: p.stat().st_mtime_ns for p in folder.glob("graph-*")}
    vectors_before = {p.name: p.stat().st_mtime_ns for p in folder.glob("vectors-*")}
    pid = os.getpid()

    def wchar() -> int:
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("wchar:"):
                return int(line.split()[1])
        raise AssertionError("no wchar in /proc/self/io")

    start = wchar()
    for i in range(20):
        index.add(clustered(1, 100 + i), [f"new{i}"])
    per_add = (wchar() - start) / 20
    # a 4,000 x 64 graph alone is ~2 MB; one add writes a few SQLite pages (WAL)
    assert per_add < 64 * 1024, per_add
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("graph-*")} == graph_before
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("vectors-*")} == vectors_before
    # the tail is searched exactly and merged: every new item is found at once
    reader = ConceptIndex.load(folder)
    for i in range(20):
        assert reader.search_ids(clustered(1, 100 + i)[0], 1)[0][0] == 4000 + i
    assert reader.manifest()["counts"]["tail"] == 20


def test_the_tail_is_checkpointed_automatically_and_readers_follow(tmp_path):
    folder = tmp_path / "auto.idx"
    data = clustered(3000, 2)
    index = ConceptIndex(DIM, "m@1", exact_below=0, checkpoint_every=200)
    index.add(data[:1000])
    index.save(folder)
    reader = ConceptIndex.load(folder)
    writer = ConceptIndex.open(folder)
    for start in range(1000, 3000, 50):
        writer.add(data[start : start + 50])
        assert reader.search_ids(data[start + 7], 1)[0][0] == start + 7  # follows at once
    gen = writer.manifest()["checkpoint"]["gen"]
    assert gen >= 8  # 2,000 adds, a checkpoint every 200
    assert reader.manifest()["counts"]["tail"] <= 200
    # old checkpoints' files are cleared (the current and the previous one stay for readers)
    assert len(list(folder.glob("graph-*.bin"))) <= 2
    assert reader.verify() == []


def test_calibration_follows_the_gallery_as_it_grows(tmp_path):
    """Grown from 500 to 8,000 through add, the index re-tunes itself at each doubling (or
    sooner, when a check finds the depth short) and keeps masked recall@10 at the target."""
    folder = tmp_path / "tune.idx"
    data = clustered(8300, 3)
    index = ConceptIndex(
        DIM, "m@1", exact_below=0, ef=8, M=8, ef_construction=40, checkpoint_every=500
    )
    index.add(data[:500], num_threads=1)
    index.save(folder)
    writer = ConceptIndex.open(folder)
    tuned = []
    for start in range(500, 8000, 250):
        writer.add(data[start : start + 250], num_threads=1)
        tuned.append(writer._state()["tuned_at"])
    steps = sorted(set(tuned) - {0})
    # never more than a doubling (and the checkpoint that notices it) without a tuning
    assert len(steps) >= 3 and all(b <= 2 * a + 500 + 250 for a, b in zip(steps, steps[1:]))
    assert steps[-1] * 2 + 750 > 8000
    done = writer.optimize()  # and on demand
    assert done["calibration"]["queries"] > 0
    fresh = data[8000:]
    reader = ConceptIndex.load(folder)
    assert reader.ef > 8  # the depth rose with the graph
    assert reader.recall(fresh) >= 0.97
    assert reader.recall(fresh, exclude=list(range(0, DIM, 2))) >= 0.95


def _tuned_then_grown(tmp_path, grow: int) -> tuple[ConceptIndex, np.ndarray]:
    """An index tuned at 2,000 items that then took ``grow`` more, not yet checkpointed;
    and 100 fresh items from the same clusters."""
    data = clustered(2100 + grow, 4)
    index = ConceptIndex.create(
        tmp_path / "idx", DIM, "m@1", exact_below=0, ef=8, M=8, ef_construction=40
    )
    index.auto_checkpoint = False
    index.add(data[:2000], num_threads=1)
    index.checkpoint(retune=True)
    assert index._state()["tuned_at"] == 2000
    index.add(data[2000:-100], num_threads=1)
    return index, data[-100:]


def test_a_checkpoint_checks_the_tuned_depth_between_doublings(tmp_path):
    """Grown by a quarter, the graph is checked against the target on the new items (which
    join it afterwards); a depth that still reaches it is kept, and the check is recorded."""
    index, _ = _tuned_then_grown(tmp_path, 600)
    index.ef = 200  # deep enough for any graph of this size
    before = (index.ef, index.mask_ef_power, index.renorm_ef_power)
    done = index.checkpoint()
    check = done["check"]
    assert check["ok"] and check["queries"] == 120 and "calibration" not in done
    assert check["recall"] >= 0.98 and set(check["masked_recall"]) == {
        "0.1",
        "0.1 renormalized",
        "0.5",
        "0.5 renormalized",
    }
    state = index._state()
    assert state["tuned_at"] == 2000 and state["checked_at"] == 2600
    assert index.manifest()["checkpoint"]["checked_at"] == 2600  # `index info` shows it
    assert (index.ef, index.mask_ef_power, index.renorm_ef_power) == before
    assert len(index) == 2600 and index.manifest()["counts"]["tail"] == 0
    assert "check" not in index.checkpoint()  # not again until it grows another quarter


def test_a_depth_that_falls_short_of_the_target_is_tuned_again_before_the_doubling(tmp_path):
    """What the check is for: a walk too shallow for the grown graph is re-tuned at once
    instead of serving below the target until the gallery doubles."""
    index, fresh = _tuned_then_grown(tmp_path, 600)
    index.ef, index.mask_ef_power, index.renorm_ef_power = 1, 0.0, 0.0  # far too shallow
    done = index.checkpoint()
    assert not done["check"]["ok"] and done["calibration"]["queries"] == 120
    assert index.ef > 1 and index._state()["tuned_at"] == 2600
    reader = ConceptIndex.load(tmp_path / "idx")
    assert reader.ef == index.ef  # the new depth is what the checkpoint wrote
    assert reader.recall(fresh) >= 0.97


WRITER = """
    import sys, numpy as np
    from cmn_edge.index import ConceptIndex
    folder, batches = sys.argv[1], int(sys.argv[2])
    index = ConceptIndex.open(folder)
    rng = np.random.default_rng(7)
    for b in range(batches):
        x = rng.standard_normal((25, index.num_concepts)).astype(np.float32)
        index.add(x, [f"w{b}-{i}" for i in range(25)])
        print("committed", len(index), flush=True)
"""

READER = """
    import sys, numpy as np
    from pathlib import Path
    from cmn_edge.index import ConceptIndex
    folder, done = sys.argv[1], Path(sys.argv[2])
    index = ConceptIndex.load(folder)
    rng = np.random.default_rng(int(sys.argv[3]))
    searches, last = 0, 0
    while not done.exists():
        q = rng.standard_normal(index.num_concepts).astype(np.float32)
        hits = index.search(q, 5, where={"kind": "seed"} if searches % 3 == 0 else None)
        assert hits and all(h.path for h in hits), hits
        n = len(index)
        assert n >= last, (n, last)  # never goes back
        last, searches = n, searches + 1
        if searches % 10 == 0:
            index = ConceptIndex.load(folder)  # cold opens too, mid-checkpoint or not
    print("searches", searches, "saw", last, flush=True)
"""


def test_readers_never_fail_while_a_writer_adds(tmp_path):
    """Three reader processes search (and re-open) while a writer process adds 1,500 items
    in 60 commits with a checkpoint every 150: no reader ever errs."""
    folder = tmp_path / "shared.idx"
    index = ConceptIndex(DIM, "m@1", exact_below=0, checkpoint_every=150)
    index.add(clustered(500, 4), [f"s{i}" for i in range(500)], [{"kind": "seed"}] * 500)
    index.save(folder)
    done = tmp_path / "done"
    readers = [python(READER, folder, done, seed) for seed in range(3)]
    writer = python(WRITER, folder, 60)
    try:
        out, err = writer.communicate(timeout=WAIT)
        assert writer.returncode == 0, err
        assert out.splitlines()[-1] == "committed 2000"
    finally:
        done.touch()
    for reader in readers:
        out, err = reader.communicate(timeout=WAIT)
        assert reader.returncode == 0, err
        searches = int(out.split()[1])
        assert searches > 0
    final = ConceptIndex.load(folder)
    assert len(final) == 2000 and final.manifest()["checkpoint"]["gen"] >= 8
    assert final.verify() == []


PAUSING_WRITER = """
    import os, sys, time, numpy as np
    from cmn_edge.index import ConceptIndex
    folder, mode = sys.argv[1], sys.argv[2]
    index = ConceptIndex.open(folder)
    rng = np.random.default_rng(11)
    for b in range(3):  # three batches committed in full
        index.add(rng.standard_normal((40, index.num_concepts)).astype(np.float32),
                  [f"ok{b}-{i}" for i in range(40)])
        print("committed", len(index), flush=True)
    conn = index._store.conn
    gen = index._store.checkpoint().gen

    def pause():
        # SQLite calls this between virtual-machine steps of the statement under way:
        # the transaction is open and part-written. Say so, then wait to be killed.
        if mode == "checkpoint" and not os.path.exists(f"{folder}/graph-{gen + 1:06d}.bin"):
            return 0
        print("paused mid-write", flush=True)
        time.sleep(600)
        return 0

    if mode == "batch":
        calls = [0]
        def after_some_rows():
            calls[0] += 1
            return pause() if calls[0] > 50 else 0  # well inside the batch's inserts
        conn.set_progress_handler(after_some_rows, 100)
        index.add(rng.standard_normal((400, index.num_concepts)).astype(np.float32),
                  [f"lost-{i}" for i in range(400)])
    else:
        index.add(rng.standard_normal((30, index.num_concepts)).astype(np.float32),
                  [f"tail-{i}" for i in range(30)])
        print("committed", len(index), flush=True)
        conn.set_progress_handler(pause, 1)  # pauses once the new graph file is written
        index.checkpoint()
    print("finished without a pause", flush=True)
"""


@pytest.mark.parametrize("mode", ["batch", "checkpoint"])
def test_kill_9_mid_write_loses_nothing_committed(tmp_path, mode):
    """SIGKILL a writer at a point the test controls: inside a batch's transaction, or
    inside a checkpoint after its new graph file is on disk but before it is recorded.
    The index opens and holds exactly the committed items."""
    folder = tmp_path / "kill.idx"
    start = ConceptIndex(DIM, "m@1", exact_below=0)
    start.add(clustered(300, 5), [f"s{i}" for i in range(300)])
    start.save(folder)
    child = python(PAUSING_WRITER, folder, mode)
    committed = 300
    lines = []
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        line = child.stdout.readline()
        if not line:
            break
        lines.append(line.strip())
        if line.startswith("committed"):
            committed = int(line.split()[1])
        if line.startswith("paused mid-write"):
            break
    assert lines and lines[-1] == "paused mid-write", (lines, child.stderr.read())
    child.send_signal(signal.SIGKILL)
    child.communicate(timeout=WAIT)
    assert child.returncode == -signal.SIGKILL
    if mode == "checkpoint":
        assert (folder / "graph-000002.bin").exists()  # written, never recorded
    index = ConceptIndex.load(folder)
    assert len(index) == committed == (420 if mode == "batch" else 450)
    paths = {index.item(i)[0] for i in index.ids}
    assert not any(p.startswith("lost-") for p in paths)
    assert index.manifest()["checkpoint"]["gen"] == 1  # the kill undid the checkpoint
    assert index.verify() == []
    probe = index.id_for_path("ok2-39")
    assert index.search_ids(index.embedding(probe), 1)[0][0] == probe
    index.add(clustered(1, 6), ["after"])  # and it takes changes again
    assert ConceptIndex.open(folder).save() == folder
    assert not (folder / "graph-000002.bin").exists() or index.manifest()["checkpoint"]["gen"] == 2


def test_the_python_api(tmp_path, embedder, labelled_folder, photos):
    folder = tmp_path / "api.idx"
    index = Index.create(folder, embedder=embedder, exact_below=0)
    report = index.sync(labelled_folder)
    assert (report.added, report.removed, report.skipped) == (15, 0, [])
    cat = labelled_folder / "cat" / "original.jpg"
    hits = index.search(cat, k=3)
    assert hits[0].path == str(cat.resolve()) and hits[0].score == pytest.approx(1, abs=1e-4)
    vector = embedder.embed(photos["rocket"])
    [new] = index.add(vector, paths=[photos["rocket"]], metadata=[{"label": "rocket"}])
    assert index.search(vector[0], k=1, where={"label": "rocket"})[0].id == new
    masked = index.search(cat, k=2, exclude=[0, 1], weights={5: 2.0})
    assert len(masked) == 2
    index.remove([photos["rocket"]])
    assert new not in index and len(index) == 15
    again = Index.open(folder)  # the model comes from the index itself
    assert again.search(cat, k=1)[0].path == str(cat.resolve())
    assert again.embedder.model_id == embedder.model_id


def test_the_python_api_refuses_a_sync_that_would_empty_the_index(
    tmp_path, embedder, labelled_folder
):
    """An unmounted drive is an empty folder: Index.sync removed every item (only the CLI
    refused it)."""
    index = Index.create(tmp_path / "api.idx", embedder=embedder, exact_below=0)
    assert index.sync(labelled_folder).added == 15
    mount_point = tmp_path / "unmounted"
    mount_point.mkdir()
    with pytest.raises(ConceptIndexError, match="no images found; syncing would remove all 15"):
        index.sync(mount_point)
    assert len(Index.open(tmp_path / "api.idx")) == 15
    kept = index.sync(mount_point, remove_missing=False)  # asked for: nothing is removed
    assert (kept.added, kept.removed, len(index)) == (0, 0, 15)


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs: a real full disk (root only; the CI runs as root)."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_full_disk_during_build_is_one_line_and_leaves_an_index_that_opens(
    small_disk, tmp_path, photos
):
    gallery = tmp_path / "many"
    gallery.mkdir()
    for i in range(400):  # enough to fill 3 MiB with vectors, WAL and graph
        src = list(photos.values())[i % len(photos)]
        (gallery / f"{i:04d}.jpg").write_bytes(src.read_bytes())
    target = small_disk / "idx"
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "from cmn_edge.cli import main; main()",
            "index",
            "build",
            str(gallery),
            "--index",
            str(target),
            "--threads",
            "2",
            "--batch-size",
            "16",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=WAIT,
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "No space left on device" in lines[0]
    if (target / "index.db").exists():  # what was committed opens, whole
        index = ConceptIndex.open(target)
        assert 0 < len(index) <= 400  # the disk filled in a commit, or at the checkpoint
        assert index.verify() == []


def test_a_long_lived_reader_folds_a_large_tail_into_its_own_graph(tmp_path):
    folder = tmp_path / "soft.idx"
    data = clustered(2000, 8)
    index = ConceptIndex(DIM, "m@1", exact_below=0)
    index.add(data[:1000])
    index.save(folder)
    writer = ConceptIndex.open(folder)
    writer.auto_checkpoint = False
    writer.add(data[1000:2000])
    before = sorted(p.name for p in folder.iterdir())
    reader = ConceptIndex.load(folder)
    assert reader.manifest()["counts"]["tail"] == 1000  # scanned exactly at first
    for i in range(150):
        assert reader.search_ids(data[1000 + i], 1)[0][0] == 1000 + i
    assert reader.manifest()["counts"]["tail"] == 0  # now in its own in-memory graph
    assert sorted(p.name for p in folder.iterdir()) == before  # nothing written
    assert reader.search_ids(data[1999], 1)[0][0] == 1999


def test_the_vector_file_is_mapped_read_only_and_whole(tmp_path):
    """The checkpoint's rows come back bit for bit, without a copy, and cannot be written."""
    from cmn_edge.index.vectors import map_rows

    rows = np.random.default_rng(0).standard_normal((37, 8)).astype(np.float32)
    path = tmp_path / "vectors-000001.f32"
    rows.tofile(path)
    with open(path, "ab") as handle:
        handle.write(b"\0" * 64)  # a killed append beyond the recorded rows is not read
    mapped = map_rows(path, 37, 8)
    assert mapped.shape == (37, 8) and mapped.dtype == np.float32
    assert np.array_equal(mapped, rows) and not mapped.flags.owndata
    with pytest.raises(ValueError):
        mapped[0, 0] = 1.0
    assert map_rows(path, 0, 8).shape == (0, 8)


def test_a_graph_rebuilt_in_new_directions_is_tuned_again(tmp_path):
    """Tuning followed growth only: a graph rebuilt when its --graph-dims projection was
    first fitted (or refitted) kept the depth tuned on the graph before it."""
    index = ConceptIndex.create(tmp_path / "idx", DIM, "m@1", exact_below=0, graph_dims=32)
    index.auto_checkpoint = False
    index.add(clustered(150, 1), num_threads=1)
    index.checkpoint()
    assert index._projection is None and index._state()["tuned_at"] == 150
    index.add(clustered(130, 2), num_threads=1)  # 280: past the fit threshold, not doubled
    done = index.checkpoint()
    assert index._projection is not None and done.get("refit")
    assert "calibration" in done and index._state()["tuned_at"] == 280
