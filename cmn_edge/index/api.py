"""``Index``: what an application uses (the kiosk, the camera watcher, the CLI).

    from cmn_edge import Index

    index = Index.create("photos.idx", embedder=Embedder())   # or Index.open("photos.idx")
    index.sync("photos/")                                     # embed new/changed, drop vanished
    index.add(vectors, paths=["a.jpg"], metadata=[{"label": "cat"}])
    hits = index.search("query.jpg", k=5, exclude=["background"], where={"label": "cat"})
    index.remove(["a.jpg"])

    # DIML's structural re-ranking needs region maps: Index.create(..., regions=True), or
    # index.add_regions() for an index built without them
    hits = index.search("query.jpg", k=5, rerank="structural", rerank_depth=100)

Every change is committed when the call returns; any number of processes may search the
same index while one adds to it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from ..parts import Parts
from .core import ConceptIndex, Hit
from .errors import ConceptIndexError
from .plan import ConceptRef
from .rebuild import RebuildReport, embed_stored
from .rebuild import rebuild as rebuild_index
from .regions import RegionsError
from .rerank import DEFAULT_DEPTH
from .sync import NOT_UTF8, SyncReport, storable_name, sync_folder


def embedder_for_index(
    index: ConceptIndex,
    model: str | None = None,
    precision: str | None = None,
    threads: int | None = None,
    *,
    refuse_other: bool = True,
):
    """The embedder for ``index``: the model it was built with unless ``model`` names another
    (None: the index's), at the index's precision unless ``precision`` is given; any model
    other than the index's is refused (its concept axes mean something else), except for a
    rebuild (``refuse_other=False``), which loads the file the index names as it is now.

    The one place that finds an index's model: the CLI, ``explain``, the kiosk, the camera
    watcher and ``Index.rebuild`` all call it.
    """
    from ..embedder import Embedder

    embedder = Embedder(
        model if model is not None else index.model_ref,
        precision=precision or index.precision or "int8",
        threads=threads,
    )
    if refuse_other:
        index.check_model(embedder.model_id)
    return embedder


def model_ref(model: str | None) -> str | None:
    """What an index remembers of ``--model`` so later commands default to the same model:
    a bundled name as is (a bundled file's path too: it moves with the package), any other
    file by its absolute path."""
    from ..registry import bundled_name_of, get_bundled

    if model is None:
        return None
    try:
        get_bundled(str(model))
        return str(model)
    except ValueError:
        path = Path(model).resolve()
        return bundled_name_of(path) or str(path)


class Index:
    """An on-disk concept index and the model that fills it.

    Queries and additions may be images (paths, PIL images) or embeddings; images need the
    embedder, which defaults to the index's own model (loaded on first use).
    """

    def __init__(self, index: ConceptIndex, embedder=None, threads: int | None = None) -> None:
        self.index = index
        self._embedder = embedder
        self._threads = threads
        if embedder is not None:
            index.check_model(embedder.model_id)

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path: str | os.PathLike, embedder=None, *, threads: int | None = None) -> Index:
        """Attach to an existing index; cheap (the search view loads on the first search)."""
        return cls(ConceptIndex.open(path), embedder, threads)

    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        embedder=None,
        *,
        model: str | None = None,
        precision: str = "auto",
        threads: int | None = None,
        regions: bool = False,
        **params,
    ) -> Index:
        """A new index in a new or empty directory, bound to ``embedder``'s model (or to
        ``model``/``precision``, loaded now). ``regions``: keep every item's region maps for
        structural re-ranking (16 KiB an item for the bundled model). ``params``: see
        :class:`ConceptIndex`."""
        if embedder is None:
            from ..embedder import Embedder

            embedder = Embedder(model, precision=precision, threads=threads)
        if regions:
            embedder._check_regions()
        ref = model_ref(model) if model is not None else getattr(embedder, "model_ref", None)
        # the precision the embedder loaded ("auto" resolved), so reopening loads that file
        loaded = getattr(embedder, "precision", None) or precision
        index = ConceptIndex.for_embedder(embedder, model_ref=ref, precision=loaded, **params)
        if regions:
            index.keep_regions(embedder.metadata.region_grid)
        index.save(path)
        return cls(index, embedder, threads)

    @property
    def embedder(self):
        if self._embedder is None:
            self._embedder = embedder_for_index(self.index, threads=self._threads)
        return self._embedder

    @property
    def path(self) -> Path:
        return self.index.path

    def close(self) -> None:
        self.index.close()

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self.index

    # ------------------------------------------------------------------ paths
    def _stored_path(self, path: str | os.PathLike) -> str:
        """Relative to the indexed root when under it (a moved folder still matches)."""
        resolved = Path(path).resolve()
        if not storable_name(resolved):  # refused before anything is written
            raise ConceptIndexError(f"{path}: {NOT_UTF8}")
        root = self.index.root
        if root is not None:
            try:
                return resolved.relative_to(root).as_posix()
            except ValueError:
                pass
        return str(resolved)

    def full_path(self, stored: str | None) -> str | None:
        """A stored path as a file path (relative ones joined to the indexed root)."""
        return self.index.full_path(stored)

    def id_for_path(self, path: str | os.PathLike) -> int | None:
        found = self.index.id_for_path(self._stored_path(path))
        return found if found is not None else self.index.id_for_path(str(Path(path).resolve()))

    @property
    def num_concepts(self) -> int:
        return self.index.num_concepts

    @property
    def model_id(self) -> str | None:
        return self.index.model_id

    @property
    def parts(self) -> Parts:
        """What controls, names and explanations count: concepts, or a DGML's groups."""
        return self.index.parts

    @property
    def concept_names(self) -> dict[int, str]:
        """Part names by part id (concepts, or a DGML model's groups)."""
        return self.index.concept_names

    def resolve_part(self, part: ConceptRef) -> int:
        return self.index.resolve_part(part)

    def resolve_concept(self, concept: ConceptRef) -> int:
        return self.index.resolve_part(concept)

    def plan(self, exclude=(), only=None, weights=None, renormalize: bool = False):
        """The query weight vector of these concept controls (see :class:`Plan`)."""
        return self.index.plan(exclude, only, weights, renormalize)

    def item(self, item_id: int) -> tuple[str | None, dict[str, str]]:
        """(file path, metadata) of one item."""
        path, meta = self.index.item(item_id)
        return self.full_path(path), meta

    def embedding(self, item_id: int) -> np.ndarray:
        return self.index.embedding(item_id)

    @property
    def keeps_regions(self) -> bool:
        """Whether this index keeps region maps (structural re-ranking works)."""
        return self.index.region_grid is not None

    # ------------------------------------------------------------------ changes
    def _embed(self, items) -> tuple[np.ndarray, np.ndarray | None]:
        """(vectors, region maps where the index keeps them) of images; floats pass as is."""
        array = np.asarray(items) if not isinstance(items, (str, os.PathLike)) else None
        if array is not None and array.dtype.kind == "f":
            return array, None
        self.index.check_model(self.embedder.model_id)
        if self.keeps_regions:
            if isinstance(items, (str, os.PathLike)):
                items = [items]
            return self.embedder.embed_regions(items)
        return self.embedder.embed(items), None

    def add(
        self,
        vectors_or_images,
        paths: Sequence[str | os.PathLike | None] | None = None,
        metadata: Sequence[Mapping[str, object] | None] | None = None,
        *,
        regions: np.ndarray | None = None,
    ) -> list[int]:
        """Add embeddings ([N, C] floats) or images (paths, embedded here); committed when
        this returns. A path already indexed updates that item. Image paths are the paths
        stored unless ``paths`` says otherwise. Embeddings added to an index that keeps
        region maps come with their ``regions`` [N, R, C]; images bring their own."""
        vectors, embedded_regions = self._embed(vectors_or_images)
        if embedded_regions is not None:
            regions = embedded_regions
        if paths is None and not isinstance(vectors_or_images, np.ndarray):
            given = vectors_or_images
            if isinstance(given, (str, os.PathLike)):
                given = [given]
            if all(isinstance(p, (str, os.PathLike)) for p in given):
                paths = list(given)
        stored = (
            None if paths is None else [None if p is None else self._stored_path(p) for p in paths]
        )
        return self.index.add(vectors, stored, metadata, regions=regions)

    def add_regions(self, batch_size: int = 32, progress=None, plan=None) -> list[tuple[str, str]]:
        """Give an index built without region maps its maps, by re-embedding each item's
        file; structural re-ranking works once every item has them. Returns the items that
        could not be read, as (path, reason); while there are any, the index stays as it was
        (the maps written so far are kept, so a second run after fixing them resumes)."""
        self.embedder._check_regions()
        grid = self.embedder.metadata.region_grid
        todo = self.index.items_without_regions()
        # every item's path in one scan (an IN list of all ids would pass SQLite's limit)
        paths = {item_id: path for path, (item_id, *_) in self.index.file_stamps().items()}
        unreadable: dict[int, tuple[str, str]] = {}
        for ids, _vectors, maps in embed_stored(
            self.index,
            self.embedder,
            {item_id: paths.get(item_id) for item_id in todo},
            batch_size,
            True,
            unreadable,
            plan,
        ):
            self.index.put_regions(ids, maps, grid)
            if progress is not None:
                progress(len(ids))
        if not unreadable:
            self.index.keep_regions(grid)
        return list(unreadable.values())

    def remove(self, items: Iterable[int | str | os.PathLike]) -> int:
        """Remove items given by id or by path (a deleted file's path still works)."""
        ids = []
        for item in items:
            if isinstance(item, (int, np.integer)):
                ids.append(int(item))
                continue
            found = self.id_for_path(item)
            if found is None:
                raise ConceptIndexError(f"{item}: not in the index {self.index.path}")
            ids.append(found)
        self.index.remove(ids)
        return len(set(ids))

    def rebuild(
        self,
        embedder=None,
        *,
        model: str | None = None,
        precision: str | None = None,
        batch_size: int = 32,
        drop_unreadable: bool = False,
        progress=None,
        plan=None,
    ) -> RebuildReport:
        """Re-embed every item with ``embedder`` (default: ``model``/``precision``, else the
        model file the index names now, e.g. after a package upgrade re-quantized it), in
        place: ids, paths and metadata stay. See :mod:`.rebuild` for how it stays safe;
        when the report lists unreadable items and ``drop_unreadable`` is False, the index
        is unchanged and a second run resumes."""
        if model is not None:
            ref = model_ref(model)
        elif embedder is not None:
            ref = model_ref(str(embedder.path))  # so that Index.open finds this file again
        else:
            ref = self.index.model_ref
        if embedder is None:
            embedder = embedder_for_index(
                self.index, model, precision, self._threads, refuse_other=False
            )
        report = rebuild_index(
            self.index,
            embedder,
            model_ref=ref,
            batch_size=batch_size,
            drop_unreadable=drop_unreadable,
            progress=progress,
            plan=plan,
        )
        if self.index.model_id == embedder.model_id:  # swapped now, or already on it
            self._embedder = embedder
        return report

    def sync(self, folder: str | os.PathLike, **kwargs) -> SyncReport:
        """Embed new files under ``folder``, re-embed changed ones, remove vanished ones."""
        return sync_folder(self.index, self.embedder, folder, **kwargs)

    def name_concept(self, concept: ConceptRef, name: str | None) -> None:
        self.index.set_concept_name(concept, name)

    def name_part(self, part: ConceptRef, name: str | None) -> None:
        """Name a part (a concept, or a DGML model's group); None clears."""
        self.index.set_concept_name(part, name)

    def optimize(self) -> dict:
        return self.index.optimize()

    def verify(self) -> list[str]:
        return self.index.verify()

    # ------------------------------------------------------------------ search
    def search(
        self,
        query,
        k: int = 10,
        *,
        exclude: Iterable[ConceptRef] = (),
        only: Iterable[ConceptRef] | None = None,
        weights: Mapping[ConceptRef, float] | None = None,
        where: Mapping[str, object] | None = None,
        renormalize: bool = False,
        exact: bool = False,
        exclude_ids: Iterable[int] = (),
        explain: int = 0,
        rerank: str | None = None,
        rerank_depth: int = DEFAULT_DEPTH,
        query_regions: np.ndarray | None = None,
    ) -> list[Hit]:
        """The k best items for an embedding ([C] floats) or an image (path or PIL image).

        ``exclude``, ``only`` and ``weights`` name parts (:attr:`parts`) by id or name: a
        CMN's concepts, a DGML model's groups (a group's whole block). Fewer come back
        when the gallery or ``where`` holds fewer. Hit paths are file paths.
        ``rerank="structural"``: DIML's re-ranking of the best ``rerank_depth`` (an image
        query brings its region maps; an embedding needs ``query_regions`` [R, C]).
        """
        if isinstance(query, np.ndarray) and query.dtype.kind == "f":
            vector = query
        else:
            # another process may have re-embedded the index with another model since
            self.index.check_model(self.embedder.model_id)
            if rerank is not None:
                if not self.keeps_regions:  # say so before embedding anything
                    self.index._query_regions(None)
                vectors, maps = self.embedder.embed_regions([query])
                vector, query_regions = vectors[0], maps[0]
            else:
                vector = self.embedder.embed([query])[0]
        hits = self.index.search(
            vector,
            k,
            exclude=exclude,
            only=only,
            weights=weights,
            where=where,
            renormalize=renormalize,
            exact=exact,
            exclude_ids=exclude_ids,
            explain=explain,
            rerank=rerank,
            rerank_depth=rerank_depth,
            query_regions=query_regions,
        )
        return [h.with_path(self.full_path(h.path)) for h in hits]


__all__ = [
    "Index",
    "RebuildReport",
    "RegionsError",
    "SyncReport",
    "embedder_for_index",
    "model_ref",
]
