"""Image decoding and the evaluation transform, in Pillow and numpy only.

The transform is the one torchvision applies in training (``Resize(short side)``,
``CenterCrop``, normalise), reproduced with the same Pillow calls so the two agree.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, JpegImagePlugin

from .metadata import Preprocess

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray]  # noqa: UP007 (runtime alias)

#: Refuse images above this many pixels (about 12k x 8k): decompression bombs.
MAX_PIXELS = 100_000_000
#: A resize to more pixels than this (an aspect ratio past 256:1 at the usual 256 short
#: side) resamples only the centre crop, not the whole resized image.
MAX_RESIZED_PIXELS = 4096 * 4096

_INTERPOLATION = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}


class ImageError(ValueError):
    """An input that cannot be turned into an image; the message names the file and reason."""


def _describe(source: object) -> str:
    return str(source) if isinstance(source, (str, os.PathLike)) else type(source).__name__


def open_image(source: ImageInput, preprocess: Preprocess | None = None) -> Image.Image:
    """Decode to an upright RGB image, decoding large JPEGs at reduced scale when allowed.

    With ``preprocess`` given, a JPEG is decoded through Pillow's draft mode at the smallest
    DCT scale that still leaves at least twice the resize target on the short side, so the
    later antialiased resize sees nearly the same pixels at a fraction of the decode cost.
    """
    if isinstance(source, Image.Image):
        name = getattr(source, "filename", "") or _describe(source)
        try:  # an Image.open()ed image decodes only now: it may be truncated or corrupt
            upright = ImageOps.exif_transpose(source)
        except (OSError, SyntaxError, ValueError) as exc:
            raise ImageError(f"{name}: corrupt or truncated image ({exc})") from None
        return _to_rgb(upright, name)
    if isinstance(source, np.ndarray):
        return _array_to_image(source)
    path = Path(source)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ImageError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a directory, not an image") from None
    except OSError as exc:
        raise ImageError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return decode_bytes(data, str(path), preprocess)


def _open_without_pillows_limit(buffer: io.BytesIO) -> Image.Image:
    """``Image.open`` without Pillow's refusal of images over 179 MP, which comes before a
    JPEG can be drafted down: a 200 MP phone photo decodes at 1/8 scale as 3 MP. The
    limit that protects this runtime is MAX_PIXELS, checked on the pixels to be decoded
    before any is. Pillow checks its limit in ``Image.open``, not in its JPEG reader, so a
    JPEG it refuses is opened again by that reader: Pillow's process-wide limit is never
    lifted, not even for a moment another thread could open a bomb in."""
    try:
        return Image.open(buffer)
    except Image.DecompressionBombError:
        buffer.seek(0)
        if buffer.read(3) != b"\xff\xd8\xff":  # not a JPEG: nothing can draft it down
            raise
        buffer.seek(0)
        return JpegImagePlugin.jpeg_factory(buffer)


def decode_bytes(data: bytes, source: str, preprocess: Preprocess | None = None) -> Image.Image:
    """``open_image`` for a file's bytes read elsewhere (Ray Data's binary reader): the same
    checks, draft-mode decode and rotation, so the pixels equal those of reading ``source``."""
    path = source
    if not data:
        raise ImageError(f"{path}: file is empty")
    try:
        with warnings.catch_warnings():
            # MAX_PIXELS below is the limit; Pillow's own warning (89 M) would undercut it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = _open_without_pillows_limit(io.BytesIO(data))
            width, height = image.size
            if preprocess is not None and image.format == "JPEG":
                target = 2 * preprocess.resize_size
                short = min(image.size)
                if short > target:
                    scale = target / short
                    image.draft("RGB", (int(image.width * scale), int(image.height * scale)))
            # the limit is on the pixels decoded: a 108 MP phone photo drafted to 1/8 scale
            # is 1.7 M of them
            if image.width * image.height > MAX_PIXELS:
                raise ImageError(
                    f"{path}: image is {width}x{height}, above the "
                    f"{MAX_PIXELS:,} pixel limit (possible decompression bomb)"
                )
            image.load()
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{path}: decompression bomb refused ({exc})") from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"{path}: not an image file (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{path}: corrupt or truncated image ({exc})") from None
    # The image is ours: rotate it in place rather than copying it (Pillow copies otherwise,
    # even when there is nothing to rotate).
    ImageOps.exif_transpose(image, in_place=True)
    return _to_rgb(image, str(path))


def _to_rgb(image: Image.Image, source: str) -> Image.Image:
    """Palette, alpha, CMYK, greyscale and 16-bit images all become 8-bit RGB."""
    if not image.width or not image.height:  # an empty crop or array: nothing to resize
        raise ImageError(f"{source}: image is empty ({image.width}x{image.height} pixels)")
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        return Image.fromarray(_sixteen_bit_to_grey(image), "L").convert("RGB")
    if image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        grey = np.clip(array * (255.0 if array.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except (OSError, ValueError) as exc:
        raise ImageError(f"{source}: cannot convert mode {image.mode} to RGB ({exc})") from None


#: Rows of a 16-bit image scaled to 8 bits at a time (bounds the temporary memory).
GREY_ROWS = 512


def _sixteen_bit_to_grey(image: Image.Image) -> np.ndarray:
    """round(value / peak x 255), in integers and a band of rows at a time: through float64
    a 100 MP 16-bit scan took about 2.4 GB at its peak; now the 8-bit result and one band."""
    array = np.asarray(image)
    peak = 65535 if image.mode.startswith("I;16") or array.max() > 255 else 255
    grey = np.empty(array.shape, np.uint8)
    for start in range(0, len(array), GREY_ROWS):
        band = np.clip(array[start : start + GREY_ROWS], 0, peak).astype(np.int64)
        grey[start : start + GREY_ROWS] = (band * 510 + peak) // (2 * peak)
    return grey


def _array_to_image(array: np.ndarray) -> Image.Image:
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ImageError(f"array: expected HxW, HxWx3 or HxWx4, got shape {array.shape}")
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    if array.dtype != np.uint8:
        if np.issubdtype(array.dtype, np.floating) and array.max(initial=0) <= 1.0:
            array = array * 255.0
        array = np.clip(array, 0, 255).astype(np.uint8)
    mode = "RGBA" if array.shape[-1] == 4 else "RGB"
    return _to_rgb(Image.fromarray(np.ascontiguousarray(array), mode), "array")


def resize_and_crop(image: Image.Image, preprocess: Preprocess) -> Image.Image:
    """torchvision's ``Resize(resize_size)`` then ``CenterCrop(input_size)`` on a PIL image."""
    width, height = image.size
    short = preprocess.resize_size
    if width <= height:
        new_w, new_h = short, int(short * height / width)
    else:
        new_w, new_h = int(short * width / height), short
    crop = preprocess.input_size
    left = int(round((new_w - crop) / 2.0))
    top = int(round((new_h - crop) / 2.0))
    resample = _INTERPOLATION[preprocess.interpolation]
    if new_w * new_h > MAX_RESIZED_PIXELS and short >= crop:
        # A strip (1x5000 resizes to 256x1,280,000: over a GB, from a 100-byte PNG): resample
        # only the crop's region of the source at the same scale. Within a grey level or two
        # of resize-then-crop; images of ordinary shape never come here and stay exact.
        sx, sy = width / new_w, height / new_h
        box = (left * sx, top * sy, min(width, (left + crop) * sx), min(height, (top + crop) * sy))
        return image.resize((crop, crop), resample, box=box)
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), resample)
    return image.crop((left, top, left + crop, top + crop))


def to_tensor(image: Image.Image, preprocess: Preprocess) -> np.ndarray:
    """HWC uint8 -> CHW float32, normalised, in the model's channel order.

    The pixels stay uint8 until one float32 pass writes the contiguous CHW result; the values
    are those of ``(float32(x) - mean) * (1 / std)``.
    """
    array = np.asarray(image)
    if preprocess.channel_order == "BGR":
        array = array[..., ::-1]
    mean = np.asarray(preprocess.mean, dtype=np.float32)[:, None, None]
    inv_std = (1.0 / np.asarray(preprocess.std, dtype=np.float32))[:, None, None]
    out = np.empty((3, *array.shape[:2]), dtype=np.float32)
    np.subtract(array.transpose(2, 0, 1), mean, out=out, dtype=np.float32)
    out *= inv_std
    return out


def load(source: ImageInput, preprocess: Preprocess) -> np.ndarray:
    """One image, ready for the graph: float32 [3, input_size, input_size]."""
    name = str(source) if isinstance(source, (str, os.PathLike)) else "image"
    with _memory_is_an_image_error(name):
        return to_tensor(resize_and_crop(open_image(source, preprocess), preprocess), preprocess)


def load_bytes(data: bytes, source: str, preprocess: Preprocess) -> np.ndarray:
    """``load`` of a file's bytes; ``source`` names the file in errors."""
    with _memory_is_an_image_error(source):
        image = decode_bytes(data, source, preprocess)
        return to_tensor(resize_and_crop(image, preprocess), preprocess)


@contextlib.contextmanager
def _memory_is_an_image_error(name: str) -> Iterator[None]:
    """A photo too large for this device's memory is that file's failure (skipped under
    --skip-errors, named in one line), not the command's internal error."""
    try:
        yield
    except MemoryError:
        raise ImageError(f"{name}: not enough memory to decode and resize this image") from None
