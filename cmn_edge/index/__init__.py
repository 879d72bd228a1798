"""A concept-aware image index: hnswlib for speed, numpy for exactness, SQLite for truth.

One job per module:

- :mod:`.store`      the directory on disk: the SQLite database (WAL), checkpoint records
- :mod:`.items`      items, paths, metadata, file stamps, concept names (rows in the database)
- :mod:`.vectors`    the vectors in memory: memory-mapped checkpoint rows + the tail
- :mod:`.graph`      the hnswlib graph's life cycle (checksum verified before it is parsed)
- :mod:`.projection` the ``--graph-dims`` principal directions
- :mod:`.plan`       concept controls -> one query weight vector
- :mod:`.search`     exact, graph + re-rank, renormalised, tail merge
- :mod:`.regions`    each item's region maps (float16, opt-in) for structural re-ranking
- :mod:`.rerank`     DIML's re-ranking of the best candidates by structural matching
- :mod:`.calibrate`  ef and mask depth tuned to a recall target, again as the gallery grows
- :mod:`.lock`       readers and a writer within a process
- :mod:`.sync`       an index kept in step with a folder
- :mod:`.rebuild`    every item re-embedded with another model file, in place
- :mod:`.view`       each process's search view, following the database incrementally
- :mod:`.persistence` save, copy, graph checkpoints, optimize, verify, the manifest
- :mod:`.core`       ``ConceptIndex``: the pieces put together, and the writes
- :mod:`.api`        ``Index``: what applications use

Per-hit explanations are :func:`cmn_edge.explain.top_concepts`.
"""

from __future__ import annotations

from .api import Index, embedder_for_index, model_ref
from .core import ConceptIndex, Hit
from .errors import ConceptError, ConceptIndexError, IndexCorruptError, ModelMismatchError
from .plan import ConceptRef, Plan
from .rebuild import RebuildReport
from .store import DB_FILE, FORMAT, FORMAT_VERSION, is_index_dir
from .sync import SyncReport

__all__ = [
    "DB_FILE",
    "FORMAT",
    "FORMAT_VERSION",
    "ConceptError",
    "ConceptIndex",
    "ConceptIndexError",
    "ConceptRef",
    "Hit",
    "Index",
    "IndexCorruptError",
    "ModelMismatchError",
    "Plan",
    "RebuildReport",
    "SyncReport",
    "embedder_for_index",
    "is_index_dir",
    "model_ref",
]
