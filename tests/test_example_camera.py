"""The camera watcher example as a real subprocess on a real folder of real photos.

Frames arrive as a capture tool writes them: one whole, one in two halves with a pause, one
truncated for good. The watcher must index each good frame once, report watch-list matches
with the index's concept-masked score, log the corrupt frame and go on, and after a restart
skip what it already indexed.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
WATCH = ROOT / "examples" / "camera" / "watch.py"
WAIT = 180  # seconds; only ever a ceiling: the CPU is shared with training runs


class Watcher:
    """A running watch.py and its log file."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.log = log
        self._out = open(log, "a")
        self.process = subprocess.Popen(
            [sys.executable, str(WATCH), *args],
            stdout=self._out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        self.start = 0  # log offset: wait_for only looks at lines written after it

    def text(self) -> str:
        return self.log.read_text()[self.start :]

    def wait_for(self, pattern: str, count: int = 1) -> list[re.Match]:
        deadline = time.monotonic() + WAIT
        while True:
            found = list(re.finditer(pattern, self.text(), re.MULTILINE))
            if len(found) >= count:
                return found
            if self.process.poll() is not None or time.monotonic() > deadline:
                state = (
                    f"exited {self.process.returncode}"
                    if self.process.poll() is not None
                    else "still running"
                )
                pytest.fail(
                    f"no {count} x /{pattern}/ in the watcher's log ({state}):\n{self.text()}"
                )
            time.sleep(0.1)

    def stop(self, signum: int) -> int:
        self.process.send_signal(signum)
        try:
            return self.process.wait(timeout=WAIT)
        finally:
            if self.process.poll() is None:
                self.process.kill()
            self._out.close()


@pytest.fixture
def watchers():
    started: list[Watcher] = []

    def start(args: list[str], log: Path) -> Watcher:
        watcher = Watcher(args, log)
        started.append(watcher)
        return watcher

    yield start
    for watcher in started:
        if watcher.process.poll() is None:
            watcher.process.kill()
            watcher.process.wait()
        watcher._out.close()


def write_slowly(source: Path, target: Path, watcher: Watcher) -> None:
    """Write half the file, wait until the watcher has tried (and failed) to read it, finish.

    Driven by events, not by a race against the clock: the watcher is paused (SIGSTOP) from
    the moment it has logged its failed read until the file is complete, so however slow
    this machine is, the watcher next sees the finished file. (It gives a frame up only
    after two failed reads of the same version, ``--settle`` seconds apart at least.)
    """
    data = source.read_bytes()
    with open(target, "wb") as out:
        out.write(data[: len(data) // 2])
        out.flush()
        watcher.wait_for(rf"not readable yet: {re.escape(target.name)} ")
        watcher.process.send_signal(signal.SIGSTOP)
        try:
            out.write(data[len(data) // 2 :])
        finally:
            out.close()
            watcher.process.send_signal(signal.SIGCONT)


def match_score(watcher: Watcher, frame: str, reference: str) -> float:
    line = watcher.wait_for(
        rf"MATCH {re.escape(frame)} ~ {re.escape(reference)} score (-?[0-9.]+)"
    )[0]
    return float(line.group(1))


def indexed_paths(index_dir: Path) -> list[str]:
    from cmn_edge.index import ConceptIndex

    index = ConceptIndex.load(index_dir)
    return [index.item(i)[0] for i in index.ids]


def test_watcher_survives_partial_and_corrupt_frames_and_restarts(
    tmp_path: Path, photos: dict[str, Path], embedder, watchers
) -> None:
    from cmn_edge.index import ConceptIndex

    frames, reference, index_dir = tmp_path / "frames", tmp_path / "watch", tmp_path / "index"
    frames.mkdir()
    reference.mkdir()
    shutil.copy(photos["cat"], reference / "cat.jpg")

    # An index whose strongest concept in the cat photo is named "background", so the
    # watcher's --ignore-concept goes through a name, as a user would write it.
    cat, coffee = embedder.embed([photos["cat"], photos["coffee"]])
    background = int(np.argmax(np.abs(cat)))
    index = ConceptIndex.for_embedder(embedder, precision="int8")
    index.set_concept_name(background, "background")
    index.save(index_dir)
    # With concept c ignored, a frame identical to a reference scores (q*w).q = 1 - q_c^2.
    expected_cat = 1.0 - float(cat[background]) ** 2
    expected_coffee = 1.0 - float(coffee[background]) ** 2
    threshold = round(min(expected_cat, expected_coffee) - 0.05, 3)
    assert expected_cat < 0.9995  # the ignored concept visibly changes the score

    args = [
        str(frames),
        "--index",
        str(index_dir),
        "--watch",
        str(reference),
        "--threshold",
        str(threshold),
        "--ignore-concept",
        "background",
        "--interval",
        "0.1",
        "--settle",
        "2",
        "--give-up",
        "4",
        "--threads",
        "2",
    ]
    first = watchers(args, tmp_path / "watch-1.log")
    first.wait_for(r"watching .* watch list: 1; .* ignoring concepts: background")

    shutil.copy(photos["coffee"], frames / "0001-coffee.jpg")
    first.wait_for(r"added 0001-coffee\.jpg as item \d+")

    write_slowly(photos["cat"], frames / "0002-cat.jpg", first)
    assert match_score(first, "0002-cat.jpg", "cat.jpg") == pytest.approx(expected_cat, abs=2e-3)

    data = photos["rocket"].read_bytes()
    (frames / "0003-broken.jpg").write_bytes(data[: len(data) // 3])  # never finished
    first.wait_for(r"CORRUPT 0003-broken\.jpg: .*truncated")
    assert first.process.poll() is None, "a corrupt frame stopped the watcher"

    shutil.copy(photos["rocket"], frames / "0004-rocket.jpg")
    first.wait_for(r"added 0004-rocket\.jpg as item \d+ \(committed; 3 items\)")
    assert first.stop(signal.SIGTERM) == 0
    assert "stopped (SIGTERM)" in first.text()
    log = first.text()
    assert "Traceback" not in log
    assert "CORRUPT 0002-cat.jpg" not in log and "added 0003-broken" not in log
    assert len(re.findall(r"added 0002-cat\.jpg", log)) == 1

    paths = indexed_paths(index_dir)
    names = sorted(Path(p).name for p in paths)
    assert names == ["0001-coffee.jpg", "0002-cat.jpg", "0004-rocket.jpg"]
    coffee_path = str((frames / "0001-coffee.jpg").resolve())
    coffee_id = ConceptIndex.load(index_dir).id_for_path(coffee_path)
    assert coffee_id is not None

    # Restart over the same folder, now also watching for an item of the index by id.
    second = watchers([*args, "--watch-id", str(coffee_id)], tmp_path / "watch-2.log")
    second.wait_for(r"skipped 3 frame\(s\) already in the index")
    second.wait_for(r"watch list: 2;")
    shutil.copy(photos["coffee"], frames / "0005-coffee.jpg")
    score = match_score(second, "0005-coffee.jpg", f"#{coffee_id} 0001-coffee.jpg")
    assert score == pytest.approx(expected_coffee, abs=2e-3)
    second.wait_for(r"CORRUPT 0003-broken\.jpg")  # looked at again, still corrupt, still alive
    second.wait_for(r"added 0005-coffee\.jpg as item \d+ \(committed; 4 items\)")
    assert second.stop(signal.SIGINT) == 0
    log = second.text()
    assert "Traceback" not in log
    for old in ("0001-coffee", "0002-cat", "0004-rocket"):
        assert f"added {old}" not in log

    paths = indexed_paths(index_dir)
    assert len(paths) == len(set(paths)) == 4
    assert sorted(Path(p).name for p in paths) == [
        "0001-coffee.jpg",
        "0002-cat.jpg",
        "0004-rocket.jpg",
        "0005-coffee.jpg",
    ]


def test_watcher_refuses_an_unknown_concept_name_in_one_line(tmp_path: Path, embedder) -> None:
    from cmn_edge.index import ConceptIndex

    frames = tmp_path / "frames"
    frames.mkdir()
    ConceptIndex.for_embedder(embedder, precision="int8").save(tmp_path / "index")
    done = subprocess.run(
        [
            sys.executable,
            str(WATCH),
            str(frames),
            "--index",
            str(tmp_path / "index"),
            "--ignore-concept",
            "sky",
            "--threads",
            "2",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=WAIT,
    )
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert "unknown concept name 'sky'" in lines[0]


def test_watcher_and_another_program_change_the_index_at_once(
    tmp_path: Path, photos: dict[str, Path], watchers
) -> None:
    """Someone names a concept and searches while the watcher adds: everyone's changes stay,
    nobody errs, and a watcher killed with SIGKILL loses nothing it had committed."""
    from cmn_edge.index import ConceptIndex

    frames, index_dir = tmp_path / "frames", tmp_path / "index"
    frames.mkdir()
    args = [
        str(frames),
        "--index",
        str(index_dir),
        "--interval",
        "0.1",
        "--settle",
        "0.3",
        "--threads",
        "2",
    ]
    first = watchers(args, tmp_path / "watch-1.log")
    first.wait_for(r"watching ")
    shutil.copy(photos["coffee"], frames / "0001-coffee.jpg")
    first.wait_for(r"added 0001-coffee\.jpg as item \d+ \(committed; 1 items\)")

    cli = [sys.executable, "-c", "from cmn_edge.cli import main; main()"]
    named = subprocess.run(
        [*cli, "index", "name-concept", "--index", str(index_dir), "5", "background"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=WAIT,
    )
    assert named.returncode == 0, named.stderr
    shutil.copy(photos["cat"], frames / "0002-cat.jpg")
    first.wait_for(r"added 0002-cat\.jpg as item \d+ \(committed; 2 items\)")
    found = subprocess.run(
        [
            *cli,
            "search",
            str(photos["cat"]),
            "--index",
            str(index_dir),
            "-k",
            "1",
            "--json",
            "--threads",
            "2",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=WAIT,
    )
    assert found.returncode == 0, found.stderr
    assert "0002-cat.jpg" in found.stdout
    first.process.kill()  # SIGKILL: no shutdown code runs
    first.process.wait(timeout=WAIT)
    index = ConceptIndex.load(index_dir)
    assert index.concept_names == {5: "background"}  # theirs survived
    assert sorted(Path(index.item(i)[0]).name for i in index.ids) == [
        "0001-coffee.jpg",
        "0002-cat.jpg",
    ]
    assert index.verify() == []

    # A restart skips what is there and goes on.
    second = watchers([*args, "--ignore-concept", "background"], tmp_path / "watch-2.log")
    second.wait_for(r"skipped 2 frame\(s\) already in the index")
    shutil.copy(photos["rocket"], frames / "0003-rocket.jpg")
    second.wait_for(r"added 0003-rocket\.jpg as item \d+ \(committed; 3 items\)")
    assert second.stop(signal.SIGTERM) == 0
    assert "Traceback" not in second.text()
