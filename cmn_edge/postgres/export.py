"""``index export``: a local index's items, paths, metadata and vectors into PostgreSQL.

One transaction: the rows go into staging tables by binary COPY, the indexes are built on
them, and only then do they replace the gallery's tables. A failure anywhere (the server
going away, a full disk, Ctrl-C) rolls it all back: no half-written gallery, and searchers
of the old one are not blocked until the final swap.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import numpy as np

from ..index import ConceptIndex
from .connect import DEFAULT_TABLE, connect, display_url, first_line, psycopg_modules
from .errors import PostgresError
from .schema import STAGING, Names, create_indexes, create_tables, exists, publish, sql

#: pgvector's defaults; ``ef_search`` is chosen per query (see :mod:`.search`).
HNSW_M = 16
HNSW_EF_CONSTRUCTION = 64
BATCH = 4096
#: ``ef_search`` values tried for an unmasked query; the first that reaches the target wins
EF_STEPS = (40, 64, 100, 160, 250, 400, 640, 1000)
EF_TARGET = 0.99
CALIBRATION_QUERIES = 60


def calibrate(conn, items: str, vectors: np.ndarray, k: int = 10) -> tuple[int, float | None]:
    """The smallest ``ef_search`` whose recall@k against exact reaches :data:`EF_TARGET`.

    Queries are gallery rows pushed off their cluster by the difference of two other rows
    (renormalised): like a photo of something the gallery has not seen, not a copy the graph
    has as a node (those are found at any depth). Masked queries search
    ``ef / cos(q, q*w) ** ef_power`` deep from this base (see :mod:`.search`).
    """
    n = len(vectors)
    if n <= 4 * k:
        return EF_STEPS[0], None
    rng = np.random.default_rng(0)
    picks = rng.choice(n, (min(CALIBRATION_QUERIES, n // 3), 3), replace=False)
    queries = vectors[picks[:, 0]] + 0.7 * (vectors[picks[:, 1]] - vectors[picks[:, 2]])
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    truth = [set(np.argsort(-(vectors @ q), kind="stable")[:k].tolist()) for q in queries]
    # rows were copied in id order; positions map back through the ordered ids
    order = np.asarray([r[0] for r in conn.execute(sql("SELECT id FROM {t} ORDER BY id", t=items))])
    query = sql("SELECT id FROM {t} ORDER BY embedding <#> %s LIMIT %s", t=items)
    from pgvector import Vector

    conn.execute("SET LOCAL enable_seqscan = off")  # measure the graph, not a scan
    recall = 0.0
    for ef in EF_STEPS:
        conn.execute(f"SET LOCAL hnsw.ef_search = {ef}")
        found = 0
        for q, want in zip(queries, truth):
            got = [r[0] for r in conn.execute(query, (Vector(q), k))]
            found += len(set(np.searchsorted(order, got).tolist()) & want)
        recall = found / (k * len(queries))
        if recall >= EF_TARGET:
            break
    conn.execute("SET LOCAL enable_seqscan = on")
    return ef, round(recall, 4)


def _rows(index: ConceptIndex) -> Iterator[tuple[int, str | None, dict, np.ndarray]]:
    """(id, file path, metadata, unit vector) of every item, from one read snapshot."""
    store = index._store
    root = index.root  # read once: full_path would look it up for every row

    def full_path(stored: str | None) -> str | None:
        if stored is None or root is None or os.path.isabs(stored):
            return stored
        return str(root / stored)

    with store.read() as conn:
        meta: dict[int, dict] = {}
        for item_id, key, value in conn.execute("SELECT id, key, value FROM meta ORDER BY key"):
            meta.setdefault(item_id, {})[key] = value
        cursor = conn.execute(
            "SELECT items.id, items.path, vectors.vec FROM items "
            "JOIN vectors ON vectors.id = items.id ORDER BY items.id"
        )
        while batch := cursor.fetchmany(BATCH):
            for item_id, path, blob in batch:
                vector = np.frombuffer(blob, dtype=np.float32)
                yield int(item_id), full_path(path), meta.get(item_id, {}), vector


def export_index(
    index: ConceptIndex,
    url: str,
    *,
    table: str = DEFAULT_TABLE,
    replace: bool = False,
    m: int = HNSW_M,
    ef_construction: int = HNSW_EF_CONSTRUCTION,
    progress=None,
) -> dict:
    """Write ``index`` to the gallery ``table`` at ``url``; a summary dict when committed.

    ``replace``: an existing gallery of that name is replaced (atomically); without it, it
    is an error. ``progress(n)`` is called as rows are copied.
    """
    psycopg, _ = psycopg_modules()
    jsonb = psycopg.types.json.Jsonb
    final, staging = Names.of(table), Names.of(table, STAGING)
    shown = display_url(url)
    where = f"{shown} table {table}"
    if len(index) == 0:
        raise PostgresError(f"{index._where()}: the index is empty; nothing to export")
    start = time.perf_counter()
    conn = connect(url, create_extension=True)
    try:
        with conn.transaction():
            if exists(conn, final.items) and not replace:
                raise PostgresError(f"{where}: already exists (--replace to overwrite it)")
            for name in staging.tables:  # debris of an export killed with its server
                conn.execute(sql("DROP TABLE IF EXISTS {t}", t=name))
            create_tables(conn, staging, index.num_concepts)
            count, keys, kept = 0, set(), []  # every row, for the exact truth (2 KiB each)
            copy_sql = sql(
                "COPY {t} (id, path, metadata, embedding) FROM STDIN WITH (FORMAT BINARY)",
                t=staging.items,
            )
            with conn.cursor() as cur, cur.copy(copy_sql) as copy:
                copy.set_types(["int8", "text", "jsonb", "vector"])
                for item_id, path, meta, vector in _rows(index):
                    copy.write_row((item_id, path, jsonb(meta), vector))
                    keys.update(meta)
                    kept.append(vector)
                    count += 1
                    if progress is not None and count % BATCH == 0:
                        progress(count)
            copied = time.perf_counter()
            # an in-memory build is several times faster than one that spills to disk
            conn.execute("SET LOCAL maintenance_work_mem = '1GB'")
            create_indexes(conn, staging, m, ef_construction)
            conn.execute(sql("ANALYZE {t}", t=staging.items))
            ef_search, ef_recall = calibrate(conn, staging.items, np.stack(kept))
            del kept
            conn.execute(
                sql(
                    "INSERT INTO {t} (model_id, model_ref, precision, num_concepts, items, "
                    "metadata_keys, hnsw_m, hnsw_ef_construction, ef_search, ef_recall, source, "
                    "parts) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                    t=staging.model,
                ),
                (
                    index.model_id,
                    index.model_ref,
                    index.precision,
                    index.num_concepts,
                    count,
                    sorted(keys),
                    int(m),
                    int(ef_construction),
                    ef_search,
                    ef_recall,
                    str(index.path) if index.path else None,
                    jsonb(index.parts.to_info()),
                ),
            )
            names = sorted(index.concept_names.items())
            if names:
                with conn.cursor() as cur:
                    cur.executemany(
                        sql("INSERT INTO {t} (concept, name) VALUES (%s, %s)", t=staging.concepts),
                        names,
                    )
            publish(conn, staging, final)
            size = conn.execute(
                "SELECT pg_total_relation_size(%s::regclass)", (final.items,)
            ).fetchone()[0]
    except psycopg.Error as exc:
        raise PostgresError(f"{where}: export failed, nothing written: {first_line(exc)}") from None
    finally:
        conn.close()
    done = time.perf_counter()
    return {
        "target": shown,
        "table": table,
        "items": count,
        "num_concepts": index.num_concepts,
        "model": index.model_id,
        "bytes": int(size),
        "copy_s": round(copied - start, 3),
        "index_s": round(done - copied, 3),
        "ef_search": ef_search,
        "ef_recall": ef_recall,
    }


__all__ = ["HNSW_EF_CONSTRUCTION", "HNSW_M", "export_index"]
