"""The ``regions`` output DIML's structural matching needs, added to an exported CMN graph.

DIML (Zhao et al., ICCV 2021) applies a model's embedding layer at every position of the
feature map, pools the map to a coarse grid and matches the regions of two images by
optimal transport. In a CMN the embedding layer is the concept head, so a region's feature
is each concept's cosine against that region's projected token; the head already computes
the numerators (tokens x unit concept queries, [N, R, C]) for the global scores. This adds,
after those tensors and in float: divide by the token norms, average-pool the attention
grid to ``grid`` cells (adaptive pooling, as PyTorch's ``adaptive_avg_pool2d``), and
L2-normalise each cell.

It works on the FP32 graph and on its QDQ INT8 twin alike (it reads the dequantized
tokens there), adds nodes without touching any other, and so leaves every existing output
bit for bit as it was: old files gain the output without a re-export or a re-quantization.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from cmn_edge.metadata import OUTPUT_REGIONS, ModelMetadata

#: DIML's grid: 4 x 4 regions.
DEFAULT_GRID = (4, 4)
#: Every node this module adds is named under it (the quantizer leaves them float).
NODE_PREFIX = "/regions"


class RegionsError(ValueError):
    """A graph whose concept head cannot be found."""


def adaptive_pool_matrix(source: tuple[int, int], target: tuple[int, int]) -> np.ndarray:
    """[target cells, source cells]: row i averages the source cells of target cell i, with
    PyTorch's adaptive pooling bins (start floor(i*n/m), end ceil((i+1)*n/m))."""
    (sh, sw), (th, tw) = source, target
    pool = np.zeros((th * tw, sh * sw), np.float32)
    for i in range(th):
        r0, r1 = (i * sh) // th, -(-((i + 1) * sh) // th)
        for j in range(tw):
            c0, c1 = (j * sw) // tw, -(-((j + 1) * sw) // tw)
            cells = [r * sw + c for r in range(r0, r1) for c in range(c0, c1)]
            pool[i * tw + j, cells] = 1.0 / len(cells)
    return pool


def _head_tensors(graph: onnx.GraphProto) -> tuple[str, str]:
    """(tokens [N, R, D], along_query [N, R, C]): the inputs of the head's numerator.

    The numerator is ``Mul(softmax attention, tokens @ queries^T)`` with the queries a
    constant. In an INT8 graph the product comes through QuantizeLinear/DequantizeLinear and
    the tokens are dequantized: both are taken as the head itself reads them.
    """
    producers = {out: node for node in graph.node for out in node.output}
    constants = {init.name for init in graph.initializer}

    def constant(name: str) -> bool:
        node = producers.get(name)
        if node is not None and node.op_type in ("DequantizeLinear", "Transpose"):
            return node.input[0] in constants or constant(node.input[0])
        return name in constants

    def matmul_behind(name: str) -> onnx.NodeProto | None:
        node = producers.get(name)
        while node is not None and node.op_type in ("DequantizeLinear", "QuantizeLinear"):
            node = producers.get(node.input[0])
        if node is not None and node.op_type == "MatMul" and constant(node.input[1]):
            return node
        return None

    for node in graph.node:
        if node.op_type != "Mul":
            sources = []
        else:
            sources = [producers.get(name) for name in node.input]
        if not any(s is not None and s.op_type == "Softmax" for s in sources):
            continue
        for name in node.input:
            matmul = matmul_behind(name)
            if matmul is not None:
                return matmul.input[0], name
    raise RegionsError("no CMN concept head found (softmax x tokens @ constant queries)")


def add_region_output(
    model: onnx.ModelProto, metadata: ModelMetadata, grid: tuple[int, int] = DEFAULT_GRID
) -> tuple[onnx.ModelProto, ModelMetadata]:
    """A copy of ``model`` with the ``regions`` output [N, rows*cols, C] and its metadata."""
    if metadata.head != "cmn":
        raise RegionsError(
            f"a {metadata.head.upper()} model has no concept head to take regions from "
            "(structural matching is CMN-only)"
        )
    if any(out.name == OUTPUT_REGIONS for out in model.graph.output):
        raise RegionsError(f"the graph already has a '{OUTPUT_REGIONS}' output")
    rows, cols = metadata.attention_grid
    if grid[0] > rows or grid[1] > cols or min(grid) < 1:
        raise RegionsError(f"region grid {grid} must fit the {rows}x{cols} attention grid")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    tokens, along_query = _head_tensors(graph)
    name = NODE_PREFIX
    pool = numpy_helper.from_array(adaptive_pool_matrix((rows, cols), grid), f"{name}/pool")
    floor = numpy_helper.from_array(np.array(1e-12, np.float32), f"{name}/floor")
    graph.initializer.extend([pool, floor])
    nodes = [
        # cosine of each region's token with each unit concept query: [N, R, C]
        helper.make_node("ReduceL2", [tokens], [f"{name}/token_norm"], axes=[-1], keepdims=1),
        helper.make_node("Max", [f"{name}/token_norm", floor.name], [f"{name}/token_norm_c"]),
        helper.make_node("Div", [along_query, f"{name}/token_norm_c"], [f"{name}/cosine"]),
        # adaptive average pooling to the grid: [cells, R] @ [N, R, C] -> [N, cells, C]
        helper.make_node("MatMul", [pool.name, f"{name}/cosine"], [f"{name}/pooled"]),
        helper.make_node("ReduceL2", [f"{name}/pooled"], [f"{name}/norm"], axes=[-1], keepdims=1),
        helper.make_node("Max", [f"{name}/norm", floor.name], [f"{name}/norm_c"]),
        helper.make_node("Div", [f"{name}/pooled", f"{name}/norm_c"], [OUTPUT_REGIONS]),
    ]
    for index, node in enumerate(nodes):
        node.name = f"{name}/{node.op_type}_{index}"  # the quantizer keeps these float by name
    opset = next((o.version for o in out.opset_import if o.domain in ("", "ai.onnx")), 13)
    if opset >= 18:  # ReduceL2 takes its axes as an input from opset 18
        axes = numpy_helper.from_array(np.array([-1], np.int64), f"{name}/axes")
        graph.initializer.append(axes)
        for node in nodes:
            if node.op_type == "ReduceL2":
                del node.attribute[:]
                node.attribute.append(helper.make_attribute("keepdims", 1))
                node.input.append(axes.name)
    graph.node.extend(nodes)
    cells = grid[0] * grid[1]
    graph.output.append(
        helper.make_tensor_value_info(
            OUTPUT_REGIONS, TensorProto.FLOAT, ["batch", cells, metadata.num_concepts]
        )
    )
    return out, replace(metadata, region_grid=(int(grid[0]), int(grid[1])))


def add_region_output_to_file(
    path: str | Path, out: str | Path, grid: tuple[int, int] = DEFAULT_GRID
) -> ModelMetadata:
    """``cmn-export regions``: an older FP32 or INT8 file gains the output, nothing else."""
    from cmn_edge.files import atomic_write

    from .onnx_export import model_metadata, write_metadata

    model = onnx.load(str(path))
    upgraded, metadata = add_region_output(model, model_metadata(model, str(path)), grid)
    write_metadata(upgraded, metadata)
    onnx.checker.check_model(upgraded)
    with atomic_write(out) as handle:
        handle.write(upgraded.SerializeToString())
    return metadata


__all__ = [
    "DEFAULT_GRID",
    "NODE_PREFIX",
    "RegionsError",
    "adaptive_pool_matrix",
    "add_region_output",
    "add_region_output_to_file",
]
