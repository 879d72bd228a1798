"""A shared gallery in PostgreSQL + pgvector: export a local index, search it from anywhere.

    from cmn_edge.postgres import export_index, PgGallery

    export_index(ConceptIndex.open("photos.idx"), "postgresql://host/db")
    with PgGallery.connect("postgresql://host/db") as gallery:
        hits = gallery.search(vector, k=10, exclude=["background"], where={"camera": "door"})

Concept controls are resolved by the local index's own planner (:mod:`cmn_edge.index.plan`)
and applied to the query alone, so masked inner-product search is exact; the hits have the
local search's shape. psycopg is imported on first use, never by ``import cmn_edge``.
"""

from __future__ import annotations

from .errors import PostgresError
from .export import export_index
from .search import PgGallery, SearchPlan

__all__ = ["PgGallery", "PostgresError", "SearchPlan", "export_index"]
