"""Regenerate the bad-input fixtures in this folder: ``python tests/data/make_bad_inputs.py``.

Each file is something a user can really hand to ``cmn-edge``; all are small on disk.
"""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parent
PHOTO = HERE.parent.parent / "examples" / "photos" / "cat.jpg"


def main() -> None:
    (HERE / "empty.jpg").write_bytes(b"")
    data = PHOTO.read_bytes()
    (HERE / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (HERE / "corrupt.jpg").write_bytes(random.Random(0).randbytes(4096))
    (HERE / "text.jpg").write_text("this is a shopping list, not a photo\neggs\nmilk\n")
    # 12000 x 12000 = 144 M pixels, above MAX_PIXELS; a blank 1-bit PNG is ~20 kB on disk.
    Image.new("1", (12000, 12000)).save(HERE / "bomb.png", optimize=True)


if __name__ == "__main__":
    main()
