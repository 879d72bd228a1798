"""Labelled image folders: a ``manifest.csv`` (path,label,class_name,split) or ``<class>/<img>``.

Shared by ``cmn-edge eval`` and the training side, so both read a dataset the same way.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from PIL import features

MANIFEST_COLUMNS = ("path", "label", "class_name", "split")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
#: Photo formats this Pillow cannot decode: a folder's files of these kinds are left out,
#: and the commands say how many (phones save HEIC; they were passed over without a word).
UNDECODABLE_SUFFIXES = {".heic", ".heif", ".jxl", ".avif"}
# Pillow >= 11.2 reads AVIF (phones' newer default); older ones skip it (and would warn
# "Unknown feature" at features.check, so the module table is asked first)
if "avif" in features.modules and features.check_module("avif"):
    IMAGE_SUFFIXES.add(".avif")
    UNDECODABLE_SUFFIXES.discard(".avif")


def passed_over_note(paths: list[Path]) -> str | None:
    """One line for the photos a folder listing left out because Pillow cannot decode
    them, or None."""
    if not paths:
        return None
    counts: dict[str, int] = {}
    for path in paths:
        counts[path.suffix.lower()] = counts.get(path.suffix.lower(), 0) + 1
    kinds = ", ".join(f"{n} {suffix}" for suffix, n in sorted(counts.items()))
    return (
        f"left out {len(paths)} photo(s) in formats Pillow cannot decode here ({kinds}), "
        f"e.g. {paths[0]}; convert them to JPEG to include them"
    )


class DatasetError(ValueError):
    """A dataset that cannot be used; the message names the file and the reason."""


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int
    class_name: str
    split: str


def is_image_file(path: Path) -> bool:
    suffix_ok = path.suffix.lower() in IMAGE_SUFFIXES
    return suffix_ok and path.is_file() and not path.name.startswith(".")


def load_samples(root: str | Path, split: str | None = None) -> list[Sample]:
    """All samples of ``root`` (optionally one split), in a stable order."""
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"{root}: dataset folder not found")
    manifest = root / "manifest.csv" if root.is_dir() else root
    if manifest.is_file():
        samples = _read_manifest(manifest)
        base = "manifest"
    elif root.is_dir():
        samples = _read_image_folder(root)
        base = "folder"
        if split not in (None, "all"):
            split = None  # an ImageFolder tree has no splits: the whole tree is the split
    else:
        raise DatasetError(f"{root}: neither a folder nor a manifest.csv")
    if split not in (None, "all"):
        samples = [s for s in samples if s.split == split]
    if not samples:
        where = f"split '{split}' of " if split not in (None, "all") else ""
        raise DatasetError(f"{manifest if base == 'manifest' else root}: {where}dataset is empty")
    return samples


def _read_manifest(manifest: Path) -> list[Sample]:
    with manifest.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = tuple(reader.fieldnames or ())
        missing = [c for c in MANIFEST_COLUMNS if c not in columns]
        unknown = [c for c in columns if c not in MANIFEST_COLUMNS]
        if missing or unknown:
            detail = "; ".join(
                part
                for part in (
                    f"missing columns {missing}" if missing else "",
                    f"unknown columns {unknown}" if unknown else "",
                )
                if part
            )
            raise DatasetError(f"{manifest}: {detail} (expected {','.join(MANIFEST_COLUMNS)})")
        samples = []
        for line, row in enumerate(reader, start=2):
            try:
                label = int(row["label"])
            except (TypeError, ValueError):
                raise DatasetError(
                    f"{manifest}:{line}: label {row['label']!r} is not an integer"
                ) from None
            samples.append(
                Sample(manifest.parent / row["path"], label, row["class_name"], row["split"])
            )
    return samples


def _read_image_folder(root: Path) -> list[Sample]:
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    samples = []
    for label, folder in enumerate(classes):
        for path in sorted(folder.iterdir()):
            if is_image_file(path):
                samples.append(Sample(path, label, folder.name, "all"))
    return samples


def check_retrieval_ready(samples: list[Sample], source: str | Path) -> None:
    """Leave-one-out retrieval and proxy training need at least two images per class."""
    counts: dict[str, int] = {}
    for sample in samples:
        counts[sample.class_name] = counts.get(sample.class_name, 0) + 1
    lonely = sorted(name for name, n in counts.items() if n < 2)
    if lonely:
        shown = ", ".join(lonely[:5]) + (" ..." if len(lonely) > 5 else "")
        raise DatasetError(
            f"{source}: {len(lonely)} class(es) with a single image ({shown}); "
            "each class needs at least two"
        )
