"""``cmn-edge index ...`` and ``cmn-edge search``: build, maintain and query a concept index.

Every command that changes an index loads it, changes it in memory and saves a complete new
version at the very end, so a command that fails (bad image, unknown id, wrong model) leaves
the index on disk exactly as it was.

``cmn-edge search --json`` prints one object of this shape (a stable interface)::

    {
      "query": "photos/cat.jpg",          # as given
      "query_kind": "image" | "id",
      "query_id": 17,                       # only for an id query (the item is left out)
      "model": "cmn-lite0@1a2b...",         # the index's model identity
      "index": "gallery.idx",
      "k": 10,
      "exact": false,
      "control": {"exclude": [3], "only": null, "weights": {"7": 2.0},
                  "renormalize": false, "where": {"label": "cat"}},
      "results": [
        {"rank": 1, "id": 4, "score": 0.93, "path": "/abs/cat.jpg",
         "metadata": {"label": "cat"},
         "top_concepts": [                  # only with --explain
           {"index": 12, "name": "beak", "contribution": 0.05, "share": 0.06}]}
      ]
    }

``score`` is the masked inner product ``(q * w) . g`` (the cosine when no control is given),
or with ``--renormalize`` the cosine over the kept concepts. A concept's ``contribution`` is
its term of that score (they sum to it) and ``share`` is contribution / score.

``k`` larger than the searchable gallery is an error (exit 1), not a silent short list;
a ``--where`` filter may match fewer than k items, and then fewer are listed (with a warning).
"""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

import click
import numpy as np

from .cli_common import CliError, model_options, user_errors
from .embedder import Embedder, list_images
from .index import ConceptIndex, ConceptIndexError, is_index_dir
from .registry import get_bundled

INDEX_OPTION = click.option(
    "--index",
    "index_dir",
    required=True,
    type=click.Path(path_type=Path),
    help="Index directory.",
)


# ---------------------------------------------------------------------- helpers
def _model_ref(model: str | None) -> str | None:
    """What the manifest remembers so later commands default to the same model."""
    if model is None:
        return None
    try:
        get_bundled(str(model))
        return str(model)
    except ValueError:
        return str(Path(model).resolve())


def _embedder_for(
    index: ConceptIndex, model: str | None, precision: str, threads: int | None
) -> Embedder:
    """The index's own model unless the user named one; refuse any other model."""
    ctx = click.get_current_context()
    if ctx.get_parameter_source("model") == click.core.ParameterSource.DEFAULT:
        model = index.model_ref
    if ctx.get_parameter_source("precision") == click.core.ParameterSource.DEFAULT:
        precision = index.precision or precision
    embedder = Embedder(model, precision=precision, threads=threads)
    index.check_model(embedder.model_id)
    return embedder


def _warn(message: str) -> None:
    click.echo(f"warning: {message}", err=True)


def _read_metadata_csv(csv_path: Path) -> dict[str, dict[str, str]]:
    """resolved image path -> {column: value}; paths are relative to the CSV's folder."""
    try:
        handle = csv_path.open(newline="", encoding="utf-8-sig")
    except FileNotFoundError:
        raise FileNotFoundError(f"{csv_path}: metadata file not found") from None
    except IsADirectoryError:
        raise CliError(f"{csv_path}: is a directory, not a metadata CSV") from None
    out: dict[str, dict[str, str]] = {}
    with handle:
        try:
            reader = csv.DictReader(handle)
            columns = reader.fieldnames or []
            if "path" not in columns:
                raise CliError(f"{csv_path}: metadata CSV needs a 'path' column (has {columns})")
            for line, row in enumerate(reader, start=2):
                if None in row:
                    raise CliError(f"{csv_path}:{line}: more fields than columns")
                raw = (row.pop("path") or "").strip()
                if not raw:
                    raise CliError(f"{csv_path}:{line}: empty path")
                path = Path(raw) if Path(raw).is_absolute() else csv_path.parent / raw
                if not path.is_file():
                    raise CliError(f"{csv_path}:{line}: {raw}: image not found")
                key = str(path.resolve())
                if key in out:
                    raise CliError(f"{csv_path}:{line}: {raw} is listed twice")
                out[key] = {k.strip(): v for k, v in row.items() if k and v not in (None, "")}
        except (UnicodeDecodeError, csv.Error) as exc:
            raise CliError(f"{csv_path}: not a readable CSV ({exc})") from None
    return out


def _embed_paths(
    embedder: Embedder, paths: list[Path], batch_size: int, skip_errors: bool
) -> tuple[list[Path], list]:
    errors: list[tuple[Path, str]] = []
    kept: list[Path] = []
    chunks = []
    with click.progressbar(
        length=len(paths),
        label="Embedding",
        file=sys.stderr,
        show_pos=True,
        hidden=not sys.stderr.isatty(),  # no stray label line in logs and pipes
    ) as bar:
        for chunk_start in range(0, len(paths), batch_size):
            chunk = paths[chunk_start : chunk_start + batch_size]
            for batch_paths, emb in embedder.iter_paths(chunk, batch_size, skip_errors, errors):
                kept += batch_paths
                chunks.append(emb)
            bar.update(len(chunk))
    for path, reason in errors:
        _warn(f"skipped {reason}" if str(path) in reason else f"skipped {path}: {reason}")
    return kept, chunks


def _expand(paths: tuple[str, ...]) -> list[Path]:
    out: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            out += list_images(path)
        elif path.exists():
            out.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
    seen: dict[str, Path] = {}
    for path in out:
        seen.setdefault(str(path.resolve()), path)
    return list(seen.values())


def _parse_pairs(values: tuple[str, ...], option: str) -> list[tuple[str, str]]:
    pairs = []
    for value in values:
        key, sep, rest = value.rpartition("=")
        if not sep or not key.strip() or not rest.strip():
            raise CliError(f"{option} {value!r}: expected KEY=VALUE")
        pairs.append((key.strip(), rest.strip()))
    return pairs


def _split_concepts(values: tuple[str, ...]) -> list[str]:
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


# ---------------------------------------------------------------------- index group
@click.group("index")
def index() -> None:
    """Build and maintain a concept index (one directory)."""


@index.command("build")
@click.argument("folder", type=click.Path(path_type=Path))
@INDEX_OPTION
@model_options
@click.option(
    "--metadata",
    "metadata_csv",
    type=click.Path(path_type=Path),
    default=None,
    help="CSV with a 'path' column (relative to the CSV) and any metadata columns.",
)
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True)
@click.option("--skip-errors", is_flag=True, help="Leave unreadable images out (with a warning).")
@click.option(
    "--M", "M", type=click.IntRange(2), default=32, show_default=True, help="HNSW links per node."
)
@click.option("--ef-construction", type=click.IntRange(1), default=200, show_default=True)
@click.option(
    "--ef",
    type=click.IntRange(1),
    default=64,
    show_default=True,
    help="Base search depth (raised by calibration where recall needs it).",
)
@click.option(
    "--exact-below",
    type=click.IntRange(0),
    default=2048,
    show_default=True,
    help="Galleries (and --where subsets) this small are searched by brute force.",
)
@click.option(
    "--graph-dims",
    type=click.IntRange(0),
    default=0,
    show_default=True,
    help="Walk the graph in this many principal directions and re-rank exactly "
    "(0: all concepts). 64 makes large galleries (10k+) several times faster "
    "for queries that resemble the gallery (100k: masked queries under 1 ms).",
)
@click.option("--no-calibrate", is_flag=True, help="Keep --ef as given.")
@click.option("--force", is_flag=True, help="Replace an index already in --index.")
@user_errors
def build(
    folder: Path,
    index_dir: Path,
    model,
    precision,
    threads,
    metadata_csv,
    batch_size,
    skip_errors,
    M,
    ef_construction,
    ef,
    exact_below,
    graph_dims,
    no_calibrate,
    force,
) -> None:
    """Embed every image below FOLDER into a new index."""
    if index_dir.exists() and not index_dir.is_dir():
        raise CliError(f"{index_dir}: exists and is not a directory")
    if is_index_dir(index_dir) and not force:
        raise CliError(f"{index_dir}: already holds an index (use --force to replace it)")
    if index_dir.is_dir() and not is_index_dir(index_dir) and any(index_dir.iterdir()):
        raise CliError(f"{index_dir}: directory is not empty and holds no index")
    paths = list_images(folder)
    if not paths:
        raise CliError(f"{folder}: no images found")
    metadata = _read_metadata_csv(metadata_csv) if metadata_csv else {}
    embedder = Embedder(model, precision=precision, threads=threads)
    kept, chunks = _embed_paths(embedder, paths, batch_size, skip_errors)
    if not kept:
        raise CliError(f"{folder}: no readable images (all {len(paths)} were skipped)")
    idx = ConceptIndex.for_embedder(
        embedder,
        model_ref=_model_ref(model),
        precision=precision,
        M=M,
        ef_construction=ef_construction,
        ef=ef,
        exact_below=exact_below,
        capacity=len(kept),
        graph_dims=graph_dims or None,
    )
    resolved = [str(p.resolve()) for p in kept]
    vectors = np.concatenate(chunks)
    meta = [metadata.get(p) for p in resolved]
    n_held = min(200, len(kept) // 5)
    if no_calibrate or not n_held or len(kept) - n_held <= idx.exact_below:
        idx.add(vectors, resolved, meta)
    else:
        # hold some images back from the graph, use them as queries it has never seen to
        # tune the search depth, then add them: calibration on in-graph items flatters recall
        held = np.random.default_rng(0).choice(len(kept), size=n_held, replace=False)
        rest = np.setdiff1d(np.arange(len(kept)), held)
        idx.add(vectors[rest], [resolved[i] for i in rest], [meta[i] for i in rest])
        result = idx.calibrate(queries=vectors[held])
        idx.add(vectors[held], [resolved[i] for i in held], [meta[i] for i in held])
        if result["queries"]:
            click.echo(
                f"calibrated search depth ef={result['ef']}, mask exponent "
                f"{result['mask_ef_power']:g} (recall@10 {result['recall']:.3f} on "
                f"{result['queries']} held-back images)",
                err=True,
            )
    idx.save(index_dir, overwrite=force)
    click.echo(f"indexed {len(idx)} images into {index_dir} ({embedder.model_id})")


@index.command("add")
@click.argument("paths", nargs=-1, required=True)
@INDEX_OPTION
@model_options
@click.option(
    "--metadata",
    "metadata_csv",
    type=click.Path(path_type=Path),
    default=None,
    help="CSV with a 'path' column (relative to the CSV) and any metadata columns.",
)
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True)
@click.option("--skip-errors", is_flag=True, help="Leave unreadable images out (with a warning).")
@user_errors
def add(
    paths, index_dir: Path, model, precision, threads, metadata_csv, batch_size, skip_errors
) -> None:
    """Add images (files or folders); an image already indexed is re-embedded in place."""
    idx = ConceptIndex.load(index_dir)
    embedder = _embedder_for(idx, model, precision, threads)
    files = _expand(paths)
    if not files:
        raise CliError(f"{paths[0]}: no images found")
    metadata = _read_metadata_csv(metadata_csv) if metadata_csv else {}
    kept, chunks = _embed_paths(embedder, files, batch_size, skip_errors)
    if not kept:
        raise CliError(f"{paths[0]}: no readable images")
    resolved = [str(p.resolve()) for p in kept]
    before = set(idx.ids)
    ids = idx.add(np.concatenate(chunks), resolved, [metadata.get(p) for p in resolved])
    idx.save()
    updated = sum(1 for i in ids if i in before)
    click.echo(f"added {len(ids) - updated}, updated {updated}; {len(idx)} items in {index_dir}")


@index.command("remove")
@click.argument("items", nargs=-1, required=True)
@INDEX_OPTION
@user_errors
def remove(items, index_dir: Path) -> None:
    """Remove items given by id (17 or id:17) or by image path."""
    idx = ConceptIndex.load(index_dir)
    ids = []
    for token in items:
        # by path first, even when the file is gone: removing deleted images is the usual case
        item_id = idx.id_for_path(str(Path(token).resolve()))
        if item_id is None:
            raw = token[3:] if token.startswith("id:") else token
            if raw.strip().isdigit() and int(raw) in idx:
                item_id = int(raw)
        if item_id is None:
            raise CliError(f"{token}: not in the index {index_dir}")
        ids.append(item_id)
    idx.remove(ids)
    idx.save()
    click.echo(f"removed {len(set(ids))}; {len(idx)} items in {index_dir}")


@index.command("info")
@INDEX_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@user_errors
def info(index_dir: Path, as_json: bool) -> None:
    """What an index holds: model, counts, parameters, concept names, metadata keys."""
    idx = ConceptIndex.load(index_dir)
    manifest = idx.manifest()
    manifest["path"] = str(index_dir)
    manifest["concept_names"] = {str(i): n for i, n in sorted(idx.concept_names.items())}
    manifest["metadata_keys"] = idx.metadata_keys()
    if as_json:
        click.echo(json.dumps(manifest, indent=1))
        return
    counts, hnsw = manifest["counts"], manifest["hnsw"]
    click.echo(f"index:     {index_dir}")
    click.echo(f"model:     {manifest['model']['id']} ({manifest['model']['precision']})")
    click.echo(f"items:     {counts['items']} ({counts['deleted_slots']} free graph slots)")
    click.echo(f"concepts:  {manifest['num_concepts']} ({counts['named_concepts']} named)")
    graph = hnsw["graph_dims_in_use"]
    click.echo(
        f"hnsw:      M={hnsw['M']} ef_construction={hnsw['ef_construction']} "
        f"ef={hnsw['ef']} capacity={hnsw['max_elements']} "
        f"graph={f'{graph} principal directions' if graph else 'all concepts'}"
    )
    click.echo(f"metadata:  {', '.join(manifest['metadata_keys']) or '(none)'}")
    for i, name in manifest["concept_names"].items():
        click.echo(f"  concept {i}: {name}")


@index.command("name-concept")
@INDEX_OPTION
@click.argument("concept")
@click.argument("name", required=False)
@click.option("--clear", is_flag=True, help="Remove the concept's name.")
@user_errors
def name_concept(index_dir: Path, concept: str, name: str | None, clear: bool) -> None:
    """Name CONCEPT (an index or its current name) NAME, so searches can say --exclude NAME."""
    if clear == (name is not None):
        raise CliError("give a NAME, or --clear to remove the name (not both)")
    idx = ConceptIndex.load(index_dir)
    concept_index = idx.resolve_concept(concept)
    idx.set_concept_name(concept_index, None if clear else name)
    idx.save()
    shown = "unnamed" if clear else f"named '{name.strip()}'"
    click.echo(f"concept {concept_index} {shown} in {index_dir}")


# ---------------------------------------------------------------------- search
@click.command("search")
@click.argument("query")
@INDEX_OPTION
@click.option("-k", "k", type=int, default=10, show_default=True, help="Results to return.")
@click.option(
    "--exclude-concept",
    multiple=True,
    help="Concept index or name to ignore (repeatable, or comma-separated).",
)
@click.option(
    "--only-concept",
    multiple=True,
    help="Compare on these concepts only (repeatable, or comma-separated).",
)
@click.option("--concept-weight", multiple=True, help="Weight a concept: I=W or NAME=W.")
@click.option(
    "--renormalize",
    is_flag=True,
    help="Score by cosine over the kept concepts instead of the masked dot product.",
)
@click.option("--where", multiple=True, help="Metadata filter KEY=VALUE (repeatable: all).")
@click.option("--exact", is_flag=True, help="Brute force instead of the HNSW graph.")
@click.option("--json", "as_json", is_flag=True, help="Print the documented JSON shape.")
@click.option("--explain", is_flag=True, help="Show each hit's top contributing concepts.")
@click.option("--explain-top", type=click.IntRange(1), default=5, show_default=True)
@model_options
@user_errors
def search(
    query: str,
    index_dir: Path,
    k,
    exclude_concept,
    only_concept,
    concept_weight,
    renormalize,
    where,
    exact,
    as_json,
    explain,
    explain_top,
    model,
    precision,
    threads,
) -> None:
    """Find the images most like QUERY: an image file, or an indexed item as id:N (or N)."""
    idx = ConceptIndex.load(index_dir)
    weights = {}
    for key, value in _parse_pairs(concept_weight, "--concept-weight"):
        try:
            weights[key] = float(value)
        except ValueError:
            raise CliError(f"--concept-weight {key}={value}: weight is not a number") from None
    filters = dict(_parse_pairs(where, "--where"))
    controls = dict(
        k=k,
        exclude=_split_concepts(exclude_concept),
        only=_split_concepts(only_concept) or None,
        weights=weights or None,
        renormalize=renormalize,
        where=filters or None,
        exact=exact,
        explain=explain_top if explain else 0,
    )
    query_id = None
    raw = query[3:] if query.startswith("id:") else query
    if query.startswith("id:") or (not os.path.exists(query) and raw.strip().isdigit()):
        if not raw.strip().isdigit():
            raise CliError(f"{query}: an item id must be a number (id:17)")
        query_id = int(raw)
        if query_id not in idx:
            raise CliError(f"{query}: no item with id {query_id} in {index_dir}")
        hits = idx.search_id(query_id, **controls)
    else:
        if not os.path.exists(query):
            raise FileNotFoundError(f"{query}: no such image file (for an indexed item: id:N)")
        embedder = _embedder_for(idx, model, precision, threads)
        hits = idx.search(embedder.embed(query)[0], **controls)
    if filters and len(hits) < k:
        _warn(f"only {len(hits)} item(s) match {' '.join(where)}")
    control = idx.plan(
        controls["exclude"], controls["only"], weights or None, renormalize
    ).described
    control["where"] = filters or None
    if as_json:
        out = {"query": query, "query_kind": "id" if query_id is not None else "image"}
        if query_id is not None:
            out["query_id"] = query_id
        out.update(
            {
                "model": idx.model_id,
                "index": str(index_dir),
                "k": k,
                "exact": exact,
                "control": control,
                "results": [h.to_dict() for h in hits],
            }
        )
        click.echo(json.dumps(out, indent=1))
        return
    for hit in hits:
        meta = " ".join(f"{key}={value}" for key, value in hit.metadata.items())
        click.echo(f"{hit.rank:3d}  {hit.score:7.4f}  #{hit.id:<6d} {hit.path}  {meta}".rstrip())
        if hit.top_concepts:
            parts = []
            for c in hit.top_concepts:
                label = f"#{c['index']}" + (f" {c['name']}" if c["name"] else "")
                share = f" ({100 * c['share']:.0f}%)" if c["share"] is not None else ""
                parts.append(f"{label} {c['contribution']:+.4f}{share}")
            click.echo("       concepts: " + ", ".join(parts))


COMMANDS = [index, search]

__all__ = ["COMMANDS", "ConceptIndexError", "index", "search"]
