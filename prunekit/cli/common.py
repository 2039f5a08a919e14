"""What every command shares: the error wrapper, common options, Enum choices, value parsers."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Annotated, ParamSpec, TypeVar

import typer

from prunekit.errors import ConfigError, PrunekitError

P = ParamSpec("P")
R = TypeVar("R")

INSPECT = "Inspect"
PIPELINE = "Pipeline"

JsonOption = Annotated[
    bool, typer.Option("--json", help="Print one JSON document on stdout and nothing else there.")
]
OutOption = Annotated[Path, typer.Option("--output", "-o", help="Output file.", dir_okay=False)]
InputShapeOption = Annotated[
    str | None,
    typer.Option(
        "--input-shape",
        help="Input shape C,H,W of one example, or one side length for 3 x S x S (default: the weights').",
    ),
]


ModelArgOption = Annotated[
    list[str] | None,
    typer.Option(
        "--model-arg",
        help="NAME=VALUE for the model's factory (repeatable), e.g. --model-arg depth=20.",
    ),
]
SourceOption = Annotated[
    str | None,
    typer.Option(
        "--model",
        help="The model source of a checkpoint of your own model (module:factory or file.py:factory): "
        "prunekit imports no code a file names.",
    ),
]


def model_args(values: list[str] | None) -> dict:
    from prunekit.config import parse_model_arg

    return dict(parse_model_arg(v) for v in values or [])


class Export(StrEnum):
    onnx = "onnx"
    none = "none"


class Device(StrEnum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


def is_primary_process() -> bool:
    """Rank 0 under torchrun (or the only process): the one that prints results and progress."""
    return os.environ.get("RANK", "0") == "0"


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


def input_shape(text: str | None) -> tuple[int, int, int] | None:
    from prunekit.config import parse_input_shape

    return None if text is None else parse_input_shape(text)


def numbers(text: str | None, option: str) -> tuple[float, ...] | None:
    """Comma-separated numbers, e.g. a per-channel --mean."""
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"{option} takes comma-separated numbers, e.g. 0.485,0.456,0.406") from None
