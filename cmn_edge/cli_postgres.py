"""``cmn-edge index export --to postgresql://...`` and ``cmn-edge search --backend postgresql://...``.

The commands in :mod:`.cli_index` hand over to these when given a server; the output has the
local search's shape (``--json``: the documented object, ``index`` being the server's URL
without its password). psycopg is imported only here and only then.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import click

from .cli_common import concept_controls, query_item_id, user_errors

TABLE_OPTION = click.option(
    "--table",
    default="cmn_gallery",
    show_default=True,
    help="Gallery table in the PostgreSQL database (with _model and _concepts beside it).",
)


def backend_options(func):
    """``--backend URL`` and ``--table`` on ``cmn-edge search``."""
    func = TABLE_OPTION(func)
    return click.option(
        "--backend",
        default=None,
        metavar="postgresql://...",
        help="Search a gallery exported to PostgreSQL (index export) instead of --index.",
    )(func)


@click.command("export")
@click.option("--index", "index_dir", required=True, type=click.Path(path_type=Path))
@click.option("--to", "url", required=True, metavar="postgresql://...", help="Target database.")
@TABLE_OPTION
@click.option("--replace", is_flag=True, help="Replace a gallery already in --table.")
@click.option("--hnsw-m", type=click.IntRange(2, 100), default=16, show_default=True)
@click.option("--hnsw-ef-construction", type=click.IntRange(4, 1000), default=64, show_default=True)
@user_errors
def export_command(
    index_dir: Path, url: str, table: str, replace: bool, hnsw_m: int, hnsw_ef_construction: int
) -> None:
    """Copy an index (items, paths, metadata, vectors, model, concept names) to a PostgreSQL
    + pgvector gallery with an HNSW index, in one transaction: all of it or nothing."""
    from .index import ConceptIndex
    from .postgres import export_index

    index = ConceptIndex.load(index_dir)
    summary = export_index(
        index, url, table=table, replace=replace, m=hnsw_m, ef_construction=hnsw_ef_construction
    )
    click.echo(
        f"exported {summary['items']} items ({summary['num_concepts']} concepts, model "
        f"{summary['model']}) to {summary['target']} table {table}: copy {summary['copy_s']}s, "
        f"HNSW {summary['index_s']}s, {summary['bytes'] / 2**20:.1f} MiB"
    )


def search(
    query: str,
    url: str,
    table: str,
    k: int,
    options: Mapping,
    model: str | None,
    precision: str | None,
    threads: int | None,
    as_json: bool,
) -> list:
    """Search the server's gallery as ``cmn-edge search`` searches a local index.

    ``options``: the search command's raw part options (exclude_part, only_part,
    part_weight, their CMN names exclude_concept, only_concept, concept_weight, renormalize,
    where, exact), parsed by the same helper against the gallery's parts.
    """
    from .embedder import Embedder
    from .postgres import PgGallery

    where_args = options["where"]

    with PgGallery.connect(url, table) as gallery:
        controls = concept_controls(options, gallery.parts)
        filters = controls.pop("where") or {}
        controls["exact"] = options["exact"]
        query_id = query_item_id(query)
        if query_id is not None:
            vector = gallery.embedding(query_id)
            exclude_ids = {query_id}
        else:
            embedder = Embedder(
                model if model is not None else gallery.model_ref,
                precision=precision or gallery.precision or "int8",
                threads=threads,
            )
            gallery.check_model(embedder.model_id)
            vector = embedder.embed([Path(query)])[0]
            exclude_ids = set()
        hits = gallery.search(vector, k, exclude_ids=exclude_ids, where=filters or None, **controls)
        if len(hits) < k:
            if filters:
                click.echo(
                    f"warning: only {len(hits)} item(s) match {' '.join(where_args)}", err=True
                )
            else:
                click.echo(f"note: the gallery holds only {len(hits)} item(s) to return", err=True)
        control = gallery.plan(
            controls["exclude"], controls["only"], controls["weights"], controls["renormalize"]
        ).described
        control["where"] = dict(filters) or None
        if as_json:
            out: dict = {"query": query, "query_kind": "id" if query_id is not None else "image"}
            if query_id is not None:
                out["query_id"] = query_id
            out.update(
                {
                    "model": gallery.model_id,
                    "index": gallery.url,
                    "k": k,
                    "exact": bool(controls.get("exact")),
                    "control": control,
                    "results": [h.to_dict() for h in hits],
                }
            )
            click.echo(json.dumps(out, indent=1))
        return hits


__all__ = ["TABLE_OPTION", "backend_options", "export_command", "search"]
