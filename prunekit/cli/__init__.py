"""The prunekit command line. Commands are thin: parse options, call one library function, render.

Conventions every command follows:
- results on stdout, diagnostics on stderr; with `--json`, exactly one JSON document on stdout;
- a PrunekitError becomes `error: <message>` (one line) on stderr and its exit code (2, or 3 for the
  accuracy gate); any other exception is a bug and propagates (exit code 1, with its traceback);
- torch, torchvision, fvcore and onnx are imported inside commands, never at module level, so that
  `prunekit --help` and `--version` stay fast.

Layout (Typer's one-file-per-command-group guide): `inspect` and `pipeline` each own a Typer app that
this root merges with `add_typer`; they import `common` and `render`, never this module.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from prunekit import __version__
from prunekit.cli import inspect, pipeline
from prunekit.cli.common import BROKEN_PIPE_EXIT, emit_error_document, one_line, silence_stdout


class OneLineErrors(TyperGroup):
    """Click's own usage errors (an out-of-range `--granularity 0`, an unknown option, a bad choice) in
    prunekit's format: one `error:` line on stderr and exit code 2, instead of a multi-line box."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        _bare_flags(self)
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        from prunekit.cli import render

        render.EMITTED["document"] = False  # per invocation (tests run many in one process)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except SystemExit as exc:
            if isinstance(exc.__context__, BrokenPipeError):  # Typer/rich printing help into a closed pipe
                silence_stdout()
                sys.exit(BROKEN_PIPE_EXIT)
            raise
        except typer.Abort:  # Ctrl-C while Click itself was reading input
            print("error: interrupted", file=sys.stderr, flush=True)
            sys.exit(130)
        except typer.TyperException as exc:  # Typer's (vendored) Click errors: usage and bad values
            ctx = getattr(exc, "ctx", None)
            where = f" (see {ctx.command_path} --help)" if ctx is not None else ""
            message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
            text = f"{one_line(message)}{where}"
            argv = sys.argv[1:] if args is None else list(args)
            if "--json" in argv and ctx is not None:  # the one document, also for a usage error
                command = ctx.info_name if ctx.parent is not None else "prunekit"
                emit_error_document(command, text, getattr(exc, "exit_code", 2))
            print(f"error: {text}", file=sys.stderr, flush=True)
            sys.exit(getattr(exc, "exit_code", 2))
        sys.exit(code if isinstance(code, int) else 0)


def _bare_flags(group: TyperGroup) -> None:
    """Flags (`--json`, `--resume`, ...) take no value: show none in --help, instead of Typer's `<bool>`."""
    commands = [group, *group.commands.values()]
    for command in commands:
        for param in command.params:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""


app = typer.Typer(
    name="prunekit",
    cls=OneLineErrors,
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish, PowerShell
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,  # bugs keep their plain traceback; user errors never get one
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(inspect.app)
app.add_typer(pipeline.app)


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
    """Prune classifiers (torchvision, timm, your own) with learned channel gates, slim them, export ONNX.

    Every command takes --json (one JSON document on stdout, docs/json-schema.md). Exit codes: 0 success,
    2 bad input, 3 accuracy gate failed, 130 interrupted, 143 terminated (SIGTERM), 141 stdout closed,
    1 a bug in prunekit (docs/robustness.md).
    """


def main() -> None:
    """Console entry point (`prunekit`, `python -m prunekit`)."""
    app(prog_name="prunekit")


__all__ = ["app", "main"]
