"""The pipeline commands: gate, finetune, slim, run, demo. Thin shells: parse, call one stage, render.

Every default comes from the torch-free `prunekit.config` dataclasses, so none is written twice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from prunekit.cli import render
from prunekit.cli.common import (
    PIPELINE,
    Device,
    InputShapeOption,
    JsonOption,
    ModelArgOption,
    OutOption,
    SourceOption,
    input_shape,
    is_primary_process,
    model_args,
    numbers,
    user_errors,
)
from prunekit.cli.progress import Progress
from prunekit.config import FinetuneConfig, GateConfig, SlimConfig, defaults
from prunekit.errors import ConfigError, PrunekitError

app = typer.Typer()

G = defaults(GateConfig)
FT = defaults(FinetuneConfig)
SL = defaults(SlimConfig)
DEFAULT_DEVICE = Device(FT["device"])


@app.command("gate", rich_help_panel=PIPELINE)
@user_errors
def gate_command(
    model: Annotated[
        str,
        typer.Argument(
            help="A torchvision model name (see `prunekit models`), package.module:factory, "
            "path/to/file.py:factory, or timm:NAME."
        ),
    ],
    output: OutOption,
    weights: Annotated[
        str | None,
        typer.Option(
            help="torchvision weights name (hub cache) or a state_dict file.", rich_help_panel="Model"
        ),
    ] = None,
    model_arg: ModelArgOption = None,
    num_classes: Annotated[
        int | None,
        typer.Option(min=1, help="Classifier outputs (new head if it differs).", rich_help_panel="Model"),
    ] = None,
    shape: InputShapeOption = None,
    granularity: Annotated[
        int | None,
        typer.Option(
            min=1, help="Channels per gate [default: 8; 16 with --dynamic].", rich_help_panel="Gates"
        ),
    ] = G["granularity"],
    min_keep: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            max=0.95,
            help="Fraction of each group always kept [default: 0.05; 0.25 with --dynamic].",
            rich_help_panel="Gates",
        ),
    ] = G["min_keep"],
    dynamic: Annotated[
        bool,
        typer.Option(
            "--dynamic",
            help="Input-dependent gates (conditional computation): per residual block, a small gate "
            "network decides from the block's input which of its internal channels each example uses.",
            rich_help_panel="Gates",
        ),
    ] = G["dynamic"],
    importance: Annotated[
        str,
        typer.Option(
            help="How channels are ranked within a group: l1 (group L1 magnitude of the weights they "
            "touch), bn (BatchNorm scale) or taylor (group first-order Taylor |weight x gradient| of "
            "the loss on a few batches of --data).",
            rich_help_panel="Gates",
        ),
    ] = G["importance"],
    importance_batches: Annotated[
        int,
        typer.Option(
            min=1,
            help="--importance taylor: training batches (of 64) to take gradients on.",
            rich_help_panel="Gates",
        ),
    ] = G["importance_batches"],
    data: Annotated[
        str | None,
        typer.Option(
            help="--importance taylor: training data, an ImageFolder root or `builtin`.",
            rich_help_panel="Gates",
        ),
    ] = None,
    mean: Annotated[
        str | None,
        typer.Option(
            help="Input normalisation mean per channel, e.g. 0.485,0.456,0.406.", rich_help_panel="Model"
        ),
    ] = None,
    std: Annotated[
        str | None, typer.Option(help="Input normalisation std per channel.", rich_help_panel="Model")
    ] = None,
    seed: Annotated[
        int,
        typer.Option(
            help="Seed for any random initialisation (no weights, a new head).", rich_help_panel="Model"
        ),
    ] = 0,
    json_output: JsonOption = False,
) -> None:
    """Insert learnable Gumbel channel gates into a model and write the gated checkpoint."""
    from prunekit.config import ModelSpec
    from prunekit.stages.gate import gate_stage

    spec = ModelSpec(
        model,
        weights=weights,
        num_classes=num_classes,
        input_shape=input_shape(shape),
        mean=numbers(mean, "--mean"),
        std=numbers(std, "--std"),
        model_args=model_args(model_arg),
    )
    config = GateConfig(
        granularity=granularity,
        min_keep=min_keep,
        importance=importance,
        importance_batches=importance_batches,
        dynamic=dynamic,
    )
    result = gate_stage(spec, output, config=config, seed=seed, data=data).to_dict() | {"output": str(output)}
    if json_output:
        render.emit_json(result, "gate")
    else:
        render.render_gate(result, str(output))


# finetune option name -> FinetuneConfig field, where they differ (one name per option: none now)
_FINETUNE_FIELDS: dict[str, str] = {}


@app.command("finetune", rich_help_panel=PIPELINE)
@user_errors
def finetune_command(
    ctx: typer.Context,
    gated: Annotated[Path, typer.Argument(help="Checkpoint written by `prunekit gate`.")],
    output: OutOption,
    data: Annotated[
        str,
        typer.Option(help="ImageFolder root (train/ + val/ or test/), or `builtin`.", rich_help_panel="Data"),
    ] = "",
    target_macs: Annotated[
        float | None,
        typer.Option(help="Fraction of the model's MACs to keep, e.g. 0.5.", rich_help_panel="Objective"),
    ] = None,
    target_latency: Annotated[
        str | None,
        typer.Option(
            help="A latency budget instead: a fraction of the original's onnxruntime CPU latency at "
            "batch 1 (0.5) or milliseconds (12ms). Per-layer latencies are measured on this machine once "
            "and saved beside -o (.latency.json).",
            rich_help_panel="Objective",
        ),
    ] = None,
    epochs: Annotated[int, typer.Option(min=1, rich_help_panel="Optimisation")] = FT["epochs"],
    batch_size: Annotated[
        int,
        typer.Option(
            min=1,
            help="Examples per step and per process (under torchrun: x processes).",
            rich_help_panel="Optimisation",
        ),
    ] = FT["batch_size"],
    lr: Annotated[
        float, typer.Option(help="Weights: SGD learning rate (cosine decay).", rich_help_panel="Optimisation")
    ] = FT["lr"],
    gate_lr: Annotated[
        float, typer.Option(help="Gate logits: Adam learning rate.", rich_help_panel="Optimisation")
    ] = FT["gate_lr"],
    weight_decay: Annotated[float, typer.Option(min=0.0, rich_help_panel="Optimisation")] = FT[
        "weight_decay"
    ],
    lam: Annotated[
        float,
        typer.Option("--lambda", min=0.0, help="Weight of the activation loss.", rich_help_panel="Objective"),
    ] = FT["lam"],
    tau: Annotated[float, typer.Option(help="Gumbel-softmax temperature.", rich_help_panel="Objective")] = FT[
        "tau"
    ],
    tau_end: Annotated[
        float | None,
        typer.Option(help="Anneal tau to this by the decision point.", rich_help_panel="Objective"),
    ] = FT["tau_end"],
    one_sided: Annotated[
        bool,
        typer.Option("--one-sided", help="Penalise only MACs above the target.", rich_help_panel="Objective"),
    ] = FT["one_sided"],
    decide_at: Annotated[
        float,
        typer.Option(
            help="Share of training after which gate decisions are fixed.", rich_help_panel="Objective"
        ),
    ] = FT["decide_at"],
    method: Annotated[
        str,
        typer.Option(
            help="sensitivity (each group's width from its measured cost on a few training batches), "
            "gumbel (learned gates), magnitude (the same fraction of every group by the gate ranking: "
            "a baseline) or auto (sensitivity for static gates, gumbel for dynamic ones). sensitivity "
            "and magnitude decide before the first step.",
            rich_help_panel="Objective",
        ),
    ] = FT["method"],
    sensitivity_batches: Annotated[
        int,
        typer.Option(
            min=1,
            help="--method sensitivity: training batches its measurement runs on.",
            rich_help_panel="Objective",
        ),
    ] = FT["sensitivity_batches"],
    uniform_floor: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Every group keeps at least this share of what a uniform cut to the same budget keeps "
            "it; the gates learn the rest (0: off).",
            rich_help_panel="Objective",
        ),
    ] = FT["uniform_floor"],
    allocation: Annotated[
        str,
        typer.Option(
            help="learned (the gates decide how many channels each group keeps) or uniform (each group "
            "keeps a uniform cut's count; the gates choose which).",
            rich_help_panel="Objective",
        ),
    ] = FT["allocation"],
    gate_optimizer: Annotated[
        str,
        typer.Option(
            help="adam (per-gate Adam) or shared-adam (one step scale for all gates).",
            rich_help_panel="Objective",
        ),
    ] = FT["gate_optimizer"],
    gate_phase: Annotated[
        str,
        typer.Option(
            help="Until the decision: joint (weights and gates train together) or frozen (only the "
            "gates train, on the pretrained weights).",
            rich_help_panel="Objective",
        ),
    ] = FT["gate_phase"],
    distill: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Distillation weight from the ungated model.",
            rich_help_panel="Optimisation",
        ),
    ] = FT["distill"],
    bn_recalibrate: Annotated[
        int,
        typer.Option(
            min=0, help="Batches to re-estimate BatchNorm before eval.", rich_help_panel="Optimisation"
        ),
    ] = FT["bn_recalibrate"],
    workers: Annotated[int, typer.Option(min=0, rich_help_panel="Data")] = FT["workers"],
    seed: Annotated[int, typer.Option(rich_help_panel="Optimisation")] = FT["seed"],
    device: Annotated[
        Device, typer.Option(help="Where to train.", rich_help_panel="Runtime")
    ] = DEFAULT_DEVICE,
    amp: Annotated[
        bool, typer.Option("--amp/--no-amp", help="bfloat16 autocast on CUDA.", rich_help_panel="Runtime")
    ] = FT["amp"],
    sync_bn: Annotated[
        bool,
        typer.Option(
            "--sync-bn",
            help="Under torchrun on CUDA: BatchNorm statistics over all processes.",
            rich_help_panel="Runtime",
        ),
    ] = FT["sync_bn"],
    max_steps_per_epoch: Annotated[
        int | None,
        typer.Option(min=1, help="Cap on steps per epoch (quick runs).", rich_help_panel="Optimisation"),
    ] = FT["max_steps_per_epoch"],
    strict_data: Annotated[
        bool,
        typer.Option(
            "--strict-data",
            help="Image files that do not decode are an error (checked by decoding every file before "
            "training); by default they are skipped with a warning.",
            rich_help_panel="Data",
        ),
    ] = FT["strict_data"],
    source: SourceOption = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue the run saved at --output. Only --epochs (more), --workers, --device and --amp "
            "may change; any other option that differs from the saved run is an error.",
            rich_help_panel="Runtime",
        ),
    ] = False,
    tensorboard: TensorboardOption = None,
    json_output: JsonOption = False,
) -> None:
    """Train the gates toward a MACs target (and the weights with them); checkpoint every epoch."""

    if not data:
        raise ConfigError("--data is required (an ImageFolder root, or `builtin`)")
    values = {
        k: v for k, v in ctx.params.items() if k in {"target_macs", "target_latency", *FT, *_FINETUNE_FIELDS}
    }
    values["device"] = device.value
    fields = {_FINETUNE_FIELDS.get(k, k): v for k, v in values.items()}
    if resume:
        given = {_FINETUNE_FIELDS.get(k, k): v for k, v in values.items() if _given(ctx, k)}
        config, overrides = None, given
    else:
        if target_macs is None and target_latency is None:
            raise ConfigError(
                "--target-macs is required, e.g. --target-macs 0.5 to keep half the MACs "
                "(or --target-latency 0.5 for half the latency)"
            )
        if target_macs is not None and target_latency is not None:
            raise ConfigError("give --target-macs or --target-latency, not both")
        config, overrides = FinetuneConfig(**fields), None
    # the first line, before importing torch and loading anything (a CI log shows life within a second)
    progress = Progress(json_output, quiet=not is_primary_process())
    progress.begin("finetune", f"{'resuming ' + str(output) if resume else str(gated)} on {data}")
    board = None
    try:
        from prunekit.stages.finetune import finetune_stage

        callbacks, board = _with_tensorboard(progress.callbacks(), tensorboard)
        result = finetune_stage(
            gated,
            data,
            output,
            config,
            resume=resume,
            overrides=overrides,
            callbacks=callbacks,
            source=source,
        ).to_dict()
    finally:
        progress.stop()
        if board is not None:
            board.close()
    if not is_primary_process():
        return
    if json_output:
        render.emit_json(result, "finetune")
    else:
        render.render_finetune(result)


TensorboardOption = Annotated[
    Path | None,
    typer.Option(
        "--tensorboard",
        help="Also log the training curve as TensorBoard scalars in this directory (extra: tensorboard).",
        file_okay=False,
    ),
]


def _with_tensorboard(callbacks: Any, logdir: Path | None) -> tuple[Any, Any]:
    """`callbacks` plus a TensorBoard writer's when --tensorboard is given (checked before any work)."""
    if logdir is None or not is_primary_process():
        return callbacks, None
    from prunekit.tensorboard_log import TensorboardLog

    board = TensorboardLog(logdir)
    return callbacks.also(board.callbacks()), board


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether the user set option `name` (on the command line or through the environment)."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name != "DEFAULT"  # compared by name: Typer vendors Click


@app.command("slim", rich_help_panel=PIPELINE)
@user_errors
def slim_command(
    checkpoint: Annotated[
        Path, typer.Argument(help="Fine-tuned (gated) checkpoint, or any prunekit checkpoint with --plan.")
    ],
    output: OutOption,
    export: Annotated[
        str,
        typer.Option(
            help="onnx, pt2 (a torch.export program), onnx,pt2 or none. The first is written at -o, "
            "a second beside it (model.onnx + model.pt2); the slim checkpoint goes beside them (.pt).",
            rich_help_panel="Export",
        ),
    ] = SL["export"],
    quantize: Annotated[
        str | None,
        typer.Option(
            help="Also write quantised ONNX copies: int8 (static, QDQ, calibrated on --data), fp16, or "
            "int8,fp16. Each is checked by top-1 accuracy against FP32 on --data. Needs --data.",
            rich_help_panel="Quantisation",
        ),
    ] = SL["quantize"],
    calibration_batches: Annotated[
        int,
        typer.Option(
            help="INT8: calibrate on this many batches of 32 images of the data's training split.",
            rich_help_panel="Quantisation",
        ),
    ] = SL["calibration_batches"],
    max_quantization_drop: Annotated[
        float | None,
        typer.Option(
            help="Fail with exit code 3 when a quantised copy loses more top-1 points than this "
            "against FP32 (the files are still written).",
            rich_help_panel="Quantisation",
        ),
    ] = SL["max_quantization_drop"],
    plan: Annotated[
        Path | None,
        typer.Option(help="Slim by this plan JSON instead of the gates.", rich_help_panel="Plan and checks"),
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(
            help="Verify and measure accuracy on this data (else random inputs).",
            rich_help_panel="Plan and checks",
        ),
    ] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset.", rich_help_panel="Export")] = SL["opset"],
    latency: Annotated[
        bool,
        typer.Option(
            "--latency",
            help="Time original vs slim (and quantised) ONNX in onnxruntime, interleaved, batch 1.",
            rich_help_panel="Latency",
        ),
    ] = SL["latency"],
    threads: Annotated[
        int, typer.Option(min=1, help="Threads for --latency.", rich_help_panel="Latency")
    ] = SL["threads"],
    save_plan: Annotated[
        Path | None, typer.Option(help="Also write the channel plan as JSON here.", rich_help_panel="Export")
    ] = None,
    slim_checkpoint: Annotated[
        Path | None,
        typer.Option("--checkpoint", help="Where to write the slim checkpoint.", rich_help_panel="Export"),
    ] = None,
    source: SourceOption = None,
    drop_never_on: Annotated[
        bool,
        typer.Option(
            "--drop-never-on",
            help="Dynamic gates: remove for good the channels no training image of --data turns on "
            "(changes the output of any input that would).",
            rich_help_panel="Plan and checks",
        ),
    ] = SL["drop_never_on"],
    json_output: JsonOption = False,
) -> None:
    """Remove the pruned channels physically, verify the result, export and check ONNX."""
    from prunekit.stages.slim import slim_stage

    config = SlimConfig(
        export=export,
        opset=opset,
        latency=latency,
        threads=threads,
        quantize=quantize,
        calibration_batches=calibration_batches,
        max_quantization_drop=max_quantization_drop,
        drop_never_on=drop_never_on,
    )
    result = slim_stage(
        checkpoint,
        output,
        config,
        plan_file=plan,
        data=data,
        checkpoint_out=slim_checkpoint,
        plan_out=save_plan,
        model_source=source,
    ).to_dict()
    if json_output:
        render.emit_json(result, "slim")
    elif "dynamic" in result:
        render.render_dynamic_slim(result)
    else:
        render.render_slim(result)


@app.command("run", rich_help_panel=PIPELINE)
@user_errors
def run_command(
    config: Annotated[Path, typer.Argument(help="TOML config (see examples/run.toml).")],
    out_dir: Annotated[Path, typer.Option("--out-dir", "-o", help="Run directory for every output.")] = Path(
        "runs/latest"
    ),
    max_accuracy_drop: Annotated[
        float | None, typer.Option(help="Fail (exit 3) beyond this many points.")
    ] = None,
    data: Annotated[str | None, typer.Option(help="Override data in the finetune section.")] = None,
    target_macs: Annotated[
        float | None, typer.Option(help="Override target_macs in the finetune section.")
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="Override epochs in the finetune section.")] = None,
    tensorboard: TensorboardOption = None,
    json_output: JsonOption = False,
) -> None:
    """Run gate -> finetune -> slim -> export from one config file; write report.json (for CI)."""
    from prunekit.config import load_run_config

    if tensorboard is not None:  # before any work: a missing extra is bad input, not a late failure
        from prunekit.tensorboard_log import check_available

        check_available()
    cfg = load_run_config(
        config,
        {
            "ci.max_accuracy_drop": max_accuracy_drop,
            "finetune.data": data,
            "finetune.target_macs": target_macs,
            "finetune.epochs": epochs,
        },
    )

    def job(progress: Progress) -> dict[str, Any]:
        from prunekit.stages.run import run_pipeline  # imports torch: after the first line

        callbacks, board = _with_tensorboard(progress.callbacks(), tensorboard)
        try:
            return run_pipeline(cfg, out_dir, callbacks, _stage(progress))
        finally:
            if board is not None:
                board.close()

    _run_and_render(job, json_output, "run", ("run", f"{config} into {out_dir} (config checked)"))


@app.command("demo", rich_help_panel=PIPELINE)
@user_errors
def demo_command(
    out_dir: Annotated[Path, typer.Option("--out-dir", "-o", help="Run directory.")] = Path("demo-run"),
    pretrain_epochs: Annotated[int, typer.Option(min=1, help="Epochs to train the demo model first.")] = 8,
    finetune_epochs: Annotated[int, typer.Option(min=1)] = 3,
    json_output: JsonOption = False,
) -> None:
    """The whole job offline on the built-in data: train resnet18, gate, fine-tune, slim, export."""
    from prunekit.stages.demo import run_demo

    _run_and_render(
        lambda progress: run_demo(
            out_dir,
            pretrain_epochs=pretrain_epochs,
            finetune_epochs=finetune_epochs,
            on_pretrain=lambda e: progress.event("pretrain", **e),
            callbacks=progress.callbacks(),
            on_stage=_stage(progress),
        ),
        json_output,
        "demo",
    )


def _stage(progress: Progress) -> Any:
    return lambda name, _result: progress.event("stage", stage=name)


def _run_and_render(job: Any, json_output: bool, command: str, begin: tuple[str, str] | None = None) -> None:
    """Run `job` and print its report. A run that stopped after its first stage began (a failed stage,
    the accuracy gate, an interrupt) still prints its document with --json, `summary.passed` false and
    `error` saying where and why, before the one-line error and the exit code."""
    progress = Progress(json_output)
    if begin is not None:
        progress.begin(*begin)
    try:
        report = job(progress)
    except PrunekitError as err:
        progress.stop()
        report = getattr(err, "report", None)
        if report is not None and json_output:
            render.emit_json(report, command)
        elif report is not None and report.get("slim") is not None:  # the accuracy gate: show the numbers
            render.render_run(report)
        raise
    finally:
        progress.stop()
    if json_output:
        render.emit_json(report, command)
    else:
        render.render_run(report)
