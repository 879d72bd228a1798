"""The runtime must work on a device with no torch, timm, onnx or training code installed.

A fresh interpreter imports every cmn_edge module and runs the CLI; then none of the training
side's packages may be loaded. The blocked run also makes any such import raise, so a lazy
import in a code path fails loudly instead of quietly loading torch.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = ("torch", "timm", "torchvision", "onnx", "cmn_export", "export")

SCRIPT = textwrap.dedent(
    """
    import importlib, json, pkgutil, sys

    FORBIDDEN = set(sys.argv[1].split(","))
    block, photo, dataset = sys.argv[2] == "block", sys.argv[3], sys.argv[4]

    class Forbidden:
        # A meta-path finder consulted before all others: forbidden imports raise.
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in FORBIDDEN:
                raise ImportError(f"the runtime imported {name}")
            return None

    if block:
        sys.meta_path.insert(0, Forbidden())
        try:
            import torch  # noqa: F401
        except ImportError:
            pass
        else:
            raise SystemExit("the import blocker does not work")

    import cmn_edge
    modules = [m.name for m in pkgutil.walk_packages(cmn_edge.__path__, "cmn_edge.")]
    for name in modules:
        importlib.import_module(name)

    from click.testing import CliRunner
    from cmn_edge.cli import main

    runner = CliRunner()
    calls = [["--help"]] + [[name, "--help"] for name in sorted(main.commands)]
    calls += [["embed", photo, "--format", "npy"], ["embed", photo, "--scores"],
              ["eval", dataset, "--json"], ["models", "--json"]]
    for args in calls:
        result = runner.invoke(main, args)
        if result.exit_code != 0:
            raise SystemExit(f"{args} failed: {result.output} {result.exception!r}")

    loaded = sorted(n for n in sys.modules if n.split(".")[0] in FORBIDDEN)
    print(json.dumps({"modules": modules, "commands": sorted(main.commands), "loaded": loaded}))
    """
)


@pytest.mark.parametrize("mode", ["block", "watch"])
def test_runtime_never_imports_training_packages(mode, photos, labelled_folder):
    """``watch`` catches an import hidden in try/except; ``block`` one made lazily."""
    completed = subprocess.run(
        [
            sys.executable,
            "-c",
            SCRIPT,
            ",".join(FORBIDDEN),
            mode,
            str(photos["cat"]),
            str(labelled_folder),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:] + completed.stdout[-3000:]
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    assert report["loaded"] == []
    assert {"cmn_edge.cli", "cmn_edge.cli_run", "cmn_edge.embedder"} <= set(report["modules"])
    assert {"embed", "eval", "models"} <= set(report["commands"])
