"""Pack one split of a dataset small enough to travel, e.g. to a lent GPU machine.

The images are re-encoded (WebP or JPEG at a chosen quality, optionally shrunk) next to a
new ``manifest.csv``, so ``cmn-export train`` reads the pack exactly as it reads the original.
"""

from __future__ import annotations

import csv
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from cmn_edge import preprocess as pp
from cmn_edge.dataset import MANIFEST_COLUMNS, load_samples

FORMATS = {"webp": ("WEBP", ".webp"), "jpeg": ("JPEG", ".jpg")}


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
    """Write the pack to ``out`` (replaced whole, never half-written); returns (images, bytes)."""
    codec, suffix = FORMATS[image_format]
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
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return len(rows), sum(sizes)
