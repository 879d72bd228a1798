"""The shared gallery in PostgreSQL + pgvector, against a real server (never a mock).

A session fixture initdb's a throwaway cluster on 127.0.0.1 (:mod:`pg_cluster`). Without the
server binaries or pgvector the tests FAIL, naming ``.ci/postgres.sh``: they never skip.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from pg_cluster import Cluster, SetupMissing

from cmn_edge.cli import main as cli_main
from cmn_edge.index import ConceptIndex, Index, ModelMismatchError
from cmn_edge.postgres import PgGallery, PostgresError, export_index

ROOT = Path(__file__).resolve().parent.parent
C = 512


@pytest.fixture(scope="session")
def pg_url() -> str:
    try:
        cluster = Cluster()
    except SetupMissing as exc:
        pytest.fail(str(exc), pytrace=False)
    with cluster as url:
        yield url


def clustered(n: int, seed: int, classes: int = 60) -> np.ndarray:
    """Unit vectors drawn like the bundled model's embeddings of a real test split: a shared
    mean direction (norm 0.74), a power-law spectrum (variance of component i ~ 1/(i+1)),
    45% of the variance between classes (the figures of cub100's test split)."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(np.random.default_rng(0).standard_normal((C, C)))[0].astype(np.float32)
    mean = 0.74 * basis[0]
    scale = 1.0 / np.sqrt(np.arange(1, C + 1, dtype=np.float32))
    scale *= np.sqrt((1 - 0.74**2) / float(np.sum(scale**2)))

    def draw(m: int, share: float) -> np.ndarray:
        return (rng.standard_normal((m, C)).astype(np.float32) * scale * np.sqrt(share)) @ basis

    centres = mean + draw(classes, 0.45)
    x = centres[rng.integers(classes, size=n)] + draw(n, 0.55)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def local_index(vectors: np.ndarray, model_id: str = "test@1") -> ConceptIndex:
    index = ConceptIndex(C, model_id)
    meta = [{"camera": f"cam{i % 4}", "site": "a" if i % 3 else "b"} for i in range(len(vectors))]
    index.add(vectors, [f"/photos/{i}.jpg" for i in range(len(vectors))], meta)
    index.set_concept_name(7, "fur")
    return index


CONTROLS = [
    {},
    {"exclude": [3]},
    {"exclude": ["fur", 11, 12]},
    {"only": list(range(0, C, 2))},
    {"weights": {"fur": 3.0, 5: 0.0}},
    {"exclude": list(range(100)), "renormalize": True},
    {"where": {"camera": "cam1"}},
    {"exclude": list(range(256)), "where": {"camera": "cam2", "site": "a"}},
]


@pytest.mark.parametrize("force_graph", [False, True], ids=["exact", "hnsw"])
def test_export_then_search_equals_local_exact_search(pg_url: str, force_graph: bool) -> None:
    vectors = clustered(600, seed=1)
    index = local_index(vectors)
    summary = export_index(index, pg_url, table="equal", replace=True)
    assert summary["items"] == 600 and summary["model"] == "test@1"
    queries = clustered(5, seed=2)
    with PgGallery.connect(pg_url, "equal") as gallery:
        assert gallery.concept_names == {7: "fur"} and gallery.num_concepts == C
        if force_graph:
            gallery.exact_below = 0
        for controls in CONTROLS:
            for q in queries:
                want = index.search(q, 10, exact=True, **controls)
                got = gallery.search(q, 10, **controls)
                assert [h.id for h in got] == [h.id for h in want], controls
                # re-scored by the local index's own code (BLAS may sum a block differently)
                assert [h.score for h in got] == pytest.approx([h.score for h in want], abs=1e-6)
                assert [(h.path, h.metadata) for h in got] == [(h.path, h.metadata) for h in want]
            assert gallery.last_plan.method == ("hnsw" if force_graph else "exact")


@pytest.fixture(scope="module")
def recall_gallery(pg_url: str):
    vectors = clustered(6000, seed=3)
    index = local_index(vectors)
    export_index(index, pg_url, table="recall", replace=True)
    with PgGallery.connect(pg_url, "recall") as gallery:
        gallery.exact_below = 0  # every query through the HNSW unless the plan says otherwise
        yield index, gallery


@pytest.mark.parametrize("masked", [1, 51, 256], ids=["one", "10pct", "50pct"])
@pytest.mark.parametrize("where", [None, {"camera": "cam1"}], ids=["all", "where"])
def test_masked_recall_against_exact(recall_gallery, masked: int, where) -> None:
    index, gallery = recall_gallery
    rng = np.random.default_rng(masked)
    queries = clustered(40, seed=4 + masked)
    recalls, methods = [], set()
    for q in queries:
        exclude = rng.choice(C, masked, replace=False).tolist()
        truth = {h.id for h in index.search(q, 10, exclude=exclude, where=where, exact=True)}
        got = {h.id for h in gallery.search(q, 10, exclude=exclude, where=where)}
        recalls.append(len(got & truth) / 10)
        methods.add(gallery.last_plan.method)
        if where:
            assert gallery.last_plan.method == "exact" or (
                gallery.last_plan.iterative_scan == "relaxed_order"
            )
    assert np.mean(recalls) >= 0.98, (masked, where, np.mean(recalls), methods)
    if masked == 1:
        assert methods == {"hnsw"}  # a light mask stays on the graph


def test_cli_export_and_search_match_local_json(pg_url: str, tmp_path: Path, photos) -> None:
    index_dir = tmp_path / "g.idx"
    idx = Index.create(index_dir, precision="int8")
    idx.add([photos[name] for name in sorted(photos)], metadata=[{"kind": "photo"}] * len(photos))
    idx.add(clustered(40, seed=5), paths=[f"x{i}.jpg" for i in range(40)])
    idx.name_concept(3, "fur")
    idx.close()
    runner = CliRunner()
    out = runner.invoke(
        cli_main, ["index", "export", "--index", str(index_dir), "--to", pg_url, "--table", "cli"]
    )
    assert out.exit_code == 0, out.output
    assert "exported 45 items" in out.output
    args = ["-k", "4", "--json", "--exclude-concept", "fur", "--concept-weight", "5=2"]
    for query in (str(photos["cat"]), "id:2"):
        for extra in ([], ["--where", "kind=photo"], ["--renormalize"]):
            local = runner.invoke(
                cli_main, ["search", query, "--index", str(index_dir)] + args + extra
            )
            remote = runner.invoke(
                cli_main, ["search", query, "--backend", pg_url, "--table", "cli"] + args + extra
            )
            assert local.exit_code == 0 and remote.exit_code == 0, remote.output
            a, b = json.loads(local.stdout), json.loads(remote.stdout)
            assert b.pop("index") == pg_url
            a.pop("index")
            scores = [[r.pop("score") for r in out["results"]] for out in (a, b)]
            assert scores[1] == pytest.approx(scores[0], abs=1e-6)
            assert a == b
    # an existing gallery is not overwritten without --replace
    again = runner.invoke(
        cli_main, ["index", "export", "--index", str(index_dir), "--to", pg_url, "--table", "cli"]
    )
    assert again.exit_code == 1 and "already exists (--replace" in again.output


def test_a_dgml_gallery_masks_whole_groups_as_the_local_index_does(pg_url: str) -> None:
    """Issue #18: a DGML gallery's parts are its groups; a group control zeroes a block."""
    import psycopg

    from cmn_edge.parts import Parts

    groups, dim = 8, C // 8
    blocks = clustered(500, seed=8).reshape(500, groups, dim)
    blocks /= np.linalg.norm(blocks, axis=-1, keepdims=True)
    vectors = (blocks.reshape(500, C) / np.sqrt(groups)).astype(np.float32)
    parts = Parts(groups, dim, "dgml")
    index = ConceptIndex(C, "dgml@1", parts=parts)
    index.add(vectors, [f"/photos/{i}.jpg" for i in range(500)])
    index.set_concept_name(2, "head")
    export_index(index, pg_url, table="dgml", replace=True)
    controls = [
        {"exclude": [1]},
        {"exclude": ["head", 5]},
        {"only": [0, 3]},
        {"weights": {"head": 3.0, 6: 0.5}},
        {"exclude": [4], "renormalize": True},
    ]
    queries = vectors[:4] * 0.5 + vectors[4:8] * 0.5
    with PgGallery.connect(pg_url, "dgml") as gallery:
        assert gallery.parts == parts and gallery.concept_names == {2: "head"}
        for exact_below in (5000, 0):
            gallery.exact_below = exact_below
            for control in controls:
                for q in queries:
                    want = index.search(q, 10, exact=True, **control)
                    got = gallery.search(q, 10, **control)
                    assert [h.id for h in got] == [h.id for h in want], control
                    assert [h.score for h in got] == pytest.approx(
                        [h.score for h in want], abs=1e-6
                    )
        q = queries[0]
        w = np.ones(C, np.float32)
        w[dim : 2 * dim] = 0  # group 1's block
        truth = np.argsort(-(vectors @ (q * w)), kind="stable")[:10]
        assert [h.id for h in gallery.search(q, 10, exclude=[1])] == truth.tolist()
    line = _cli_error(
        ["search", "id:1", "--backend", pg_url, "--table", "dgml", "--exclude-concept", "1"]
    )
    assert "--exclude-concept" in line and "use --exclude-part" in line
    out = CliRunner().invoke(
        cli_main,
        [
            "search",
            "id:1",
            "--backend",
            pg_url,
            "--table",
            "dgml",
            "--exclude-part",
            "head",
            "--json",
        ],
    )
    assert out.exit_code == 0, out.output
    document = json.loads(out.stdout)
    assert document["control"]["exclude"] == [2] and document["control"]["parts"] == "groups"
    # a gallery exported before parts existed has no parts column: one concept a dimension
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("ALTER TABLE dgml_model DROP COLUMN parts")
    with PgGallery.connect(pg_url, "dgml") as gallery:
        assert gallery.parts == Parts(C)


def test_query_of_another_model_is_refused(pg_url: str, photos) -> None:
    export_index(local_index(clustered(50, seed=6), "other-model@0"), pg_url, table="foreign")
    with PgGallery.connect(pg_url, "foreign") as gallery:
        with pytest.raises(ModelMismatchError, match="built with model other-model@0"):
            gallery.check_model("cmn-lite0@x")
    out = CliRunner().invoke(
        cli_main, ["search", str(photos["cat"]), "--backend", pg_url, "--table", "foreign"]
    )
    assert out.exit_code == 1
    assert "built with model other-model@0, but the query model is cmn-lite0@" in out.output
    assert len(out.output.strip().splitlines()) == 1


def _cli_error(args: list[str]) -> str:
    out = CliRunner().invoke(cli_main, args)
    assert out.exit_code == 1, out.output
    lines = out.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.output
    return lines[0]


def test_errors_name_the_target_and_reason(pg_url: str, tmp_path: Path) -> None:
    import psycopg

    # server down: a port nobody listens on
    down = "postgresql://postgres@127.0.0.1:9/postgres"
    assert "127.0.0.1:9/postgres: cannot connect" in _cli_error(
        ["search", "id:1", "--backend", down]
    )
    assert "not a PostgreSQL URL" in _cli_error(["search", "id:1", "--backend", "mysql://x/y"])
    # a password never shows in a message
    line = _cli_error(["search", "id:1", "--backend", "postgresql://u:s3cret@127.0.0.1:9/db"])
    assert "s3cret" not in line and "u@127.0.0.1:9/db" in line
    # table missing
    assert "no gallery table 'nothing_here'" in _cli_error(
        ["search", "id:1", "--backend", pg_url, "--table", "nothing_here"]
    )
    assert "table name" in _cli_error(["search", "id:1", "--backend", pg_url, "--table", "X;--"])
    # a database without the vector extension
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS plain")
        conn.execute("CREATE DATABASE plain")
    plain = pg_url.rsplit("/", 1)[0] + "/plain"
    assert "the vector extension (pgvector >= 0.8) is not created in this database" in _cli_error(
        ["search", "id:1", "--backend", plain]
    )
    # an unknown metadata key, as the local index says it
    export_index(local_index(clustered(30, seed=7)), pg_url, table="errs", replace=True)
    assert "no item has metadata key 'colour'" in _cli_error(
        ["search", "id:1", "--backend", pg_url, "--table", "errs", "--where", "colour=red"]
    )
    assert "no item with id 999" in _cli_error(
        ["search", "id:999", "--backend", pg_url, "--table", "errs"]
    )


def test_failed_export_leaves_the_old_gallery(pg_url: str, monkeypatch) -> None:
    from cmn_edge.postgres import export as export_module

    old = local_index(clustered(40, seed=8))
    export_index(old, pg_url, table="atomic", replace=True)

    def broken(conn, *args, **kwargs):
        conn.execute("SELECT 1/0")  # the server fails mid-export, after the COPY

    monkeypatch.setattr(export_module, "create_indexes", broken)
    with pytest.raises(PostgresError, match="table atomic: export failed, nothing written"):
        export_index(local_index(clustered(70, seed=9)), pg_url, table="atomic", replace=True)
    monkeypatch.undo()
    with PgGallery.connect(pg_url, "atomic") as gallery:
        assert len(gallery) == 40
        q = old.embedding(5)
        assert gallery.search(q, 1)[0].id == 5
    import psycopg

    with psycopg.connect(pg_url) as conn:  # no staging debris either
        left = conn.execute("SELECT count(*) FROM pg_class WHERE relname LIKE 'atomic__new%'")
        assert left.fetchone()[0] == 0


def test_runtime_imports_psycopg_only_when_asked() -> None:
    script = (
        "import sys, cmn_edge.cli, cmn_edge.cli_index, cmn_edge.postgres\n"
        "assert 'psycopg' not in sys.modules, 'psycopg imported'\n"
        "sys.modules['psycopg'] = None\n"
        "from cmn_edge.postgres import PgGallery, PostgresError\n"
        "try:\n"
        "    PgGallery.connect('postgresql://127.0.0.1/x')\n"
        "except PostgresError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == (
        'the PostgreSQL backend needs its extra: pip install "cmn-edge[postgres]"'
    )
