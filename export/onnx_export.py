"""ONNX export: one self-describing graph whose metadata is all the runtime needs."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from cmn_edge.files import atomic_write
from cmn_edge.metadata import INPUT_NAME, METADATA_KEY, ModelMetadata

from .model import BackboneModel
from .regions import DEFAULT_GRID, add_region_output

OPSET = 17


def feature_grid(model: BackboneModel, input_size: int) -> tuple[int, int]:
    """The backbone's output grid at ``input_size``, measured rather than divided: a
    'same'-padded network rounds up (240 px at stride 32 is 8 x 8, not 240 // 32 = 7)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            device = next(model.parameters()).device
            probe = torch.zeros(1, 3, input_size, input_size, device=device)
            rows, cols = model.backbone(probe).shape[-2:]
    finally:
        model.train(was_training)
    return int(rows), int(cols)


def build_metadata(model: BackboneModel, name: str, **fields) -> ModelMetadata:
    """The runtime's metadata of ``model``, with its head's own fields (type, G, D)."""
    input_size = int(getattr(model, "input_size", 224))
    return ModelMetadata(
        name=name,
        backbone=model.spec.name,
        num_concepts=model.num_concepts,
        attention_grid=feature_grid(model, input_size),
        preprocess=model.spec.preprocess(input_size),
        **{**model.metadata_fields(), **fields},
    )


def write_metadata(onnx_model: onnx.ModelProto, metadata: ModelMetadata) -> None:
    """Replace the cmn_edge entry and add plain keys that generic ONNX tools display."""
    plain = {
        METADATA_KEY: metadata.to_json(),
        "cmn_edge.format_version": str(metadata.format_version),
        "cmn_edge.backbone": metadata.backbone,
        "cmn_edge.num_concepts": str(metadata.num_concepts),
        "cmn_edge.input_size": str(metadata.preprocess.input_size),
        "cmn_edge.precision": metadata.precision,
        "cmn_edge.head": metadata.head,
    }
    if metadata.head == "dgml":
        plain["cmn_edge.groups"] = str(metadata.groups)
        plain["cmn_edge.group_dim"] = str(metadata.group_dim)
    kept = [p for p in onnx_model.metadata_props if p.key not in plain]
    del onnx_model.metadata_props[:]
    onnx_model.metadata_props.extend(kept)
    for key, value in plain.items():
        onnx_model.metadata_props.add(key=key, value=value)
    onnx_model.producer_name = "cmn-export"
    if metadata.head == "dgml":
        shape = f"G={metadata.groups} x D={metadata.group_dim}"
        onnx_model.doc_string = f"DGML {metadata.name}: {metadata.backbone}, {shape}"
    else:
        onnx_model.doc_string = (
            f"CMN {metadata.name}: {metadata.backbone}, C={metadata.num_concepts}"
        )


def read_metadata(path: str | Path) -> ModelMetadata:
    return model_metadata(onnx.load(str(path), load_external_data=False), str(path))


def model_metadata(onnx_model: onnx.ModelProto, source: str = "model") -> ModelMetadata:
    """The metadata of a graph already in memory (``read_metadata`` loads it first)."""
    props = {p.key: p.value for p in onnx_model.metadata_props}
    return ModelMetadata.from_props(props, source)


def static_same_padding(module: nn.Module, size: int) -> int:
    """Replace timm's Conv2dSame by a fixed ZeroPad2d + Conv2d for ``size`` x ``size`` inputs.

    Conv2dSame computes its TF "SAME" padding from the input shape at run time, which traces
    to ~200 float shape-arithmetic nodes; the input size is fixed by the metadata, so the pads
    are constants. Returns how many convolutions were replaced (in place).
    """
    try:
        from timm.layers.conv2d_same import Conv2dSame
        from timm.layers.padding import pad_same_arg
    except ImportError:  # no timm: no Conv2dSame either
        return 0
    sizes: dict[nn.Module, list[int]] = {}

    def record(mod: nn.Module, args: tuple) -> None:
        sizes.setdefault(mod, list(args[0].shape[-2:]))

    same = [m for m in module.modules() if isinstance(m, Conv2dSame)]
    hooks = [m.register_forward_pre_hook(record) for m in same]
    with torch.no_grad():
        module(torch.zeros(1, 3, size, size))
    for hook in hooks:
        hook.remove()
    replaced = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, Conv2dSame):
                continue
            pad = pad_same_arg(sizes[child], child.weight.shape[-2:], child.stride, child.dilation)
            conv = nn.Conv2d(
                child.in_channels,
                child.out_channels,
                child.kernel_size,
                child.stride,
                0,
                child.dilation,
                child.groups,
                child.bias is not None,
            )
            conv.weight, conv.bias = child.weight, child.bias
            setattr(parent, name, nn.Sequential(nn.ZeroPad2d([int(p) for p in pad]), conv))
            replaced += 1
    return replaced


def export_onnx(
    model: BackboneModel,
    path: str | Path,
    metadata: ModelMetadata,
    region_grid: tuple[int, int] = DEFAULT_GRID,
) -> Path:
    """Trace the inference graph (the head's input-independent projections folded to
    constants), dynamic batch, plus the ``regions`` output for structural matching on heads
    that have it (the CMN; ``(0, 0)``: without it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    size = metadata.preprocess.input_size
    exportable = copy.deepcopy(model).cpu().eval().exportable().eval()
    static_same_padding(exportable.backbone, size)
    dummy = torch.randn(2, 3, size, size)
    tmp = path.with_name(f".{path.name}.export.tmp")  # torch's own output, before metadata
    try:
        _trace(exportable, dummy, tmp, model.output_names)
        onnx_model = onnx.load(str(tmp))
    finally:
        tmp.unlink(missing_ok=True)
    if region_grid != (0, 0) and model.has_regions:
        # a small input has a small attention grid: never more regions than it has cells
        grid = tuple(min(g, a) for g, a in zip(region_grid, metadata.attention_grid))
        onnx_model, metadata = add_region_output(onnx_model, metadata, grid)
    write_metadata(onnx_model, metadata)
    onnx.checker.check_model(onnx_model)
    with atomic_write(path) as handle:
        handle.write(onnx_model.SerializeToString())  # onnx.save takes the handle.name as a path
    return path


def _trace(exportable: nn.Module, dummy: torch.Tensor, out: Path, outputs: tuple[str, ...]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            exportable,
            (dummy,),
            str(out),
            input_names=[INPUT_NAME],
            output_names=list(outputs),
            dynamic_axes={name: {0: "batch"} for name in (INPUT_NAME, *outputs)},
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
