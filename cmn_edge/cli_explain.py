"""``cmn-edge explain`` (why two images match) and ``cmn-edge concepts`` (name the concepts)."""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np

from .cli_common import CliError, model_options, user_errors


def _embedder(model: str | None, precision: str, threads: int | None, index=None):
    """The model asked for; with an index, by default the model that built it (and only it).

    Concept i of one model means nothing in another, so names saved in an index are refused
    for a different model instead of being shown on the wrong concepts.
    """
    from .embedder import Embedder

    if index is not None:
        from .cli_index import chosen_model
        from .index import embedder_for_index

        return embedder_for_index(index, *chosen_model(model, precision), threads)
    return Embedder(model, precision=precision, threads=threads)


def _load_index(index_dir: Path):
    from .index import ConceptIndex

    return ConceptIndex.load(index_dir)


def _format_share(share: float | None) -> str:
    return "-" if share is None else f"{share:.1%}"


def _print_terms(title: str, terms, noun: str = "concept") -> None:
    if not terms:
        return
    click.echo(title)
    click.echo(f"  {'rank':>4}  {noun:>7}  {'contribution':>12}  {'share':>7}  name")
    for rank, term in enumerate(terms, 1):
        click.echo(
            f"  {rank:>4}  {term.index:>7}  {term.contribution:>+12.5f}  "
            f"{_format_share(term.share):>7}  {term.name or ''}".rstrip()
        )


@click.command()
@click.argument("image_a", type=click.Path(path_type=Path))
@click.argument("image_b", type=click.Path(path_type=Path))
@click.option(
    "--top",
    type=click.IntRange(min=1),
    default=10,
    show_default=True,
    help="How many parts (concepts, or a DGML model's groups) to show.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of text.")
@click.option(
    "--heatmap",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write a PNG: both images, the top parts' attention, peak-to-peak lines.",
)
@click.option(
    "--scale",
    type=click.IntRange(min=1, max=8),
    default=2,
    show_default=True,
    help="Heatmap panels are the model's input crop enlarged this many times.",
)
@click.option(
    "--index",
    "index_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="A concept index whose saved concept (or group) names to show.",
)
@click.option(
    "--structural",
    is_flag=True,
    help="Also DIML's structural match: region pairs, their transport plan and shares "
    "(drawn under the concepts with --heatmap).",
)
@model_options
@user_errors
def explain(
    image_a: Path,
    image_b: Path,
    top: int,
    as_json: bool,
    heatmap: Path | None,
    scale: int,
    index_dir: Path | None,
    structural: bool,
    model: str | None,
    precision: str,
    threads: int | None,
) -> None:
    """Why IMAGE_A and IMAGE_B are similar: each part's term of their similarity.

    A part is a concept (CMN) or a group of dimensions (DGML). The terms (a_i * b_i of the two
    unit embeddings, summed over a group's block) sum exactly to the score. The share of a
    term is contribution / score: shares of all parts sum to 1; a negative share means the
    part pulls the pair apart (for a positive score).
    """
    from .explain import explain as run_explain

    index = _load_index(index_dir) if index_dir is not None else None
    embedder = _embedder(model, precision, threads, index)
    names = index.concept_names if index is not None else None
    if heatmap is not None and not heatmap.parent.is_dir():
        raise CliError(f"{heatmap}: folder {heatmap.parent} does not exist")
    result = run_explain(image_a, image_b, embedder, top=top, names=names)
    pairs = _structural(embedder, image_a, image_b) if structural else None
    if heatmap is not None:
        from .render import pair_figure, save_png, stack, structural_figure

        figure = pair_figure(result, scale=scale)
        if pairs is not None:
            grid = embedder.metadata.region_grid
            names_ab = (f"A: {image_a.name}", f"B: {image_b.name}")
            lower = structural_figure(
                result.a.image, result.b.image, pairs, grid, top, scale, names_ab
            )
            figure = stack(figure, lower)
        save_png(figure, heatmap)
    if as_json:
        document = result.to_dict()
        if pairs is not None:
            document["structural"] = _structural_document(pairs, embedder.metadata.region_grid)
        document["heatmap"] = str(heatmap) if heatmap is not None else None
        click.echo(json.dumps(document, indent=2))
        return
    click.echo(f"score {result.score:+.5f}  ({image_a.name} vs {image_b.name}, {result.model_id})")
    noun = result.part_layout.noun
    title = f"top {len(result.top)} {noun}s (share = contribution / score):"
    _print_terms(title, result.top, noun)
    _print_terms("pulling apart:", result.against[: min(3, len(result.against))], noun)
    if pairs is not None:
        cols = embedder.metadata.region_grid[1]
        click.echo(f"structural similarity {pairs.score:+.5f} (DIML; region pairs, largest first):")
        for i, j, share in pairs.top_pairs(top):
            a, b = divmod(i, cols), divmod(j, cols)
            click.echo(f"  A region {a} <-> B region {b}  {share:+.5f}")
    if heatmap is not None:
        click.echo(f"wrote {heatmap}")


def _structural(embedder, image_a: Path, image_b: Path):
    """DIML's match of the two images' regions (the model must have its region output)."""
    from .structural import match

    emb, regions = embedder.embed_regions([image_a, image_b])
    return match(regions[0], emb[0], regions[1], emb[1])


def _structural_document(pairs, grid: tuple[int, int]) -> dict:
    """Every region pair, largest share first: the contributions sum to the score."""
    cols = grid[1]
    rows = [
        {
            "a_region": [*divmod(i, cols)],
            "b_region": [*divmod(j, cols)],
            "plan": float(pairs.plan[i, j]),
            "similarity": float(pairs.similarity[i, j]),
            "contribution": share,
        }
        for i, j, share in pairs.top_pairs(pairs.plan.size)
    ]
    return {"score": pairs.score, "grid": list(grid), "pairs": rows}


@click.group(invoke_without_command=True)
@click.option(
    "--index",
    "index_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="The concept index whose gallery shows the concepts.",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=Path("concepts.html"),
    show_default=True,
    help="A .html file (images inline) or a folder (index.html + images/, better "
    "for many concepts).",
)
@click.option(
    "--per-concept",
    type=click.IntRange(min=1, max=100),
    default=6,
    show_default=True,
    help="Images per concept.",
)
@click.option(
    "--concepts",
    "--parts",
    "spec",
    default=None,
    metavar="N|LIST",
    help="The first N parts (concepts, or a DGML model's groups), or ids like 3,17,100-110 "
    "(one id: 17,). Default: all.",
)
@click.option("--unnamed", is_flag=True, help="Only concepts without a name yet.")
@model_options
@click.pass_context
@user_errors
def concepts(
    ctx: click.Context,
    index_dir: Path | None,
    out: Path,
    per_concept: int,
    spec: str | None,
    unnamed: bool,
    model: str | None,
    precision: str,
    threads: int | None,
) -> None:
    """A catalogue of parts (concepts, or a DGML model's groups): each one's strongest gallery
    images and where it looks.

    Open the HTML, see what a part's images share, and name it with
    `cmn-edge concepts name --index DIR PART NAME`; names then work wherever a part is
    asked for (search controls, explain --index).
    """
    if ctx.invoked_subcommand is not None:
        return
    if index_dir is None:
        raise CliError("--index DIR is required (the concept index to draw the gallery from)")
    from . import catalogue

    catalogue.check_out(out)
    index = _load_index(index_dir)
    if len(index) == 0:
        raise CliError(f"{index_dir}: index is empty")
    embedder = _embedder(model, precision, threads, index)
    parts = index.parts
    chosen = catalogue.parse_concepts(spec, parts.count, parts.noun)
    names = index.concept_names
    if unnamed:
        chosen = [c for c in chosen if c not in names]
        if not chosen:
            raise CliError(f"{index_dir}: every chosen {parts.noun} is named already")
    ids = index.ids
    embeddings = np.stack([index.embedding(i) for i in ids])
    paths = _LazyPaths(index, ids)
    name_list = [names.get(c) for c in range(parts.count)]
    result = catalogue.build(
        embedder,
        ids,
        paths,
        embeddings,
        chosen,
        per_concept,
        name_list,
        source=str(index_dir),
    )
    written = catalogue.write(result, out)
    tiles = sum(len(card.tiles) for card in result.cards)
    click.echo(f"wrote {written}: {len(result.cards)} {parts.noun}s, {tiles} images")
    for line in result.missing:
        click.echo(f"warning: {line}", err=True)


class _LazyPaths:
    """Item paths looked up only for the images a catalogue shows, not the whole gallery."""

    def __init__(self, index, ids: list[int]) -> None:
        self.index, self.ids = index, ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, row: int) -> str:
        path = self.index.full_path(self.index.item(self.ids[row])[0])
        return path if path is not None else f"item {self.ids[row]} (no path)"


def _register_naming() -> None:
    """``concepts name`` is ``index name-concept`` under a second name: one implementation."""
    from .cli_index import name_concept

    concepts.add_command(name_concept, name="name")


_register_naming()

COMMANDS = [explain, concepts]
