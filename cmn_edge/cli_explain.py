"""``cmn-edge explain`` (why two images match) and ``cmn-edge concepts`` (name the concepts)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .cli_common import CliError, model_options, user_errors


def _embedder(model: str | None, precision: str, threads: int | None):
    from .embedder import Embedder

    return Embedder(model, precision=precision, threads=threads)


def _format_share(share: float | None) -> str:
    return "-" if share is None else f"{share:.1%}"


def _print_terms(title: str, terms) -> None:
    if not terms:
        return
    click.echo(title)
    click.echo(f"  {'rank':>4}  {'concept':>7}  {'contribution':>12}  {'share':>7}  name")
    for rank, term in enumerate(terms, 1):
        click.echo(
            f"  {rank:>4}  {term.index:>7}  {term.contribution:>+12.5f}  "
            f"{_format_share(term.share):>7}  {term.name or ''}".rstrip()
        )


@click.command()
@click.argument("image_a", type=click.Path(path_type=Path))
@click.argument("image_b", type=click.Path(path_type=Path))
@click.option("--top", type=click.IntRange(min=1), default=10, show_default=True,
              help="How many concepts to show.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of text.")
@click.option("--heatmap", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write a PNG: both images, the top concepts' attention, peak-to-peak lines.")
@click.option("--scale", type=click.IntRange(min=1, max=8), default=2, show_default=True,
              help="Heatmap panels are the model's input crop enlarged this many times.")
@click.option("--index", "index_dir", type=click.Path(path_type=Path), default=None,
              help="A concept index whose saved concept names to show.")
@model_options
@user_errors
def explain(
    image_a: Path, image_b: Path, top: int, as_json: bool, heatmap: Path | None, scale: int,
    index_dir: Path | None, model: str | None, precision: str, threads: int | None,
) -> None:
    """Why IMAGE_A and IMAGE_B are similar: each concept's term of their similarity.

    The terms (a_i * b_i of the two unit embeddings) sum exactly to the score. The share of a
    term is contribution / score: shares of all concepts sum to 1; a negative share means the
    concept pulls the pair apart (for a positive score).
    """
    from .explain import explain as run_explain

    embedder = _embedder(model, precision, threads)
    names = _index_names(index_dir, embedder) if index_dir is not None else None
    if heatmap is not None and not heatmap.parent.is_dir():
        raise CliError(f"{heatmap}: folder {heatmap.parent} does not exist")
    result = run_explain(image_a, image_b, embedder, top=top, names=names)
    if heatmap is not None:
        from .render import pair_figure, save_png

        save_png(pair_figure(result, scale=scale), heatmap)
    if as_json:
        document = result.to_dict()
        document["heatmap"] = str(heatmap) if heatmap is not None else None
        click.echo(json.dumps(document, indent=2))
        return
    click.echo(f"score {result.score:+.5f}  ({image_a.name} vs {image_b.name}, {result.model_id})")
    _print_terms(f"top {len(result.top)} concepts (share = contribution / score):", result.top)
    _print_terms("pulling apart:", result.against[: min(3, len(result.against))])
    if heatmap is not None:
        click.echo(f"wrote {heatmap}")


def _index_names(index_dir: Path, embedder) -> dict[int, str]:
    """Concept names saved in a concept index built with the same model."""
    raise CliError(f"{index_dir}: concept indexes are not available yet")


COMMANDS = [explain]
