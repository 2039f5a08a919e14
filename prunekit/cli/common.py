"""What every command shares: the error wrapper, common options, Enum choices, value parsers."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, ParamSpec, TypeVar

import typer

from prunekit.errors import ConfigError, Interrupted, PrunekitError, Terminated

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


class Device(StrEnum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


def is_primary_process() -> bool:
    """Rank 0 under torchrun (or the only process): the one that prints results and progress."""
    return os.environ.get("RANK", "0") == "0"


def user_errors(command: Callable[P, R]) -> Callable[P, R]:
    """Decorate every command with this (under `@app.command`): a PrunekitError prints one line on
    stderr and exits with its exit code; Ctrl-C and SIGTERM are Interrupted (130, 143); a reader that
    closes the pipe early (`prunekit models | head`) ends the command quietly with 141, as a SIGPIPE
    would; anything else propagates as the bug it is (exit code 1)."""

    @functools.wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            with sigterm_as_interrupt():
                try:
                    return command(*args, **kwargs)
                except KeyboardInterrupt as exc:
                    raise Interrupted.of(exc) from None
        except PrunekitError as err:
            message = one_line(str(err)) or type(err).__name__
            if kwargs.get("json_output"):
                emit_error_document(command.__name__.removesuffix("_command"), message, err.exit_code)
            print(f"error: {message}", file=sys.stderr, flush=True)
            raise typer.Exit(err.exit_code) from None
        except BrokenPipeError:
            silence_stdout()
            raise typer.Exit(BROKEN_PIPE_EXIT) from None

    return wrapper


def emit_error_document(command: str, message: str, exit_code: int) -> None:
    """With --json, a command that fails still prints one document (unless it printed its own, as
    `run` does with what was done): the envelope and `error`."""
    from prunekit.cli import render

    if not render.EMITTED["document"] and is_primary_process():  # under torchrun: one document
        render.emit_json({"error": {"message": message, "exit_code": exit_code}}, command)


BROKEN_PIPE_EXIT = 141  # 128 + SIGPIPE: what a shell reports for a writer whose reader went away


def one_line(text: str) -> str:
    """`text` on one line. An error re-raised from a DataLoader worker carries the worker's traceback
    in its message; only the original message (its last line, without the exception's name) is kept."""
    if "Original Traceback" in text:
        last = [line for line in text.strip().splitlines() if line.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last and last.split(": ", 1)[0].endswith("Error") else last
    return " ".join(text.split())


def silence_stdout() -> None:
    """Point stdout at /dev/null, so that flushing what is still buffered for a closed pipe (at exit)
    raises nothing (the Python documentation's recipe for SIGPIPE)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def _main_thread_only(hook: Any) -> Any:
    def report(*exc_info: Any) -> None:
        if threading.current_thread() is threading.main_thread():
            hook(*exc_info)

    return report


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While a command runs, SIGTERM raises Terminated (a KeyboardInterrupt) in the main thread, so it
    saves and cleans up exactly as Ctrl-C does. Elsewhere (a non-main thread) signals stay as they are."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def ignore(signum: int, frame: Any) -> None:
        pass

    def handler(signum: int, frame: Any) -> None:
        # The clean-up that follows must not be interrupted again, nor turned into a crash by torch's
        # SIGCHLD handler seeing DataLoader workers that the same (process-group) SIGTERM ended. A
        # Python-level no-op, not SIG_IGN/SIG_DFL: a signal already pending when the handler changes
        # would otherwise make CPython raise "Signal 17 ignored due to race condition" (seen in CI).
        signal.signal(signal.SIGTERM, ignore)
        with contextlib.suppress(ValueError, OSError):
            signal.signal(signal.SIGCHLD, ignore)
        # The same SIGTERM ends the DataLoader workers, and multiprocessing's resource_sharer thread then
        # reports the broken connection through sys.excepthook: a thread's traceback under the one-line
        # error (seen in CI). The process is exiting; only the main thread's errors are still reported.
        sys.excepthook = _main_thread_only(sys.excepthook)
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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
