"""A concept catalogue: for each part (a concept, or a DGML model's group), the gallery
images that show it best.

A person names parts by looking at what their strongest images share and where the part
attends in them (a concept: the images where it is most present; a group, which has no such
value: its most typical appearances, see :meth:`cmn_edge.parts.Parts.strength`). The
catalogue is one HTML page that needs nothing else to open: images inline as ``data:`` URIs,
or (for big galleries) JPEG files in a folder beside it.
"""

from __future__ import annotations

import base64
import html
import io
import os
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from . import preprocess as pp
from .files import write_bytes_atomic, write_text_atomic
from .parts import Parts
from .render import concept_view, peak_crop

VIEW_SIZE = 160
CROP_SIZE = 96


@dataclass(frozen=True)
class Tile:
    """One image of a concept's row."""

    item_id: int
    path: str
    value: float  # the part's strength in the stored embedding (a concept: its dimension)
    view: bytes | None  # JPEG: the crop the model saw, this part's attention overlaid
    crop: bytes | None  # JPEG: the window around the attention peak, enlarged
    error: str | None = None  # why the image could not be shown (moved, deleted, ...)


@dataclass(frozen=True)
class ConceptCard:
    concept: int
    name: str | None
    tiles: tuple[Tile, ...]


@dataclass(frozen=True)
class Catalogue:
    model_id: str
    num_items: int
    cards: tuple[ConceptCard, ...]
    source: str = ""  # the index it came from, for the naming commands
    missing: tuple[str, ...] = field(default_factory=tuple)  # one line per unreadable image
    noun: str = "concept"  # what a card is: a concept, or a DGML model's group


def parse_concepts(spec: str | None, num_concepts: int, noun: str = "concept") -> list[int]:
    """Part ids (``num_concepts`` parts called ``noun``): ``None``: all; ``"40"``: the first
    40; ``"3,17,100-110"``: those ids (``"17,"``: one)."""
    if spec is None or not spec.strip():
        return list(range(num_concepts))
    spec = spec.strip()
    if spec.isdigit():
        count = int(spec)
        if count < 1:
            raise ValueError(f"--concepts {spec}: need at least one {noun}")
        return list(range(min(count, num_concepts)))
    chosen: list[int] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        try:
            if "-" in part:
                low, high = (int(v) for v in part.split("-", 1))
                values = range(low, high + 1)
            else:
                values = range(int(part), int(part) + 1)
        except ValueError:
            raise ValueError(
                f"--concepts {spec}: expected a count or ids like 3,17,100-110"
            ) from None
        for value in values:
            if not 0 <= value < num_concepts:
                raise ValueError(
                    f"--concepts {spec}: {noun} {value} out of range (0-{num_concepts - 1})"
                )
            if value not in chosen:
                chosen.append(value)
    if not chosen:
        raise ValueError(f"--concepts {spec}: no {noun}s given")
    return chosen


def strongest(embeddings: np.ndarray, concept: int, count: int) -> np.ndarray:
    """Rows of ``embeddings`` (or of per-part strengths) with the highest value in column
    ``concept``, best first."""
    column = np.asarray(embeddings[:, concept])
    count = min(count, column.shape[0])
    if count <= 0:
        return np.zeros(0, dtype=np.int64)
    rows = np.argpartition(-column, count - 1)[:count]
    return rows[np.lexsort((rows, -column[rows]))]


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def build(
    embedder,
    item_ids: Sequence[int],
    paths: Sequence[str | os.PathLike],
    embeddings: np.ndarray,
    concepts: Sequence[int],
    per_concept: int = 6,
    names: Sequence[str | None] | None = None,
    source: str = "",
    batch_size: int = 16,
    progress: Callable[[int, int], None] | None = None,
) -> Catalogue:
    """Pick each part's strongest items by the stored embeddings, then draw where it looks.

    ``concepts`` are part ids (:class:`~cmn_edge.parts.Parts` of the embedder's model: its
    concepts, or a DGML model's groups) and ``names`` one per part. Attention is not stored
    in an index, so the chosen images (each once, however many parts chose it) are run
    through the model again. An image that cannot be read any more
    is listed as missing, not fatal: a catalogue of the rest is still useful.
    """
    embeddings = np.asarray(embeddings)
    if embeddings.ndim != 2 or not embeddings.shape[0] == len(paths) == len(item_ids):
        raise ValueError("embeddings, paths and ids do not line up")
    if embeddings.shape[1] != embedder.num_concepts:
        raise ValueError(
            f"{source or 'index'}: embeddings have {embeddings.shape[1]} concepts, the model "
            f"{embedder.num_concepts}"
        )
    parts = Parts.of(embedder.metadata)
    strength = parts.strength(embeddings)
    chosen = {c: strongest(strength, c, per_concept) for c in concepts}
    wanted: dict[int, list[int]] = {}
    for concept, rows in chosen.items():
        for row in rows:
            wanted.setdefault(int(row), []).append(concept)

    pre = embedder.preprocess
    pictures: dict[tuple[int, int], tuple[bytes, bytes]] = {}
    errors: dict[int, str] = {}
    rows_todo = sorted(wanted)
    done = 0
    for start in range(0, len(rows_todo), max(1, batch_size)):
        chunk = rows_todo[start : start + batch_size]
        crops, kept = [], []
        for row in chunk:
            try:
                crops.append(pp.resize_and_crop(pp.open_image(paths[row], pre), pre))
                kept.append(row)
            except pp.ImageError as exc:
                errors[row] = str(exc)
        if kept:
            batch = np.stack([pp.to_tensor(crop, pre) for crop in crops])
            attention = parts.maps(embedder.embed_arrays(batch, with_attention=True).attention)
            for row, crop, maps in zip(kept, crops, attention):
                for concept in wanted[row]:
                    pictures[(row, concept)] = (
                        _jpeg(concept_view(crop, maps[concept], VIEW_SIZE)),
                        _jpeg(peak_crop(crop, maps[concept], size=CROP_SIZE)),
                    )
        done += len(chunk)
        if progress is not None:
            progress(done, len(rows_todo))

    cards = []
    for concept in concepts:
        tiles = []
        for row in chosen[concept]:
            row = int(row)
            view, crop = pictures.get((row, concept), (None, None))
            tiles.append(
                Tile(
                    item_id=int(item_ids[row]),
                    path=str(paths[row]),
                    value=float(strength[row, concept]),
                    view=view,
                    crop=crop,
                    error=errors.get(row),
                )
            )
        name = names[concept] if names is not None else None
        cards.append(ConceptCard(int(concept), name or None, tuple(tiles)))
    return Catalogue(
        model_id=embedder.model_id,
        num_items=int(embeddings.shape[0]),
        cards=tuple(cards),
        source=source,
        missing=tuple(errors[row] for row in sorted(errors)),
        noun=parts.noun,
    )


#: What "strongest" means for each kind of part (the page says it).
_STRENGTH = {
    "concept": "highest value in the embedding",
    "group": "its block closest to the group's mean over the gallery: its most typical look",
}

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.3em}.meta{color:#555;font-size:.9em}
section{background:#fff;border:1px solid #ddd;border-radius:6px;margin:1em 0;padding:.6em 1em}
section h2{font-size:1.05em;margin:.2em 0 .5em}.unnamed{color:#999;font-weight:normal}
.row{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;width:FIGUREpx;font-size:.75em;color:#444}
figure img{display:block}figure .pair{display:flex;gap:4px;align-items:flex-end}
figcaption{overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.missing{width:VIEWpx;height:VIEWpx;background:#eee;color:#a00;font-size:.8em;padding:4px;
box-sizing:border-box;overflow:hidden}
input{font-size:1em;width:18em;margin-left:1em}
#commands{width:100%;height:4.5em;font-family:monospace;font-size:.85em}
.tools{position:sticky;bottom:0;background:#fafafa;padding:.5em 0;border-top:1px solid #ccc}
""".replace("FIGURE", str(VIEW_SIZE + CROP_SIZE + 4)).replace("VIEW", str(VIEW_SIZE))

_SCRIPT = """
const index = document.body.dataset.index;
function q(s){return "'" + s.replace(/'/g, "'\\\\''") + "'";}
function update(){
  const lines = [];
  for (const box of document.querySelectorAll('input[data-concept]')) {
    const v = box.value.trim();
    if (v) lines.push('cmn-edge concepts name --index ' + q(index) + ' ' + box.dataset.concept
                      + ' ' + q(v));
  }
  document.getElementById('commands').value = lines.join('\\n');
}
document.addEventListener('input', update);
"""


def to_html(catalogue: Catalogue, image_src: Callable[[Tile, str, bytes], str]) -> str:
    """The page; ``image_src(tile, kind, jpeg)`` says where each picture lives."""
    e = html.escape
    index = catalogue.source
    noun = catalogue.noun
    title_word = f"{noun.capitalize()}s"
    parts = [
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
        f"<title>{title_word} of {e(catalogue.model_id)}</title><style>{_STYLE}</style></head>",
        f'<body data-index="{e(index)}">',
        f"<h1>{title_word} of {e(catalogue.model_id)}</h1>",
        f"<p class=meta>{len(catalogue.cards)} {noun}s; for each, the "
        f"{max((len(c.tiles) for c in catalogue.cards), default=0)} of {catalogue.num_items} "
        f"indexed images where it is strongest ({_STRENGTH[noun]}), each shown as "
        f"the crop the model saw with the {noun}'s attention overlaid (peak cell boxed) and the "
        "window around that peak. Type names below and copy the commands at the bottom, or run "
        f"<code>cmn-edge concepts name --index {e(shlex.quote(index))} {noun.upper()} NAME"
        "</code>.</p>",
    ]
    if catalogue.missing:
        parts.append(
            f"<p class=meta>{len(catalogue.missing)} image(s) could not be read: "
            + "; ".join(e(m) for m in catalogue.missing[:20])
            + "</p>"
        )
    for card in catalogue.cards:
        title = (
            f"{noun} {card.concept} &mdash; {e(card.name)}"
            if card.name
            else f"{noun} {card.concept} <span class=unnamed>(unnamed)</span>"
        )
        parts.append(
            f"<section id=c{card.concept}><h2>{title}<input data-concept={card.concept} "
            f'placeholder="name {noun} {card.concept}" value="{e(card.name or "")}"></h2>'
            "<div class=row>"
        )
        for rank, tile in enumerate(card.tiles, 1):
            label = f"{tile.value:+.4f} &middot; {e(Path(tile.path).name)}"
            if tile.view is None or tile.crop is None:
                body = f"<div class=missing>{e(tile.error or 'not shown')}</div>"
            else:
                view_src = image_src(tile, f"c{card.concept}_{rank}_view", tile.view)
                crop_src = image_src(tile, f"c{card.concept}_{rank}_peak", tile.crop)
                body = (
                    f'<div class=pair><img src="{view_src}" width={VIEW_SIZE} '
                    f'height={VIEW_SIZE} alt="attention of {noun} {card.concept}">'
                    f'<img src="{crop_src}" width={CROP_SIZE} height={CROP_SIZE} '
                    'alt="peak window"></div>'
                )
            parts.append(
                f'<figure title="{e(tile.path)} (item {tile.item_id})">{body}'
                f"<figcaption>{label}</figcaption></figure>"
            )
        parts.append("</div></section>")
    parts.append(
        "<div class=tools>Naming commands (typed names appear here):"
        f"<textarea id=commands readonly></textarea></div><script>{_SCRIPT}</script>"
        "</body></html>"
    )
    return "\n".join(parts)


def check_out(out: str | os.PathLike) -> Path:
    """Refuse an unusable --out before minutes of drawing, not after."""
    out = Path(out)
    if not out.parent.is_dir():
        raise FileNotFoundError(f"{out}: folder {out.parent} does not exist")
    if out.suffix.lower() in (".html", ".htm"):
        if out.is_dir():
            raise ValueError(f"{out}: is a directory, not a .html file")
    elif out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a folder (give a .html file or a folder)")
    return out


def write(catalogue: Catalogue, out: str | os.PathLike) -> Path:
    """``*.html``: one self-contained file; otherwise a folder with index.html + images/.

    Files appear whole or not at all (written beside, then renamed).
    """
    out = check_out(out)
    if out.suffix.lower() in (".html", ".htm"):

        def inline(tile: Tile, stem: str, data: bytes) -> str:
            return "data:image/jpeg;base64," + base64.b64encode(data).decode("ascii")

        _write_text(out, to_html(catalogue, inline))
        return out
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)

    def linked(tile: Tile, stem: str, data: bytes) -> str:
        _write_bytes(images / f"{stem}.jpg", data)
        return f"images/{stem}.jpg"

    page = out / "index.html"
    _write_text(page, to_html(catalogue, linked))
    return page


def _write_bytes(path: Path, data: bytes) -> None:
    # A tile can be drawn again: no fsync for each of a few hundred small JPEGs.
    write_bytes_atomic(path, data, durable=False)


def _write_text(path: Path, text: str) -> None:
    write_text_atomic(path, text)
