"""``cmn-edge``: embed, evaluate, index, search and explain on a CPU."""

from __future__ import annotations

import click

from . import __version__
from .cli_common import debug_option


@click.group()
@click.version_option(__version__, prog_name="cmn-edge")
@debug_option
def main() -> None:
    """Interpretable, controllable image retrieval with Concept Metrics Networks."""


def _register() -> None:
    from .cli_bench import COMMANDS as bench_commands
    from .cli_explain import COMMANDS as explain_commands
    from .cli_index import COMMANDS as index_commands
    from .cli_run import COMMANDS as run_commands

    for command in (*run_commands, *index_commands, *explain_commands, *bench_commands):
        main.add_command(command)


_register()
