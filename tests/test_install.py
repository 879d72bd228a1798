"""A real, non-editable install finds its bundled model and example photo from anywhere.

The wheel is built from a copy of this checkout and installed twice, offline and without
touching the environment the tests run in: into a fresh virtual environment, and with
``pip install --user`` into a clean HOME (whose data prefix is not ``sys.prefix``). Each one
then embeds the bundled photo from an unrelated working directory, in a fresh process that
cannot see the checkout.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WAIT = 600  # seconds; a bound against a hung child, not a timing assertion
#: Not copied to build the wheel: hidden folders (.git, caches), build outputs, local data.
SKIP = {"build", "dist", "runs", "shared", "__pycache__"}


def _run(command: list, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=WAIT
    )
    assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
    return result


def _clean_env(home: Path) -> dict[str, str]:
    """No variable that could lead a child back to the checkout or to other models."""
    drop = "PYTHONPATH PYTHONHOME PYTHONUSERBASE PYTHONNOUSERSITE CMN_EDGE_MODELS PIP_USER"
    drop += " PIP_TARGET PIP_PREFIX"
    env = {k: v for k, v in os.environ.items() if k not in drop.split()}
    env["HOME"] = str(home)
    return env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    source = tmp_path_factory.mktemp("source") / "cmn-edge"
    shutil.copytree(
        ROOT,
        source,
        ignore=lambda _dir, names: [
            n for n in names if n in SKIP or n.startswith(".") or n.endswith(".egg-info")
        ],
    )
    out = tmp_path_factory.mktemp("wheel")
    pip = "-m pip wheel -q --no-deps --no-build-isolation --no-index".split()
    _run([sys.executable, *pip, "-w", out, source], source, _clean_env(source))
    (built,) = out.glob("cmn_edge-*.whl")
    return built


def test_wheel_ships_each_bundled_file_once_as_package_data(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    for name in ("cmn-lite0.int8.onnx", "cmn-lite0.fp32.onnx", "metrics.json", "MODEL_CARD.md"):
        assert [n for n in names if n.endswith(f"/{name}")] == [f"cmn_edge/_models/{name}"]
    assert "cmn_edge/_photos/cat.jpg" in names
    assert not [n for n in names if ".data/" in n]  # no second copy under <prefix>/share


def test_wheel_holds_every_module_of_the_checkout(wheel: Path) -> None:
    """A subpackage missing from pyproject's list would install a runtime that cannot import."""
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = [p.relative_to(ROOT).as_posix() for p in (ROOT / "cmn_edge").rglob("*.py")]
    modules += [
        "cmn_export/" + p.relative_to(ROOT / "export").as_posix()
        for p in (ROOT / "export").rglob("*.py")
    ]
    assert modules and not [m for m in modules if m not in names]


def _embeds_the_bundled_photo(
    python: Path, script: Path, env: dict[str, str], prefix: Path, elsewhere: Path
) -> None:
    """From ``elsewhere``, the installed package (under ``prefix``) embeds its own photo."""
    code = "import cmn_edge, cmn_edge.registry as r; "
    code += "print(cmn_edge.__file__); print(r.example_photo()); print(r.models_dir())"
    found = _run([python, "-c", code], elsewhere, env).stdout.splitlines()
    for line in found:
        assert Path(line).is_relative_to(prefix), (line, prefix)
        assert not Path(line).is_relative_to(ROOT), line
    photo = Path(found[1])
    result = _run([script, "embed", photo, "--precision", "int8", "--threads", "1"], elsewhere, env)
    gallery = elsewhere / "gallery"
    gallery.mkdir(exist_ok=True)
    shutil.copy(photo, gallery / "a.jpg")
    _run([script, "index", "build", gallery, "--index", elsewhere / "idx"], elsewhere, env)
    document = json.loads(result.stdout)
    assert document["model"].startswith("cmn-lite0@") and document["precision"] == "int8"
    assert [item["path"] for item in document["items"]] == [str(photo)]
    assert len(document["items"][0]["embedding"]) == document["num_concepts"]


def test_non_editable_install_in_a_virtual_environment(wheel: Path, tmp_path: Path) -> None:
    venv, home, elsewhere = tmp_path / "venv", tmp_path / "home", tmp_path / "elsewhere"
    home.mkdir()
    elsewhere.mkdir()
    env = _clean_env(home)
    # The runtime's dependencies come from the test environment's site-packages (offline);
    # --ignore-installed leaves that environment's own cmn-edge exactly as it was.
    _run(
        [sys.executable, *"-m venv --without-pip --system-site-packages".split(), venv],
        tmp_path,
        env,
    )
    python = venv / "bin" / "python"
    pip = "install -q --no-deps --no-index --ignore-installed".split()
    _run([sys.executable, "-m", "pip", "--python", python, *pip, wheel], tmp_path, env)
    _embeds_the_bundled_photo(python, venv / "bin" / "cmn-edge", env, venv, elsewhere)
    # bench without --photo times the bundled photo, wherever the package was installed.
    bench = "bench --precision int8 --batch 1 --repeats 1 --cold-repeats 1 --threads 1 --json"
    result = _run([venv / "bin" / "cmn-edge", *bench.split()], elsewhere, env)
    assert json.loads(result.stdout)["precisions"]["int8"]["end_to_end"]["p50_ms"] > 0


def _user_site_python(env: dict[str, str], cwd: Path) -> Path:
    """An interpreter whose user site is on, seeing the test environment's packages.

    A virtual environment turns the user site off for its own python (as README's test
    command runs in one), so there it is the interpreter the environment was made from, and
    a ``.pth`` in the clean HOME's user site lists the environment's site-packages: a
    ``.pth`` there is read, but not the ``.pth`` files of the folders it lists, so the
    checkout's editable install stays out of sight.
    """
    if sys.prefix == sys.base_prefix:
        return Path(sys.executable)
    python = Path(getattr(sys, "_base_executable", "") or shutil.which("python3") or "")
    code = "import site; print(site.getusersitepackages())"
    user_site = Path(_run([python, "-c", code], cwd, env).stdout.strip())
    user_site.mkdir(parents=True)
    (user_site / "test-environment.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return python


def test_user_install_in_a_clean_home(wheel: Path, tmp_path: Path) -> None:
    home, elsewhere = tmp_path / "home", tmp_path / "elsewhere"
    home.mkdir()
    elsewhere.mkdir()
    env = _clean_env(home)
    python = _user_site_python(env, tmp_path)
    pip = "install -q --user --no-deps --no-index --ignore-installed --no-warn-script-location"
    _run([sys.executable, "-m", "pip", "--python", python, *pip.split(), wheel], tmp_path, env)
    user_base = home / ".local"
    _embeds_the_bundled_photo(python, user_base / "bin" / "cmn-edge", env, user_base, elsewhere)
