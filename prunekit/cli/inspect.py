"""The inspection commands: models, report, analyze. Nothing here trains or writes files."""

from __future__ import annotations

from typing import Annotated

import typer

from prunekit.cli import render
from prunekit.cli.common import (
    INSPECT,
    InputShapeOption,
    JsonOption,
    ModelArgOption,
    SourceOption,
    input_shape,
    model_args,
    user_errors,
)

app = typer.Typer()


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
        render.emit_json({"models": rows}, "models")
        return
    if not rows:
        render.note(f"no classification model name contains {filter!r}")
    render.render_models(rows)


@app.command("report", rich_help_panel=INSPECT)
@user_errors
def report_command(
    target: Annotated[
        str,
        typer.Argument(
            help="A model source (torchvision name, module:factory, file.py:factory, timm:NAME), a prunekit "
            "checkpoint or an .onnx file."
        ),
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
    shape: InputShapeOption = None,
    depth: Annotated[int, typer.Option(min=0, help="Module depth of the per-module table (0: none).")] = 1,
    latency: Annotated[
        bool, typer.Option("--latency", help="Also time a batch-1 forward pass (median and p90 of 20).")
    ] = False,
    threads: Annotated[int, typer.Option(min=1, help="CPU threads for --latency.")] = 1,
    model_arg: ModelArgOption = None,
    source: SourceOption = None,
    json_output: JsonOption = False,
) -> None:
    """Measure MACs and parameters (and latency) of a model, a checkpoint or an ONNX file."""
    from prunekit.stages.report import report_target

    result = report_target(
        target,
        weights=weights,
        num_classes=num_classes,
        input_shape=input_shape(shape),
        depth=depth,
        latency=latency,
        threads=threads,
        model_args=model_args(model_arg),
        source=source,
    )
    if json_output:
        render.emit_json(result, "report")
    else:
        render.render_report(result)


@app.command("analyze", rich_help_panel=INSPECT)
@user_errors
def analyze_command(
    model: Annotated[
        str,
        typer.Argument(help="A model source: torchvision name, module:factory, file.py:factory, timm:NAME."),
    ],
    num_classes: Annotated[int | None, typer.Option(min=1, help="Classifier outputs.")] = None,
    shape: InputShapeOption = None,
    model_arg: ModelArgOption = None,
    json_output: JsonOption = False,
) -> None:
    """Show the coupled channel groups, the prunable share of the MACs and why anything is frozen."""
    from prunekit.config import ModelSpec
    from prunekit.stages.report import analyze_model

    spec = ModelSpec(
        model, num_classes=num_classes, input_shape=input_shape(shape), model_args=model_args(model_arg)
    )
    report = analyze_model(spec)
    if json_output:
        render.emit_json(report.to_dict(), "analyze")
    else:
        render.render_analysis(report)
