"""What a CMN ONNX file says about itself.

The exporter writes a :class:`ModelMetadata` into the ONNX ``metadata_props`` and the runtime
reads it back; nothing else describes a model, so preprocessing cannot drift from training.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

#: Bumped when the meaning of a metadata key or of a graph output changes.
FORMAT_VERSION = 1
#: The ONNX metadata key under which the JSON document is stored.
METADATA_KEY = "cmn_edge"

#: Names of the graph's input and outputs, shared by exporter and runtime.
INPUT_NAME = "images"
OUTPUT_EMBEDDING = "embedding"
OUTPUT_SCORES = "concept_scores"
OUTPUT_ATTENTION = "attention"
#: Per-region concept responses [N, R, C] (R = region_grid cells, each row unit length): the
#: region features DIML's structural matching transports between two images.
OUTPUT_REGIONS = "regions"
#: DGML only: each group's attention map [N, G, h, w] (its ``attention`` output gives every
#: embedding dimension the map of its group, so readers of CMN graphs read it unchanged).
OUTPUT_GROUP_ATTENTION = "group_attention"

#: Head types a model may declare (``head`` in the metadata; absent means "cmn"). A "dgml"
#: graph has the CMN outputs (embedding, concept_scores, attention) with one embedding
#: dimension per "concept": G groups of D dimensions, ``num_concepts`` = G x D.
HEAD_TYPES = ("cmn", "dgml")


class MetadataError(ValueError):
    """The file is not a CMN bundle, or its metadata is unusable."""


@dataclass(frozen=True)
class Preprocess:
    """Resize the short side, centre-crop, scale: the evaluation transform used in training."""

    input_size: int = 224
    resize_size: int = 256
    mean: tuple[float, float, float] = (127.0, 127.0, 127.0)
    std: tuple[float, float, float] = (128.0, 128.0, 128.0)
    channel_order: str = "RGB"
    interpolation: str = "bilinear"

    @classmethod
    def for_input_size(cls, input_size: int, **overrides: Any) -> Preprocess:
        """The usual 0.875 crop ratio (224 of 256) at any input size."""
        return cls(input_size=input_size, resize_size=round(input_size / 0.875), **overrides)


@dataclass(frozen=True)
class ModelMetadata:
    """Everything the runtime needs to use a CMN graph, stored in the graph itself."""

    name: str
    backbone: str
    num_concepts: int
    attention_grid: tuple[int, int]
    preprocess: Preprocess = field(default_factory=Preprocess)
    precision: str = "fp32"
    concept_names: tuple[str, ...] = ()
    training_data: str = ""
    training_command: str = ""
    source_checkpoint_sha256: str = ""
    quantization: dict[str, Any] = field(default_factory=dict)
    #: (rows, cols) of the ``regions`` output; (0, 0): the graph has none (older exports)
    region_grid: tuple[int, int] = (0, 0)
    #: the embedding head: "cmn" (concepts; every file written before heads existed) or
    #: "dgml" (attentive groups: ``groups`` x ``group_dim`` dimensions; 0 for a CMN)
    head: str = "cmn"
    groups: int = 0
    group_dim: int = 0
    format_version: int = FORMAT_VERSION

    @property
    def saturates_u8s8(self) -> bool:
        """INT8 with 8-bit GEMM weights: U8S8 kernels without VNNI saturate on it (an INT8 file
        from ``cmn-export quantize`` has 7-bit GEMM weights unless asked otherwise; files
        written before that record nothing and are 8-bit)."""
        if self.precision != "int8":
            return False
        q = self.quantization
        return not (q.get("reduce_range") or q.get("gemm_weight_bits", 8) <= 7)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "model") -> ModelMetadata:
        try:
            raw = json.loads(text)
            version = int(raw.get("format_version", -1))
            if version > FORMAT_VERSION:
                raise MetadataError(
                    f"{source}: metadata format {version} is newer than this cmn-edge "
                    f"understands ({FORMAT_VERSION}); upgrade cmn-edge"
                )
            pre = Preprocess(
                input_size=int(raw["preprocess"]["input_size"]),
                resize_size=int(raw["preprocess"]["resize_size"]),
                mean=tuple(float(v) for v in raw["preprocess"]["mean"]),
                std=tuple(float(v) for v in raw["preprocess"]["std"]),
                channel_order=str(raw["preprocess"]["channel_order"]),
                interpolation=str(raw["preprocess"]["interpolation"]),
            )
            meta = cls(
                name=str(raw["name"]),
                backbone=str(raw["backbone"]),
                num_concepts=int(raw["num_concepts"]),
                attention_grid=(int(raw["attention_grid"][0]), int(raw["attention_grid"][1])),
                preprocess=pre,
                precision=str(raw.get("precision", "fp32")),
                concept_names=tuple(str(n) for n in raw.get("concept_names", ())),
                training_data=str(raw.get("training_data", "")),
                training_command=str(raw.get("training_command", "")),
                source_checkpoint_sha256=str(raw.get("source_checkpoint_sha256", "")),
                quantization=dict(raw.get("quantization", {})),
                region_grid=tuple(int(v) for v in raw.get("region_grid", (0, 0))),
                head=str(raw.get("head", "cmn")),
                groups=int(raw.get("groups", 0)),
                group_dim=int(raw.get("group_dim", 0)),
                format_version=version,
            )
        except MetadataError:
            raise
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise MetadataError(f"{source}: CMN metadata is malformed ({exc!r})") from exc
        if meta.concept_names and len(meta.concept_names) != meta.num_concepts:
            raise MetadataError(
                f"{source}: {len(meta.concept_names)} concept names for "
                f"{meta.num_concepts} concepts"
            )
        if meta.head not in HEAD_TYPES:
            raise MetadataError(
                f"{source}: head '{meta.head}' is not supported by this runtime "
                f"(known: {', '.join(HEAD_TYPES)}); upgrade cmn-edge"
            )
        if meta.head == "dgml" and (
            min(meta.groups, meta.group_dim) < 1
            or meta.groups * meta.group_dim != meta.num_concepts
        ):
            raise MetadataError(
                f"{source}: DGML metadata says {meta.groups} groups of {meta.group_dim} "
                f"dimensions for a {meta.num_concepts}-d embedding"
            )
        if meta.preprocess.channel_order not in ("RGB", "BGR"):
            raise MetadataError(f"{source}: unknown channel order {meta.preprocess.channel_order}")
        return meta

    @classmethod
    def from_props(cls, props: dict[str, str], source: str = "model") -> ModelMetadata:
        """Read from ONNX metadata properties (as onnxruntime's ``custom_metadata_map``)."""
        if METADATA_KEY not in props:
            raise MetadataError(
                f"{source}: not a cmn-edge model (no '{METADATA_KEY}' entry in its ONNX metadata)"
            )
        return cls.from_json(props[METADATA_KEY], source)
