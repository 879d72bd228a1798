"""INT8-vs-FP32 fidelity of a model pair on this CPU: embedding cosines and leave-one-out R@1.

Needs only the runtime's deps (onnxruntime, numpy, Pillow) and ``cmn_edge`` on the path; meant
for ARM64 CPUs and for measuring them under QEMU user-mode emulation on an x86 host. For each
dataset it embeds a seeded random subset of one split with both models (the same preprocessed
arrays, ``cmn_edge.preprocess.load`` with the model's metadata) and prints, per dataset, the
mean / min / 1st-percentile cosine between INT8 and FP32 embeddings and R@1 of each (cosine,
leave-one-out within the subset). ``--save`` writes the embeddings; ``--reference`` compares
them with a file saved elsewhere (e.g. x86 FP32 of the same images, computed natively).

Natively (x86 reference, same subset):

    python benchmarks/arm64_fidelity.py /path/datasets/cub100 /path/datasets/caltech97 \\
        --count 300 --save /tmp/x86.npz

Under QEMU, in an arm64 Debian root (debootstrap --arch=arm64, python3 + a venv with
onnxruntime, numpy, Pillow), the datasets and this checkout bind-mounted at /data and /main,
binfmt_misc registered by qemu-user-static; QEMU_CPU picks the emulated core (cortex-a53: no
dot product; cortex-a76: SDOT/UDOT; max: also I8MM):

    QEMU_CPU=cortex-a76 chroot /work/arm64root env PYTHONPATH=/main \\
        /venv/bin/python /main/benchmarks/arm64_fidelity.py /data/cub100 /data/caltech97 \\
        --count 300 --threads 1 --save /out/a76.npz --reference /out/x86.npz

Without binfmt_misc, run the interpreter through QEMU explicitly:
``qemu-aarch64-static -cpu cortex-a76 -L /work/arm64root /work/arm64root/venv/bin/python ...``.

Under QEMU user mode ``/proc/cpuinfo`` is the host's (x86 flags), so set ``CMN_EDGE_CPU_FLAGS``
(e.g. ``"fp asimd asimddp"``) for ``cmn_edge.cpu`` to name the right path; onnxruntime itself
picks its INT8 kernels from the hwcaps QEMU sets for the emulated core (printed below; without
/sys in the root its cpuinfo library fails and it reads getauxval). Emulated FP32 is slow
(about 7 s per image on a shared x86 core, QEMU 7.2; INT8 about 1.3 s): ``--precisions int8``
with a ``--reference`` that holds FP32 embeddings prints "int8 vs ref fp32" instead.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from cmn_edge import preprocess as pp
from cmn_edge.dataset import load_samples
from cmn_edge.embedder import Embedder, u8u8_rewrite_on
from cmn_edge.metrics import retrieval_metrics

ROOT = Path(__file__).resolve().parent.parent
PRECISIONS = ("fp32", "int8")

# Linux aarch64 hwcap bits onnxruntime reads (getauxval) when its cpuinfo library fails.
_AT_HWCAP, _AT_HWCAP2 = 16, 26
_HWCAP_BITS = {"asimd": (_AT_HWCAP, 1 << 1), "asimddp": (_AT_HWCAP, 1 << 20),
               "sve": (_AT_HWCAP, 1 << 22), "i8mm": (_AT_HWCAP2, 1 << 13)}  # fmt: skip


def hwcaps() -> str:
    """The kernel's (or QEMU's) hwcap features that pick onnxruntime's INT8 kernels."""
    if platform.system() != "Linux" or platform.machine().lower() not in ("aarch64", "arm64"):
        return "n/a (not Linux aarch64)"
    getauxval = ctypes.CDLL(None).getauxval
    getauxval.restype = ctypes.c_ulong
    getauxval.argtypes = [ctypes.c_ulong]
    found = [name for name, (key, bit) in _HWCAP_BITS.items() if getauxval(key) & bit]
    return " ".join(found) or "none of asimd/asimddp/sve/i8mm"


def subset(dataset: Path, split: str, count: int, seed: int) -> list:
    """``count`` samples of ``split`` drawn with ``seed``, in manifest order.

    The first ``count`` of one seeded permutation: a smaller subset lies inside a larger one.
    """
    samples = load_samples(dataset, split)
    if count and count < len(samples):
        keep = np.sort(np.random.default_rng(seed).permutation(len(samples))[:count])
        samples = [samples[i] for i in keep]
    return samples


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return np.sum(a * b, axis=1)


def cos_stats(c: np.ndarray) -> str:
    return f"{c.mean():.5f}  {c.min():.5f}  {np.percentile(c, 1):.5f}"


def embed_all(embedders: dict[str, Embedder], paths: list[Path], batch: int) -> dict:
    """Each model's embeddings of ``paths``; images decoded once per distinct preprocess."""
    out: dict[str, list[np.ndarray]] = {name: [] for name in embedders}
    start = time.perf_counter()
    for first in range(0, len(paths), batch):
        chunk = paths[first : first + batch]
        arrays: dict = {}
        for name, embedder in embedders.items():
            key = repr(embedder.preprocess)
            if key not in arrays:
                arrays[key] = np.stack([pp.load(p, embedder.preprocess) for p in chunk])
            out[name].append(embedder.embed_arrays(arrays[key]).embedding)
        done = first + len(chunk)
        rate = (time.perf_counter() - start) / done
        print(f"  {done}/{len(paths)} images, {rate:.2f} s/image", file=sys.stderr, flush=True)
    return {name: np.concatenate(chunks) for name, chunks in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("datasets", nargs="+", type=Path, help="folders with a manifest.csv")
    parser.add_argument("--split", default="test")
    parser.add_argument("--count", type=int, default=300, help="images per dataset (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fp32", type=Path, default=ROOT / "models" / "cmn-lite0.fp32.onnx")
    parser.add_argument("--int8", type=Path, default=ROOT / "models" / "cmn-lite0.int8.onnx")
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--save", type=Path, help="write the embeddings to this .npz")
    parser.add_argument("--reference", type=Path, help=".npz from --save to compare with")
    args = parser.parse_args()

    files = {"fp32": args.fp32, "int8": args.int8}
    embedders = {p: Embedder(files[p], threads=args.threads) for p in args.precisions}
    cpu = next(iter(embedders.values())).cpu
    print(
        f"machine      {platform.machine()}  python {platform.python_version()}  "
        f"onnxruntime {ort.__version__}  numpy {np.__version__}"
    )
    print(f"QEMU_CPU     {os.environ.get('QEMU_CPU', '(unset)')}")
    print(f"hwcaps       {hwcaps()}")
    print(f"cmn_edge cpu {cpu.describe()}  (flags from {cpu.source})")
    if "int8" in embedders:
        rewrite = u8u8_rewrite_on(embedders["int8"].session)
        how = "U8U8 rewrite" if rewrite else "as quantized (onnxruntime defaults)"
        print(f"int8 session {how}")

    reference = dict(np.load(args.reference)) if args.reference else {}
    saved: dict[str, np.ndarray] = {}
    rows = []
    for dataset in args.datasets:
        samples = subset(dataset, args.split, args.count, args.seed)
        paths = [s.path for s in samples]
        labels = np.array([s.label for s in samples])
        print(f"{dataset.name}: {len(samples)} {args.split} images", file=sys.stderr, flush=True)
        emb = embed_all(embedders, paths, args.batch)
        names = np.array([Path(os.path.relpath(p, dataset)).as_posix() for p in paths])
        saved[f"{dataset.name}/paths"] = names
        saved[f"{dataset.name}/labels"] = labels
        row = {"dataset": dataset.name, "n": len(samples)}
        for precision, values in emb.items():
            saved[f"{dataset.name}/{precision}"] = values
            row[f"R@1 {precision}"] = retrieval_metrics(values, labels, ks=(1,))["R@1"]
        if len(emb) == 2:
            row["int8 vs fp32"] = cos_stats(cosines(emb["int8"], emb["fp32"]))
        for precision, values in emb.items():
            key = f"{dataset.name}/{precision}"
            if key in reference:
                where = {p: i for i, p in enumerate(reference[f"{dataset.name}/paths"])}
                if not all(p in where for p in names):
                    raise SystemExit(f"{args.reference}: lacks some {dataset.name} images")
                ref = reference[key][[where[p] for p in names]]
                row[f"{precision} vs ref"] = cos_stats(cosines(values, ref))
                if precision == "int8" and f"{dataset.name}/fp32" in reference:
                    ref = reference[f"{dataset.name}/fp32"][[where[p] for p in names]]
                    row["int8 vs ref fp32"] = cos_stats(cosines(values, ref))
        rows.append(row)
    if args.save:
        np.savez(args.save, **saved)

    print()
    print("cosines are mean  min  1st-percentile; R@1 leave-one-out within the subset, cosine")
    for row in rows:
        print(f"{row.pop('dataset')}  n={row.pop('n')}")
        for key, value in row.items():
            shown = f"{value:.2f}" if isinstance(value, float) else value
            print(f"  {key:<16} {shown}")


if __name__ == "__main__":
    main()
