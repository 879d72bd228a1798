"""The gallery's tables: items with their vectors, the model identity, the concept names.

For a table name ``T`` (default ``cmn_gallery``):

- ``T``: ``id bigint`` (the local index's id), ``path text``, ``metadata jsonb`` (string
  values), ``embedding vector(C)`` (unit rows); an HNSW index ``T_hnsw`` with
  ``vector_ip_ops`` and a GIN index ``T_metadata`` for ``--where``.
- ``T_model``: one row: the model identity (what a query must be embedded with), the
  concept count, the metadata keys, the HNSW parameters and the calibrated ``ef_search``
  of an unmasked query (with the recall@10 it reached), where and when it came from, and
  ``parts jsonb`` (:meth:`cmn_edge.parts.Parts.to_info`; NULL or absent: one concept a
  dimension).
- ``T_concepts``: ``concept int``, ``name text``: part names (a CMN's concepts, a DGML's
  groups), the names ``--exclude-part`` takes.
"""

from __future__ import annotations

from dataclasses import dataclass

from .connect import check_table_name, first_line, psycopg_modules
from .errors import PostgresError

STAGING = "__new"


@dataclass(frozen=True)
class Names:
    """The identifiers of one gallery (or of its staging copy)."""

    items: str
    model: str
    concepts: str
    hnsw: str
    metadata: str

    @classmethod
    def of(cls, table: str, suffix: str = "") -> Names:
        base = check_table_name(table) + suffix
        return cls(base, f"{base}_model", f"{base}_concepts", f"{base}_hnsw", f"{base}_metadata")

    @property
    def tables(self) -> tuple[str, str, str]:
        return (self.items, self.model, self.concepts)


def ident(name: str):
    """A quoted identifier (psycopg.sql), for names that come from a command line."""
    psycopg, _ = psycopg_modules()
    return psycopg.sql.Identifier(name)


def sql(text: str, **names: str | int):
    """``text`` with ``{name}`` placeholders filled: strings as quoted identifiers, integers
    as literals (DDL takes no bound parameters)."""
    psycopg, _ = psycopg_modules()
    filled = {
        k: psycopg.sql.Literal(int(v)) if isinstance(v, int) else ident(v) for k, v in names.items()
    }
    return psycopg.sql.SQL(text).format(**filled)


def create_tables(conn, names: Names, num_concepts: int) -> None:
    """The three tables, without indexes (built after the COPY: much faster)."""
    conn.execute(
        sql(
            "CREATE TABLE {items} (id bigint PRIMARY KEY, path text, "
            "metadata jsonb NOT NULL DEFAULT '{{}}', embedding vector({dims}) NOT NULL)",
            items=names.items,
            dims=int(num_concepts),
        )
    )
    # a 512-float vector is past the TOAST threshold: kept in line, an exact scan reads the
    # rows it scores instead of de-toasting each one (about 10x faster)
    conn.execute(
        sql("ALTER TABLE {items} ALTER COLUMN embedding SET STORAGE PLAIN", items=names.items)
    )
    conn.execute(
        sql(
            "CREATE TABLE {model} (model_id text, model_ref text, precision text, "
            "num_concepts int NOT NULL, items bigint NOT NULL, metadata_keys text[] NOT NULL, "
            "hnsw_m int NOT NULL, hnsw_ef_construction int NOT NULL, ef_search int NOT NULL, "
            "ef_recall real, source text, parts jsonb, "
            "exported_at timestamptz NOT NULL DEFAULT now())",
            model=names.model,
        )
    )
    conn.execute(
        sql(
            "CREATE TABLE {concepts} (concept int PRIMARY KEY, name text NOT NULL UNIQUE)",
            concepts=names.concepts,
        )
    )


def create_indexes(conn, names: Names, m: int, ef_construction: int) -> None:
    """HNSW over inner product (masking scales the query only) and GIN for ``--where``."""
    conn.execute(
        sql(
            "CREATE INDEX {hnsw} ON {items} USING hnsw (embedding vector_ip_ops) "
            "WITH (m = {m}, ef_construction = {efc})",
            m=int(m),
            efc=int(ef_construction),
            hnsw=names.hnsw,
            items=names.items,
        )
    )
    conn.execute(
        sql(
            "CREATE INDEX {metadata} ON {items} USING gin (metadata jsonb_path_ops)",
            metadata=names.metadata,
            items=names.items,
        )
    )


def exists(conn, name: str) -> bool:
    return conn.execute("SELECT to_regclass(%s) IS NOT NULL", (name,)).fetchone()[0]


def publish(conn, staging: Names, final: Names) -> None:
    """Swap the staging tables in under the final names (same transaction as the build)."""
    for table in final.tables:
        conn.execute(sql("DROP TABLE IF EXISTS {t}", t=table))
    for old, new in zip(staging.tables, final.tables):
        conn.execute(sql("ALTER TABLE {old} RENAME TO {new}", old=old, new=new))
    for old, new in ((staging.hnsw, final.hnsw), (staging.metadata, final.metadata)):
        conn.execute(sql("ALTER INDEX {old} RENAME TO {new}", old=old, new=new))
    # the constraints' own indexes carry the staging name too
    renames = [(f"{staging.items}_pkey", f"{final.items}_pkey")]
    renames += [(f"{staging.concepts}_pkey", f"{final.concepts}_pkey")]
    renames += [(f"{staging.concepts}_name_key", f"{final.concepts}_name_key")]
    for old, new in renames:
        conn.execute(sql("ALTER INDEX {old} RENAME TO {new}", old=old, new=new))


def read_model(conn, names: Names, where: str) -> dict:
    """The model row; a missing gallery says how to make one."""
    psycopg, _ = psycopg_modules()
    try:
        if not exists(conn, names.items) or not exists(conn, names.model):
            raise PostgresError(
                f"{where}: no gallery table '{names.items}' (make one with "
                "`cmn-edge index export --index DIR --to URL`)"
            )
        cur = conn.execute(sql("SELECT * FROM {model}", model=names.model))
        columns = [c.name for c in cur.description]
        row = cur.fetchone()
        concepts = conn.execute(
            sql("SELECT concept, name FROM {concepts}", concepts=names.concepts)
        ).fetchall()
    except psycopg.Error as exc:
        raise PostgresError(f"{where}: cannot read the gallery: {first_line(exc)}") from None
    if row is None:
        raise PostgresError(f"{where}: table '{names.model}' holds no model row")
    model = dict(zip(columns, row))
    model["concept_names"] = {int(i): str(n) for i, n in concepts}
    return model


__all__ = ["Names", "create_indexes", "create_tables", "exists", "publish", "read_model", "sql"]
