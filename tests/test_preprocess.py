"""Decoding and the evaluation transform: parity with training, EXIF, odd modes, draft, bombs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cmn_edge import preprocess as pp
from cmn_edge.metadata import Preprocess

DATA = Path(__file__).resolve().parent / "data"
BAD_FILES = ["empty.jpg", "truncated.jpg", "corrupt.jpg", "text.jpg", "bomb.png"]

#: Normalised value of a white and a black pixel under the bundled model's mean/std.
PRE = Preprocess()
WHITE = (255.0 - PRE.mean[0]) / PRE.std[0]
BLACK = (0.0 - PRE.mean[0]) / PRE.std[0]


def _portrait(path: Path, tmp_path: Path) -> Path:
    out = tmp_path / f"{path.stem}_portrait.png"
    Image.open(path).convert("RGB").transpose(Image.Transpose.ROTATE_90).save(out)
    return out


@pytest.mark.parametrize("input_size", [224, 192, 299])
def test_matches_training_eval_transform(photos, tmp_path, embedder, input_size):
    """The numpy transform must give what the training side's torchvision transform gives."""
    from cmn_export.data import eval_transform

    pre = (
        embedder.preprocess
        if input_size == embedder.preprocess.input_size
        else Preprocess.for_input_size(input_size)
    )
    transform = eval_transform(pre)
    paths = list(photos.values()) + [_portrait(photos["motorcycle"], tmp_path)]
    for path in paths:
        ours = pp.load(path, pre)
        theirs = transform(pp.open_image(path)).numpy()
        assert ours.dtype == np.float32
        assert ours.shape == theirs.shape == (3, pre.input_size, pre.input_size)
        # Same Pillow resize and crop: only float rounding of the normalisation may differ.
        assert np.abs(ours - theirs).max() < 1e-6, path


@pytest.mark.parametrize(
    "orientation, rotate_ccw", [(3, 180), (6, -90), (8, 90)], ids=["180", "cw", "ccw"]
)
def test_exif_orientation_is_applied(photos, tmp_path, orientation, rotate_ccw):
    """A phone photo stored sideways with an Orientation tag must come out upright."""
    stored = Image.open(photos["cat"]).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"oriented{orientation}.jpg"
    stored.save(path, exif=exif, quality=95)

    raw = Image.open(path)
    raw.load()  # the stored pixels, as written, without the tag applied
    # fromarray drops the EXIF block, so the expected image is not turned a second time.
    expected = Image.fromarray(np.asarray(raw.convert("RGB").rotate(rotate_ccw, expand=True)))
    upright = pp.open_image(path)
    assert upright.size == expected.size
    assert np.array_equal(np.asarray(upright), np.asarray(expected))
    tensor = pp.load(path, PRE)
    assert np.array_equal(tensor, pp.load(expected, PRE))
    unturned = Image.fromarray(np.asarray(raw.convert("RGB")))
    assert not np.allclose(tensor, pp.load(unturned, PRE), atol=0.05)


def _check_tensor(tensor: np.ndarray, pre: Preprocess = PRE) -> None:
    assert tensor.dtype == np.float32
    assert tensor.shape == (3, pre.input_size, pre.input_size)
    assert np.isfinite(tensor).all()
    assert tensor.min() >= BLACK - 1e-6 and tensor.max() <= WHITE + 1e-6


def test_greyscale_and_palette(photos, tmp_path):
    rgb = Image.open(photos["coffee"]).convert("RGB")
    grey_path = tmp_path / "grey.png"
    rgb.convert("L").save(grey_path)
    grey = pp.load(grey_path, PRE)
    _check_tensor(grey)
    assert np.array_equal(grey[0], grey[1]) and np.array_equal(grey[1], grey[2])

    palette_path = tmp_path / "palette.gif"
    rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(palette_path)
    palette = pp.load(palette_path, PRE)
    _check_tensor(palette)
    # 64 colours approximate the photo: close to it, but it is not a grey image.
    assert np.abs(palette - pp.load(rgb, PRE)).mean() < 0.1
    assert not np.allclose(palette[0], palette[2])


def test_transparency_is_composited_on_white(tmp_path):
    """Transparent areas become white (not black, not the hidden colour)."""
    rgba = Image.new("RGBA", (320, 240), (10, 200, 30, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 160, 240))  # left half: fully transparent black
    rgba_path = tmp_path / "rgba.png"
    rgba.save(rgba_path)
    tensor = pp.load(rgba_path, PRE)
    _check_tensor(tensor)
    assert np.allclose(tensor[:, :, :20], WHITE)  # left edge of the crop: transparent
    assert np.allclose(
        tensor[:, 100:120, -20:].mean(axis=(1, 2)),
        [(v - 127) / 128 for v in (10, 200, 30)],
        atol=1e-3,
    )

    palette = Image.new("P", (320, 240), 1)
    palette.putpalette([0, 0, 0, 200, 20, 20] + [0] * 762)
    palette.paste(0, (0, 0, 160, 240))
    palette_path = tmp_path / "palette_transparent.png"
    palette.save(palette_path, transparency=0)
    assert Image.open(palette_path).mode == "P"
    tensor = pp.load(palette_path, PRE)
    _check_tensor(tensor)
    assert np.allclose(tensor[:, :, :20], WHITE)
    assert np.allclose(tensor[0, :, -20:], (200 - 127) / 128, atol=1e-3)


def test_cmyk_jpeg(photos, tmp_path):
    rgb = Image.open(photos["rocket"]).convert("RGB")
    path = tmp_path / "cmyk.jpg"
    rgb.convert("CMYK").save(path, quality=95)
    assert Image.open(path).mode == "CMYK"
    tensor = pp.load(path, PRE)
    _check_tensor(tensor)
    assert np.abs(tensor - pp.load(rgb, PRE)).mean() < 0.05


def test_sixteen_bit_png_keeps_its_range(tmp_path):
    """A 16-bit value is scaled to 8 bits, not clipped: 65535 is white, 32768 mid-grey."""
    array = np.zeros((300, 300), dtype=np.uint16)
    array[:, 100:200] = 32768
    array[:, 200:] = 65535
    path = tmp_path / "sixteen.png"
    Image.fromarray(array).save(path)
    assert Image.open(path).mode.startswith("I")
    pre = Preprocess(input_size=300, resize_size=300)  # no resampling: exact pixel checks
    tensor = pp.load(path, pre)
    _check_tensor(tensor, pre)
    assert np.allclose(tensor[:, :, :90], BLACK)
    assert np.allclose(tensor[:, :, 110:190], (128 - 127) / 128)
    assert np.allclose(tensor[:, :, 210:], WHITE)


@pytest.mark.parametrize("mode", ["1", "LA", "I", "F", "YCbCr", "HSV"])
def test_other_modes_give_valid_tensors(photos, mode):
    image = Image.open(photos["astronaut"]).convert("RGB")
    image = (
        image.convert("L").convert(mode) if mode in ("1", "LA", "I", "F") else image.convert(mode)
    )
    _check_tensor(pp.load(image, PRE))


@pytest.mark.parametrize(
    "shape, dtype",
    [
        ((240, 320), np.uint8),
        ((240, 320, 1), np.uint8),
        ((240, 320, 4), np.uint8),
        ((240, 320, 3), np.float32),
    ],
)
def test_array_inputs(shape, dtype):
    rng = np.random.default_rng(0)
    array = (
        rng.random(shape).astype(dtype)
        if dtype == np.float32
        else rng.integers(0, 256, shape, dtype=dtype)
    )
    _check_tensor(pp.load(array, PRE))


def test_bad_array_shape_is_an_image_error():
    with pytest.raises(pp.ImageError, match="shape"):
        pp.load(np.zeros((4, 4, 5), dtype=np.uint8), PRE)


def test_draft_mode_decodes_large_jpeg_smaller_with_same_result(photos, tmp_path, embedder):
    pre = embedder.preprocess
    source = Image.open(photos["motorcycle"]).convert("RGB")
    path = tmp_path / "large.jpg"
    source.resize((4000, 2700), Image.Resampling.BICUBIC).save(path, quality=92)

    full = pp.open_image(path)  # no preprocess given: no draft
    drafted = pp.open_image(path, pre)
    assert full.size == (4000, 2700)
    # Draft cut the decode by a power of two but kept at least twice the resize target.
    assert min(drafted.size) >= 2 * pre.resize_size
    assert min(drafted.size) < 4 * pre.resize_size
    assert drafted.size[0] * drafted.size[1] <= full.size[0] * full.size[1] / 16

    drafted_tensor = pp.load(path, pre)
    full_tensor = pp.to_tensor(pp.resize_and_crop(full, pre), pre)
    # Mean difference below 1.5 grey levels (of 255) per pixel; the images are the same.
    assert np.abs(drafted_tensor - full_tensor).mean() < 1.5 / pre.std[0]
    embeddings = embedder.embed_arrays(np.stack([drafted_tensor, full_tensor])).embedding
    assert float(embeddings[0] @ embeddings[1]) > 0.99


def test_small_jpeg_is_decoded_at_full_size(photos, embedder):
    for path in photos.values():
        assert pp.open_image(path, embedder.preprocess).size == Image.open(path).size


@pytest.mark.parametrize("name", BAD_FILES)
def test_bad_files_raise_one_line_image_error(name):
    path = DATA / name
    with pytest.raises(pp.ImageError) as info:
        pp.load(path, PRE)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert "\n" not in message


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(pp.ImageError, match="file not found"):
        pp.load(tmp_path / "nope.jpg", PRE)
    with pytest.raises(pp.ImageError, match="directory"):
        pp.load(tmp_path, PRE)


def test_bomb_limit_is_max_pixels_not_pillows(tmp_path, monkeypatch):
    """Refused above MAX_PIXELS with a message that says so; the limit is ours to set."""
    with pytest.raises(pp.ImageError, match="pixel limit"):
        pp.open_image(DATA / "bomb.png")
    small = tmp_path / "small.png"
    Image.new("1", (200, 100)).save(small)
    assert pp.open_image(small).size == (200, 100)
    monkeypatch.setattr(pp, "MAX_PIXELS", 200 * 100 - 1)
    with pytest.raises(pp.ImageError, match="200x100"):
        pp.open_image(small)


def test_pillow_bomb_warning_does_not_undercut_max_pixels(tmp_path, monkeypatch):
    """An image between Pillow's warning threshold and MAX_PIXELS is a photo, not a bomb."""
    path = tmp_path / "between.png"
    Image.new("L", (150, 100), 90).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # warns above 10k, errors above 20k
    assert pp.open_image(path).size == (150, 100)
