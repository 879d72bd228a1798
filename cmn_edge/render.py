"""Pictures of explanations, drawn with Pillow only (the runtime has no matplotlib).

The pair figure follows the CMN / DIML papers: both images as the model saw them, each top
concept's attention in its own colour, and a line from the concept's peak in one image to its
peak in the other, so matching parts are visibly paired.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from .explain import SHARE_EPS, Explanation
from .files import atomic_write
from .structural import Match

#: 20 colours chosen to stay distinct from each other (Sasha Trubetskoy's list), most
#: distinct first; concepts beyond 20 reuse them.
# fmt: off
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
    (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0),
    (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128),
)
# fmt: on

# Figure layout, in output pixels. The figure is
#   width  = 2 * MARGIN + 2 * panel + GAP
#   height = HEADER + panel + MARGIN + rows * LEGEND_ROW + MARGIN
# with panel = input_size * scale and rows = ceil(n / legend_columns(panel)).
MARGIN = 16
GAP = 48
HEADER = 52
LEGEND_ROW = 24
BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)


def colour(rank: int) -> tuple[int, int, int]:
    """Colour of the concept at 0-based ``rank``."""
    return PALETTE[rank % len(PALETTE)]


@lru_cache(maxsize=8)
def font(size: int = 14) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's bundled scalable font, so text looks the same on every machine."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow built without FreeType
        return ImageFont.load_default()


def legend_columns(panel: int) -> int:
    return 2 if panel >= 300 else 1


def figure_size(input_size: int, num_concepts: int, scale: int = 2) -> tuple[int, int]:
    """(width, height) of :func:`pair_figure`'s image for ``num_concepts`` legend entries."""
    panel = input_size * scale
    rows = math.ceil(num_concepts / legend_columns(panel)) if num_concepts else 0
    return 2 * MARGIN + 2 * panel + GAP, HEADER + panel + MARGIN + rows * LEGEND_ROW + MARGIN


def upsample(attention: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """An h x w attention map smoothly resized (bicubic) to ``size`` and scaled to [0, 1]."""
    width, height = (size, size) if isinstance(size, int) else size
    grid = Image.fromarray(np.asarray(attention, dtype=np.float32), mode="F")
    up = np.asarray(grid.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)
    low, high = float(up.min()), float(up.max())
    if high - low < 1e-12:
        return np.zeros_like(up)
    return (up - low) / (high - low)


def peakedness(attention: np.ndarray) -> float:
    """0 for a uniform map, towards 1 for a single-cell map: how much there is to show."""
    attention = np.asarray(attention, dtype=np.float64)
    uniform = 1.0 / attention.size
    peak = float(attention.max())
    return 0.0 if peak <= uniform else 1.0 - uniform / peak


def overlay(
    image: Image.Image,
    maps: Sequence[np.ndarray],
    colours: Sequence[tuple[int, int, int]],
    outline: bool = True,
) -> Image.Image:
    """Tint each map's strong region in its colour over ``image`` (already at output size).

    Where regions overlap, the pixel goes to the concept whose normalised attention is highest
    there, so ten concepts stay readable instead of mixing into brown. Flat maps fade (their
    opacity follows :func:`peakedness`) rather than tint the whole picture.
    """
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    if not maps:
        return image.convert("RGB")
    height, width = base.shape[:2]
    ups = np.stack([upsample(m, (width, height)) for m in maps])
    strength = np.asarray([0.3 + 0.4 * peakedness(m) for m in maps], dtype=np.float32)
    alpha = np.clip((ups - 0.45) / 0.55, 0.0, 1.0) ** 0.7 * strength[:, None, None]
    winner = np.argmax(alpha, axis=0)
    a = np.take_along_axis(alpha, winner[None], axis=0)[0][..., None]
    palette = np.asarray(colours, dtype=np.float32)
    out = base * (1.0 - a) + palette[winner] * a
    if outline:
        for k in range(len(maps)):
            mask = (winner == k) & (ups[k] >= 0.6)
            if not mask.any():
                continue
            mask_image = Image.fromarray(mask.astype(np.uint8) * 255, mode="L")
            # a 3x3 edge kernel marks both sides of the border: a 2 px outline
            out[np.asarray(mask_image.filter(ImageFilter.FIND_EDGES)) > 0] = palette[k]
    return Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8), mode="RGB")


def _label(term_index: int, name: str | None) -> str:
    return f"#{term_index} {name}" if name else f"#{term_index}"


def _fit(draw: ImageDraw.ImageDraw, text: str, width: int, fnt) -> str:
    """Shorten ``text`` with an ellipsis until it fits ``width`` pixels."""
    if draw.textlength(text, font=fnt) <= width:
        return text
    while text and draw.textlength(text + "…", font=fnt) > width:
        text = text[:-1]
    return text + "…"


def _marker(draw: ImageDraw.ImageDraw, xy: tuple[float, float], rgb, label: str) -> None:
    x, y = xy
    r = 10
    draw.ellipse((x - r, y - r, x + r, y + r), fill=rgb, outline=(255, 255, 255), width=2)
    luminance = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    ink = (0, 0, 0) if luminance > 140 else (255, 255, 255)
    draw.text((x, y), label, fill=ink, font=font(12), anchor="mm")


def pair_figure(explanation: Explanation, top: int | None = None, scale: int = 2) -> Image.Image:
    """Both crops side by side, the top parts' (concepts', groups') attention overlaid, peaks
    joined by lines."""
    if scale < 1:
        raise ValueError(f"scale must be >= 1, not {scale}")
    terms = list(explanation.top if top is None else explanation.top[:top])
    size = explanation.input_size
    panel = size * scale
    width, height = figure_size(size, len(terms), scale)
    figure = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(figure)
    colours = [colour(r) for r in range(len(terms))]
    origins = [(MARGIN, HEADER), (MARGIN + panel + GAP, HEADER)]
    sides = [explanation.a, explanation.b]

    for side, origin in zip(sides, origins):
        shown = side.image.resize((panel, panel), Image.Resampling.BICUBIC)
        maps = [side.attention[t.index] for t in terms]
        figure.paste(overlay(shown, maps, colours), origin)

    # Header: the score and what each panel is.
    explained = sum(t.contribution for t in terms)
    head = f"similarity {explanation.score:+.4f}"
    if terms and explanation.score > SHARE_EPS:
        fraction = explained / explanation.score
        noun = explanation.part_layout.noun
        head += f"   top {len(terms)} {noun}s: {explained:+.4f} ({fraction:.0%})"
    head += f"   {explanation.model_id}"
    draw.text((MARGIN, 8), _fit(draw, head, width - 2 * MARGIN, font(15)), fill=TEXT, font=font(15))
    for letter, side, (x, y) in zip("AB", sides, origins):
        caption = f"{letter}: {Path(side.source).name}"
        draw.text((x, y - 20), _fit(draw, caption, panel, font(14)), fill=TEXT, font=font(14))

    # Structural view: a line from each concept's peak in A to its peak in B.
    points = []
    for t in terms:
        pa = explanation.a.peak_xy(t.index)
        pb = explanation.b.peak_xy(t.index)
        points.append(
            (
                (origins[0][0] + pa[0] * scale, origins[0][1] + pa[1] * scale),
                (origins[1][0] + pb[0] * scale, origins[1][1] + pb[1] * scale),
            )
        )
    for (pa, pb), rgb in zip(reversed(points), reversed(colours)):
        draw.line((pa, pb), fill=(0, 0, 0), width=6)
        draw.line((pa, pb), fill=rgb, width=3)
    for rank, ((pa, pb), rgb) in reversed(list(enumerate(zip(points, colours), 1))):
        _marker(draw, pa, rgb, str(rank))
        _marker(draw, pb, rgb, str(rank))

    # Legend: rank, colour, concept id/name, contribution and share.
    columns = legend_columns(panel)
    column_width = (width - 2 * MARGIN) // columns
    rows = math.ceil(len(terms) / columns) if terms else 0
    top_y = HEADER + panel + MARGIN
    for rank, (t, rgb) in enumerate(zip(terms, colours), 1):
        col, row = divmod(rank - 1, rows)
        x = MARGIN + col * column_width
        y = top_y + row * LEGEND_ROW
        draw.rectangle((x, y + 3, x + 16, y + 19), fill=rgb, outline=(60, 60, 60))
        share = "" if t.share is None else f" ({t.share:.1%})"
        numbers = f"{t.contribution:+.4f}{share}"
        fnt = font(14)
        number_width = int(draw.textlength(numbers, font=fnt))
        right = x + column_width - 12
        draw.text((right - number_width, y + 3), numbers, fill=TEXT, font=fnt)
        label = _fit(draw, f"{rank}. {_label(t.index, t.name)}", right - number_width - x - 32, fnt)
        draw.text((x + 24, y + 3), label, fill=TEXT, font=fnt)
    return figure


def concept_view(
    image: Image.Image, attention: np.ndarray, size: int = 160, rgb=PALETTE[0]
) -> Image.Image:
    """One image with one concept's attention overlaid and its peak cell boxed."""
    shown = image.resize((size, size), Image.Resampling.BICUBIC)
    out = overlay(shown, [attention], [rgb])
    row, col = divmod(int(np.argmax(attention)), attention.shape[1])
    ch, cw = size / attention.shape[0], size / attention.shape[1]
    ImageDraw.Draw(out).rectangle(
        (col * cw, row * ch, (col + 1) * cw - 1, (row + 1) * ch - 1),
        outline=(255, 255, 255),
        width=2,
    )
    return out


def peak_crop(
    image: Image.Image, attention: np.ndarray, cells: float = 2.5, size: int = 128
) -> Image.Image:
    """A square window of ``cells`` grid cells around the smooth attention peak, enlarged."""
    up = upsample(attention, image.size)
    y, x = np.unravel_index(int(np.argmax(up)), up.shape)
    half = cells * image.width / attention.shape[1] / 2
    half = min(half, image.width / 2, image.height / 2)
    left = min(max(x - half, 0), image.width - 2 * half)
    top = min(max(y - half, 0), image.height - 2 * half)
    box = (int(left), int(top), int(left + 2 * half), int(top + 2 * half))
    return image.crop(box).resize((size, size), Image.Resampling.BICUBIC)


def save_png(image: Image.Image, path: str | os.PathLike) -> Path:
    """Write atomically: a failed or interrupted save never leaves a half-written PNG.

    The file gets the umask's mode (a web server may show it); a FIFO is written through.
    """
    with atomic_write(path) as out:
        image.save(out, format="PNG")
    return Path(path)


def stack(upper: Image.Image, lower: Image.Image) -> Image.Image:
    """One picture above the other, on the figures' background."""
    out = Image.new("RGB", (max(upper.width, lower.width), upper.height + lower.height), BACKGROUND)
    out.paste(upper, (0, 0))
    out.paste(lower, (0, upper.height))
    return out


def structural_figure(
    image_a: Image.Image,
    image_b: Image.Image,
    match: Match,
    grid: tuple[int, int],
    top: int = 12,
    scale: int = 2,
    captions: tuple[str, str] = ("A", "B"),
) -> Image.Image:
    """DIML's view: both crops with their region grid, and a line per matched region pair,
    as wide as its share of the structural score (the ``top`` largest pairs)."""
    if scale < 1:
        raise ValueError(f"scale must be >= 1, not {scale}")
    panel = image_a.width * scale
    width = 2 * MARGIN + 2 * panel + GAP
    height = HEADER + panel + MARGIN
    figure = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(figure)
    origins = [(MARGIN, HEADER), (MARGIN + panel + GAP, HEADER)]
    rows, cols = grid
    for image, (x, y), caption in zip((image_a, image_b), origins, captions):
        figure.paste(image.resize((panel, panel), Image.Resampling.BICUBIC), (x, y))
        for i in range(1, rows):
            draw.line((x, y + i * panel / rows, x + panel, y + i * panel / rows), fill=(255,) * 3)
        for j in range(1, cols):
            draw.line((x + j * panel / cols, y, x + j * panel / cols, y + panel), fill=(255,) * 3)
        draw.text((x, y - 20), _fit(draw, caption, panel, font(14)), fill=TEXT, font=font(14))
    pairs = match.top_pairs(top)
    shown = sum(c for _, _, c in pairs)
    head = f"structural similarity {match.score:+.4f}   top {len(pairs)} region pairs: "
    share = f" ({shown / match.score:.0%})" if match.score > SHARE_EPS else ""
    head += f"{shown:+.4f}{share}"
    draw.text((MARGIN, 8), _fit(draw, head, width - 2 * MARGIN, font(15)), fill=TEXT, font=font(15))
    largest = max((c for _, _, c in pairs), default=0.0)

    def centre(origin: tuple[int, int], cell: int) -> tuple[float, float]:
        row, col = divmod(cell, cols)
        return origin[0] + (col + 0.5) * panel / cols, origin[1] + (row + 0.5) * panel / rows

    for rank, (i, j, contribution) in reversed(list(enumerate(pairs))):
        line = (centre(origins[0], i), centre(origins[1], j))
        thickness = max(1, round(10 * contribution / largest)) if largest > 0 else 1
        draw.line(line, fill=(0, 0, 0), width=thickness + 3)
        draw.line(line, fill=colour(rank), width=thickness)
    return figure
