"""Pack one split of a dataset small enough to travel, e.g. to a lent GPU machine.

The images are re-encoded (WebP or JPEG at a chosen quality, optionally shrunk) next to a
new ``manifest.csv``, so ``cmn-export train`` reads the pack exactly as it reads the original.
"""

from __future__ import annotations

import csv
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from cmn_edge import preprocess as pp
from cmn_edge.dataset import MANIFEST_COLUMNS, load_samples

FORMATS = {"webp": ("WEBP", ".webp"), "jpeg": ("JPEG", ".jpg")}

#: Written into every pack: only a folder holding it may be replaced by a new pack.
PACK_MARKER = ".cmn-export-pack"


class PackError(ValueError):
    """An ``--out`` that pack must not replace: user data, the dataset, or a folder above it."""


def check_out(root: Path, out: Path) -> None:
    """Refuse any ``out`` whose removal could lose data; an absent one or an earlier pack is fine.

    The dataset itself (even an earlier pack being re-packed) and every folder that contains
    it are refused first: replacing them would delete the images being read.
    """
    dataset, target = Path(root).resolve(), Path(out).resolve()
    if dataset == target or dataset.is_relative_to(target):
        raise PackError(f"{out}: is the dataset {root} or holds it; give a new folder")
    if not os.path.lexists(out):
        return
    if out.is_symlink() or not out.is_dir():
        raise PackError(f"{out}: exists and is not a folder; give a new folder")
    if not (out / PACK_MARKER).is_file():
        raise PackError(
            f"{out}: exists and is not an earlier pack (no {PACK_MARKER}); "
            "give a new folder or remove it yourself"
        )


def _encode(source: Path, target: Path, codec: str, quality: int, max_side: int) -> int:
    image = pp.open_image(source)
    if max_side and min(image.size) > max_side:
        scale = max_side / min(image.size)
        size = (round(image.width * scale), round(image.height * scale))
        image = image.resize(size, Image.Resampling.BICUBIC)
    options = {"method": 6} if codec == "WEBP" else {"optimize": True}
    image.save(target, codec, quality=quality, **options)
    return target.stat().st_size


def pack_split(
    root: Path,
    out: Path,
    split: str = "train",
    image_format: str = "webp",
    quality: int = 70,
    max_side: int = 0,
    workers: int = 4,
) -> tuple[int, int]:
    """Write the pack to ``out`` (replaced whole, never half-written); returns (images, bytes).

    ``out`` must be absent or an earlier pack (see :func:`check_out`): anything else is kept.
    """
    codec, suffix = FORMATS[image_format]
    check_out(root, out)
    samples = load_samples(root, split)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        rows, jobs = [], []
        for index, sample in enumerate(samples):
            relative = Path("images") / sample.class_name / f"{index:06d}{suffix}"
            (staging / relative.parent).mkdir(parents=True, exist_ok=True)
            jobs.append((sample.path, staging / relative))
            rows.append((relative.as_posix(), sample.label, sample.class_name, sample.split))
        with ThreadPoolExecutor(workers) as pool:
            sizes = list(pool.map(lambda job: _encode(*job, codec, quality, max_side), jobs))
        with (staging / "manifest.csv").open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(MANIFEST_COLUMNS)
            writer.writerows(rows)
        (staging / PACK_MARKER).write_text("written by cmn-export pack; may be replaced by it\n")
        check_out(root, out)  # again: the folder may have changed while the images were encoded
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return len(rows), sum(sizes)
