"""What every ``cmn-edge`` command shares: error reporting and the model options.

A user error (a bad file, flag or index, a full disk, no permission) is one line on stderr
naming the file and the reason, exit status 1. Anything else is a bug: a short line that
says so and how to see the traceback (``--debug`` or ``CMN_EDGE_DEBUG=1``), exit status 70.
"""

from __future__ import annotations

import functools
import linecache
import os
import select
import sys
import traceback
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import click

from .registry import PRECISION_CHOICES

if TYPE_CHECKING:
    from .parts import Parts

#: Set to anything but "" or "0" to print the traceback of every error (like ``--debug``).
DEBUG_ENV = "CMN_EDGE_DEBUG"
#: Exit status of an internal error (sysexits' EX_SOFTWARE); user errors exit 1, usage 2.
EXIT_INTERNAL = 70
#: Packages whose own exception classes, and whose ``raise`` statements, speak to the user.
PROJECT_PACKAGES = ("cmn_edge", "cmn_export")


class CliError(click.ClickException):
    def show(self, file=None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


_DEBUG_META = "cmn_edge.debug"


def _set_debug(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        ctx.meta[_DEBUG_META] = True  # ctx.meta is shared with every sub-command's context


def debug_option(func):
    """``--debug`` on a command group: print the traceback of any error."""
    return click.option(
        "--debug",
        is_flag=True,
        expose_value=False,
        callback=_set_debug,
        help=f"Print the full traceback of an error (same as {DEBUG_ENV}=1).",
    )(func)


def debug_enabled() -> bool:
    """``--debug`` on the command line or ``CMN_EDGE_DEBUG`` set."""
    if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
        return True
    ctx = click.get_current_context(silent=True)
    return ctx is not None and bool(ctx.meta.get(_DEBUG_META))


def _in_project(module: str) -> bool:
    return module.partition(".")[0] in PROJECT_PACKAGES


def _raised_on_purpose(exc: BaseException) -> bool:
    """Whether a ``raise`` statement in this project made ``exc`` (a message for the user).

    A ValueError from inside numpy, onnxruntime or an operator (a shape mismatch, a bad
    index) ends its traceback elsewhere, or on a line of ours that is not a ``raise``.
    """
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    frame = tb.tb_frame
    if not _in_project(str(frame.f_globals.get("__name__", ""))):
        return False
    line = linecache.getline(frame.f_code.co_filename, tb.tb_lineno, frame.f_globals)
    return line.lstrip().startswith("raise ")


def is_user_error(exc: BaseException) -> bool:
    """The user's input or the machine's state (one line), not a bug (a traceback)."""
    if isinstance(exc, OSError):  # missing file, no permission, full disk, read-only, ...
        return True
    if any(_in_project(cls.__module__) for cls in type(exc).__mro__):
        return True  # ImageError, ModelError, DatasetError, the index's, cmn_export's, ...
    return isinstance(exc, ValueError) and _raised_on_purpose(exc)


def error_message(exc: BaseException) -> str:
    """``<file>: <reason>`` on one line."""
    if isinstance(exc, OSError) and exc.strerror:
        if exc.filename is not None:
            second = f" -> {exc.filename2}" if exc.filename2 is not None else ""
            return f"{exc.filename}{second}: {exc.strerror}"
        return exc.strerror
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _program() -> str:
    """``cmn-edge`` or ``cmn-export``: the command the user typed."""
    ctx = click.get_current_context(silent=True)
    name = ctx.find_root().info_name if ctx is not None else None
    return name or "cmn-edge"


def _stdout_closed() -> bool:
    """Whether standard output is a pipe whose reader has gone (poll reports an error on
    its write end); where that cannot be asked, a broken pipe is taken to be stdout."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(event & select.POLLERR for _, event in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll (Windows), no stdout
        return True


def user_errors(func):
    """User errors -> ``error: <file>: <reason>``, exit 1; bugs -> a pointer to ``--debug``."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except BrokenPipeError as exc:
            if not _stdout_closed():
                raise CliError(error_message(exc)) from None  # a socket, not the reader
            # the reader went away (`| head`): stop quietly, as cat does, with SIGPIPE's
            # status; stdout goes to /dev/null so the exit's flush cannot fail again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(128 + 13)
        except Exception as exc:
            if debug_enabled():
                traceback.print_exception(exc, file=sys.stderr)
            if is_user_error(exc):
                raise CliError(error_message(exc)) from None
            program = _program()
            click.echo(
                f"internal error: {type(exc).__name__}: {error_message(exc)}\n"
                f"This is a bug in {program}; `{program} --debug ...` or {DEBUG_ENV}=1 prints "
                "the traceback.",
                err=True,
            )
            sys.exit(EXIT_INTERNAL)

    return wrapper


def parse_pairs(values: tuple[str, ...], option: str) -> list[tuple[str, str]]:
    """KEY=VALUE, split on the first '=' (keys and concept names never hold one; values may)."""
    pairs = []
    for value in values:
        key, sep, rest = value.partition("=")
        if not sep or not key.strip() or not rest.strip():
            raise CliError(f"{option} {value!r}: expected KEY=VALUE")
        pairs.append((key.strip(), rest.strip()))
    return pairs


def _split_concepts(values: tuple[str, ...]) -> list[str]:
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


#: The search's part options and, beside each, its CMN name (the same control on a CMN).
PART_OPTIONS = (
    ("exclude_part", "exclude_concept"),
    ("only_part", "only_concept"),
    ("part_weight", "concept_weight"),
)


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def concept_controls(options: Mapping[str, Any], parts: Parts) -> dict:
    """The search's raw options as ``search`` keywords (exclude, only, weights, renormalize,
    where): one reading for the local index and the PostgreSQL gallery.

    ``--exclude-part``/``--only-part``/``--part-weight`` name the model's parts (``parts``);
    the ``--*-concept`` options are their CMN names. On a model whose parts are not concepts
    (a DGML's groups) a ``--*-concept`` option is refused rather than guessed at: concept N
    there could mean dimension N or group N.
    """
    values: dict[str, list[str]] = {}
    for part_key, concept_key in PART_OPTIONS:
        given = tuple(options.get(concept_key) or ())
        if given and parts.noun != "concept":
            raise CliError(
                f"{_flag(concept_key)}: this model's parts are {parts.noun}s "
                f"({parts.head.upper()}, {parts.describe()}), not concepts; "
                f"use {_flag(part_key)}"
            )
        values[part_key] = [*given, *(options.get(part_key) or ())]
    weights = {}
    for key in ("concept_weight", "part_weight"):
        for name, value in parse_pairs(tuple(options.get(key) or ()), _flag(key)):
            try:
                weights[name] = float(value)
            except ValueError:
                raise CliError(f"{_flag(key)} {name}={value}: weight is not a number") from None
    return dict(
        exclude=_split_concepts(tuple(values["exclude_part"])),
        only=_split_concepts(tuple(values["only_part"])) or None,
        weights=weights or None,
        renormalize=bool(options.get("renormalize")),
        where=dict(parse_pairs(tuple(options.get("where") or ()), "--where")) or None,
    )


def part_options(func):
    """The search's part controls: --exclude-part, --only-part, --part-weight and their CMN
    names --exclude-concept, --only-concept, --concept-weight (one implementation for the
    local index and the PostgreSQL gallery)."""
    specs = [
        ("--concept-weight", "Weight a concept: I=W or NAME=W (CMN name of --part-weight)."),
        ("--only-concept", "Compare on these concepts only (CMN name of --only-part)."),
        ("--exclude-concept", "Concept index or name to ignore (CMN name of --exclude-part)."),
        ("--part-weight", "Weight a part (concept or DGML group): I=W or NAME=W."),
        (
            "--only-part",
            "Compare on these parts only (concepts, or a DGML model's groups; repeatable, "
            "or comma-separated).",
        ),
        (
            "--exclude-part",
            "Part to ignore: a concept, or a DGML model's group (its whole block), by id or "
            "name (repeatable, or comma-separated).",
        ),
    ]
    for flag, text in specs:
        func = click.option(flag, multiple=True, help=text)(func)
    return func


def query_item_id(query: str) -> int | None:
    """A search QUERY's item id (``id:17``, or ``17`` where no such file exists), or None for
    an image path, which must exist: the local and the PostgreSQL search read QUERY alike."""
    raw = query[3:] if query.startswith("id:") else query
    if query.startswith("id:") or (not os.path.exists(query) and raw.strip().isdigit()):
        if not raw.strip().isdigit():
            raise CliError(f"{query}: an item id must be a number (id:17)")
        return int(raw)
    if not os.path.exists(query):
        raise FileNotFoundError(f"{query}: no such image file (for an indexed item: id:N)")
    return None


def model_options(func):
    """--model, --precision, --threads, in that order on every command that embeds."""
    func = click.option("--threads", type=int, default=None, help="onnxruntime threads.")(func)
    func = click.option(
        "--precision",
        type=click.Choice(PRECISION_CHOICES),
        default="auto",
        show_default=True,
        help="auto: INT8 where this CPU's INT8 kernels keep FP32-level retrieval, else FP32.",
    )(func)
    func = click.option(
        "--model", default=None, help="Bundled model name or path to a CMN .onnx file."
    )(func)
    return func
