"""The prunekit command line. Commands are thin: parse options, call one library function, render.

Conventions every command follows:
- results on stdout, diagnostics on stderr; with `--json`, exactly one JSON document on stdout;
- a PrunekitError becomes `error: <message>` (one line) on stderr and its exit code (2, or 3 for the
  accuracy gate); any other exception is a bug and propagates (exit code 1, with its traceback);
- torch, torchvision, fvcore and onnx are imported inside commands, never here at module level, so that
  `prunekit --help` and `--version` stay fast.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Annotated, ParamSpec, TypeVar

import typer

from prunekit import __version__, render
from prunekit.errors import PrunekitError

P = ParamSpec("P")
R = TypeVar("R")

INSPECT = "Inspect"

app = typer.Typer(
    name="prunekit",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,  # bugs keep their plain traceback; user errors never get one
    context_settings={"help_option_names": ["-h", "--help"]},
)

# Options shared by several commands.
JsonOption = Annotated[
    bool, typer.Option("--json", help="Print one JSON document on stdout and nothing else there.")
]


def user_errors(command: Callable[P, R]) -> Callable[P, R]:
    """Decorate every command with this (under `@app.command`): a PrunekitError prints one line on
    stderr and exits with its exit code; anything else propagates as the bug it is."""

    @functools.wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except PrunekitError as err:
            message = " ".join(str(err).split()) or type(err).__name__
            print(f"error: {message}", file=sys.stderr, flush=True)
            raise typer.Exit(err.exit_code) from None

    return wrapper


def _print_version(value: bool) -> None:
    if value:
        print(f"prunekit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """Prune torchvision classifiers with learned channel gates, slim them physically, export ONNX.

    Every command takes --json (one JSON document on stdout). Exit codes: 0 success, 2 bad input,
    3 accuracy gate failed, 1 a bug in prunekit.
    """


@app.command("models", rich_help_panel=INSPECT)
@user_errors
def models_command(
    filter: Annotated[
        str | None, typer.Option("--filter", "-f", help="Only models whose name contains this.")
    ] = None,
    json_output: JsonOption = False,
) -> None:
    """List torchvision's classification models with their weights metadata (MACs, params, input size)."""
    from prunekit.models import model_catalog

    rows = model_catalog(filter)
    if json_output:
        render.emit_json({"models": rows})
        return
    if not rows:
        render.note(f"no classification model name contains {filter!r}")
    render.render_models(rows)


@app.command("report", rich_help_panel=INSPECT)
@user_errors
def report_command(
    target: Annotated[
        str, typer.Argument(help="A torchvision model name (see `prunekit models`) or an .onnx file.")
    ],
    weights: Annotated[
        str | None,
        typer.Option(
            help="torchvision weights (DEFAULT, IMAGENET1K_V1, ...) from the hub cache, or a state_dict file."
        ),
    ] = None,
    num_classes: Annotated[
        int | None, typer.Option(min=1, help="Classifier outputs (default: from the weights, else 1000).")
    ] = None,
    input_size: Annotated[
        int | None, typer.Option(min=8, help="Square input side in pixels (default: the weights' crop size).")
    ] = None,
    depth: Annotated[int, typer.Option(min=0, help="Module depth of the per-module table (0: none).")] = 1,
    latency: Annotated[
        bool, typer.Option("--latency", help="Also time a batch-1 forward pass (median and p90 of 20).")
    ] = False,
    threads: Annotated[int, typer.Option(min=1, help="CPU threads for --latency.")] = 1,
    json_output: JsonOption = False,
) -> None:
    """Measure MACs and parameters (and latency) of a torchvision model or an ONNX file."""
    from prunekit.measure import report_target

    result = report_target(
        target,
        weights=weights,
        num_classes=num_classes,
        input_size=input_size,
        depth=depth,
        latency=latency,
        threads=threads,
    )
    if json_output:
        render.emit_json(result)
    else:
        render.render_report(result)


def main() -> None:
    """Console entry point (`prunekit`, `python -m prunekit`)."""
    app(prog_name="prunekit")


# The pipeline commands live in their own module; importing it registers them on `app`.
from prunekit import cli_stages  # noqa: E402,F401
