"""The embeddings folder that ``cmn-edge embed --format parquet`` and ``--engine ray`` write.

``--out`` is a folder: Parquet parts of up to ``ROWS_PER_PART`` rows (id, path, model,
embedding, error, metadata; one row per input, in input order) and ``_cmn_edge.json``, the
manifest (model, precision, counts, what each column means). The parts are written into a
hidden folder beside ``--out``, fsynced, and the folder is renamed into place only when
everything is written (:func:`cmn_edge.files.publish_folder`): a failed job leaves no
half-written output, and any earlier output as it was.

pyarrow comes with the ``scale`` extra; nothing here imports it until a folder is written
or read.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .files import publish_folder, staging_folder, write_text_atomic

if TYPE_CHECKING:  # the scale extra; imported for real only when a folder is written
    import pyarrow as pa

INSTALL_HINT = 'pip install "cmn-edge[scale]"'
#: The folder's description (model, counts, parts); Parquet readers skip ``_`` names.
MANIFEST = "_cmn_edge.json"
#: Rows per Parquet part written by the driver.
ROWS_PER_PART = 100_000


class MissingExtraError(RuntimeError):
    """pyarrow or Ray Data (the ``scale`` extra) is not installed."""


class OutputFolderError(ValueError):
    """An ``--out`` that cannot take the embeddings folder (a file, a foreign folder)."""


def schema(num_concepts: int) -> pa.Schema:
    """The Parquet columns: one row per input file, ``embedding`` null where ``error`` is set."""
    import pyarrow as pa

    return pa.schema(
        [
            ("id", pa.int64()),
            ("path", pa.string()),
            ("model", pa.string()),
            ("embedding", pa.list_(pa.float32(), num_concepts)),
            ("error", pa.string()),
            ("metadata", pa.string()),  # JSON object, or null
        ]
    )


def table_of_rows(
    ids: Sequence[int],
    paths: Sequence[str],
    model: str,
    embeddings: np.ndarray,
    errors: Sequence[str | None],
    metadata: Sequence[str | None],
) -> pa.Table:
    """Rows as a pyarrow table; ``embeddings`` [N, C] with any values where errors are set."""
    import pyarrow as pa

    count, concepts = embeddings.shape
    flat = pa.array(np.ascontiguousarray(embeddings, dtype=np.float32).reshape(-1))
    mask = pa.array([e is not None for e in errors], type=pa.bool_())
    vectors = pa.FixedSizeListArray.from_arrays(flat, concepts, mask=mask)
    return pa.Table.from_arrays(
        [
            pa.array(ids, pa.int64()),
            pa.array(paths, pa.string()),
            pa.array([model] * count, pa.string()),
            vectors,
            pa.array(errors, pa.string()),
            pa.array(metadata, pa.string()),
        ],
        schema=schema(concepts),
    )


def check_out(out: Path) -> None:
    """``--out`` is a new folder, or one this command wrote before (it is replaced)."""
    if out.exists() and not out.is_dir():
        raise OutputFolderError(f"{out}: is a file; Parquet output is written as a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise OutputFolderError(
            f"{out}: folder is not empty and was not written by cmn-edge embed (no {MANIFEST}); "
            "give a new or empty folder"
        )
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise OutputFolderError(f"{out}: output folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise OutputFolderError(f"{out}: output folder {parent} is not writable")


class PartWriter:
    """Tables -> ``part-00000.parquet``, ``part-00001.parquet``, ... of ``ROWS_PER_PART`` rows
    each, every part fsynced when closed (the folder is renamed into place after)."""

    def __init__(self, folder: Path, table_schema: pa.Schema) -> None:
        self.folder, self.schema = folder, table_schema
        self.parts: list[Path] = []
        self.rows = 0
        self._writer: Any = None
        self._in_part = 0

    def write(self, table: pa.Table) -> None:
        import pyarrow.parquet as pq

        start = 0
        while start < table.num_rows:
            if self._writer is None:
                self.parts.append(self.folder / f"part-{len(self.parts):05d}.parquet")
                self._writer = pq.ParquetWriter(self.parts[-1], self.schema)
            head = table.slice(start, ROWS_PER_PART - self._in_part)
            self._writer.write_table(head)
            start += head.num_rows
            self.rows += head.num_rows
            self._in_part += head.num_rows
            if self._in_part == ROWS_PER_PART:
                self._finish()

    def _finish(self) -> None:
        self._writer.close()
        self._writer, self._in_part = None, 0
        with open(self.parts[-1], "rb") as handle:
            os.fsync(handle.fileno())

    def close(self) -> None:
        if self._writer is not None:
            self._finish()


def finish_folder(
    temp: Path,
    out: Path,
    writer: PartWriter,
    *,
    engine: str,
    model_id: str,
    precision: str,
    concept_names: list[str],
    embedded: int,
    errors: int,
) -> None:
    """Close the parts, write the manifest and rename ``temp`` to ``out``."""
    writer.close()
    concepts = writer.schema.field("embedding").type.list_size
    manifest = {
        "format": "cmn-edge embeddings",
        "engine": engine,
        "model": model_id,
        "precision": precision,
        "num_concepts": concepts,
        "concept_names": concept_names,
        "rows": writer.rows,
        "embedded": embedded,
        "errors": errors,
        "parts": [p.name for p in writer.parts],
        "columns": {
            "id": "position in the input list (the local embed's row order)",
            "path": "the path as given",
            "model": "model name @ file hash",
            "embedding": f"float32[{concepts}], unit norm; null where error is set",
            "error": "why the file could not be embedded; null on success",
            "metadata": "JSON object or null",
        },
    }
    write_text_atomic(temp / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    publish_folder(temp, out)


def staging(out: Path) -> Path:
    """A new hidden folder beside ``out`` for the parts (same file system: rename works);
    those of killed jobs are removed (``files.staging_folder``)."""
    temp = staging_folder(out)
    temp.mkdir()
    return temp


def write_embeddings(
    out: str | os.PathLike,
    paths: Sequence[str | os.PathLike],
    embeddings: np.ndarray,
    errors: Sequence[str | None],
    *,
    model_id: str,
    precision: str,
    concept_names: Sequence[str] = (),
    metadata: Sequence[str | None] | None = None,
    engine: str = "local",
) -> Path:
    """The local engine's Parquet output: the Ray engine's folder layout, from rows in hand.

    ``embeddings`` [N, C] has a row for every path (any values where ``errors`` is set); row
    ``i`` gets id ``i``.
    """
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise MissingExtraError(f"--format parquet needs pyarrow: {INSTALL_HINT}") from None
    out = Path(out)
    check_out(out)
    given = [str(p) for p in paths]
    temp = staging(out)
    try:
        writer = PartWriter(temp, schema(embeddings.shape[1]))
        writer.write(
            table_of_rows(
                list(range(len(given))),
                given,
                model_id,
                embeddings,
                list(errors),
                list(metadata) if metadata is not None else [None] * len(given),
            )
        )
        finish_folder(
            temp,
            out,
            writer,
            engine=engine,
            model_id=model_id,
            precision=precision,
            concept_names=list(concept_names),
            embedded=sum(e is None for e in errors),
            errors=sum(e is not None for e in errors),
        )
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return out


def read_embeddings(folder: str | os.PathLike) -> pa.Table:
    """The rows of an ``--out`` folder as one pyarrow table, sorted by ``id``."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise MissingExtraError(f"reading Parquet needs pyarrow: {INSTALL_HINT}") from None
    folder = Path(folder)
    manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    tables = [pq.read_table(folder / name) for name in manifest["parts"]]

    if not tables:
        return schema(manifest["num_concepts"]).empty_table()
    return pa.concat_tables(tables).sort_by("id")


__all__ = [
    "INSTALL_HINT",
    "MANIFEST",
    "ROWS_PER_PART",
    "MissingExtraError",
    "OutputFolderError",
    "PartWriter",
    "check_out",
    "finish_folder",
    "read_embeddings",
    "schema",
    "staging",
    "table_of_rows",
    "write_embeddings",
]
