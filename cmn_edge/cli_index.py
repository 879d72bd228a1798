"""``cmn-edge index ...`` and ``cmn-edge search``: build, maintain and query a concept index.

Every command that changes an index commits its change to the index's database when it
succeeds, and only that change: an add writes the new rows, not the index. A command that
fails (bad image, unknown id, wrong model) commits nothing. ``build`` and ``sync`` commit
batch by batch, so an interrupted one resumes where it stopped when run again.

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
                  "renormalize": false, "parts": "concepts",   # or "groups" (DGML)
                  "where": {"label": "cat"}},
      "results": [
        {"rank": 1, "id": 4, "score": 0.93, "path": "/abs/cat.jpg",
         "metadata": {"label": "cat"},
         "score_global": 0.81, "score_structural": 0.12,  # only with --rerank structural
         "top_concepts": [                  # only with --explain
           {"index": 12, "name": "beak", "contribution": 0.05, "share": 0.06}]}
      ]
    }

``score`` is the masked inner product ``(q * w) . g`` (the cosine when no control is given),
or with ``--renormalize`` the cosine over the kept concepts. A concept's ``contribution`` is
its term of that score (they sum to it) and ``share`` is contribution / score. The ids in
``control`` and ``top_concepts`` count the model's parts (:mod:`cmn_edge.parts`): concepts,
or a DGML model's groups, whose contribution is the sum of its block's terms.

With ``--rerank structural`` (DIML) the best ``--rerank-depth`` candidates of that search
are re-ordered by ``score = score_global + score_structural``, where ``score_global`` is
the score above and ``score_structural`` the optimal-transport match of the two images'
region maps under the same concept weights (``"rerank": {"kind": ..., "depth": ...}`` is
then part of the object). The index must keep region maps (``index build --regions``, or
``index regions`` for an existing index).

``k`` larger than the searchable gallery lists all there is, with a note on stderr; a
``--where`` filter may match fewer than k items, and then fewer are listed (with a note).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
from pathlib import Path

import click
import numpy as np

from . import cli_postgres
from .cli_common import (
    CliError,
    concept_controls,
    model_options,
    part_options,
    query_item_id,
    user_errors,
)
from .dataset import passed_over_note
from .embedder import Embedder, check_folder, list_images
from .files import publish_folder, staging_folder
from .index import ConceptIndex, ConceptIndexError, Index, embedder_for_index, is_index_dir
from .index.rerank import DEFAULT_DEPTH, RERANK_CHOICES
from .index.sync import NOT_UTF8, check_storable_folder, storable_name

INDEX_OPTION = click.option(
    "--index",
    "index_dir",
    required=True,
    type=click.Path(path_type=Path),
    help="Index directory.",
)
METADATA_OPTION = click.option(
    "--metadata",
    "metadata_csv",
    type=click.Path(path_type=Path),
    default=None,
    help="CSV with a 'path' column (relative to the CSV) and any metadata columns.",
)
BATCH_OPTION = click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True)


# ---------------------------------------------------------------------- helpers
def chosen_model(model: str | None, precision: str | None) -> tuple[str | None, str | None]:
    """(model, precision) as the user gave them: None where a default was left in place,
    so :func:`embedder_for_index` picks the index's own."""
    ctx = click.get_current_context()
    given = (click.core.ParameterSource.DEFAULT, click.core.ParameterSource.DEFAULT_MAP)
    if ctx.get_parameter_source("model") in given:
        model = None
    if ctx.get_parameter_source("precision") in given:
        precision = None
    return model, precision


def _embedder_for(
    index: ConceptIndex, model: str | None, precision: str, threads: int | None
) -> Embedder:
    """The index's own model unless the user named one; refuse any other model."""
    model, precision = chosen_model(model, precision)
    return embedder_for_index(index, model, precision, threads)


def _warn(message: str) -> None:
    click.echo(f"warning: {message}", err=True)


def _note(message: str) -> None:
    click.echo(f"note: {message}", err=True)


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


def _progress_bar(label: str):
    return click.progressbar(
        length=0,
        label=label,
        file=sys.stderr,
        show_pos=True,
        hidden=not sys.stderr.isatty(),  # no stray label line in logs and pipes
    )


def _with_progress(label: str, work, **kwargs):
    """``work(**kwargs, progress=..., plan=...)`` under a progress bar on stderr, whose length
    the work sets through ``plan(n)`` once it knows how many images it will embed."""
    with _progress_bar(label) as bar:

        def plan(n: int) -> None:  # n more to come (a rebuild may plan again)
            bar.length = bar.pos + n

        return work(**kwargs, progress=bar.update, plan=plan)


def _embed_paths(
    embedder: Embedder,
    paths: list[Path],
    batch_size: int,
    skip_errors: bool,
    regions: bool = False,
) -> tuple[list[Path], np.ndarray, np.ndarray | None]:
    """(readable paths, their embeddings, their region maps when ``regions``)."""
    errors: list[tuple[Path, str]] = []
    kept: list[Path] = []
    chunks, maps = [], []
    stream = embedder.iter_regions if regions else embedder.iter_paths
    with _progress_bar("Embedding") as bar:
        bar.length = len(paths)
        for chunk_start in range(0, len(paths), batch_size):
            chunk = paths[chunk_start : chunk_start + batch_size]
            for batch_paths, out in stream(chunk, batch_size, skip_errors, errors):
                kept += batch_paths
                chunks.append(out[0] if regions else out)
                if regions:
                    maps.append(out[1])
            bar.update(len(chunk))
    for path, reason in errors:
        _warn(f"skipped {reason}" if str(path) in reason else f"skipped {path}: {reason}")
    if not kept:
        return kept, np.zeros((0, embedder.num_concepts), np.float32), None
    return kept, np.concatenate(chunks), np.concatenate(maps) if regions else None


def _expand(paths: tuple[str, ...]) -> list[Path]:
    out: list[Path] = []
    passed_over: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            out += list_images(path, passed_over)
        elif path.exists():
            out.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
    note = passed_over_note(passed_over)
    if note:
        _warn(note)
    seen: dict[str, Path] = {}
    for path in out:
        seen.setdefault(str(path.resolve()), path)
    return list(seen.values())


def _check_dangling(index_dir: Path) -> None:
    """A symbolic link to nothing as --index: mkdir would say only 'File exists'."""
    if index_dir.is_symlink() and not index_dir.exists():
        raise CliError(
            f"{index_dir}: a symbolic link to {os.readlink(index_dir)}, which does not exist"
        )


def _run_sync(index: Index, folder: Path, batch_size: int, strict: bool, metadata) -> object:
    """sync with a progress bar on stderr; unreadable files listed after it."""
    report = _with_progress(
        "Embedding",
        index.sync,
        folder=folder,
        strict=strict,
        batch_size=batch_size,
        metadata=metadata,
    )
    for path, reason in report.skipped:
        _warn(f"skipped {path}: {reason}")
    note = passed_over_note([Path(p) for p in report.passed_over])
    if note:
        _warn(note)
    return report


# ---------------------------------------------------------------------- index group
@click.group("index")
def index() -> None:
    """Build and maintain a concept index (one directory)."""


@index.command("build")
@click.argument("folder", type=click.Path(path_type=Path))
@INDEX_OPTION
@model_options
@METADATA_OPTION
@BATCH_OPTION
@click.option("--strict", is_flag=True, help="Stop at the first unreadable image.")
@click.option(
    "--skip-errors", is_flag=True, hidden=True, help="Kept for old scripts: now the default."
)
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
@click.option(
    "--regions",
    is_flag=True,
    help="Keep each image's region maps for `search --rerank structural` (16 KiB an image).",
)
@user_errors
def build(
    folder: Path,
    index_dir: Path,
    model,
    precision,
    threads,
    metadata_csv,
    batch_size,
    strict,
    skip_errors,
    M,
    ef_construction,
    ef,
    exact_below,
    graph_dims,
    no_calibrate,
    force,
    regions,
) -> None:
    """Embed every image below FOLDER into a new index.

    Unreadable images are skipped and listed (--strict: stop at the first). An interrupted
    build resumes where it stopped when run again with the same FOLDER and --index.
    """
    if index_dir.exists() and not index_dir.is_dir():
        raise CliError(f"{index_dir}: exists and is not a directory")
    _check_dangling(index_dir)
    passed_over: list[Path] = []
    paths = list_images(folder, passed_over)  # the sync below reports what it passed over
    if not paths:
        note = passed_over_note(passed_over)
        raise CliError(f"{folder}: no images found" + (f"; {note}" if note else ""))
    check_storable_folder(folder)
    metadata = _read_metadata_csv(metadata_csv) if metadata_csv else None
    resume = None
    if is_index_dir(index_dir) and not force:
        existing = ConceptIndex.open(index_dir)
        building = existing._store.get_info("building")
        if building is None or building != str(folder.resolve()):
            existing.close()
            raise CliError(f"{index_dir}: already holds an index (use --force to replace it)")
        resume = Index(existing, threads=threads)
        click.echo(
            f"resuming the interrupted build of {folder} ({len(existing)} indexed)", err=True
        )
    elif index_dir.is_dir() and not is_index_dir(index_dir) and any(index_dir.iterdir()):
        raise CliError(f"{index_dir}: directory is not empty and holds no index")
    created = not index_dir.exists()
    build_dir = index_dir  # where the new index is made
    replacing = False
    if resume is None:
        embedder = Embedder(model, precision=precision, threads=threads)
        if force and is_index_dir(index_dir):
            # the old index stays in place until the new one is complete: a build that
            # fails or is interrupted leaves it as it was
            replacing, created = True, True
            target = index_dir.resolve()  # `--index .` has no name to put a sibling beside
            build_dir = staging_folder(target)
        idx = Index.create(
            build_dir,
            embedder,
            model=model,
            precision=precision,
            M=M,
            ef_construction=ef_construction,
            ef=ef,
            exact_below=exact_below,
            graph_dims=graph_dims or None,
            regions=regions,
        )
        with idx.index._store.write():
            idx.index._store.set_info("building", str(folder.resolve()))
    else:
        idx = resume
    idx.index.auto_checkpoint = False  # one checkpoint at the end, not one per batch

    def discard() -> None:
        """A refused build leaves nothing: the directory it made, or what it put in one."""
        idx.close()
        if created:
            shutil.rmtree(build_dir, ignore_errors=True)
        else:
            for entry in build_dir.iterdir():  # it was empty before this build
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink(missing_ok=True)

    try:
        report = _run_sync(idx, folder, batch_size, strict, metadata)
    except BaseException as exc:
        # a refusal (--strict) leaves nothing; an interruption or a full disk leaves what
        # was committed, for the next build to resume (a replacement is not resumed: the
        # old index is still in place)
        if replacing or (resume is None and not isinstance(exc, (KeyboardInterrupt, OSError))):
            discard()
        raise
    if not len(idx):
        discard()
        raise CliError(f"{folder}: no readable images (all {len(paths)} were skipped)")
    try:
        result = idx.index.checkpoint(retune=not no_calibrate, compact=True)
        with idx.index._store.write():
            idx.index._store.conn.execute("DELETE FROM info WHERE key = 'building'")
        count, model_id = len(idx), idx.index.model_id
        if replacing:
            idx.close()
            publish_folder(build_dir, target)
    except BaseException:
        if replacing:
            discard()
        raise
    calibration = result.get("calibration")
    if calibration and calibration["queries"]:
        click.echo(
            f"calibrated search depth ef={calibration['ef']}, mask exponent "
            f"{calibration['mask_ef_power']:g} (recall@10 {calibration['recall']:.3f} on "
            f"{calibration['queries']} held-back images)",
            err=True,
        )
    if report.skipped:
        _warn(f"{len(report.skipped)} unreadable image(s) left out (listed above)")
    click.echo(f"indexed {count} images into {index_dir} ({model_id})")


@index.command("sync")
@click.argument("folder", type=click.Path(path_type=Path))
@INDEX_OPTION
@model_options
@METADATA_OPTION
@BATCH_OPTION
@click.option("--strict", is_flag=True, help="Stop at the first unreadable image.")
@click.option("--regions", is_flag=True, help="A new index keeps region maps (see `index build`).")
@user_errors
def sync(
    folder: Path,
    index_dir: Path,
    model,
    precision,
    threads,
    metadata_csv,
    batch_size,
    strict,
    regions,
):
    """Bring the index in step with FOLDER: embed new images, re-embed changed ones (size and
    mtime, then content hash), remove vanished ones. Paths are stored relative to FOLDER, so
    a moved folder still matches. Creates the index when --index holds none."""
    check_folder(folder)
    check_storable_folder(folder)
    metadata = _read_metadata_csv(metadata_csv) if metadata_csv else None
    if is_index_dir(index_dir):
        idx = Index.open(index_dir)  # sync_folder refuses a folder that would empty it
        idx._embedder = _embedder_for(idx.index, model, precision, threads)
    else:
        _check_dangling(index_dir)
        if index_dir.is_dir() and any(index_dir.iterdir()):
            raise CliError(f"{index_dir}: directory is not empty and holds no index")
        idx = Index.create(
            index_dir, model=model, precision=precision, threads=threads, regions=regions
        )
    report = _run_sync(idx, folder, batch_size, strict, metadata)
    click.echo(f"{report.summary()}; {len(idx)} items in {index_dir}")


@index.command("add")
@click.argument("paths", nargs=-1, required=True)
@INDEX_OPTION
@model_options
@METADATA_OPTION
@BATCH_OPTION
@click.option("--skip-errors", is_flag=True, help="Leave unreadable images out (with a warning).")
@user_errors
def add(
    paths, index_dir: Path, model, precision, threads, metadata_csv, batch_size, skip_errors
) -> None:
    """Add images (files or folders); an image already indexed is re-embedded in place."""
    idx = Index.open(index_dir)  # reads no graph: an add writes only its own rows
    embedder = _embedder_for(idx.index, model, precision, threads)
    files = _expand(paths)
    if not files:
        raise CliError(f"{paths[0]}: no images found")
    for file in [f for f in files if not storable_name(f.resolve())]:
        if not skip_errors:
            raise CliError(f"{file}: {NOT_UTF8}")
        _warn(f"skipped {file}: {NOT_UTF8}")
        files.remove(file)
    if not files:
        raise CliError(f"{paths[0]}: no readable images")
    metadata = _read_metadata_csv(metadata_csv) if metadata_csv else {}
    kept, vectors, maps = _embed_paths(
        embedder, files, batch_size, skip_errors, regions=idx.keeps_regions
    )
    if not kept:
        raise CliError(f"{paths[0]}: no readable images")
    resolved = [str(p.resolve()) for p in kept]
    before = len(idx)
    idx.add(vectors, resolved, [metadata.get(p) for p in resolved], regions=maps)
    added = len(idx) - before
    click.echo(f"added {added}, updated {len(kept) - added}; {len(idx)} items in {index_dir}")


@index.command("remove")
@click.argument("items", nargs=-1, required=True)
@INDEX_OPTION
@user_errors
def remove(items, index_dir: Path) -> None:
    """Remove items given by id (17 or id:17) or by image path."""
    idx = Index.open(index_dir)
    ids = []
    for token in items:
        # by path first, even when the file is gone: removing deleted images is the usual case
        item_id = idx.id_for_path(token)
        if item_id is None:
            raw = token[3:] if token.startswith("id:") else token
            if raw.strip().isdigit() and int(raw) in idx:
                item_id = int(raw)
        if item_id is None:
            raise CliError(f"{token}: not in the index {index_dir}")
        ids.append(item_id)
    idx.remove(ids)
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
    manifest["root"] = None if idx.root is None else str(idx.root)
    manifest["concept_names"] = {str(i): n for i, n in sorted(idx.concept_names.items())}
    manifest["metadata_keys"] = idx.metadata_keys()
    if as_json:
        click.echo(json.dumps(manifest, indent=1))
        return
    counts, hnsw, ckpt = manifest["counts"], manifest["hnsw"], manifest["checkpoint"]
    click.echo(f"index:     {index_dir}")
    click.echo(f"model:     {manifest['model']['id']} ({manifest['model']['precision']})")
    click.echo(f"items:     {counts['items']} ({counts['deleted_slots']} free graph slots)")
    parts = idx.parts
    shown = f"{parts.noun}s:"
    click.echo(f"{shown:<11}{parts.describe()} ({counts['named_concepts']} named)")
    graph = hnsw["graph_dims_in_use"]
    click.echo(
        f"hnsw:      M={hnsw['M']} ef_construction={hnsw['ef_construction']} "
        f"ef={hnsw['ef']} capacity={hnsw['max_elements']} "
        f"graph={f'{graph} principal directions' if graph else 'all concepts'}"
    )
    click.echo(
        f"storage:   checkpoint {ckpt['gen']}, {counts['tail']} item(s) changed since "
        f"(searched exactly); tuned at {ckpt['tuned_at']} items, checked at "
        f"{ckpt['checked_at']}"
    )
    if manifest["root"]:
        click.echo(f"root:      {manifest['root']}")
    kept = manifest["regions"]
    click.echo(
        "regions:   "
        + (
            f"{kept['grid'][0]}x{kept['grid'][1]} {kept['dtype']} maps, "
            f"{kept['bytes'] / 2**20:.1f} MiB (structural re-ranking)"
            if kept
            else "none (`cmn-edge index regions` adds them)"
        )
    )
    click.echo(f"metadata:  {', '.join(manifest['metadata_keys']) or '(none)'}")
    for i, name in manifest["concept_names"].items():
        click.echo(f"  {parts.noun} {i}: {name}")


@index.command("optimize")
@INDEX_OPTION
@click.option(
    "--rebuild-graph",
    is_flag=True,
    help="Build the graph anew from the database (after a damaged or tampered graph file).",
)
@user_errors
def optimize(index_dir: Path, rebuild_graph: bool) -> None:
    """Checkpoint the graph, compact the vector file, re-tune the search depth (and the
    --graph-dims directions) for the gallery as it is now."""
    idx = ConceptIndex.open(index_dir)
    done = idx.optimize(rebuild_graph=rebuild_graph)
    calibration = done.get("calibration") or {}
    tuned = (
        f"; ef={calibration['ef']}, mask exponent {calibration['mask_ef_power']:g}"
        if calibration.get("queries")
        else ""
    )
    click.echo(f"optimized {index_dir}: checkpoint {done['checkpoint']}, {len(idx)} items{tuned}")


@index.command("verify")
@INDEX_OPTION
@user_errors
def verify(index_dir: Path) -> None:
    """Check everything: the database's integrity, the graph's checksum, every stored vector
    (reads the whole index; opening one checks only what it parses)."""
    problems = ConceptIndex.open(index_dir).verify()
    for problem in problems:
        click.echo(f"problem: {problem}", err=True)
    if problems:
        raise CliError(f"{index_dir}: {len(problems)} problem(s) found (listed above)")
    click.echo(f"{index_dir}: ok")


@index.command("regions")
@INDEX_OPTION
@model_options
@BATCH_OPTION
@user_errors
def regions(index_dir: Path, model, precision, threads, batch_size) -> None:
    """Add region maps to an index built without them (for `search --rerank structural`):
    each item's image is embedded again. Items whose file cannot be read are listed and the
    index is left as it was; run again once they are back (or removed) to finish."""
    idx = Index.open(index_dir)
    if idx.keeps_regions:
        click.echo(f"{index_dir} already keeps region maps for all {len(idx)} items")
        return
    idx._embedder = _embedder_for(idx.index, model, precision, threads)
    unreadable = _with_progress("Embedding regions", idx.add_regions, batch_size=batch_size)
    for path, reason in unreadable:
        _warn(f"skipped {path}: {reason}")
    if unreadable:
        raise CliError(
            f"{index_dir}: {len(unreadable)} item(s) could not be read (listed above); "
            "restore or `cmn-edge index remove` them, then run `index regions` again"
        )
    click.echo(f"{index_dir}: region maps kept for all {len(idx)} items")


@index.command("rebuild")
@INDEX_OPTION
@model_options
@BATCH_OPTION
@click.option(
    "--drop-unreadable",
    is_flag=True,
    help="Remove the items whose image cannot be read (default: stop, change nothing).",
)
@user_errors
def rebuild(index_dir: Path, model, precision, threads, batch_size, drop_unreadable) -> None:
    """Re-embed every item with the index's model file as it is now (after an upgrade that
    replaced it), or with --model/--precision: ids, paths, metadata and concept names stay.
    Items whose image cannot be read are listed and nothing changes (--drop-unreadable
    removes them); an interrupted rebuild resumes when run again."""
    idx = Index.open(index_dir, threads=threads)
    model, precision = chosen_model(model, precision)
    report = _with_progress(
        "Re-embedding",
        idx.rebuild,
        model=model,
        precision=precision,
        batch_size=batch_size,
        drop_unreadable=drop_unreadable,
    )
    for path, reason in report.unreadable:
        _warn(f"{'removed' if report.swapped else 'cannot re-embed'} {path}: {reason}")
    if report.unreadable and not report.swapped:
        raise CliError(
            f"{index_dir}: {len(report.unreadable)} item(s) could not be read (listed above); "
            "the index is unchanged: restore them and run again to resume, or "
            "--drop-unreadable to remove them"
        )
    click.echo(f"{index_dir}: {report.summary()}; {len(idx)} items")


@index.command("name-concept")
@INDEX_OPTION
@click.argument("concept")
@click.argument("name", required=False)
@click.option("--clear", is_flag=True, help="Remove the part's name.")
@user_errors
def name_concept(index_dir: Path, concept: str, name: str | None, clear: bool) -> None:
    """Name a part NAME: CONCEPT is a concept, or a DGML model's group, by id or current name;
    searches can then say --exclude-part NAME (also `index name-part`)."""
    if clear == (name is not None):
        raise CliError("give a NAME, or --clear to remove the name (not both)")
    idx = ConceptIndex.open(index_dir)
    concept_index = idx.resolve_part(concept)
    idx.set_concept_name(concept_index, None if clear else name)
    shown = "unnamed" if clear else f"named '{name.strip()}'"
    click.echo(f"{idx.parts.noun} {concept_index} {shown} in {index_dir}")


index.add_command(name_concept, name="name-part")


# ---------------------------------------------------------------------- search
@click.command("search")
@click.argument("query")
@click.option("--index", "index_dir", type=click.Path(path_type=Path), help="Index directory.")
@cli_postgres.backend_options
@click.option("-k", "k", type=int, default=10, show_default=True, help="Results to return.")
@part_options
@click.option(
    "--renormalize",
    is_flag=True,
    help="Score by cosine over the kept parts instead of the masked dot product.",
)
@click.option(
    "--where", multiple=True, help="Metadata filter KEY=VALUE (repeatable: all; VALUE may hold =)."
)
@click.option("--exact", is_flag=True, help="Brute force instead of the HNSW graph.")
@click.option("--json", "as_json", is_flag=True, help="Print the documented JSON shape.")
@click.option(
    "--explain", is_flag=True, help="Show each hit's top contributing parts (concepts, groups)."
)
@click.option("--explain-top", type=click.IntRange(1), default=5, show_default=True)
@click.option(
    "--rerank",
    type=click.Choice(RERANK_CHOICES),
    default=None,
    help="Re-order the best --rerank-depth by DIML's structural match of region maps.",
)
@click.option(
    "--rerank-depth",
    type=click.IntRange(1),
    default=DEFAULT_DEPTH,
    show_default=True,
    help="Candidates re-ranked (clamped to the gallery; at least -k).",
)
@model_options
@user_errors
def search(
    query: str,
    index_dir: Path | None,
    backend: str | None,
    table: str,
    k,
    exclude_part,
    only_part,
    part_weight,
    exclude_concept,
    only_concept,
    concept_weight,
    renormalize,
    where,
    exact,
    as_json,
    explain,
    explain_top,
    rerank,
    rerank_depth,
    model,
    precision,
    threads,
) -> None:
    """Find the images most like QUERY: an image file, or an indexed item as id:N (or N)."""
    if k < 1:
        raise CliError(f"-k {k}: k must be at least 1")
    if backend is not None:
        if index_dir is not None or explain or rerank:
            raise CliError("--backend searches the server: --index, --explain, --rerank are local")
        options = dict(locals())
        chosen = chosen_model(model, precision)
        cli_postgres.search(query, backend, table, k, options, *chosen, threads, as_json)
        return
    if index_dir is None:
        raise CliError("--index DIR (or --backend postgresql://...) is required")
    idx = Index(ConceptIndex.load(index_dir), threads=threads)
    controls = concept_controls(locals(), idx.index.parts)
    filters, weights = controls["where"] or {}, controls["weights"]
    controls.update(
        exact=exact,
        explain=explain_top if explain else 0,
        rerank=rerank,
        rerank_depth=rerank_depth,
    )
    query_id = query_item_id(query)
    if query_id is not None:
        if query_id not in idx:
            raise CliError(f"{query}: no item with id {query_id} in {index_dir}")
        stored_maps = idx.index.regions_of(query_id) if rerank else None
        hits = idx.search(
            idx.index.embedding(query_id),
            k,
            exclude_ids={query_id},
            query_regions=stored_maps,
            **controls,
        )
    else:
        idx._embedder = _embedder_for(idx.index, model, precision, threads)
        hits = idx.search(Path(query), k, **controls)
    if len(hits) < k:
        if filters:
            _warn(f"only {len(hits)} item(s) match {' '.join(where)}")
        else:
            _note(f"the index holds only {len(hits)} item(s) to return; listed them all")
    control = idx.index.plan(
        controls["exclude"], controls["only"], weights or None, renormalize
    ).described
    control["where"] = filters or None
    if as_json:
        out = {"query": query, "query_kind": "id" if query_id is not None else "image"}
        if query_id is not None:
            out["query_id"] = query_id
        out.update(
            {
                "model": idx.index.model_id,
                "index": str(index_dir),
                "k": k,
                "exact": exact,
                "control": control,
                **({"rerank": {"kind": rerank, "depth": rerank_depth}} if rerank else {}),
                "results": [h.to_dict() for h in hits],
            }
        )
        click.echo(json.dumps(out, indent=1))
        return
    for hit in hits:
        meta = " ".join(f"{key}={value}" for key, value in hit.metadata.items())
        click.echo(f"{hit.rank:3d}  {hit.score:7.4f}  #{hit.id:<6d} {hit.path}  {meta}".rstrip())
        if hit.score_structural is not None:
            click.echo(
                f"       global {hit.score_global:.4f} + structural {hit.score_structural:.4f}"
            )
        if hit.top_concepts:
            terms = []
            for c in hit.top_concepts:
                label = f"#{c['index']}" + (f" {c['name']}" if c["name"] else "")
                share = f" ({100 * c['share']:.0f}%)" if c["share"] is not None else ""
                terms.append(f"{label} {c['contribution']:+.4f}{share}")
            click.echo(f"       {idx.index.parts.noun}s: " + ", ".join(terms))


index.add_command(cli_postgres.export_command)
COMMANDS = [index, search]

__all__ = ["COMMANDS", "ConceptIndexError", "chosen_model", "index", "search"]
