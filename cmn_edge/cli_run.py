"""``cmn-edge embed``, ``cmn-edge eval`` and ``cmn-edge models``: the runtime's own commands."""

from __future__ import annotations

import contextlib
import csv
import glob
import io
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import click
import numpy as np
import onnxruntime as ort

from .cli_common import CliError, model_options, user_errors
from .cpu import this_cpu
from .dataset import check_retrieval_ready, is_image_file, load_samples, passed_over_note
from .embedder import Embedder, ModelError, list_images
from .files import atomic_write, storable_name
from .metadata import MetadataError, ModelMetadata
from .metrics import retrieval_metrics
from .pipeline import stream_batches
from .registry import BUNDLED, DEFAULT_MODEL, bundled_metrics, choose_precision, models_dir

#: Below this many images a progress bar is more noise than help.
PROGRESS_MIN_ITEMS = 64
FORMATS = ("json", "npy", "csv", "parquet")
#: Where ``embed`` runs the model: this process, or Ray Data actors (the ``scale`` extra).
ENGINES = ("local", "ray")


# --------------------------------------------------------------------------------------------
# helpers


def _progress(items: list, label: str):
    """A progress bar on stderr, only for an interactive terminal and a long job.

    click prints the label once on a non-terminal; scripts and tests read stderr for the one
    error line, so the bar stays out of their way entirely.
    """
    if len(items) >= PROGRESS_MIN_ITEMS and _interactive():
        return click.progressbar(length=len(items), label=label, file=sys.stderr)
    return contextlib.nullcontext(None)


def _interactive() -> bool:
    return sys.stderr.isatty()


def _expand_inputs(photos: tuple[str, ...]) -> list[Path]:
    """Files as given, folders replaced by the images below them (sorted, recursive), and
    a quoted glob (``"photos/*.jpg"``, ``**`` recursive) by the images it matches (sorted)."""
    paths: list[Path] = []
    passed_over: list[Path] = []
    for item in photos:
        path = Path(item)
        if path.is_dir():
            paths.extend(list_images(path, passed_over))
        elif not path.exists() and any(c in item for c in "*?["):
            for match in sorted(glob.glob(item, recursive=True)):
                found = Path(match)
                if found.is_dir():
                    paths.extend(list_images(found, passed_over))
                elif is_image_file(found):
                    paths.append(found)
        else:
            paths.append(path)  # a missing or unreadable file is reported when it is decoded
    note = passed_over_note(passed_over)
    if note:
        click.echo(f"warning: {note}", err=True)
    if not paths:
        raise CliError(f"{', '.join(photos)}: no images found")
    return paths


@contextlib.contextmanager
def _atomic_output(target: Path | None, binary: bool) -> Iterator[io.IOBase]:
    """Write into a temporary file beside ``target`` and rename it over only on success.

    A crash, an interrupt or an error half-way (a full disk too) leaves any earlier file
    untouched and no partial file behind; the new file gets the mode the umask gives, and a
    device or FIFO target is written through (see :func:`cmn_edge.files.atomic_write`).
    Without a target the stream is stdout.
    """
    if target is None:
        if binary:
            if sys.stdout.isatty():
                raise CliError("npy output is binary: give --output FILE or redirect stdout")
            yield sys.stdout.buffer
            sys.stdout.buffer.flush()
        else:
            if hasattr(sys.stdout, "reconfigure"):
                # a file name that is not UTF-8 goes out as its own bytes, as into a file
                # (a UTF-8 locale's stdout is strict: the run failed half-written)
                sys.stdout.reconfigure(errors="surrogateescape")
            yield sys.stdout
            sys.stdout.flush()
        return
    # a file name that is not UTF-8 (Latin-1 from an old camera) is written as its own bytes,
    # as stdout does under a UTF-8 locale, rather than failing the run at its very end
    text = {} if binary else {"encoding": "utf-8", "errors": "surrogateescape", "newline": ""}
    with atomic_write(target, "wb" if binary else "w", **text) as out:
        yield out


def _check_output_target(output: Path | None) -> None:
    """Fail before the (possibly long) embedding run, not after it."""
    if output is None:
        return
    if output.is_dir():
        raise CliError(f"{output}: output is a directory")
    parent = output.parent if str(output.parent) else Path(".")
    if not parent.is_dir():
        raise CliError(f"{output}: output folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise CliError(f"{output}: output folder {parent} is not writable")


def _floats(row: np.ndarray) -> list[float]:
    """float32 values as the shortest decimals that read back to the same float32."""
    return [float(f"{v:.9g}") for v in row.tolist()]


def _reason(path: Path, message: str) -> str:
    prefix = f"{path}: "
    return message[len(prefix) :] if message.startswith(prefix) else message


# --------------------------------------------------------------------------------------------
# embed


@click.command("embed", short_help="Embed photos or folders into concept space.")
@click.argument("photos", nargs=-1, required=True, type=click.Path(path_type=str))
@model_options
@click.option(
    "--format",
    "fmt",
    type=click.Choice(FORMATS),
    default=None,
    help="Output format; default from the --output suffix, else json (parquet with "
    "--engine ray). parquet writes a folder of parts (needs pyarrow: the scale extra).",
)
@click.option(
    "--output",
    "--out",
    "-o",
    type=click.Path(path_type=Path),
    default=None,
    help="Write here (atomically) instead of stdout; for parquet a folder.",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option(
    "--skip-errors",
    is_flag=True,
    help="Leave out files that cannot be decoded, list them on stderr (and in json 'errors').",
)
@click.option(
    "--scores",
    is_flag=True,
    help="Also output the raw concept scores (json: per item; csv: extra columns).",
)
@click.option(
    "--engine",
    type=click.Choice(ENGINES),
    default="local",
    show_default=True,
    help="ray: Ray Data reads the files, an actor pool embeds them, Parquet to --out FOLDER; "
    'failures are rows with their error (pip install "cmn-edge[scale]").',
)
@click.option(
    "--ray-address",
    default=None,
    help="--engine ray: the cluster to join ('auto': the one running here); default: "
    "start Ray on this machine for this run.",
)
@click.option(
    "--ray-actors",
    type=click.IntRange(min=1),
    default=None,
    help="--engine ray: actors running the model, each on --threads threads (default 1); "
    "default: the cluster's CPUs / threads.",
)
@user_errors
def embed(
    photos: tuple[str, ...],
    model: str | None,
    precision: str,
    threads: int | None,
    fmt: str | None,
    output: Path | None,
    batch_size: int,
    skip_errors: bool,
    scores: bool,
    engine: str,
    ray_address: str | None,
    ray_actors: int | None,
) -> None:
    """Embed PHOTOS (files or folders, searched recursively) into concept space.

    Each row is L2-normalised; dimension i measures how present concept i is. A file that
    cannot be decoded stops the run with one error line and nothing written. With
    --skip-errors the rest are embedded and the failures listed; the exit status is then 0 if
    at least one image was embedded, 1 if none was. npy rows follow the input order (folders
    in sorted order) minus the failures listed on stderr.

    --format parquet writes --output FOLDER: Parquet parts with one row per input (id, path,
    model, embedding, error, metadata) and _cmn_edge.json. --engine ray writes the same
    folder from a Ray cluster, every failure a row with its error (the exit status as with
    --skip-errors).
    """
    if fmt is None:
        suffix = output.suffix.lower().lstrip(".") if output is not None else ""
        fmt = "parquet" if engine == "ray" else suffix if suffix in FORMATS else "json"
    if fmt == "npy" and scores:
        raise click.UsageError("--scores needs --format json or csv (npy holds one array)")
    if fmt == "parquet" and (scores or output is None):
        raise click.UsageError("--format parquet needs --output FOLDER and takes no --scores")
    if engine == "ray" and fmt != "parquet":
        raise click.UsageError("--engine ray writes --format parquet to --out FOLDER")
    if engine != "ray" and (ray_address is not None or ray_actors is not None):
        raise click.UsageError("--ray-address and --ray-actors need --engine ray")
    if fmt != "parquet":
        _check_output_target(output)
    paths = _expand_inputs(photos)
    if fmt == "parquet":  # before anything is embedded: Parquet's strings are UTF-8
        for path in paths:
            if not storable_name(path):
                raise CliError(
                    f"{path}: file name is not valid UTF-8, which Parquet cannot store "
                    "(rename the file, or write --format json or npy)"
                )
    if engine == "ray":
        _embed_with_ray(
            paths, output, model, precision, threads, batch_size, ray_address, ray_actors
        )
        return
    embedder = Embedder(model, precision=precision, threads=threads)

    kept: list[Path] = []
    kept_index: list[int] = []
    error_index: list[int] = []
    embeddings: list[np.ndarray] = []
    concept_scores: list[np.ndarray] = []
    errors: list[tuple[Path, str]] = []
    failed: list[tuple[tuple[int, Path], str]] = []
    # the one pipeline (decode threads ahead of the model, input order); items carry their
    # position, so a file given twice and the parquet rows stay where they were asked for
    batches = stream_batches(
        list(enumerate(paths)),
        lambda item: embedder.load(item[1]),
        lambda batch: embedder.embed_arrays(batch, with_scores=scores),
        batch_size,
        embedder.threads.decode,
        skip_errors,
        failed,
    )

    def report_failures() -> int:
        """Failures the stream recorded since the last call: listed now, as they happen."""
        new = failed[len(errors) :]
        for (index, path), message in new:
            errors.append((path, _reason(path, message)))
            error_index.append(index)
            click.echo(f"error: {path}: {errors[-1][1]}", err=True)
        return len(new)

    with _progress(paths, "embedding") as bar:
        for batch, result in batches:
            kept_index += [index for index, _ in batch]
            kept += [path for _, path in batch]
            embeddings.append(result.embedding)
            if scores:
                concept_scores.append(result.scores)
            done = len(batch) + report_failures()
            if bar is not None:
                bar.update(done)
    report_failures()  # files that failed after the last batch
    if not kept:
        raise CliError(f"no image could be embedded ({len(errors)} failed)")
    matrix = np.concatenate(embeddings).astype(np.float32, copy=False)
    score_matrix = np.concatenate(concept_scores) if scores else None

    if fmt == "parquet":
        from .embeddings_folder import write_embeddings

        full = np.zeros((len(paths), embedder.num_concepts), np.float32)
        full[kept_index] = matrix
        reasons: list[str | None] = [None] * len(paths)
        for index, (_, reason) in zip(error_index, errors):
            reasons[index] = reason
        write_embeddings(
            output,
            paths,
            full,
            reasons,
            model_id=embedder.model_id,
            precision=embedder.metadata.precision,
            concept_names=list(embedder.metadata.concept_names),
        )
    else:
        _write_output(output, fmt, embedder, kept, matrix, score_matrix, errors)
    if errors:
        click.echo(f"embedded {len(kept)} of {len(paths)} images; {len(errors)} skipped", err=True)


def _write_output(output, fmt, embedder, kept, matrix, score_matrix, errors) -> None:
    with _atomic_output(output, binary=fmt == "npy") as out:
        if fmt == "npy":
            np.save(out, matrix)
        elif fmt == "csv":
            _write_csv(out, embedder, kept, matrix, score_matrix)
        else:
            _write_json(out, embedder, kept, matrix, score_matrix, errors)


def _embed_with_ray(
    paths: list[Path],
    output: Path,
    model: str | None,
    precision: str,
    threads: int | None,
    batch_size: int,
    address: str | None,
    actors: int | None,
) -> None:
    """``embed --engine ray``: the job is in :mod:`cmn_edge.ray_embed` (imported only here,
    so the local engine never imports Ray)."""
    from .ray_embed import embed_with_ray

    result = embed_with_ray(
        paths,
        output,
        model=model,
        precision=precision,
        threads=threads,
        batch_size=batch_size,
        address=address,
        actors=actors,
        progress=_interactive(),
    )
    for path, reason in result.errors:
        click.echo(f"error: {path}: {reason}", err=True)
    if not result.embedded:
        raise CliError(
            f"no image could be embedded ({len(result.errors)} failed; rows in {output})"
        )
    if result.errors:
        click.echo(
            f"embedded {result.embedded} of {result.rows} images; {len(result.errors)} failed",
            err=True,
        )


def _write_json(out, embedder, kept, matrix, score_matrix, errors) -> None:
    items = []
    for i, path in enumerate(kept):
        item = {"path": str(path), "embedding": _floats(matrix[i])}
        if score_matrix is not None:
            item["scores"] = _floats(score_matrix[i])
        items.append(item)
    document = {
        "model": embedder.model_id,
        "precision": embedder.metadata.precision,
        "num_concepts": embedder.num_concepts,
        "items": items,
        "errors": [{"path": str(p), "error": reason} for p, reason in errors],
    }
    json.dump(document, out)
    out.write("\n")


def _write_csv(out, embedder, kept, matrix, score_matrix) -> None:
    count = embedder.num_concepts
    names = list(embedder.metadata.concept_names) or [f"c{i}" for i in range(count)]
    header = ["path", *names]
    if score_matrix is not None:
        header += [f"score_{name}" for name in names]
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    for i, path in enumerate(kept):
        row = [str(path), *(f"{v:.9g}" for v in matrix[i].tolist())]
        if score_matrix is not None:
            row += [f"{v:.9g}" for v in score_matrix[i].tolist()]
        writer.writerow(row)


# --------------------------------------------------------------------------------------------
# eval


@click.command("eval", short_help="Recall@K and MAP@R of a labelled dataset.")
@click.argument("dataset", type=click.Path(path_type=Path))
@click.option(
    "--split",
    default="test",
    show_default=True,
    help="Manifest split to evaluate ('all' for every row); an ImageFolder tree is one split.",
)
@model_options
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option(
    "--limit-per-class",
    type=click.IntRange(min=2),
    default=None,
    help="Use at most this many images of each class (a quick check).",
)
@user_errors
def eval_(
    dataset: Path,
    split: str,
    model: str | None,
    precision: str,
    threads: int | None,
    as_json: bool,
    batch_size: int,
    limit_per_class: int | None,
) -> None:
    """Recall@1/2/4/8 and MAP@R of a labelled DATASET, leave-one-out over one split.

    DATASET is a folder with manifest.csv (path,label,class_name,split) or an ImageFolder
    tree (<class>/<image>). Every image of the split queries all the others.
    """
    samples = load_samples(dataset, split)
    if limit_per_class is not None:
        seen: dict[int, int] = {}
        limited = []
        for sample in samples:
            seen[sample.label] = seen.get(sample.label, 0) + 1
            if seen[sample.label] <= limit_per_class:
                limited.append(sample)
        samples = limited
    check_retrieval_ready(samples, dataset)
    embedder = Embedder(model, precision=precision, threads=threads)

    started = time.perf_counter()
    paths = [s.path for s in samples]
    chunks = []
    with _progress(paths, "evaluating") as bar:
        for chunk_paths, chunk in embedder.iter_paths(paths, batch_size):
            chunks.append(chunk)
            if bar is not None:
                bar.update(len(chunk_paths))
    matrix = np.concatenate(chunks)
    labels = np.asarray([s.label for s in samples])
    metrics = retrieval_metrics(matrix, labels)
    seconds = time.perf_counter() - started

    split_name = samples[0].split if len({s.split for s in samples}) == 1 else split
    result = {
        "model": embedder.model_id,
        "precision": embedder.metadata.precision,
        "dataset": str(dataset),
        "split": split_name,
        "count": len(samples),
        "classes": len({s.label for s in samples}),
        "seconds": round(seconds, 3),
        "metrics": {k: round(v, 4) for k, v in metrics.items()},
    }
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(
        f"{result['model']} ({result['precision']}) on {dataset} [{split_name}]: "
        f"{result['count']} images, {result['classes']} classes, {seconds:.1f} s"
    )
    names = list(result["metrics"])
    click.echo("  ".join(f"{name:>7}" for name in names))
    click.echo("  ".join(f"{result['metrics'][name]:7.2f}" for name in names))


# --------------------------------------------------------------------------------------------
# models


def file_metadata(path: Path) -> dict:
    """The key facts a model file's own ONNX metadata records (what ``cmn-export`` wrote).

    Read from the file rather than from the model card, so the listing cannot drift from
    what the runtime will actually load. Raises :class:`ModelError` for an unreadable file.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # just read
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        props = session.get_modelmeta().custom_metadata_map
        meta = ModelMetadata.from_props(props, str(path))
    except MetadataError as exc:
        raise ModelError(str(exc)) from None
    except Exception as exc:  # onnxruntime raises its own untyped errors
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(f"{path}: unreadable ({reason})") from None
    quant = meta.quantization
    return {
        "name": meta.name,
        "backbone": meta.backbone,
        "precision": meta.precision,
        "num_concepts": meta.num_concepts,
        "named_concepts": len(meta.concept_names),
        "input_size": meta.preprocess.input_size,
        "resize_size": meta.preprocess.resize_size,
        "attention_grid": list(meta.attention_grid),
        "training_data": meta.training_data,
        "quantization": {
            "format": quant.get("format"),
            "activation_type": quant.get("activation_type"),
            "weight_type": quant.get("weight_type"),
            "per_channel": quant.get("per_channel"),
            "gemm_weight_bits": 8 if meta.saturates_u8s8 else 7,
            "u8u8_rewrite_here": meta.saturates_u8s8 and this_cpu().needs_u8u8,
            "calibration": quant.get("calibration", {}),
            "float_compute_nodes": {
                op: len(nodes) for op, nodes in quant.get("float_compute_nodes", {}).items()
            },
        }
        if quant
        else None,
    }


def _describe(meta: dict) -> list[str]:
    """A few lines for the text listing."""
    size, grid = meta["input_size"], meta["attention_grid"]
    named = f", {meta['named_concepts']} named" if meta["named_concepts"] else ""
    lines = [
        f"{meta['name']}: {meta['num_concepts']} concepts{named}, {meta['backbone']}, "
        f"input {size}x{size} (resize {meta['resize_size']}), attention {grid[0]}x{grid[1]}, "
        f"{meta['precision']}"
    ]
    quant = meta["quantization"]
    if quant:
        channel = "per-channel" if quant["per_channel"] else "per-tensor"
        lines.append(
            f"quantization: {quant['format']}, activations {quant['activation_type']}, "
            f"weights {quant['weight_type']} {channel}, GEMM weights "
            f"{quant['gemm_weight_bits']}-bit"
        )
        lines.append(
            "on this CPU: "
            + (
                "U8U8 rewrite (8-bit GEMM weights would saturate U8S8 here)"
                if quant["u8u8_rewrite_here"]
                else "runs as quantized"
            )
        )
        calib = quant["calibration"]
        method = calib.get("method", "?")
        if calib.get("percentile") is not None:
            method += f" {calib['percentile']:g}"
        lines.append(
            f"calibration: {method} on {calib.get('count', '?')} {calib.get('split', '?')} "
            f"images of {calib.get('data', '?')}"
        )
        floats = ", ".join(f"{op} x{n}" for op, n in sorted(quant["float_compute_nodes"].items()))
        lines.append(f"float compute nodes: {floats or 'none'}")
    return lines


@click.command("models", short_help="The bundled models: files, ONNX metadata, metrics.")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@user_errors
def models(as_json: bool) -> None:
    """The bundled models: their files, what each file's ONNX metadata records (name,
    concepts, input size, precision, the INT8 recipe) and the metrics in the model card."""
    folder = models_dir()
    listing = []
    for bundled in BUNDLED:
        files = []
        for precision, filename in bundled.files:
            path = folder / filename
            metadata, metadata_error = None, None
            if path.is_file():
                try:
                    metadata = file_metadata(path)
                except ModelError as exc:
                    metadata_error = str(exc)
            files.append(
                {
                    "precision": precision,
                    "file": filename,
                    "path": str(path),
                    "exists": path.is_file(),
                    "bytes": path.stat().st_size if path.is_file() else None,
                    "metadata": metadata,
                    "metadata_error": metadata_error,
                }
            )
        metrics_error = None
        try:
            metrics = bundled_metrics(bundled)
        except (OSError, ValueError) as exc:
            metrics, metrics_error = {}, f"{folder / bundled.metrics}: unreadable ({exc})"
        if isinstance(metrics, dict) and isinstance(metrics.get(bundled.name), dict):
            metrics = metrics[bundled.name]
        card = folder / bundled.card
        listing.append(
            {
                "name": bundled.name,
                "default": bundled.name == DEFAULT_MODEL,
                "description": bundled.description,
                "files": files,
                "model_card": str(card) if card.is_file() else None,
                "metrics": metrics,
                "metrics_error": metrics_error,
            }
        )
    cpu = this_cpu()
    auto = choose_precision("auto", cpu)
    if as_json:
        payload = {"models_dir": str(folder), "cpu": cpu.to_dict(), "precision_auto": auto}
        click.echo(json.dumps({**payload, "models": listing}, indent=2))
        return
    click.echo(f"models folder: {folder}")
    click.echo(f"this CPU: {cpu.describe()}")
    click.echo(f"--precision auto (the default) loads: {auto}")
    for entry in listing:
        default = " (default)" if entry["default"] else ""
        click.echo(f"\n{entry['name']}{default}: {entry['description']}")
        for f in entry["files"]:
            size = f"{f['bytes'] / 1e6:8.1f} MB" if f["exists"] else "     missing"
            click.echo(f"  {f['precision']:5} {size}  {f['file']}")
            for line in _describe(f["metadata"]) if f["metadata"] else ():
                click.echo(f"          {line}")
            if f["metadata_error"]:
                click.echo(f"          metadata: {f['metadata_error']}")
        if entry["model_card"]:
            click.echo(f"  model card: {entry['model_card']}")
        if entry["metrics_error"]:
            click.echo(f"  metrics: {entry['metrics_error']}")
        elif not entry["metrics"]:
            click.echo(f"  metrics: none recorded (no {folder / 'metrics.json'})")
        else:
            click.echo("  metrics:")
            for key, value in _flatten(entry["metrics"]):
                click.echo(f"    {key}: {value}")


def _flatten(value: object, prefix: str = "") -> Iterator[tuple[str, object]]:
    """Nested metrics as dotted keys, so any layout of metrics.json prints readably."""
    if isinstance(value, dict):
        for key, inner in value.items():
            yield from _flatten(inner, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, value


COMMANDS = [embed, eval_, models]
