"""Would a hybrid embedding, the concept scores beside the model's own pooled backbone
features, beat both the CMN embedding and the plain features? (issue #20's open question)

For each test split: the FP32 model's embedding E (512 concepts, unit norm) and its backbone's
global-average-pooled feature map P (unit norm), read from one run of the graph with a pooled
output added in memory; then leave-one-out R@1 and MAP@R of [E ; beta * P] for several beta.
beta = 0 is the shipped embedding; "pooled only" is P alone (the tuned backbone's features,
to compare with ``benchmarks/anchor.py``'s untouched ImageNet backbone).

    python benchmarks/hybrid_embedding.py ../shared/datasets/cub100 ../shared/datasets/caltech97
"""

from __future__ import annotations

import argparse

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from cmn_edge.dataset import load_samples
from cmn_edge.embedder import INPUT_NAME, OUTPUT_EMBEDDING, Embedder
from cmn_edge.metrics import retrieval_metrics
from cmn_edge.registry import resolve_model_path

BETAS = (0.0, 0.5, 0.75, 1.0, 1.5, 2.0)


def with_pooled_output(path: str) -> bytes:
    """The model with one more output: the backbone's feature map, averaged over space."""
    model = onnx.load(path)
    feature = next(n for n in model.graph.node if n.op_type == "Reshape" and n.name == "/Reshape")
    graph = model.graph
    graph.node.append(helper.make_node("GlobalAveragePool", [feature.input[0]], ["pooled4d"]))
    graph.node.append(helper.make_node("Flatten", ["pooled4d"], ["pooled"], axis=1))
    graph.output.append(helper.make_tensor_value_info("pooled", onnx.TensorProto.FLOAT, None))
    return model.SerializeToString()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("datasets", nargs="+")
    parser.add_argument("--model", default=None, help="FP32 .onnx (default: the bundled one)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    path = str(args.model or resolve_model_path(None, "fp32"))
    embedder = Embedder(path, precision="fp32", threads=args.threads)  # its preprocessing
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    session = ort.InferenceSession(with_pooled_output(path), options, ["CPUExecutionProvider"])
    for dataset in args.datasets:
        samples = load_samples(dataset, "test")
        concepts, pooled = [], []
        for start in range(0, len(samples), 32):
            batch = np.stack([embedder.load(s.path) for s in samples[start : start + 32]])
            e, p = session.run([OUTPUT_EMBEDDING, "pooled"], {INPUT_NAME: batch})
            concepts.append(e)
            pooled.append(p / np.linalg.norm(p, axis=1, keepdims=True))
        e, p = np.concatenate(concepts), np.concatenate(pooled)
        labels = np.array([s.label for s in samples])
        print(f"{dataset} [test, {len(samples)} images], {embedder.model_id}:")
        rows = [(f"beta {b:g}", np.concatenate([e, b * p], axis=1)) for b in BETAS]
        for name, x in [*rows, ("pooled only", p)]:
            m = retrieval_metrics(x, labels)
            print(f"  {name:<12} R@1 {m['R@1']:6.2f}  MAP@R {m['MAP@R']:6.2f}", flush=True)


if __name__ == "__main__":
    main()
