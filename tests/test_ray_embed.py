"""``cmn-edge embed --engine ray``: the local command's vectors, from Ray Data actors.

Ray runs on this machine (one local node started once for the module, and a two-node
``ray.cluster_utils.Cluster`` in a child process with a hard timeout). Token authentication,
the dashboard and usage stats are switched off explicitly: a test must not write a token
into HOME or open ports beyond Ray's own.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cmn_edge.cli import main

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
BAD = ["empty.jpg", "truncated.jpg", "corrupt.jpg", "text.jpg", "bomb.png", "missing.jpg"]
RAY_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DISABLE_DOCKER_CPU_WARNING": "1",
    "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
}
#: A bound against a hung cluster (ray #44687), not a timing assertion.
CLUSTER_TIMEOUT = 240


def _ray_installed() -> bool:
    try:
        import pyarrow  # noqa: F401
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


# Ray's own DataContext warns about its own deprecated fields when copied.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")
needs_ray = pytest.mark.skipif(not _ray_installed(), reason='needs pip install ".[scale]"')


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module (2 CPUs, as on the CI machine)."""
    import ray

    saved = {k: os.environ.get(k) for k in RAY_ENV}
    os.environ.update(RAY_ENV)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        yield ray
    finally:
        ray.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _inputs(photos: dict[str, Path]) -> list[Path]:
    """Real photos, every kind of bad file and one photo twice."""
    good = [photos[n] for n in ("cat", "coffee", "rocket", "astronaut", "motorcycle")]
    return [*good[:3], *(DATA / name for name in BAD), *good[3:], good[0]]


def _local_json(paths: list[Path], output: Path) -> dict:
    result = CliRunner().invoke(
        main,
        ["embed", *map(str, paths), "--precision", "int8", "--skip-errors", "-o", str(output)],
    )
    assert result.exit_code == 0, result.output
    return json.loads(output.read_text())


@needs_ray
def test_ray_engine_equals_the_local_embed_and_records_failures(local_ray, photos, tmp_path):
    from cmn_edge.ray_embed import MANIFEST, read_embeddings

    paths = _inputs(photos)
    out = tmp_path / "vectors"
    result = CliRunner().invoke(
        main,
        ["embed", *map(str, paths), "--engine", "ray", "--precision", "int8", "--out", str(out)],
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "part-00000.parquet"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging debris

    table = read_embeddings(out)
    assert table.column_names == ["id", "path", "model", "embedding", "error", "metadata"]
    assert str(table.schema.field("embedding").type) == "fixed_size_list<element: float>[512]"
    rows = table.to_pylist()
    assert [r["id"] for r in rows] == list(range(len(paths)))
    assert [r["path"] for r in rows] == [str(p) for p in paths]

    local = _local_json(paths, tmp_path / "local.json")
    assert {r["model"] for r in rows} == {local["model"]}
    errors = {(r["path"], r["error"]) for r in rows if r["error"] is not None}
    assert errors == {(e["path"], e["error"]) for e in local["errors"]}
    assert len(errors) == len(BAD)
    assert all(r["embedding"] is None for r in rows if r["error"] is not None)
    embedded = [r for r in rows if r["error"] is None]
    assert [r["path"] for r in embedded] == [item["path"] for item in local["items"]]
    ray_vectors = np.asarray([r["embedding"] for r in embedded], np.float32)
    local_vectors = np.asarray([item["embedding"] for item in local["items"]], np.float32)
    np.testing.assert_allclose(ray_vectors, local_vectors, rtol=0, atol=1e-6)

    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["engine"] == "ray" and manifest["precision"] == local["precision"] == "int8"
    assert (manifest["rows"], manifest["errors"]) == (len(paths), len(BAD))
    assert "error: " in result.stderr and f"{len(BAD)} failed" in result.stderr

    # The local engine writes the same folder: the two outputs compare row for row.
    local_out = tmp_path / "local-vectors"
    again = CliRunner().invoke(
        main,
        ["embed", *map(str, paths), "--format", "parquet", "--skip-errors"]
        + ["--precision", "int8", "--out", str(local_out)],
    )
    assert again.exit_code == 0, again.output
    local_rows = read_embeddings(local_out).to_pylist()
    assert [(r["id"], r["path"], r["error"]) for r in local_rows] == [
        (r["id"], r["path"], r["error"]) for r in rows
    ]
    local_parquet = np.asarray([r["embedding"] for r in local_rows if r["error"] is None])
    np.testing.assert_allclose(ray_vectors, local_parquet, rtol=0, atol=1e-6)


@needs_ray
def test_glob_metadata_and_replacing_an_earlier_output(local_ray, photos, tmp_path):
    """A quoted glob is expanded as a folder would be; per-row metadata is stored as JSON;
    a folder this command wrote before is replaced, any other non-empty one refused."""
    from cmn_edge.ray_embed import embed_with_ray, read_embeddings, write_embeddings

    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("cat", "rocket"):
        (folder / f"{name}.jpg").write_bytes(photos[name].read_bytes())
    out = tmp_path / "vectors"
    out.mkdir()
    (out / "stale.txt").write_text("not ours")
    glob_args = ["embed", f"{folder}/*.jpg", "--engine", "ray", "-o", str(out)]
    result = CliRunner().invoke(main, glob_args)
    assert result.exit_code == 1 and "not written by cmn-edge embed" in result.stderr
    assert (out / "stale.txt").exists()

    (out / "stale.txt").unlink()
    out.rmdir()
    earlier = np.ones((1, 512), np.float32)
    write_embeddings(out, ["old.jpg"], earlier, [None], model_id="old@0", precision="fp32")
    paths = [folder / "cat.jpg", folder / "rocket.jpg"]
    meta = {str(paths[1]): {"camera": "door"}}
    job = embed_with_ray(paths, out, precision="int8", threads=1, metadata=meta)
    assert (job.rows, job.embedded, job.errors) == (2, 2, [])
    rows = read_embeddings(out).to_pylist()
    assert [r["path"] for r in rows] == [str(p) for p in paths]
    assert [r["metadata"] for r in rows] == [None, '{"camera": "door"}']
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_failed_write_leaves_no_output(tmp_path, monkeypatch):
    """The staging folder is removed and the earlier output kept when writing fails."""
    pytest.importorskip("pyarrow")
    from cmn_edge import embeddings_folder as folder

    out = tmp_path / "vectors"
    vectors = np.eye(3, 4, dtype=np.float32)
    folder.write_embeddings(
        out, ["a", "b", "c"], vectors, [None, None, "bad"], model_id="m@1", precision="fp32"
    )
    before = sorted(p.name for p in out.iterdir())

    def full_disk(self, table):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(folder.PartWriter, "write", full_disk)
    with pytest.raises(OSError):
        folder.write_embeddings(out, ["d"], vectors[:1], [None], model_id="m@1", precision="fp32")
    assert sorted(p.name for p in out.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["vectors"]
    assert folder.read_embeddings(out)["path"].to_pylist() == ["a", "b", "c"]


def test_a_killed_write_leaves_nothing_the_next_write_does_not_remove(tmp_path):
    """A job killed with -9 while writing its parts, or inside the publish just after the
    swap (the staging folder then holds the *old* output), left a hidden folder the size of
    the output that nothing removed. The next write to the same output removes this
    host's dead ones and keeps a running job's."""
    pytest.importorskip("pyarrow")
    import socket

    from cmn_edge import embeddings_folder as folder

    out = tmp_path / "vectors"
    vectors = np.eye(3, 4, dtype=np.float32)
    staged = folder.staging(out)
    host = socket.gethostname()
    assert staged.name.startswith(f".vectors.new-{os.getpid()}@{host}-")
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    dead = tmp_path / f".vectors.new-{ended.pid}@{host}-0000abcd"
    other_host = tmp_path / f".vectors.new-{ended.pid}@another-host-0000abcd"
    for debris in (dead, other_host):
        debris.mkdir()
        (debris / "part-00000.parquet").write_bytes(b"x" * 1000)
    folder.write_embeddings(
        out, ["a", "b", "c"], vectors, [None] * 3, model_id="m@1", precision="fp32"
    )
    assert not dead.exists()
    assert staged.is_dir() and other_host.is_dir()  # this process's, and a share's
    assert folder.read_embeddings(out)["path"].to_pylist() == ["a", "b", "c"]


MISSING_EXTRA = textwrap.dedent(
    """
    import sys

    class NoRay:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "ray":
                raise ImportError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, NoRay())
    from click.testing import CliRunner
    from cmn_edge.cli import main

    local = CliRunner().invoke(main, ["embed", sys.argv[1], "--format", "npy", "-o", sys.argv[2]])
    assert local.exit_code == 0, local.output
    assert not [m for m in sys.modules if m.split(".")[0] == "ray"], "local embed imported ray"
    args = ["embed", sys.argv[1], "--engine", "ray", "--out", sys.argv[3]]
    result = CliRunner().invoke(main, args)
    print(result.exit_code)
    print(result.stderr, end="")
    """
)


def test_missing_extra_is_one_line_naming_it(photos, tmp_path):
    """Without Ray the local engine still works (and never imports it); --engine ray exits 1
    with the install command."""
    completed = subprocess.run(
        [sys.executable, "-c", MISSING_EXTRA, str(photos["cat"])]
        + [str(tmp_path / "v.npy"), str(tmp_path / "vectors")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    status, *lines = completed.stdout.splitlines()
    assert status == "1" and len(lines) == 1, completed.stdout
    assert lines[0].startswith("error: ") and 'pip install "cmn-edge[scale]"' in lines[0]
    assert not (tmp_path / "vectors").exists()


TWO_NODES = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path

    import numpy as np
    from click.testing import CliRunner
    from ray.cluster_utils import Cluster

    from cmn_edge import Embedder
    from cmn_edge.cli import main
    from cmn_edge.ray_embed import read_embeddings

    paths, out = [Path(p) for p in sys.argv[2:]], Path(sys.argv[1])
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False}
    )
    cluster.add_node(num_cpus=1)
    try:
        # The command joins the cluster by its address. Two actors of 0.75 CPU cannot share
        # a 1-CPU node: each node runs one.
        args = ["embed", *map(str, paths), "--engine", "ray", "--ray-address", cluster.address]
        args += ["--ray-actors", "2", "--threads", "1", "--precision", "int8", "--out", str(out)]
        result = CliRunner().invoke(main, args)
        nodes = len(cluster.list_all_nodes())
    finally:
        cluster.shutdown()
    assert result.exit_code == 0, result.output
    table = read_embeddings(out)
    local = Embedder(precision="int8", threads=1).embed(paths)
    got = np.asarray(table["embedding"].to_pylist(), np.float32)
    print(json.dumps({"nodes": nodes, "rows": table.num_rows,
                      "errors": table["error"].drop_null().to_pylist(),
                      "max_diff": float(np.abs(got - local).max())}))
    """
)


@needs_ray
def test_two_node_cluster_gives_the_local_vectors(photos, tmp_path):
    """A head and a worker node on this machine, two actors; killed after CLUSTER_TIMEOUT."""
    paths = [photos[n] for n in ("cat", "coffee", "rocket", "astronaut", "motorcycle")]
    env = {**os.environ, **RAY_ENV}
    child = subprocess.Popen(
        [sys.executable, "-c", TWO_NODES, str(tmp_path / "vectors"), *map(str, paths)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: a timeout kills Ray's daemons too
    )
    try:
        stdout, stderr = child.communicate(timeout=CLUSTER_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.communicate()
        pytest.fail(f"the two-node job did not finish in {CLUSTER_TIMEOUT} s")
    assert child.returncode == 0, stderr[-3000:]
    report = json.loads(stdout.strip().splitlines()[-1])
    assert report["nodes"] == 2 and report["rows"] == len(paths) and report["errors"] == []
    assert report["max_diff"] <= 1e-6
