"""The runtime's INT8 scan graph (``cmn_edge/index/scan_int8.onnx``): one MatMulInteger.

The runtime installs without the ``onnx`` package, so it cannot build a graph; this is the
one place that does, and ``tests/test_index_scan.py`` checks that the shipped file is what
it writes. Regenerate with ``python -m cmn_export.scan_graph``.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto, helper

#: Where the runtime reads it (package data of cmn_edge.index).
SHIPPED = Path(__file__).resolve().parent.parent / "cmn_edge" / "index" / "scan_int8.onnx"


def build() -> bytes:
    """``scores[1, n] = query[1, d] @ codes[d, n]``: u8 query, s8 codes, int32 scores.

    The codes are the rows transposed, so onnxruntime sees a single-row GEMM over a long
    ``n`` and streams the codes once (the [n, d] layout ran 2-4x slower). No zero points:
    one made onnxruntime sum every column on every call, doubling the time; the query's
    offset is taken off by the caller with per-row sums computed once.
    """
    query = helper.make_tensor_value_info("query", TensorProto.UINT8, [1, "d"])
    codes = helper.make_tensor_value_info("codes", TensorProto.INT8, ["d", "n"])
    scores = helper.make_tensor_value_info("scores", TensorProto.INT32, [1, "n"])
    node = helper.make_node("MatMulInteger", ["query", "codes"], ["scores"])
    graph = helper.make_graph([node], "cmn_edge_int8_scan", [query, codes], [scores])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8  # onnxruntime >= 1.17, the runtime's floor, reads it
    onnx.checker.check_model(model)
    return model.SerializeToString()


if __name__ == "__main__":
    SHIPPED.write_bytes(build())
    print(f"wrote {SHIPPED} ({SHIPPED.stat().st_size} bytes)")
