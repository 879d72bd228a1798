"""Which INT8 settings make a CMN model fast on this CPU, and what they cost in accuracy.

Quantizes one FP32 CMN ONNX graph many ways with onnxruntime.quantization and times each
variant the way the runtime runs it, next to the FP32 graph under the same session settings:

  python benchmarks/quant_sweep.py                      # default model, cub100 calibration
  python benchmarks/quant_sweep.py --only u8s8,s8s8 --rounds 2     # quick look
  python benchmarks/quant_sweep.py --json sweep.json    # keep the figures

Levers (``--list`` prints them): QDQ vs QOperator, activation/weight types (U8S8, S8S8,
U8U8), per-channel, reduce_range, which node types stay float (depthwise convs, the head's
MatMuls / LayerNorm / Softmax), quant_pre_process, folding the backbone's data-dependent
``Pad`` amounts into constants, and, on the FP32 graph and the best INT8 graph, the session
settings: optimisation level, a saved optimised model, threads, spinning, the memory arena,
and the batch size.

Columns: ``b1 p50``/``b1 min`` the median and the least wall time of one image; ``cpu``
the process CPU time of that run (both threads, spinning included); ``x`` the FP32/variant
ratio of ``b1 p50`` under the same session settings (and ``x32`` of the batch-32
throughput ``b32 img/s``); ``cos`` the mean and minimum cosine between the variant's and
the FP32 embeddings of held-out images (classes never used for calibration); ``qconv`` how
many Conv nodes onnxruntime turned into integer kernels (after its own graph
optimisation) out of all Convs. All graphs are timed in interleaved rounds, so that other
work on the machine falls on all of them alike; ``cmn-edge bench`` (one session at a time)
is the reference for the latency of a shipped pair.

The ``onnx`` package is used here (benchmarks are not the runtime) for graph edits and for
the check that the head's input-independent parts are constants, and to cross-check the
head share measured by ``cmn-edge bench``'s profiler method by timing the graph cut at the
backbone's last feature map.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper
from onnxruntime.quantization import (
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

ROOT = Path(__file__).resolve().parent.parent
ort.set_default_logger_severity(3)  # the saved-model warning is expected here
logging.getLogger().setLevel(logging.ERROR)  # the quantizer's per-tensor chatter
sys.path.insert(0, str(ROOT))

from cmn_edge import preprocess as pp  # noqa: E402
from cmn_edge.bench import head_share, random_batch  # noqa: E402
from cmn_edge.dataset import load_samples  # noqa: E402
from cmn_edge.embedder import list_images  # noqa: E402
from cmn_edge.metadata import INPUT_NAME, OUTPUT_EMBEDDING, ModelMetadata  # noqa: E402
from cmn_export.calibration import ImageCalibrationReader  # noqa: E402

TYPES = {"U8": QuantType.QUInt8, "S8": QuantType.QInt8}
HEAD_MATMULS = ("/token_proj/MatMul", "/MatMul", "/MatMul_1")


@dataclass(frozen=True)
class Quant:
    """One way to quantize: the arguments of quant_pre_process/quantize_static, named."""

    fmt: str = "QDQ"  # QDQ | QOperator | FP32 (no quantization: graph edits only)
    act: str = "U8"
    weight: str = "S8"
    per_channel: bool = True
    reduce_range: bool = False
    #: depthwise, head_matmul, keys_attn_matmul, layernorm, softmax, shape_arith, head_all,
    #: head_but_const_matmul, head_but_matmul
    keep_float: tuple[str, ...] = ()
    pre_process: bool = True
    static_pads: bool = True
    calibrate: str = "MinMax"  # MinMax | Percentile | Entropy
    note: str = ""


@dataclass(frozen=True)
class Session:
    """onnxruntime session settings."""

    threads: int = 2
    opt: str = "all"  # basic | extended | all
    saved: bool = False  # load a model onnxruntime optimised and saved before
    spinning: bool = True
    arena: bool = True


VARIANTS: dict[str, Quant] = {
    "fp32-dynpads": Quant(fmt="FP32", static_pads=False, note="the FP32 graph as exported before"),
    "s8s8-dynpads": Quant(
        act="S8",
        static_pads=False,
        note="plain quantize_static defaults on the old export (the 1.1x)",
    ),
    "u8s8-dynpads": Quant(static_pads=False, note="shape arithmetic of the pads quantized too"),
    "u8s8-dynpads-excl": Quant(
        static_pads=False, keep_float=("shape_arith",), note="shape arithmetic kept float"
    ),
    "s8s8": Quant(act="S8", note="S8 activations and weights (quantize_static's default)"),
    "s8s8-headfloat": Quant(act="S8", keep_float=("head_matmul", "layernorm", "softmax")),
    "u8s8": Quant(note="U8 activations, S8 weights, per channel, everything quantized"),
    "u8s8-headfloat": Quant(
        keep_float=("head_matmul", "layernorm", "softmax"),
        note="the head's MatMuls, LayerNorm, Softmax float",
    ),
    "u8s8-headallfloat": Quant(
        keep_float=("head_all",),
        note="every node after the backbone float (export/quantize.py's default float_head)",
    ),
    "u8s8-constmm": Quant(
        keep_float=("head_but_const_matmul",),
        note="in the head only MatMuls with a constant weight INT8; the rest float",
    ),
    "u8s8-constmm-pct": Quant(
        keep_float=("head_but_const_matmul",),
        calibrate="Percentile",
        note="u8s8-constmm calibrated with the 99.999th percentile",
    ),
    "u8s8-headmm": Quant(
        keep_float=("head_but_matmul",),
        note="in the head every MatMul INT8 (quantize.py head_op_types=('MatMul',))",
    ),
    "u8s8-attnfloat": Quant(
        keep_float=("keys_attn_matmul", "layernorm", "softmax"),
        note="token_proj MatMul INT8; the keys/attention MatMuls float",
    ),
    "u8s8-lnsmfloat": Quant(
        keep_float=("layernorm", "softmax"), note="all head MatMuls INT8; LayerNorm, Softmax float"
    ),
    "u8s8-pertensor": Quant(per_channel=False),
    "u8s8-rr": Quant(reduce_range=True, note="7-bit weights: no VPMADDUBSW saturation on AVX2"),
    "u8s8-dwfloat": Quant(keep_float=("depthwise",), note="depthwise convs float"),
    "u8u8": Quant(weight="U8"),
    "u8s8-qop": Quant(fmt="QOperator"),
    "u8s8-noprep": Quant(pre_process=False, note="without quant_pre_process"),
    "u8s8-percentile": Quant(calibrate="Percentile"),
    "u8s8-entropy": Quant(calibrate="Entropy"),
}

SESSIONS: dict[str, Session] = {
    "default": Session(),
    "1thread": Session(threads=1),
    "nospin": Session(spinning=False),
    "noarena": Session(arena=False),
    "extended": Session(opt="extended"),
    "basic": Session(opt="basic"),
    "saved": Session(saved=True),
}

OPT_LEVELS = {
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


# ------------------------------------------------------------------------------- graph edits


def fold_static_pads(source: Path, target: Path) -> int:
    """Replace each Pad's computed ``pads`` input by the constant it always evaluates to.

    tf_efficientnet's "SAME" padding is exported as Shape/Gather/Ceil/... arithmetic on the
    input's height and width. Those are fixed by the metadata, so the amounts are constants;
    computed at run time they cost ~200 tiny kernels and block onnxruntime's Pad fusions.
    Checked at two batch sizes so nothing batch-dependent is frozen.
    """
    model = onnx.load(str(source))
    pads = [n for n in model.graph.node if n.op_type == "Pad" and len(n.input) > 1]
    initializers = {i.name for i in model.graph.initializer}
    dynamic = [n for n in pads if n.input[1] not in initializers]
    if not dynamic:
        onnx.save(model, str(target))
        return 0
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for node in dynamic:
        probe.graph.output.append(onnx.ValueInfoProto(name=node.input[1]))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    size = _input_size(model)
    names = [n.input[1] for n in dynamic]
    one = session.run(names, {INPUT_NAME: random_batch(1, size)})
    two = session.run(names, {INPUT_NAME: random_batch(2, size)})
    for node, a, b in zip(dynamic, one, two):
        if not np.array_equal(a, b):
            raise RuntimeError(f"{node.name}: pad amounts depend on the batch size")
        name = f"{node.name}_static_pads"
        model.graph.initializer.append(numpy_helper.from_array(np.asarray(a), name))
        node.input[1] = name
    _remove_dead_nodes(model)
    onnx.save(model, str(target))
    return len(dynamic)


def dynamic_pads(path: Path) -> int:
    """Pad nodes whose amounts are computed from the input's shape at run time."""
    model = onnx.load(str(path), load_external_data=False)
    reached = {i.name for i in model.graph.input}
    for node in model.graph.node:
        if any(i in reached for i in node.input):
            reached.update(node.output)
    return sum(
        1
        for n in model.graph.node
        if n.op_type == "Pad" and len(n.input) > 1 and n.input[1] in reached
    )


def _remove_dead_nodes(model: onnx.ModelProto) -> None:
    needed = {o.name for o in model.graph.output}
    kept = []
    for node in reversed(model.graph.node):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
    del model.graph.node[:]
    model.graph.node.extend(reversed(kept))
    used = {i for n in model.graph.node for i in n.input}
    live = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(live)


def _input_size(model: onnx.ModelProto) -> int:
    props = {p.key: p.value for p in model.metadata_props}
    return ModelMetadata.from_props(props).preprocess.input_size


def nodes_to_keep_float(model_path: Path, kinds: tuple[str, ...]) -> list[str]:
    """Node names of the kinds asked for (after pre-processing, so the names are final)."""
    model = onnx.load(str(model_path), load_external_data=False)
    names = [n.name for n in shape_arithmetic(model)] if "shape_arith" in kinds else []
    constants = {i.name for i in model.graph.initializer}
    for node in model.graph.node:
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if "depthwise" in kinds and node.op_type == "Conv" and group > 1:
            names.append(node.name)
        if "head_matmul" in kinds and node.op_type == "MatMul" and node.name in HEAD_MATMULS:
            names.append(node.name)
        if "keys_attn_matmul" in kinds and node.name in HEAD_MATMULS[1:]:
            names.append(node.name)
        if "head_all" in kinds and not node.name.startswith("/backbone/"):
            names.append(node.name)
        if "head_but_matmul" in kinds and not node.name.startswith("/backbone/"):
            if node.op_type != "MatMul":
                names.append(node.name)
        if "head_but_const_matmul" in kinds and not node.name.startswith("/backbone/"):
            if not (node.op_type == "MatMul" and any(i in constants for i in node.input)):
                names.append(node.name)
        if "layernorm" in kinds and node.op_type == "LayerNormalization":
            names.append(node.name)
        if "softmax" in kinds and node.op_type == "Softmax":
            names.append(node.name)
    return names


def shape_arithmetic(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Nodes computing from shapes and constants only (the dynamic SAME padding amounts)."""
    data = {i.name for i in model.graph.input}
    found = []
    for node in model.graph.node:
        if node.op_type in ("Shape", "Size"):
            continue
        if any(i in data for i in node.input):
            data.update(node.output)
        elif node.op_type != "Constant":
            found.append(node)
    return found


def input_independent_nodes(model_path: Path) -> list[str]:
    """Nodes that compute only from constants: work repeated for every image for nothing.

    DequantizeLinear of a weight is such a node by design in a QDQ graph (onnxruntime fuses
    it into the integer kernel), so it is not reported.
    """
    model = onnx.load(str(model_path), load_external_data=False)
    live = {i.name for i in model.graph.input}
    found = []
    for node in model.graph.node:  # ONNX graphs are topologically sorted
        if any(i in live for i in node.input if i):
            live.update(node.output)
        elif node.op_type not in ("Constant", "DequantizeLinear", "Identity"):
            found.append(f"{node.op_type} {node.name}")
    return found


def head_nodes_on_concepts(model_path: Path) -> dict:
    """The head ops of the exported graph and whether any runs on the concept parameters."""
    model = onnx.load(str(model_path), load_external_data=False)
    inits = {i.name: tuple(i.dims) for i in model.graph.initializer}
    head = [
        n
        for n in model.graph.node
        if not n.name.startswith("/backbone/")
        and n.op_type in ("MatMul", "LayerNormalization", "Gemm")
    ]
    return {
        "head_ops": [
            f"{n.op_type} {n.name} consts={[inits[i] for i in n.input if i in inits]}" for n in head
        ],
        "input_independent": input_independent_nodes(model_path),
    }


def backbone_cut(model_path: Path, target: Path) -> Path:
    """The graph up to the backbone's last feature map (the head's first node's input)."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(model_path)))
    first_head = next(n for n in model.graph.node if n.name == "/Reshape")
    feature = first_head.input[0]
    extracted = onnx.utils.Extractor(model).extract_model([INPUT_NAME], [feature])
    onnx.save(extracted, str(target))
    return target


# ------------------------------------------------------------------------------- quantizing


def calibration_paths(folder: Path, split: str, count: int, seed: int) -> list[Path]:
    if (folder / "manifest.csv").is_file():
        paths = [s.path for s in load_samples(folder, split)]
    else:
        paths = list_images(folder)
    rng = random.Random(seed)
    return sorted(paths if len(paths) <= count else rng.sample(paths, count))


def heldout_paths(folders: list[Path], count: int, seed: int) -> list[Path]:
    """Test-split images (classes calibration never saw), spread over the datasets."""
    chosen: list[Path] = []
    per = max(1, count // max(1, len(folders)))
    for folder in folders:
        if (folder / "manifest.csv").is_file():
            paths = [s.path for s in load_samples(folder, "test")]
        else:
            paths = list_images(folder)
        chosen += random.Random(seed + 1).sample(paths, min(per, len(paths)))
    return chosen


def quantize(
    fp32: Path,
    variant: Quant,
    reader: ImageCalibrationReader,
    work: Path,
    name: str,
    reuse: bool = False,
) -> Path:
    """The variant's graph in ``work`` (made again unless ``reuse`` and it is there)."""
    out = work / f"{name}.onnx"
    if reuse and out.exists():
        return out
    source = fp32
    if variant.static_pads:
        source = work / f"{name}.pads.onnx"
        fold_static_pads(fp32, source)
    if variant.fmt == "FP32":
        return source
    if variant.pre_process:
        prepped = work / f"{name}.pre.onnx"
        quant_pre_process(str(source), str(prepped))
        source = prepped
    reader.rewind()
    extra = {}
    if variant.fmt == "QOperator":
        extra["ForceQuantizeNoInputCheck"] = False
    with contextlib.redirect_stdout(io.StringIO()):  # the QOperator path prints value infos
        quantize_static(
            str(source),
            str(out),
            reader,
            quant_format=QuantFormat.QDQ if variant.fmt == "QDQ" else QuantFormat.QOperator,
            activation_type=TYPES[variant.act],
            weight_type=TYPES[variant.weight],
            per_channel=variant.per_channel,
            reduce_range=variant.reduce_range,
            nodes_to_exclude=nodes_to_keep_float(source, variant.keep_float),
            calibrate_method=getattr(CalibrationMethod, variant.calibrate),
            extra_options=extra,
        )
    return out


# ------------------------------------------------------------------------------- measuring


def make_session(path: Path, settings: Session, work: Path) -> tuple[ort.InferenceSession, float]:
    """A session as specified, and the seconds its creation took."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = settings.threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = OPT_LEVELS[settings.opt]
    options.enable_cpu_mem_arena = settings.arena
    options.add_session_config_entry(
        "session.intra_op.allow_spinning", "1" if settings.spinning else "0"
    )
    load_path = path
    if settings.saved:
        load_path = work / f"{path.stem}.{settings.opt}.ortopt.onnx"
        if not load_path.exists():
            prep = ort.SessionOptions()
            prep.graph_optimization_level = OPT_LEVELS[settings.opt]
            prep.optimized_model_filepath = str(load_path)
            ort.InferenceSession(str(path), prep, providers=["CPUExecutionProvider"])
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    start = time.perf_counter()
    session = ort.InferenceSession(str(load_path), options, providers=["CPUExecutionProvider"])
    return session, time.perf_counter() - start


class Timer:
    """Wall and CPU times of many sessions, measured in interleaved rounds.

    Other programs share this CPU; timing each candidate in its own block lets a burst of
    their work land on one candidate. Round-robin rounds spread it over all of them, and the
    minimum is reported beside the median as the least disturbed figure.
    """

    def __init__(self, size: int, batches: tuple[int, ...]) -> None:
        self.inputs = {b: {INPUT_NAME: random_batch(b, size)} for b in batches}
        self.sessions: dict[str, ort.InferenceSession] = {}
        self.wall: dict[tuple[str, int], list[float]] = {}
        self.cpu: dict[tuple[str, int], list[float]] = {}

    def add(self, name: str, session: ort.InferenceSession) -> None:
        self.sessions[name] = session
        for feed in self.inputs.values():  # warm up: arena growth, first-run allocations
            session.run(_first_output(session), feed)

    def run(self, rounds: int, runs: dict[int, int]) -> None:
        for _ in range(rounds):
            for name, session in self.sessions.items():
                # Let the previous session's spinning worker threads park first, or they
                # steal this one's cores (17 sessions hold 17 thread pools).
                time.sleep(0.02)
                outputs = _first_output(session)
                for batch, count in runs.items():
                    feed = self.inputs[batch]
                    for _ in range(count):
                        c0, t0 = time.process_time(), time.perf_counter()
                        session.run(outputs, feed)
                        self.wall.setdefault((name, batch), []).append(time.perf_counter() - t0)
                        self.cpu.setdefault((name, batch), []).append(time.process_time() - c0)

    def stats(self, name: str, batch: int) -> dict[str, float]:
        wall = np.asarray(self.wall[(name, batch)]) * 1000
        cpu = np.asarray(self.cpu[(name, batch)]) * 1000
        return {
            "p50_ms": float(np.median(wall)),
            "p90_ms": float(np.percentile(wall, 90)),
            "min_ms": float(wall.min()),
            "cpu_ms": float(np.median(cpu)),
            "img_s": 1000 * batch / float(np.median(wall)),
            "runs": int(wall.size),
        }


def _first_output(session: ort.InferenceSession) -> list[str]:
    """The embedding, or the feature map of a graph cut at the backbone."""
    names = [o.name for o in session.get_outputs()]
    return [OUTPUT_EMBEDDING] if OUTPUT_EMBEDDING in names else names[:1]


def optimised_op_counts(path: Path, work: Path) -> Counter:
    """Op types after onnxruntime's own optimisation: did the integer kernels get used?"""
    target = work / f"{path.stem}.counts.onnx"
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(target)
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    counts = Counter(n.op_type for n in onnx.load(str(target)).graph.node)
    target.unlink()
    return counts


def embeddings(path: Path, heldout: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate(
        [
            session.run([OUTPUT_EMBEDDING], {INPUT_NAME: heldout[i : i + 16]})[0]
            for i in range(0, len(heldout), 16)
        ]
    )


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


# ------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "cmn-lite0.fp32.onnx")
    parser.add_argument("--calib", type=Path, default=ROOT.parent / "shared/datasets/cub100")
    parser.add_argument("--calib-split", default="train")
    parser.add_argument("--count", type=int, default=64, help="calibration images")
    parser.add_argument(
        "--heldout",
        type=Path,
        nargs="*",
        default=[ROOT.parent / "shared/datasets/cub100", ROOT.parent / "shared/datasets/caltech97"],
    )
    parser.add_argument("--heldout-count", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--no-spin",
        action="store_true",
        help="threads sleep instead of spinning, so the cpu column counts only work "
        "(steadiest comparison while other programs share the CPU)",
    )
    parser.add_argument("--rounds", type=int, default=8, help="interleaved timing rounds")
    parser.add_argument("--b1-runs", type=int, default=5, help="batch-1 runs per round")
    parser.add_argument("--big-batch", type=int, default=32)
    parser.add_argument("--only", default="", help="comma-separated variant names")
    parser.add_argument(
        "--sessions",
        default="default,1thread,nospin,noarena,extended,basic,saved",
        help="session settings tried on FP32 and the best INT8 ('' to skip)",
    )
    parser.add_argument(
        "--best",
        default="",
        help="INT8 variant for the session sweep "
        "(default: the fastest b1 within 0.01 mean cosine of the best)",
    )
    parser.add_argument("--work", type=Path, default=None, help="keep the variants here")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--reuse", action="store_true", help="time the variants already in --work again"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--list", action="store_true", help="print the variants and exit")
    args = parser.parse_args(argv)
    if args.list:
        for name, variant in VARIANTS.items():
            print(f"{name:22s} {variant}")
        return 0

    work_ctx = tempfile.TemporaryDirectory(prefix="quant-sweep-") if args.work is None else None
    work = Path(work_ctx.name) if work_ctx else args.work
    work.mkdir(parents=True, exist_ok=True)
    names = [n for n in args.only.split(",") if n] or list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; --list shows them")

    source = args.model
    meta = ModelMetadata.from_props(
        {p.key: p.value for p in onnx.load(str(source), load_external_data=False).metadata_props},
        str(source),
    )
    size = meta.preprocess.input_size
    print(
        f"# {source} ({meta.backbone}, C={meta.num_concepts}); onnxruntime {ort.__version__}; "
        f"threads {args.threads}{' (no spinning)' if args.no_spin else ''}; load average {_load()}",
        flush=True,
    )
    graph_check = head_nodes_on_concepts(source)
    graph_check["dynamic_pads"] = dynamic_pads(source)
    print(f"# Pad nodes with data-dependent amounts: {graph_check['dynamic_pads']}")
    print("# head ops:", *graph_check["head_ops"], sep="\n#   ")
    print(f"# nodes computing only from constants: {graph_check['input_independent'] or 'none'}")

    calib = calibration_paths(args.calib, args.calib_split, args.count, args.seed)
    reader = ImageCalibrationReader(calib, meta.preprocess)
    held = heldout_paths(args.heldout, args.heldout_count, args.seed)
    heldout = np.stack([pp.load(p, meta.preprocess) for p in held])
    print(
        f"# calibration: {len(calib)} images of {args.calib} ({args.calib_split}); "
        f"held out: {len(held)} test-split images",
        flush=True,
    )

    # The reference: the FP32 graph with constant pads, as the exporter now writes it (a
    # no-op for a graph that has them already); "fp32-dynpads" times the graph as given.
    fp32 = work / "fp32.onnx"
    fold_static_pads(source, fp32)
    reference = embeddings(fp32, heldout)
    counts = optimised_op_counts(fp32, work)
    rows: dict[str, dict] = {
        "fp32": {
            "qconv": f"0/{counts['Conv'] + counts['FusedConv']}",
            "size_mb": fp32.stat().st_size / 1e6,
        }
    }
    paths: dict[str, Path] = {"fp32": fp32}
    for name in names:  # phase 1: build every variant, measure what does not need a clock
        variant = VARIANTS[name]
        try:
            start = time.perf_counter()
            path = quantize(source, variant, reader, work, name, args.reuse)
            quant_s = time.perf_counter() - start
            cos = cosines(embeddings(path, heldout), reference)
            counts = optimised_op_counts(path, work)
        except Exception as exc:  # a lever that breaks the quantizer is a finding too
            rows[name] = {"error": str(exc).splitlines()[0][:120] if str(exc) else repr(exc)}
            print(f"{name:22s} FAILED: {rows[name]['error']}", flush=True)
            continue
        qconv = counts["QLinearConv"]
        rows[name] = {
            "cos_mean": float(cos.mean()),
            "cos_min": float(cos.min()),
            "qconv": f"{qconv}/{qconv + counts['Conv'] + counts['FusedConv']}",
            "size_mb": path.stat().st_size / 1e6,
            "quantize_s": quant_s,
            "settings": asdict(variant),
        }
        paths[name] = path
        print(f"# built {name} ({quant_s:.0f} s)", flush=True)

    # Phase 2: every graph timed in interleaved rounds.
    base = Session(threads=args.threads, spinning=not args.no_spin)
    timer = Timer(size, (1, args.big_batch))
    for name, path in paths.items():
        session, load_s = make_session(path, base, work)
        rows[name]["load_ms"] = 1000 * load_s
        timer.add(name, session)
    timer.run(args.rounds, {1: args.b1_runs, args.big_batch: 1})
    for name in paths:
        rows[name]["b1"] = timer.stats(name, 1)
        rows[name]["big"] = timer.stats(name, args.big_batch)
    del timer
    print(f"\n# variants, {args.rounds} interleaved rounds; load average {_load()}")
    _print_header(args.big_batch)
    for name in rows:
        if "error" in rows[name]:
            print(f"{name:22s} FAILED: {rows[name]['error']}")
        else:
            _print_row(name, rows[name], rows["fp32"])

    # The fastest INT8 graph among the most faithful ones (within 0.01 mean cosine of the best).
    good = [
        n for n in paths if n != "fp32" and VARIANTS[n].fmt != "FP32" and "error" not in rows[n]
    ]
    top = max((rows[n]["cos_mean"] for n in good), default=0.0)
    good = [n for n in good if rows[n]["cos_mean"] >= top - 0.01]
    best = args.best or (min(good, key=lambda n: rows[n]["b1"]["p50_ms"]) if good else "")
    session_rows: dict[str, dict] = {}
    batch_rows: dict[int, dict] = {}
    shares: dict[str, dict] = {}
    if best and args.sessions:
        timer = Timer(size, (1, args.big_batch))
        settings_used = [s for s in args.sessions.split(",") if s]
        for sname in settings_used:
            settings = SESSIONS[sname]
            if sname != "1thread":
                settings = replace(settings, threads=args.threads)
            for label, path in (("fp32", fp32), ("int8", paths[best])):
                session, load_s = make_session(path, settings, work)
                session_rows.setdefault(sname, {})[label] = {"load_ms": 1000 * load_s}
                timer.add(f"{sname}/{label}", session)
        timer.run(args.rounds, {1: args.b1_runs, args.big_batch: 1})
        print(
            f"\n# session settings, FP32 vs {best} (threads={args.threads} unless named); "
            f"load average {_load()}"
        )
        big = f"b{args.big_batch}"
        print(
            f"{'session':10s} {'fp32 b1':>8s} {'int8 b1':>8s} {'x':>5s} {'fp32 min':>8s} "
            f"{'int8 min':>8s} {'fp32 ' + big:>9s} {'int8 ' + big:>9s} {'x' + big[1:]:>5s} "
            f"{'fp32 load':>9s} {'int8 load':>9s}"
        )
        for sname in settings_used:
            pair = session_rows[sname]
            for label in ("fp32", "int8"):
                pair[label]["b1"] = timer.stats(f"{sname}/{label}", 1)
                pair[label]["big"] = timer.stats(f"{sname}/{label}", args.big_batch)
            f, i = pair["fp32"], pair["int8"]
            print(
                f"{sname:10s} {f['b1']['p50_ms']:8.2f} {i['b1']['p50_ms']:8.2f} "
                f"{f['b1']['p50_ms'] / i['b1']['p50_ms']:5.2f} {f['b1']['min_ms']:8.2f} "
                f"{i['b1']['min_ms']:8.2f} {f['big']['img_s']:9.1f} {i['big']['img_s']:9.1f} "
                f"{i['big']['img_s'] / f['big']['img_s']:5.2f} {f['load_ms']:9.0f} "
                f"{i['load_ms']:9.0f}",
                flush=True,
            )
        del timer

        batches = (1, 2, 4, 8, 16, 32)
        timer = Timer(size, batches)
        timer.add("fp32", make_session(fp32, base, work)[0])
        timer.add("int8", make_session(paths[best], base, work)[0])
        timer.run(max(3, args.rounds // 2), {b: max(1, 8 // b) for b in batches})
        print(f"\n# batching, {best} (default session): ms per image; load average {_load()}")
        for b in batches:
            f = timer.stats("fp32", b)["p50_ms"] / b
            i = timer.stats("int8", b)["p50_ms"] / b
            batch_rows[b] = {"fp32_ms_per_img": f, "int8_ms_per_img": i}
            print(f"b{b:<3d} fp32 {f:6.2f}  int8 {i:6.2f}  x {f / i:4.2f}", flush=True)
        del timer

        print("\n# head share of model time (b1): profiler method vs graph cut at the backbone")
        for label, path in (("fp32", fp32), ("int8", paths[best])):
            cut = backbone_cut(path, work / f"{path.stem}.backbone.onnx")
            timer = Timer(size, (1,))
            timer.add("full", make_session(path, base, work)[0])
            timer.add("cut", make_session(cut, base, work)[0])
            timer.run(args.rounds, {1: args.b1_runs})
            full_ms, cut_ms = timer.stats("full", 1)["p50_ms"], timer.stats("cut", 1)["p50_ms"]
            prof = head_share(path, args.threads, size)
            shares[label] = {
                "profiler": prof,
                "cut": 1 - cut_ms / full_ms,
                "full_ms": full_ms,
                "backbone_ms": cut_ms,
            }
            print(
                f"{label}: profiler {100 * (prof or 0):.1f}%  "
                f"cut {100 * (1 - cut_ms / full_ms):.1f}%"
                f"  (full {full_ms:.2f} ms, backbone {cut_ms:.2f} ms)",
                flush=True,
            )

    print(f"\n# load average at the end: {_load()}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "model": str(source),
                    "threads": args.threads,
                    "graph_check": graph_check,
                    "variants": rows,
                    "best": best,
                    "sessions": session_rows,
                    "batching": batch_rows,
                    "head_share": shares,
                    "load_average": os.getloadavg(),
                    "onnxruntime": ort.__version__,
                },
                indent=2,
                default=str,
            )
        )
    if work_ctx:
        work_ctx.cleanup()
    return 0


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def _print_header(big: int) -> None:
    print(
        f"{'variant':22s} {'b1 p50':>7s} {'b1 min':>7s} {'cpu ms':>7s} {'x':>5s} "
        f"{'b' + str(big) + ' img/s':>10s} {'x' + str(big):>5s} {'cos mean':>8s} {'cos min':>8s} "
        f"{'qconv':>6s} {'MB':>5s} {'load ms':>7s}"
    )


def _print_row(name: str, row: dict, fp32: dict) -> None:
    cos_mean = f"{row['cos_mean']:.4f}" if "cos_mean" in row else "ref"
    cos_min = f"{row['cos_min']:.4f}" if "cos_min" in row else "ref"
    b1, big = row["b1"], row["big"]
    print(
        f"{name:22s} {b1['p50_ms']:7.2f} {b1['min_ms']:7.2f} {b1['cpu_ms']:7.2f} "
        f"{fp32['b1']['p50_ms'] / b1['p50_ms']:5.2f} {big['img_s']:10.1f} "
        f"{big['img_s'] / fp32['big']['img_s']:5.2f} {cos_mean:>8s} {cos_min:>8s} "
        f"{row['qconv']:>6s} {row['size_mb']:5.1f} {row['load_ms']:7.0f}",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
