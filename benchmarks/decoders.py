"""Is a faster JPEG decoder worth it? Pillow's draft mode against simplejpeg and PyTurboJPEG.

Each decoder does the same job as ``cmn_edge.preprocess.load``: the file's bytes to the
model's float32 input, decoding at the smallest DCT scale that keeps at least twice the
resize target on the short side, then the same resize, crop and normalisation. Prints, per
decoder and folder: the median time per image on one thread, the images/s with one decode
thread per core, and the embeddings' cosine to today's path (bundled model):

    pip install simplejpeg "PyTurboJPEG<2"     # PyTurboJPEG also needs libturbojpeg0 (apt)
    python benchmarks/decoders.py FOLDER [FOLDER ...] [--limit 100]

Decoders that are not installed are skipped with a note. State the CPU class (printed
first) beside any figure you quote.

On a busy machine, count instructions instead of timing (repeatable whatever else runs):
``--decode-only NAME --count N`` decodes the first N files and nothing else, so

    valgrind --tool=callgrind python3.11 benchmarks/decoders.py DIR --decode-only pillow --count 0
    valgrind --tool=callgrind python3.11 benchmarks/decoders.py DIR --decode-only pillow --count 4

give the instructions per image as (second total - first total) / 4 (use the real
interpreter, not a pyenv shim, which valgrind would trace instead).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cmn_edge import Embedder  # noqa: E402
from cmn_edge import preprocess as pp  # noqa: E402
from cmn_edge.dataset import is_image_file  # noqa: E402


def _finish(pixels: np.ndarray, preprocess) -> np.ndarray:
    image = Image.fromarray(pixels)
    return pp.to_tensor(pp.resize_and_crop(image, preprocess), preprocess)


def simplejpeg_loader(preprocess) -> Callable[[Path], np.ndarray]:
    import simplejpeg

    target = 2 * preprocess.resize_size

    def load(path: Path) -> np.ndarray:
        data = path.read_bytes()
        pixels = simplejpeg.decode_jpeg(
            data, colorspace="RGB", fastdct=False, fastupsample=False, min_height=target,
            min_width=target,
        )  # fmt: skip
        return _finish(pixels, preprocess)

    return load


def turbojpeg_loader(preprocess) -> Callable[[Path], np.ndarray]:
    from turbojpeg import TJPF_RGB, TurboJPEG

    jpeg = TurboJPEG()
    scales = sorted((n / d, (n, d)) for n, d in jpeg.scaling_factors if n / d <= 1)
    target = 2 * preprocess.resize_size

    def load(path: Path) -> np.ndarray:
        data = path.read_bytes()
        width, height, _, _ = jpeg.decode_header(data)
        factor = next(
            (f for s, f in scales if min(width, height) * s >= target), (1, 1)
        )  # the smallest scale with at least ``target`` on the short side, as Pillow's draft
        pixels = jpeg.decode(data, pixel_format=TJPF_RGB, scaling_factor=factor)
        return _finish(pixels, preprocess)

    return load


def folder_images(folder: Path, limit: int | None) -> list[Path]:
    found = sorted(p for p in folder.rglob("*") if is_image_file(p))
    jpegs = [p for p in found if p.suffix.lower() in (".jpg", ".jpeg")]
    return jpegs[:limit]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--limit", type=int, default=100, help="first N JPEGs per folder")
    parser.add_argument("--decode-only", default=None, help="one decoder: pillow, simplejpeg, "
                        "PyTurboJPEG (for valgrind)")  # fmt: skip
    parser.add_argument("--count", type=int, default=4, help="with --decode-only")
    args = parser.parse_args()

    embedder = Embedder(threads=2)
    preprocess = embedder.preprocess
    if args.decode_only:
        load = {
            "pillow": lambda path: pp.load(path, preprocess),
            "simplejpeg": simplejpeg_loader(preprocess),
            "PyTurboJPEG": turbojpeg_loader(preprocess),
        }[args.decode_only]
        paths = folder_images(args.folders[0], None)
        load(paths[-1])  # the decoder's own set-up, in both runs
        for path in paths[: args.count]:
            load(path)
        return
    print(f"CPU: {embedder.cpu.describe()}; Pillow {Image.__version__}")
    loaders: dict[str, Callable[[Path], np.ndarray]] = {
        "pillow draft (today)": lambda path: pp.load(path, preprocess)
    }
    for name, make in (("simplejpeg", simplejpeg_loader), ("PyTurboJPEG", turbojpeg_loader)):
        try:
            loaders[name] = make(preprocess)
        except (ImportError, RuntimeError, OSError) as exc:
            print(f"{name}: not available ({exc})")
    workers = os.cpu_count() or 1
    for folder in args.folders:
        paths = folder_images(folder, args.limit)
        print(f"\n{folder}: {len(paths)} JPEGs")
        print(f"{'decoder':24} {'ms/img, 1 thread':>17} {f'img/s, {workers} threads':>18} "
              f"{'min cosine':>11} {'mean cosine':>12}")  # fmt: skip
        reference = None
        for name, load in loaders.items():
            for path in paths[:3]:
                load(path)  # warm up
            single = []
            for path in paths:
                started = time.perf_counter()
                load(path)
                single.append(time.perf_counter() - started)
            with ThreadPoolExecutor(workers) as pool:
                started = time.perf_counter()
                arrays = list(pool.map(load, paths))
                rate = len(paths) / (time.perf_counter() - started)
            embedded = embedder.embed_arrays(np.stack(arrays)).embedding
            if reference is None:
                reference = embedded
            cosine = (embedded * reference).sum(1)
            print(
                f"{name:24} {1000 * np.median(single):17.2f} {rate:18.1f} "
                f"{cosine.min():11.5f} {cosine.mean():12.5f}"
            )


if __name__ == "__main__":
    main()
