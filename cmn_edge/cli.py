"""``cmn-edge``: embed, evaluate, index, search and explain on a CPU."""

from __future__ import annotations

import os
import warnings

import click

from . import __version__
from .cli_common import debug_option
from .pipeline import DECODE_WORKERS_ENV


def _set_decode_workers(_ctx: click.Context, _param: click.Parameter, value: int | None) -> None:
    if value is not None:  # read by ThreadBudget, wherever this process embeds a folder
        os.environ[DECODE_WORKERS_ENV] = str(value)


@click.group()
@click.version_option(__version__, prog_name="cmn-edge")
@debug_option
@click.option(
    "--decode-workers",
    type=click.IntRange(min=1),
    default=None,
    expose_value=False,
    callback=_set_decode_workers,
    help=f"Threads that decode images while the model runs (default: one per core; or "
    f"{DECODE_WORKERS_ENV}). The model's own threads: each command's --threads.",
)
def main() -> None:
    """Interpretable, controllable image retrieval with Concept Metrics Networks."""
    # Pillow's warnings on a file's damaged metadata (corrupt EXIF, a short palette) name
    # neither the file nor a consequence, two lines each: the decode goes on, or fails with
    # the one line that names the file
    warnings.filterwarnings("ignore", category=UserWarning, module="PIL")


def _register() -> None:
    from .cli_bench import COMMANDS as bench_commands
    from .cli_explain import COMMANDS as explain_commands
    from .cli_index import COMMANDS as index_commands
    from .cli_run import COMMANDS as run_commands

    for command in (*run_commands, *index_commands, *explain_commands, *bench_commands):
        main.add_command(command)


_register()
