"""``cmn-edge embed --engine ray``: the same embeddings as the local command, from a Ray cluster.

Ray Data reads each file's bytes (``read_binary_files``); a pool of actors, each holding one
:class:`~cmn_edge.embedder.Embedder`, decodes them with the runtime's own preprocessing
(:func:`cmn_edge.preprocess.load_bytes`, the code path of a local file) and runs the same ONNX
file at the precision the driver chose, so the vectors equal the local ones. A file that
cannot be read or decoded becomes a row with its error, not a failed job. The rows stream
back to the driver, which writes ``--out`` as the local engine's embeddings folder
(:mod:`cmn_edge.embeddings_folder`), renamed into place only when the job has finished.

Ray is an optional extra (``pip install "cmn-edge[scale]"``): nothing here imports it, or
pyarrow, until a job runs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import preprocess as pp
from .embeddings_folder import (
    INSTALL_HINT,
    MANIFEST,
    MissingExtraError,
    PartWriter,
    check_out,
    finish_folder,
    read_embeddings,
    schema,
    staging,
    table_of_rows,
    write_embeddings,
)
from .pipeline import stream_batches

if TYPE_CHECKING:  # the scale extra; imported for real only when a job runs
    import pyarrow as pa

#: CPUs one read task reserves: reading bytes waits on the disk, and a read task that asks
#: for a whole CPU cannot start once the actors hold the rest (the job hangs: ray #44687).
READ_CPUS = 0.25
#: CPUs an actor reserves per model thread: fractional, so the readers keep a share.
ACTOR_CPUS_PER_THREAD = 0.75


class RayEmbedError(RuntimeError):
    """A Ray job that could not run (no cluster at the address, an output in the way)."""


@dataclass(frozen=True)
class RayEmbedResult:
    """What a job wrote: the folder, its Parquet parts and the row counts."""

    out: Path
    parts: list[Path]
    rows: int
    embedded: int
    errors: list[tuple[str, str]]  # (path, reason)
    model: str
    precision: str
    seconds: float


def require_ray() -> Any:
    """``ray`` with Ray Data and pyarrow, or one line naming the extra to install."""
    try:
        import pyarrow  # noqa: F401
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        missing = exc.name or "ray"
        raise MissingExtraError(
            f"--engine ray needs Ray Data ({missing} is not installed): {INSTALL_HINT}"
        ) from None
    return ray


def _reason(path: str, message: str) -> str:
    prefix = f"{path}: "
    return message[len(prefix) :] if message.startswith(prefix) else message


class EmbedActor:
    """One Embedder per actor, loaded once; a batch of Ray's (bytes, path) rows -> the same
    rows' ``source`` path, ``embedding`` (zeros where it failed) and ``error``.

    The model and precision are the driver's choice, and the file's hash is checked against
    the driver's: a worker with another copy of the model refuses to run. Row ids stay on
    the driver, so the actor's arguments are small whatever the number of files.
    """

    def __init__(
        self, model: str | None, precision: str, model_id: str, threads: int, batch_size: int
    ) -> None:
        from .embedder import Embedder

        self.embedder = Embedder(
            model, precision=precision, threads=threads, decode_workers=threads
        )
        if self.embedder.model_id != model_id:
            raise RuntimeError(
                f"this worker's model {self.embedder.model_id} is not the driver's {model_id}"
            )
        self.batch_size = batch_size

    def __call__(self, batch: pa.Table) -> pa.Table:
        import pyarrow as pa

        paths = batch.column("path").to_pylist()
        rows = list(enumerate(zip(paths, batch.column("bytes").to_pylist())))
        preprocess = self.embedder.preprocess
        concepts = self.embedder.num_concepts
        matrix = np.zeros((len(rows), concepts), np.float32)
        failures: list[tuple[tuple[int, tuple[str, bytes]], str]] = []
        for kept, vectors in stream_batches(
            rows,
            lambda row: pp.load_bytes(row[1][1], row[1][0], preprocess),
            lambda arrays: self.embedder.embed_arrays(arrays).embedding,
            batch_size=self.batch_size,
            workers=self.embedder.threads.decode,
            skip_errors=True,
            errors=failures,
        ):
            matrix[[i for i, _ in kept]] = vectors
        errors: list[str | None] = [None] * len(rows)
        for (i, (path, _)), message in failures:
            errors[i] = _reason(path, message)
        flat = pa.array(matrix.reshape(-1))
        return pa.table(
            {
                "source": pa.array(paths, pa.string()),
                "embedding": pa.FixedSizeListArray.from_arrays(flat, concepts),
                "error": pa.array(errors, pa.string()),
            }
        )


def _key(path: str) -> str:
    """One spelling of a local path, for what Ray's reader reports and what was given."""
    return os.path.normpath(os.path.abspath(path))


def _rows(
    result: pa.Table,
    entries: Mapping[str, Sequence[tuple[int, str, str | None]]],
    model_id: str,
    concepts: int,
) -> pa.Table:
    """An actor's output as output rows: one per input entry of each file read."""
    sources = result.column("source").to_pylist()
    vectors = np.asarray(result.column("embedding").combine_chunks().values, np.float32)
    vectors = vectors.reshape(-1, concepts)
    reasons = result.column("error").to_pylist()
    take = [(i, entry) for i, source in enumerate(sources) for entry in entries[_key(source)]]
    rows = [i for i, _ in take]
    return table_of_rows(
        [entry[0] for _, entry in take],
        [entry[1] for _, entry in take],
        model_id,
        vectors[rows],
        [reasons[i] for i in rows],
        [entry[2] for _, entry in take],
    )


def _unreadable(path: Path) -> str | None:
    """Why the driver already knows ``path`` cannot be read (Ray's reader would fail the
    whole job on it), in the words the local command uses; None when it looks readable."""
    if not path.exists():
        return "file not found"
    if path.is_dir():
        return "is a directory, not an image"
    if not os.access(path, os.R_OK):
        return "cannot read (Permission denied)"
    if path.stat().st_size == 0:
        return "file is empty"
    return None


@contextlib.contextmanager
def _ray_session(ray: Any, address: str | None):
    """Connect to ``address`` (``auto``: the running cluster) or start a local Ray; a session
    this call started is shut down after, one the caller started is left running."""
    if ray.is_initialized():
        yield
        return
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": "WARNING"}
    if address is None:
        # "local": a new Ray for this run, never a cluster someone else started here.
        address = "local"
        kwargs["num_cpus"] = os.cpu_count() or 1
    try:
        ray.init(address=address, **kwargs)
    except Exception as exc:  # no cluster there, a refused token, ...: Ray's own classes
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = f"Ray at {address!r}" if address != "local" else "a local Ray"
        raise RayEmbedError(f"cannot start or join {where}: {reason}") from None
    try:
        yield
    finally:
        ray.shutdown()


def embed_with_ray(
    paths: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    model: str | os.PathLike | None = None,
    precision: str = "auto",
    threads: int | None = None,
    batch_size: int = 32,
    address: str | None = None,
    actors: int | None = None,
    actor_cpus: float | None = None,
    metadata: Mapping[str, Mapping[str, Any]] | None = None,
    progress: bool = False,
) -> RayEmbedResult:
    """Embed ``paths`` on Ray and write ``out`` (a folder of Parquet parts and a manifest).

    Row ``id`` is the position in ``paths`` (the local command's row order) and ``path`` the
    path as given; ``metadata`` (path as given -> JSON-able dict) is stored per row. Each of
    ``actors`` actors runs the model on ``threads`` threads (default 1) and reserves
    ``actor_cpus`` CPUs (default 0.75 per thread, fractional so reads are never starved).
    """
    ray = require_ray()
    from .embedder import Embedder

    out = Path(out)
    check_out(out)
    started = time.perf_counter()
    # One model thread per actor by default: more actors, not more threads, is how Ray
    # spreads over nodes, and on 2 cores 2 actors x 1 thread beat 1 x 2 (benchmarks/).
    threads = max(1, threads or 1)
    driver = Embedder(model, precision=precision, threads=1)
    model_id, resolved = driver.model_id, driver.precision
    concepts = driver.num_concepts

    given = [str(p) for p in paths]
    meta = metadata or {}
    meta_json = {p: json.dumps(dict(meta[p]), sort_keys=True) for p in given if p in meta}
    # Ray reads each file once; a file given twice (as the local command allows) gives two rows.
    readable: dict[str, list[tuple[int, str, str | None]]] = {}
    early: list[tuple[int, str, str]] = []
    for index, path in enumerate(given):
        reason = _unreadable(Path(path))
        if reason is None:
            entry = (index, path, meta_json.get(path))
            readable.setdefault(_key(path), []).append(entry)
        else:
            early.append((index, path, reason))

    temp = staging(out)
    errors: list[tuple[int, str, str]] = list(early)
    embedded = 0
    try:
        writer = PartWriter(temp, schema(concepts))
        with _ray_session(ray, address):
            context = ray.data.DataContext.get_current()
            context.execution_options.preserve_order = True  # parts in input order
            context.enable_progress_bars = progress
            if not progress:  # the plan and timing lines: stderr is for the errors
                logging.getLogger("ray.data").setLevel(logging.WARNING)
            cpus = float(ray.cluster_resources().get("CPU", 1))
            per_actor = actor_cpus if actor_cpus is not None else ACTOR_CPUS_PER_THREAD * threads
            pool = actors or max(1, math.floor(cpus / threads))
            if readable:
                ds = ray.data.read_binary_files(
                    list(readable), include_paths=True, num_cpus=READ_CPUS
                )
                ds = ds.map_batches(
                    EmbedActor,
                    fn_constructor_kwargs={
                        "model": None if model is None else str(model),
                        "precision": resolved,
                        "model_id": model_id,
                        "threads": threads,
                        "batch_size": batch_size,
                    },
                    batch_size=batch_size,
                    batch_format="pyarrow",
                    compute=ray.data.ActorPoolStrategy(size=pool),
                    num_cpus=per_actor,
                )
                for result in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                    table = _rows(result, readable, model_id, concepts)
                    failed = table.column("error")
                    embedded += failed.null_count
                    if failed.null_count < table.num_rows:
                        bad = table.filter(failed.is_valid())
                        errors += zip(
                            bad["id"].to_pylist(), bad["path"].to_pylist(), bad["error"].to_pylist()
                        )
                    writer.write(table)
        if early:
            zeros = np.zeros((len(early), concepts), np.float32)
            writer.write(
                table_of_rows(
                    [i for i, _, _ in early],
                    [p for _, p, _ in early],
                    model_id,
                    zeros,
                    [r for _, _, r in early],
                    [meta_json.get(p) for _, p, _ in early],
                )
            )
        errors.sort()
        finish_folder(
            temp,
            out,
            writer,
            engine="ray",
            model_id=model_id,
            precision=resolved,
            concept_names=list(driver.metadata.concept_names),
            embedded=embedded,
            errors=len(errors),
        )
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return RayEmbedResult(
        out=out,
        parts=[out / p.name for p in writer.parts],
        rows=writer.rows,
        embedded=embedded,
        errors=[(p, r) for _, p, r in errors],
        model=model_id,
        precision=resolved,
        seconds=time.perf_counter() - started,
    )


__all__ = [
    "INSTALL_HINT",
    "MANIFEST",
    "MissingExtraError",
    "RayEmbedError",
    "RayEmbedResult",
    "embed_with_ray",
    "read_embeddings",
    "require_ray",
    "write_embeddings",
]
