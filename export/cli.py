"""``cmn-export``: train a CMN (or DGML, ``--head dgml``), export it to ONNX, quantize it to
INT8, validate it."""

from __future__ import annotations

import sys
from pathlib import Path

import click

# The same error handling as cmn-edge: user errors one line + exit 1, bugs point to --debug.
from cmn_edge.cli_common import CliError, debug_option
from cmn_edge.cli_common import user_errors as _user_errors

from .heads import HEADS


@click.group()
@debug_option
def main() -> None:
    """Training side of cmn-edge."""


def head_options(func):
    """``--head`` and every head's own options, from the table in ``export/heads.py``."""
    for spec in reversed(list(HEADS.values())):
        for opt in reversed(spec.options):
            func = click.option(
                opt.flag,
                opt.key,
                default=opt.default,
                show_default=True,
                help=opt.help,
                type=click.Choice(opt.choices) if opt.choices else None,
            )(func)
    return click.option(
        "--head",
        type=click.Choice(list(HEADS)),
        default="cmn",
        show_default=True,
        help="Embedding head: " + "; ".join(f"{s.name}: {s.description}" for s in HEADS.values()),
    )(func)


@main.command()
@click.argument("datasets", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", "out_dir", default="runs/cmn", show_default=True, type=click.Path())
@click.option("--backbone", default="tf_efficientnet_lite0", show_default=True)
@head_options
@click.option("--concepts", "num_concepts", default=512, show_default=True, help="CMN: concepts.")
@click.option("--input-size", default=224, show_default=True)
@click.option(
    "--mode",
    type=click.Choice(["tail", "full"]),
    default="tail",
    show_default=True,
    help="tail: tune the last stages on cached early-stage features (CPU); full: end to end.",
)
@click.option("--epochs", default=10, show_default=True)
@click.option("--warmup-epochs", default=1, show_default=True, help="Backbone frozen.")
@click.option("--batch-size", default=64, show_default=True)
@click.option("--lr", default=5e-5, show_default=True, help="Backbone LR; head 10x, proxies 100x.")
@click.option("--val-fraction", default=0.1, show_default=True, help="Train classes held out.")
@click.option(
    "--select-metric",
    default="MAP@R",
    show_default=True,
    type=click.Choice(["MAP@R", "R@1"]),
    help="Validation metric that picks best.pt.",
)
@click.option(
    "--distill-weight",
    default=3.0,
    show_default=True,
    help="Keep each image's similarity order close to the pretrained backbone's (0: off).",
)
@click.option(
    "--amp",
    is_flag=True,
    help="bfloat16 autocast for the backbone (GPU; the head and losses stay float32).",
)
@click.option("--seed", default=0, show_default=True)
@click.option("--workers", default=2, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--final-test/--no-final-test", default=True, show_default=True)
@click.option("--max-steps-per-epoch", default=0, hidden=True)
@click.option("--no-pretrained", is_flag=True, help="Random backbone init (tests).")
@click.option(
    "--backbone-weights",
    type=click.Path(path_type=str),
    help="State dict of the backbone network to start from (e.g. torchvision ResNet-50).",
)
@click.option("--resume", type=click.Path(path_type=Path), help="A last.pt to continue from.")
@_user_errors
def train(datasets, resume, no_pretrained, **options) -> None:
    """Train on DATASETS (folders with manifest.csv, or <class>/<img> trees)."""
    from cmn_edge.dataset import DatasetError

    from .backbones import WeightsError
    from .checkpoint import CheckpointError
    from .heads import head_option_values
    from .train import TrainConfig
    from .train import train as run_training

    given = {o.key: options.pop(o.key) for spec in HEADS.values() for o in spec.options}
    try:
        chosen = head_option_values(options["head"], given)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    config = TrainConfig(
        datasets=[str(d) for d in datasets],
        pretrained=not no_pretrained,
        head_options=chosen,
        **options,
    )
    try:
        best = run_training(config, resume=resume)
    except (DatasetError, CheckpointError, WeightsError) as exc:
        raise CliError(str(exc)) from None
    click.echo(f"best checkpoint: {best}")


# --- export, quantize, validate -------------------------------------------------------------


def _read_concept_names(path: Path, count: int) -> tuple[str, ...]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: concept names file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read concept names ({exc})") from None
    names = tuple(line.strip() for line in lines if line.strip())
    if len(names) != count:
        raise ValueError(f"{path}: {len(names)} concept names for a model with {count} concepts")
    return names


def qat_command_line(qat: dict) -> str:
    """The `cmn-export qat` step recorded in a fine-tuned checkpoint, as a command line."""
    return " ".join(
        [
            "cmn-export qat",
            str(qat["source_checkpoint"]),
            *map(str, qat["datasets"]),
            f"--epochs {qat['epochs']} --lr {qat['lr']:g} --batch-size {qat['batch_size']}",
            f"--int8-weight {qat.get('int8_weight', 1.0):g} --seed {qat['seed']}",
        ]
    )


def export_checkpoint(
    out: Path,
    checkpoint: Path | None = None,
    upstream_checkpoint: Path | None = None,
    name: str | None = None,
    concept_names: Path | None = None,
) -> tuple[Path, float]:
    """Export a cmn-export or upstream checkpoint; returns the path and the parity error."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from cmn_edge.files import file_sha256
    from cmn_edge.metadata import INPUT_NAME, OUTPUT_EMBEDDING

    from .checkpoint import model_from_checkpoint, model_from_upstream
    from .onnx_export import build_metadata, export_onnx
    from .validate import PARITY_TOLERANCE

    source = checkpoint if checkpoint is not None else upstream_checkpoint
    assert source is not None
    if checkpoint is not None:
        model, config = model_from_checkpoint(checkpoint)
        data = ", ".join(str(d) for d in config.get("datasets", []))
        command = str(config.get("command", ""))
        if config.get("qat"):
            command += " && " + qat_command_line(config["qat"])
    else:
        model = model_from_upstream(upstream_checkpoint)
        data = f"unknown (upstream shchen0001/CMN checkpoint {Path(source).name})"
        command = "shchen0001/CMN train.py (upstream)"
    model.eval()
    names = _read_concept_names(concept_names, model.num_concepts) if concept_names else ()
    default_name = out.name.removesuffix(".onnx").removesuffix(".fp32")
    metadata = build_metadata(
        model,
        name or default_name,
        concept_names=names,
        training_data=data,
        training_command=command,
        source_checkpoint_sha256=file_sha256(Path(source)),
    )
    export_onnx(model, out, metadata)
    # A last look: the written graph must compute what the PyTorch model computes.
    size = metadata.preprocess.input_size
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x).numpy()
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (got,) = session.run([OUTPUT_EMBEDDING], {INPUT_NAME: x.numpy()})
    diff = float(np.abs(got - expected).max())
    if diff >= PARITY_TOLERANCE:
        out.unlink()
        raise ValueError(f"{out}: ONNX differs from PyTorch by {diff:.2e}; file removed")
    return out, diff


@main.command("onnx")
@click.option("--checkpoint", type=click.Path(path_type=Path), help="A cmn-export best.pt.")
@click.option(
    "--upstream-checkpoint",
    type=click.Path(path_type=Path),
    help="A state dict saved by upstream shchen0001/CMN train.py (ResNet-50).",
)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="model.fp32.onnx")
@click.option("--name", default=None, help="Model name in the metadata (default: from --out).")
@click.option(
    "--concept-names",
    type=click.Path(path_type=Path),
    help="Text file, one name per concept, in concept order.",
)
@_user_errors
def onnx_command(checkpoint, upstream_checkpoint, out, name, concept_names) -> None:
    """Export a checkpoint to a self-describing FP32 ONNX graph (dynamic batch)."""
    if (checkpoint is None) == (upstream_checkpoint is None):
        raise CliError("give exactly one of --checkpoint or --upstream-checkpoint")
    path, diff = export_checkpoint(out, checkpoint, upstream_checkpoint, name, concept_names)
    from .onnx_export import read_metadata

    meta = read_metadata(path)
    size = f"C={meta.num_concepts}"
    if meta.head == "dgml":
        size = f"DGML G={meta.groups} x D={meta.group_dim}"
    click.echo(
        f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB): {meta.backbone}, "
        f"{size}, grid {meta.attention_grid[0]}x{meta.attention_grid[1]}, "
        f"input {meta.preprocess.input_size}; PyTorch vs ONNX max abs diff {diff:.1e}"
    )


@main.command("regions")
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), help="Default: replace MODEL.")
@click.option("--grid", default=4, show_default=True, help="Regions per side (DIML: 4).")
@_user_errors
def regions_command(model, out, grid) -> None:
    """Add the ``regions`` output (structural matching) to an older FP32 or INT8 file.

    Only nodes are added: every existing output stays bit for bit what it was.
    """
    from .regions import add_region_output_to_file

    meta = add_region_output_to_file(model, out or model, (grid, grid))
    rows, cols = meta.region_grid
    click.echo(f"wrote {out or model}: regions {rows}x{cols} of {meta.num_concepts} concepts")


@main.command("quantize")
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "--calibration",
    required=True,
    multiple=True,
    type=click.Path(path_type=Path),
    help="Dataset folder (manifest.csv or <class>/<img>) whose images calibrate the ranges; "
    "repeat for a model trained on several (the count is shared).",
)
@click.option("--split", default="train", show_default=True)
@click.option("--count", default=256, show_default=True, help="Calibration images.")
@click.option("--check-count", default=32, show_default=True, help="Held-out check images.")
@click.option("--out", type=click.Path(path_type=Path), help="Default: MODEL with .int8.onnx.")
@click.option(
    "--method",
    type=click.Choice(["minmax", "percentile", "entropy", "auto"]),
    default="minmax",
    show_default=True,
    help="Calibration; auto keeps the best of the three on the check images.",
)
@click.option(
    "--format",
    "quant_format",
    type=click.Choice(["qdq", "qoperator"]),
    default="qdq",
    show_default=True,
)
@click.option(
    "--activation-type", type=click.Choice(["uint8", "int8"]), default="uint8", show_default=True
)
@click.option(
    "--weight-type", type=click.Choice(["int8", "uint8"]), default="int8", show_default=True
)
@click.option("--per-channel/--per-tensor", default=True, show_default=True)
@click.option(
    "--reduce-range", is_flag=True, help="onnxruntime's 7-bit weights, naively rounded, everywhere."
)
@click.option(
    "--gemm-weight-bits",
    type=click.Choice(["7", "8"]),
    default=None,
    help="GEMM weights: 7 (GPTQ-rounded, exact on every CPU, the default for QDQ int8) or 8 "
    "(needs a slow exact rewrite on x86 without VNNI).",
)
@click.option("--quantize-head", is_flag=True, help="Quantize the whole concept head too.")
@click.option(
    "--quantize-head-matmuls",
    is_flag=True,
    help="Quantize the head's MatMuls (half the weights), LayerNorm/Softmax stay float.",
)
@click.option(
    "--quantize-head-projections/--float-head-projections",
    default=True,
    show_default=True,
    help="Quantize the head's MatMuls with a constant weight (token/key/query projections).",
)
@click.option(
    "--float-op-type",
    "float_op_types",
    multiple=True,
    help="Op types kept float everywhere (repeatable; replaces the default list).",
)
@click.option("--seed", default=0, show_default=True)
@_user_errors
def quantize_command(
    model,
    calibration,
    split,
    count,
    check_count,
    out,
    method,
    quant_format,
    activation_type,
    weight_type,
    per_channel,
    reduce_range,
    gemm_weight_bits,
    quantize_head,
    quantize_head_matmuls,
    quantize_head_projections,
    float_op_types,
    seed,
) -> None:
    """Static INT8 quantization of MODEL, calibrated on TRAIN-split images."""
    from .quantize import DEFAULT_FLOAT_OP_TYPES, QuantizeOptions, quantize, summary

    if out is None:
        stem = model.name.removesuffix(".onnx").removesuffix(".fp32")
        out = model.with_name(f"{stem}.int8.onnx")
    options = QuantizeOptions(
        method=method,
        quant_format=quant_format,
        activation_type=activation_type,
        weight_type=weight_type,
        per_channel=per_channel,
        reduce_range=reduce_range,
        gemm_weight_bits=int(gemm_weight_bits) if gemm_weight_bits else None,
        float_head=not quantize_head,
        head_op_types=("MatMul",) if quantize_head_matmuls else (),
        head_projections=quantize_head_projections,
        float_op_types=tuple(float_op_types) or DEFAULT_FLOAT_OP_TYPES,
    )
    result = quantize(model, out, calibration, split, count, check_count, seed, options)
    click.echo(summary(result))


@main.command("validate")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--int8", "int8_model", type=click.Path(path_type=Path), help="Its INT8 twin.")
@click.option("--checkpoint", type=click.Path(path_type=Path), help="For PyTorch parity.")
@click.option("--upstream-checkpoint", type=click.Path(path_type=Path))
@click.option("--data", required=True, type=click.Path(path_type=Path))
@click.option("--split", default="test", show_default=True)
@click.option("--limit", type=int, default=None, help="First N images of the split.")
@click.option("--threads", type=int, default=None, help="onnxruntime threads (latency).")
@click.option("--runs", default=5, show_default=True, help="Latency runs (median).")
@click.option(
    "--report",
    type=click.Path(path_type=Path),
    help="Default: <model>.validation.json next to MODEL.",
)
@_user_errors
def validate_command(
    model, int8_model, checkpoint, upstream_checkpoint, data, split, limit, threads, runs, report
) -> None:
    """Parity, INT8 fidelity, Recall@K, sizes and CPU latency of an exported model."""
    from .validate import table, validate

    if checkpoint is not None and upstream_checkpoint is not None:
        raise CliError("give at most one of --checkpoint or --upstream-checkpoint")
    result = validate(
        model,
        data,
        int8=int8_model,
        checkpoint=checkpoint or upstream_checkpoint,
        upstream=upstream_checkpoint is not None,
        split=split,
        limit=limit,
        threads=threads,
        latency_runs=runs,
        report=report,
    )
    click.echo(table(result))
    parity = result.get("parity")
    if parity and not parity["ok"]:
        raise CliError(f"{model}: PyTorch vs ONNX parity above {parity['tolerance']:g}")


@main.command("qat")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.argument("datasets", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="New checkpoint.")
@click.option("--epochs", default=3, show_default=True)
@click.option("--lr", default=1e-5, show_default=True)
@click.option("--batch-size", default=64, show_default=True)
@click.option("--workers", default=2, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option(
    "--int8-weight",
    default=1.0,
    show_default=True,
    help="Weight of the simulated-INT8-to-float term against the anchor term.",
)
@click.option("--seed", default=0, show_default=True)
@_user_errors
def qat_command(
    checkpoint, datasets, out, epochs, lr, batch_size, workers, device, int8_weight, seed
) -> None:
    """Quantization-aware fine-tuning of CHECKPOINT on train images of DATASETS (no labels
    used): the INT8 file quantized from the result stays closer to its FP32 twin."""
    from .qat import fine_tune

    result = fine_tune(
        checkpoint,
        [str(d) for d in datasets],
        out,
        epochs,
        lr,
        batch_size,
        workers=workers,
        device=device,
        int8_weight=int8_weight,
        seed=seed,
    )
    last = result["history"][-1]
    click.echo(
        f"wrote {out}: 1-cos simulated INT8 to float {last['int8_gap']:.5f}, "
        f"float to the original {last['float_gap']:.5f}"
    )


@main.command("pack")
@click.argument("dataset", type=click.Path(path_type=Path))
@click.option(
    "--out",
    required=True,
    type=click.Path(path_type=Path),
    help="A new folder, or an earlier pack (replaced); anything else is refused.",
)
@click.option("--split", default="train", show_default=True)
@click.option(
    "--format",
    "image_format",
    type=click.Choice(["webp", "jpeg"]),
    default="webp",
    show_default=True,
)
@click.option("--quality", default=70, show_default=True, type=click.IntRange(1, 100))
@click.option(
    "--max-side",
    default=0,
    show_default=True,
    help="Shrink images whose short side is longer (0: keep the size).",
)
@_user_errors
def pack_command(dataset, out, split, image_format, quality, max_side) -> None:
    """Re-encode one split of DATASET small enough to carry (e.g. to a GPU machine)."""
    from .pack import pack_split

    count, size = pack_split(dataset, out, split, image_format, quality, max_side)
    click.echo(f"{out}: {count} images, {size / 1e6:.1f} MB")


if __name__ == "__main__":
    sys.exit(main())
