"""``cmn-edge bench``: how fast the whole embed path is on this machine, FP32 beside INT8."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .cli_common import CliError, user_errors


def _batches(_ctx: click.Context, _param: click.Parameter, value: str) -> list[int]:
    try:
        sizes = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"'{value}' is not a comma-separated list of integers") from None
    if not sizes or min(sizes) < 1:
        raise click.BadParameter(f"'{value}': batch sizes must be positive integers")
    return sizes


@click.command("bench", short_help="Latency, throughput, decode time, cold start, memory.")
@click.option(
    "--model",
    default=None,
    help="Bundled model name or path to a CMN .onnx file (both "
    "precisions need the bundled name; a path is timed at the precision it was given for).",
)
@click.option(
    "--precision",
    type=click.Choice(["both", "int8", "fp32"]),
    default="both",
    show_default=True,
)
@click.option(
    "--batch",
    "batches",
    default="1,8,32",
    show_default=True,
    callback=_batches,
    help="Comma-separated batch sizes.",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="onnxruntime threads (default: onnxruntime's choice).",
)
@click.option(
    "--repeats",
    type=click.IntRange(min=1),
    default=20,
    show_default=True,
    help="Timed runs per measure (batches above 8 use a quarter).",
)
@click.option(
    "--cold-repeats",
    type=click.IntRange(min=1),
    default=3,
    show_default=True,
    help="Fresh `cmn-edge embed` processes timed per precision.",
)
@click.option(
    "--photo",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Small JPEG to time (default: the bundled cat photo); the 12 MP one is made from it.",
)
@click.option(
    "--pipeline",
    "pipeline_folder",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Time embedding this folder instead: each stage alone, then end to end.",
)
@click.option(
    "--decode-workers",
    type=click.IntRange(min=1),
    default=None,
    help="With --pipeline: decoding threads (default: one per core).",
)
@click.option(
    "--limit", type=click.IntRange(min=1), default=None, help="With --pipeline: first N images."
)
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@user_errors
def bench(
    model: str | None,
    precision: str,
    batches: list[int],
    threads: int | None,
    repeats: int,
    cold_repeats: int,
    photo: Path | None,
    pipeline_folder: Path | None,
    decode_workers: int | None,
    limit: int | None,
    as_json: bool,
) -> None:
    """Time the model (per batch size), decoding, end to end and cold start; one table.

    With ``--pipeline FOLDER``: read, decode and model throughput alone, and end to end.
    Timings are wall clock on whatever else this machine is doing: the load average is
    printed with them. Nothing here is a pass/fail check.
    """
    from .bench import format_table, run_bench

    def progress(message: str) -> None:
        if not as_json:
            click.echo(f"  {message} ...", err=True)

    if pipeline_folder is not None:
        from .bench_pipeline import format_pipeline, run_pipeline_bench

        result = run_pipeline_bench(
            pipeline_folder,
            model,
            "auto" if precision == "both" else precision,
            threads,
            decode_workers,
            batch_size=max(batches),
            limit=limit,
            progress=progress,
        )
        click.echo(json.dumps(result, indent=2) if as_json else format_pipeline(result))
        return

    precisions = ["fp32", "int8"] if precision == "both" else [precision]
    if model is not None and precision == "both" and str(model).endswith(".onnx"):
        raise CliError(f"{model}: one .onnx file has one precision; give --precision int8 or fp32")

    try:
        result = run_bench(
            model=model,
            precisions=precisions,
            batches=batches,
            threads=threads,
            repeats=repeats,
            photo=photo,
            cold_repeats=cold_repeats,
            progress=progress,
        )
    except RuntimeError as exc:
        raise CliError(str(exc)) from None
    if as_json:
        click.echo(json.dumps(result, indent=2, sort_keys=True))
    else:
        click.echo(format_table(result))


COMMANDS = [bench]
