"""What every ``cmn-edge`` command shares: one-line errors and the model options."""

from __future__ import annotations

import functools
import sys

import click

from .dataset import DatasetError
from .embedder import ModelError
from .metadata import MetadataError
from .preprocess import ImageError

#: Errors that are the user's input, not a bug: shown as one line, exit status 1.
USER_ERRORS = (
    ImageError, ModelError, MetadataError, DatasetError, FileNotFoundError, ValueError,
    PermissionError,
)


class CliError(click.ClickException):
    def show(self, file=None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


def user_errors(func):
    """Turn a user-input error into ``error: <file>: <reason>`` on stderr and exit 1."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except click.ClickException:
            raise
        except USER_ERRORS as exc:
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CliError(message) from None
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


def model_options(func):
    """--model, --precision, --threads, in that order on every command that embeds."""
    func = click.option("--threads", type=int, default=None, help="onnxruntime threads.")(func)
    func = click.option(
        "--precision", type=click.Choice(["int8", "fp32"]), default="int8", show_default=True
    )(func)
    func = click.option(
        "--model", default=None, help="Bundled model name or path to a CMN .onnx file."
    )(func)
    return func
