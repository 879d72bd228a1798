"""Embedding images with a CMN ONNX graph: the runtime's core, onnxruntime + numpy only."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import onnxruntime as ort

from . import preprocess as pp
from .cpu import X64_QUANT_PRECISION, this_cpu
from .dataset import UNDECODABLE_SUFFIXES, is_image_file
from .files import file_sha256
from .metadata import (
    INPUT_NAME,
    OUTPUT_ATTENTION,
    OUTPUT_EMBEDDING,
    OUTPUT_REGIONS,
    OUTPUT_SCORES,
    MetadataError,
    ModelMetadata,
)
from .pipeline import ThreadBudget, stream_batches
from .registry import resolve_model_path


class ModelError(ValueError):
    """A model file that is not a usable CMN bundle."""


@dataclass(frozen=True)
class Embeddings:
    """One batch of results; ``scores`` and ``attention`` only when asked for."""

    embedding: np.ndarray  # [N, C] float32, unit rows
    scores: np.ndarray | None = None  # [N, C] raw concept cosines
    attention: np.ndarray | None = None  # [N, C, h, w], each map sums to 1
    regions: np.ndarray | None = None  # [N, R, C] region features, unit rows


class Embedder:
    """Load a CMN model once, embed many images.

    ``model`` is a bundled model name (the default model when None) or a path to an ``.onnx``
    file; everything about preprocessing comes from that file's metadata.
    """

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        precision: str = "auto",
        threads: int | None = None,
        decode_workers: int | None = None,
    ) -> None:
        self.cpu = this_cpu()
        self.threads = ThreadBudget.for_machine(threads, decode_workers)
        self.path = resolve_model_path(model, precision)
        try:
            self.session = open_session(self.path, self.threads.inference, spin=False)
        except Exception as exc:  # onnxruntime raises its own untyped errors
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ModelError(f"{self.path}: not a loadable ONNX model ({reason})") from None
        props = self.session.get_modelmeta().custom_metadata_map
        try:
            self.metadata = ModelMetadata.from_props(props, str(self.path))
        except MetadataError as exc:
            raise ModelError(str(exc)) from None
        names = {o.name for o in self.session.get_outputs()}
        expected = {OUTPUT_EMBEDDING, OUTPUT_SCORES, OUTPUT_ATTENTION}
        if not expected <= names or INPUT_NAME not in {i.name for i in self.session.get_inputs()}:
            raise ModelError(
                f"{self.path}: graph lacks the CMN inputs/outputs ({INPUT_NAME} -> "
                f"{', '.join(sorted(expected))})"
            )
        self.preprocess = self.metadata.preprocess

    @property
    def precision(self) -> str:
        """The precision of the loaded file (``auto`` resolved), from its metadata."""
        return self.metadata.precision

    @property
    def num_concepts(self) -> int:
        return self.metadata.num_concepts

    @cached_property
    def model_id(self) -> str:
        """Name and content hash: an index refuses queries from any other model file."""
        return f"{self.metadata.name}@{file_sha256(self.path)[:16]}"

    def run(self, batch: np.ndarray, outputs: Sequence[str] = (OUTPUT_EMBEDDING,)) -> list:
        """The graph on an already preprocessed float32 batch [N, 3, H, W]."""
        return self.session.run(list(outputs), {INPUT_NAME: batch})

    def load(self, image: pp.ImageInput) -> np.ndarray:
        return pp.load(image, self.preprocess)

    def embed_batch(
        self,
        images: Sequence[pp.ImageInput],
        with_scores: bool = False,
        with_attention: bool = False,
    ) -> Embeddings:
        batch = np.stack([self.load(image) for image in images])
        return self.embed_arrays(batch, with_scores, with_attention)

    def embed_arrays(
        self,
        batch: np.ndarray,
        with_scores: bool = False,
        with_attention: bool = False,
        with_regions: bool = False,
    ) -> Embeddings:
        names = [OUTPUT_EMBEDDING]
        if with_scores:
            names.append(OUTPUT_SCORES)
        if with_attention:
            names.append(OUTPUT_ATTENTION)
        if with_regions:
            self._check_regions()
            names.append(OUTPUT_REGIONS)
        values = dict(zip(names, self.run(batch, names)))
        return Embeddings(
            embedding=values[OUTPUT_EMBEDDING],
            scores=values.get(OUTPUT_SCORES),
            attention=values.get(OUTPUT_ATTENTION),
            regions=values.get(OUTPUT_REGIONS),
        )

    def embed(
        self, images: pp.ImageInput | Iterable[pp.ImageInput], batch_size: int = 32
    ) -> np.ndarray:
        """float32 [N, C] unit-norm embeddings of paths, PIL images or arrays."""
        if isinstance(images, (str, os.PathLike, np.ndarray)) or hasattr(images, "getpixel"):
            if not (isinstance(images, np.ndarray) and images.ndim == 4):
                images = [images]
        chunks = [emb for _, emb in self._stream(images, batch_size)]
        if not chunks:
            return np.zeros((0, self.num_concepts), dtype=np.float32)
        return np.concatenate(chunks)

    def _stream(self, images, batch_size: int, skip_errors: bool = False, errors=None, infer=None):
        """Decode in ``self.threads.decode`` threads while the model runs (``pipeline``);
        ``infer`` maps a preprocessed batch to the outputs (default: the embeddings)."""
        return stream_batches(
            images,
            self.load,
            infer or (lambda batch: self.embed_arrays(batch).embedding),
            batch_size,
            self.threads.decode,
            skip_errors,
            errors,
        )

    @property
    def has_regions(self) -> bool:
        """Whether the graph has the ``regions`` output (structural matching)."""
        return self.metadata.region_grid != (0, 0)

    def embed_regions(
        self, images: Iterable[pp.ImageInput], batch_size: int = 32
    ) -> tuple[np.ndarray, np.ndarray]:
        """Global embeddings [N, C] and region features [N, R, C], from one forward pass."""
        parts = [out for _, out in self.iter_regions(images, batch_size)]
        if not parts:
            cells = self.metadata.region_grid[0] * self.metadata.region_grid[1]
            empty = np.zeros((0, self.num_concepts), np.float32)
            return empty, np.zeros((0, cells, self.num_concepts), np.float32)
        return np.concatenate([e for e, _ in parts]), np.concatenate([r for _, r in parts])

    def iter_regions(
        self,
        images: Iterable[pp.ImageInput],
        batch_size: int = 32,
        skip_errors: bool = False,
        errors: list | None = None,
    ) -> Iterator[tuple[list, tuple[np.ndarray, np.ndarray]]]:
        """(images, (embeddings, region features)) batches, as :meth:`iter_paths` streams."""
        self._check_regions()

        def infer(batch: np.ndarray) -> list[np.ndarray]:
            return self.run(batch, (OUTPUT_EMBEDDING, OUTPUT_REGIONS))

        yield from self._stream(images, batch_size, skip_errors, errors, infer=infer)

    def _check_regions(self) -> None:
        if not self.has_regions:
            raise ModelError(
                f"{self.path}: this model has no region output for structural matching; add "
                f"it with `cmn-export regions {self.path}` (or re-export with cmn-export onnx)"
            )

    def explain(self, image: pp.ImageInput) -> Embeddings:
        """Embedding, raw concept scores and attention maps of one image."""
        return self.embed_batch([image], with_scores=True, with_attention=True)

    def iter_folder(
        self,
        folder: str | os.PathLike,
        batch_size: int = 32,
        skip_errors: bool = False,
        errors: list[tuple[Path, str]] | None = None,
    ) -> Iterator[tuple[list[Path], np.ndarray]]:
        """(paths, embeddings) batches over every image below ``folder``, in sorted order.

        With ``skip_errors`` unreadable files are left out and reported in ``errors``.
        """
        paths = list_images(folder)
        yield from self.iter_paths(paths, batch_size, skip_errors, errors)

    def iter_paths(
        self,
        paths: Sequence[Path],
        batch_size: int = 32,
        skip_errors: bool = False,
        errors: list[tuple[Path, str]] | None = None,
    ) -> Iterator[tuple[list[Path], np.ndarray]]:
        """(paths, embeddings) batches in input order; unreadable files stop the run, or with
        ``skip_errors`` are left out and reported in ``errors``."""
        yield from self._stream([Path(p) for p in paths], batch_size, skip_errors, errors)


def session_options(
    threads: int | None = None, spin: bool = True, saturating_int8: bool = False
) -> ort.SessionOptions:
    """The onnxruntime settings every session of a CMN model uses (``cmn-edge bench``,
    ``cmn-export quantize`` and ``validate`` too, through ``open_session``): so INT8 is
    measured as it is run. ``saturating_int8``: the graph's 8-bit GEMM weights need the U8U8
    rewrite where U8S8 saturates (``CpuInfo.session_config``)."""
    options = ort.SessionOptions()
    for key, value in this_cpu().session_config(saturating_int8).items():
        options.add_session_config_entry(key, value)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    if not spin:
        # Between batches the model's threads sleep instead of spinning, so the decode
        # workers get the cores (a batch is long enough for the wake-up not to matter).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def saturates_u8s8(props: dict[str, str]) -> bool:
    """Whether a graph with these metadata properties is INT8 with 8-bit GEMM weights. A graph
    without cmn-edge metadata might be: it is treated as such (the rewrite is exact)."""
    try:
        return ModelMetadata.from_props(props).saturates_u8s8
    except MetadataError:
        return True


def open_session(
    path: str | os.PathLike,
    threads: int | None = None,
    spin: bool = True,
    profile_prefix: str | None = None,
) -> ort.InferenceSession:
    """A session of the graph at ``path`` as the runtime runs it. Where U8S8 saturates (x86-64
    without VNNI) and the graph is INT8 with 8-bit GEMM weights (older or user-made files),
    it is reopened with onnxruntime's exact U8U8 rewrite; 7-bit-GEMM INT8 files and FP32
    graphs run as they are. Reading the metadata needs a session, hence the reopening."""

    def build(saturating: bool) -> ort.InferenceSession:
        options = session_options(threads, spin, saturating)
        if profile_prefix:
            options.enable_profiling = True
            options.profile_file_prefix = profile_prefix
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    session = build(False)
    if this_cpu().needs_u8u8 and saturates_u8s8(session.get_modelmeta().custom_metadata_map):
        session = build(True)
    return session


def u8u8_rewrite_on(session: ort.InferenceSession) -> bool:
    """Whether ``session`` runs with the U8U8 rewrite (what ``models`` and ``bench`` print)."""
    try:
        return session.get_session_options().get_session_config_entry(X64_QUANT_PRECISION) == "1"
    except RuntimeError:  # onnxruntime's answer for an entry that was never set
        return False


def check_folder(folder: str | os.PathLike) -> None:
    """A missing folder, or a file given as one, as the one-line error that says which."""
    folder = Path(folder)
    if not folder.is_dir():
        if folder.exists():
            raise NotADirectoryError(f"{folder}: is a file, not a folder")
        raise FileNotFoundError(f"{folder}: folder not found")


def list_images(folder: str | os.PathLike, passed_over: list[Path] | None = None) -> list[Path]:
    """The images under ``folder``, sorted; photos in formats Pillow cannot decode (HEIC)
    are appended to ``passed_over`` when it is given, for the caller to report."""
    folder = Path(folder)
    check_folder(folder)
    images = []
    for path in folder.rglob("*"):
        if is_image_file(path):
            images.append(path)
        elif (
            passed_over is not None
            and path.suffix.lower() in UNDECODABLE_SUFFIXES
            and not path.name.startswith(".")
            and path.is_file()
        ):
            passed_over.append(path)
    if passed_over is not None:
        passed_over.sort()
    return sorted(images)
