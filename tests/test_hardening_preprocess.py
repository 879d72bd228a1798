"""Bad input to the image decoder and the evaluation transform, made for real with Pillow."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cmn_edge import preprocess as pp
from cmn_edge.metadata import Preprocess

PRE = Preprocess()

#: Load an image in a child whose address space is its size after the imports plus 512 MiB.
BOUNDED_LOAD = """
import resource, sys
import cmn_edge.preprocess as pp
from cmn_edge.metadata import Preprocess
status = open("/proc/self/status").read()
size = int(status.split("VmSize:")[1].split()[0]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (size + 512 * 2**20, resource.RLIM_INFINITY))
print(pp.load(sys.argv[1], Preprocess()).shape)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux's /proc")
@pytest.mark.parametrize("size", [(1, 5000), (5000, 1)])
def test_a_strip_image_loads_in_little_memory(tmp_path: Path, size: tuple[int, int]) -> None:
    """A 100-byte PNG one pixel wide and 5,000 tall: resizing it whole to a 256 short side
    would make a 256x1,280,000 image (over a GB, a MemoryError or an OOM kill)."""
    path = tmp_path / "strip.png"
    Image.new("RGB", size, (200, 30, 30)).save(path)
    result = subprocess.run(
        [sys.executable, "-c", BOUNDED_LOAD, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "(3, 224, 224)"


def test_a_strip_image_matches_resize_then_crop(photos: dict[str, Path]) -> None:
    """The centre-crop shortcut for strips gives the pixels of the plain transform."""
    image = Image.open(photos["cat"]).convert("RGB").resize((3, 2000))
    width, height = image.size
    new_h = int(PRE.resize_size * height / width)
    assert PRE.resize_size * new_h > pp.MAX_RESIZED_PIXELS  # the shortcut is taken
    top = int(round((new_h - PRE.input_size) / 2.0))
    left = int(round((PRE.resize_size - PRE.input_size) / 2.0))
    full = image.resize((PRE.resize_size, new_h), Image.Resampling.BILINEAR)
    expected = np.asarray(
        full.crop((left, top, left + PRE.input_size, top + PRE.input_size)), dtype=int
    )
    got = np.asarray(pp.resize_and_crop(image, PRE), dtype=int)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1


@pytest.mark.parametrize(
    "image",
    [
        np.zeros((0, 0, 3), np.uint8),
        np.zeros((0, 7), np.uint8),
        np.zeros((4, 0, 4), np.float32),
        Image.new("RGB", (0, 3)),
        Image.new("L", (3, 0)),
    ],
    ids=["array-0x0", "array-7x0", "array-0x4-rgba", "pil-0x3", "pil-3x0"],
)
def test_an_empty_image_is_an_image_error(image) -> None:
    """An empty crop (a camera's region of interest that missed) raised ZeroDivisionError in
    the resize: not an ImageError, so skip_errors could not leave it out."""
    with pytest.raises(pp.ImageError, match=r"image is empty \(\d+x\d+ pixels\)"):
        pp.load(image, PRE)


def test_a_truncated_pil_image_is_an_image_error_naming_its_file() -> None:
    """``Image.open`` reads only the header: the decode in ``load`` raised a bare OSError."""
    truncated = Path(__file__).parent / "data" / "truncated.jpg"
    with Image.open(truncated) as image:
        with pytest.raises(pp.ImageError, match="corrupt or truncated") as info:
            pp.load(image, PRE)
    assert str(info.value).startswith(f"{truncated}: ")


def test_the_pixel_limit_is_on_the_pixels_decoded(tmp_path: Path, monkeypatch) -> None:
    """A JPEG decoded at reduced scale (draft mode) was refused for its full size: a 108 MP
    phone photo (12000x9000) never got embedded, though it decodes as 1500x1125. Made here
    at a lowered limit: the same JPEG is refused only where it is decoded whole."""
    photo = tmp_path / "phone.jpg"
    Image.new("RGB", (2400, 1800), (120, 80, 60)).save(photo, quality=80)
    png = tmp_path / "phone.png"
    Image.new("RGB", (2400, 1800), (120, 80, 60)).save(png)
    monkeypatch.setattr(pp, "MAX_PIXELS", 2400 * 1800 - 1)
    assert pp.open_image(photo, PRE).size == (1200, 900)  # drafted to 1/2
    assert pp.load(photo, PRE).shape == (3, PRE.input_size, PRE.input_size)
    for whole in (lambda: pp.open_image(photo), lambda: pp.load(png, PRE)):
        with pytest.raises(pp.ImageError, match="2400x1800, above the"):
            whole()


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_16_bit_images_scale_to_8_bits_as_before_in_integers(mode) -> None:
    """The integer, banded scaling gives exactly what the float64 formula gave."""
    rng = np.random.default_rng(4)
    if mode == "I;16":
        values = rng.integers(0, 65536, (1100, 37)).astype(np.uint16)
        values[0, :3] = [0, 65535, 32767]
    else:
        values = rng.integers(-70000, 140000, (1100, 37)).astype(np.int32)
    image = Image.fromarray(values)
    assert image.mode == mode
    array = np.asarray(image, dtype=np.float64)
    peak = 65535.0 if mode.startswith("I;16") or array.max() > 255 else 255.0
    before = np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(pp._sixteen_bit_to_grey(image), before)
    small = Image.fromarray(np.array([[0, 100], [255, 7]], np.int32))  # mode I, peak 255
    np.testing.assert_array_equal(pp._sixteen_bit_to_grey(small), [[0, 100], [255, 7]])


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux's /proc")
def test_a_large_16_bit_scan_loads_in_bounded_memory_and_too_little_is_one_error(
    tmp_path: Path,
) -> None:
    """A 30 MP 16-bit PNG went through float64 (about a GB of temporaries): a MemoryError
    in a 512 MiB budget, which the CLI reported as an internal error."""
    path = tmp_path / "scan16.png"
    ramp = (np.arange(6000, dtype=np.uint32)[None, :] * 10 % 65536).astype(np.uint16)
    Image.fromarray(np.repeat(ramp, 5000, axis=0)).save(path, compress_level=1)
    loaded = subprocess.run(
        [sys.executable, "-c", BOUNDED_LOAD, str(path)], capture_output=True, text=True
    )
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert loaded.stdout.strip() == "(3, 224, 224)"
    starved = BOUNDED_LOAD.replace("512 * 2**20", "64 * 2**20").replace(
        "print(pp.load(sys.argv[1], Preprocess()).shape)",
        "try:\n    pp.load(sys.argv[1], Preprocess())\nexcept pp.ImageError as e:\n    print(e)",
    )
    refused = subprocess.run(
        [sys.executable, "-c", starved, str(path)], capture_output=True, text=True
    )
    assert refused.returncode == 0, refused.stderr[-2000:]
    assert refused.stdout.strip() == f"{path}: not enough memory to decode and resize this image"


def test_a_photo_over_pillows_own_limit_is_drafted_down_not_refused(tmp_path: Path) -> None:
    """A 192 MP JPEG (200 MP phone cameras) was refused at open by Pillow's 179 MP limit
    before draft mode could decode it at 1/8 scale (2000x1500)."""
    photo = tmp_path / "200mp.jpg"
    Image.new("L", (16000, 12000), 128).save(photo, quality=50)
    limit = Image.MAX_IMAGE_PIXELS
    assert pp.load(photo, PRE).shape == (3, PRE.input_size, PRE.input_size)
    assert pp.open_image(photo, PRE).size == (2000, 1500)
    with pytest.raises(pp.ImageError, match="16000x12000, above the 100,000,000 pixel limit"):
        pp.open_image(photo)  # decoded whole, it is still refused, by this runtime's limit
    assert Image.MAX_IMAGE_PIXELS == limit  # Pillow's own, for the rest of the process


def test_pillows_limit_is_never_lifted_while_a_large_photo_opens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Opening a JPEG over Pillow's limit once set ``Image.MAX_IMAGE_PIXELS = None`` for a
    moment: another thread's ``Image.open`` in that moment (an app's own code) had no
    bomb check at all. Every assignment to Pillow's module is now watched, and a bomb that
    is not a JPEG is still refused by Pillow."""
    photo = tmp_path / "200mp.jpg"
    Image.new("L", (16000, 12000), 128).save(photo, quality=50)
    bomb = tmp_path / "bomb.png"
    Image.new("1", (16000, 12000)).save(bomb)  # 1-bit: a few hundred KB, 192 MP

    class Watched(types.ModuleType):
        def __setattr__(self, name: str, value: object) -> None:
            if name == "MAX_IMAGE_PIXELS":
                raise AssertionError(f"Image.MAX_IMAGE_PIXELS set to {value}")
            super().__setattr__(name, value)

    monkeypatch.setattr(Image, "__class__", Watched)
    assert pp.open_image(photo, PRE).size == (2000, 1500)
    with pytest.raises(pp.ImageError, match=f"{bomb}: decompression bomb refused"):
        pp.open_image(bomb, PRE)
