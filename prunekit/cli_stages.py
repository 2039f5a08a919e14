"""The pipeline commands: analyze, gate, finetune, slim, run, demo (registered on `prunekit.cli.app`).

Thin shells, like the rest of the CLI: parse, call one function of `prunekit.pipeline`, render.
Training progress goes to stderr (a rich bar on a terminal, one line per epoch otherwise, one JSON
line per epoch with --json); the result goes to stdout.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from prunekit import render
from prunekit.cli import JsonOption, app, user_errors

PIPELINE = "Pipeline"

OutOption = Annotated[Path, typer.Option("--output", "-o", help="Output file.", dir_okay=False)]


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


class _Progress:
    """Per-step progress bar on a terminal; per-epoch lines otherwise (JSON lines with --json)."""

    def __init__(self, json_lines: bool) -> None:
        self.json_lines = json_lines
        self.tty = sys.stderr.isatty() and not json_lines
        self.bar: Any = None
        self.task: Any = None
        self.steps = 0
        self.epochs = 0

    def start(self, info: dict[str, Any]) -> None:
        self.steps = int(info["steps_per_epoch"])
        line = (
            f"device {info['device']}{' (bf16 autocast)' if info['amp'] else ''}; "
            f"target {info['target_macs']:g} "
            f"of the MACs (t = {info['t']:.3f} of the gateable {info['gateable_fraction']:.3f}); baseline "
            f"val acc {_pct(info['baseline_val_acc'])}"
        )
        self._line({"event": "start", **info} if self.json_lines else line)
        if self.tty:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
                console=render.stderr_console(),
                transient=True,
            )
            self.bar.start()
            self.task = self.bar.add_task(f"epoch {info['start_epoch'] + 1}", total=self.steps, info="")

    def step(self, s: dict[str, float]) -> None:
        if self.bar is not None:
            state = "decided" if s["decided"] else f"B {s['b']:.3f}"
            self.bar.update(self.task, completed=int(s["step"]), info=f"loss {s['loss']:.3f} {state}")

    def epoch(self, m: Any) -> None:
        d = m.to_dict()
        if self.bar is not None:
            self.bar.reset(self.task, description=f"epoch {m.epoch + 1}")
        if self.json_lines:
            self._line({"event": "epoch", **d})
        else:
            self._line(
                f"epoch {m.epoch}: loss {m.loss:.4f} (ce {m.ce:.4f}, act {m.act_loss:.4f}) "
                f"train {_pct(m.train_acc)} "
                f"val {_pct(m.val_acc)} MACs {m.macs_fraction:.3f}{' decided' if m.decided else ''} "
                f"[{m.seconds:.0f}s, {m.images_per_s:.0f} img/s]"
            )

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()

    def _line(self, obj: Any) -> None:
        if self.bar is not None:
            self.bar.console.print(obj if isinstance(obj, str) else json.dumps(obj))
        else:
            print(
                obj if isinstance(obj, str) else json.dumps(render.to_jsonable(obj)),
                file=sys.stderr,
                flush=True,
            )


def _triple(text: str | None, option: str) -> tuple[float, float, float] | None:
    if text is None:
        return None
    from prunekit.errors import ConfigError

    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise ConfigError(f"{option} takes three comma-separated numbers, e.g. 0.485,0.456,0.406")
    return values  # type: ignore[return-value]


def _callbacks(progress: _Progress) -> Any:
    from prunekit.pipeline import FinetuneCallbacks

    return FinetuneCallbacks(on_start=progress.start, on_step=progress.step, on_epoch=progress.epoch)


# --------------------------------------------------------------------------------------------------


@app.command("analyze", rich_help_panel=PIPELINE)
@user_errors
def analyze_command(
    model: Annotated[str, typer.Argument(help="A torchvision model name.")],
    num_classes: Annotated[int | None, typer.Option(min=1, help="Classifier outputs.")] = None,
    input_size: Annotated[int | None, typer.Option(min=8, help="Square input side in pixels.")] = None,
    json_output: JsonOption = False,
) -> None:
    """Show the coupled channel groups, the prunable share of the MACs and why anything is frozen."""
    from prunekit.graph import analyze
    from prunekit.measure import count_macs
    from prunekit.models import check_runs, example_input, load_model

    loaded = load_model(model, num_classes=num_classes)
    x = example_input(loaded, input_size=input_size)
    check_runs(loaded.model, loaded.arch, x)
    graph = analyze(loaded.model, x)
    macs = count_macs(loaded.model, x).total_macs
    summary = graph.summary() | {
        "model": loaded.arch,
        "macs": macs,
        "prunable_fraction": graph.prunable_macs / max(1, macs),
    }
    if json_output:
        render.emit_json(summary)
        return
    out = render.console()
    table = Table(title=f"{loaded.arch}: {len(graph.groups)} coupled channel groups", title_justify="left")
    for col, just in (
        ("group (first producer)", "left"),
        ("channels", "right"),
        ("units", "right"),
        ("producers", "right"),
        ("consumers", "right"),
        ("MACs depending", "right"),
    ):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    for g in graph.groups:
        table.add_row(
            g.name,
            str(g.channels),
            str(g.units),
            str(len(g.producers)),
            str(len(g.consumers)),
            render.human(g.macs),
        )
    out.print(table)
    out.print(
        f"MACs {render.human(macs)}; {100 * summary['prunable_fraction']:.1f}% depend on prunable channels"
    )
    for f in graph.frozen:
        out.print(f"frozen: {f.where}: {f.reason}", style="dim")


@app.command("gate", rich_help_panel=PIPELINE)
@user_errors
def gate_command(
    model: Annotated[str, typer.Argument(help="A torchvision model name (see `prunekit models`).")],
    output: OutOption,
    weights: Annotated[
        str | None, typer.Option(help="torchvision weights name (hub cache) or a state_dict file.")
    ] = None,
    num_classes: Annotated[
        int | None, typer.Option(min=1, help="Classifier outputs (new head if it differs).")
    ] = None,
    input_size: Annotated[int | None, typer.Option(min=8, help="Square input side in pixels.")] = None,
    granularity: Annotated[int, typer.Option(min=1, help="Channels per gate.")] = 8,
    min_keep: Annotated[
        float, typer.Option(min=0.0, max=0.95, help="Fraction of each group always kept.")
    ] = 0.5,
    mean: Annotated[
        str | None, typer.Option(help="Input normalisation mean R,G,B (default: the weights').")
    ] = None,
    std: Annotated[str | None, typer.Option(help="Input normalisation std R,G,B.")] = None,
    seed: Annotated[
        int, typer.Option(help="Seed for any random initialisation (no weights, a new head).")
    ] = 0,
    json_output: JsonOption = False,
) -> None:
    """Insert learnable Gumbel channel gates into a model and write the gated checkpoint."""
    from prunekit.gates import GateConfig
    from prunekit.pipeline import gate_stage

    result = gate_stage(
        model,
        output,
        weights=weights,
        num_classes=num_classes,
        input_size=input_size,
        config=GateConfig(granularity=granularity, min_keep=min_keep),
        mean=_triple(mean, "--mean"),
        std=_triple(std, "--std"),
        seed=seed,
    )
    if json_output:
        render.emit_json(result)
        return
    out = render.console()
    out.print(
        f"{result['arch']}: {render.human(result['macs'])} MACs, {render.human(result['params'])} params "
        f"at {result['input_size']} px, {result['num_classes']} classes"
    )
    out.print(
        f"{result['groups']} channel groups, {result['gates']} gates of {result['granularity']} channels "
        f"({result['learnable_gates']} learnable); "
        f"{100 * result['gateable_fraction']:.1f}% of the MACs are gateable"
    )
    out.print(f"wrote {result['output']}")


@app.command("finetune", rich_help_panel=PIPELINE)
@user_errors
def finetune_command(
    gated: Annotated[Path, typer.Argument(help="Checkpoint written by `prunekit gate`.")],
    output: OutOption,
    data: Annotated[str, typer.Option(help="ImageFolder root (train/ + val/ or test/), or `builtin`.")] = "",
    target_macs: Annotated[
        float | None, typer.Option(help="Fraction of the model's MACs to keep, e.g. 0.5.")
    ] = None,
    epochs: Annotated[int, typer.Option(min=1)] = 3,
    batch_size: Annotated[int, typer.Option(min=1)] = 64,
    lr: Annotated[float, typer.Option(help="Weights: SGD learning rate (cosine decay).")] = 0.01,
    gate_lr: Annotated[float, typer.Option(help="Gate logits: Adam learning rate.")] = 0.05,
    weight_decay: Annotated[float, typer.Option(min=0.0)] = 1e-4,
    lam: Annotated[float, typer.Option("--lambda", min=0.0, help="Weight of the activation loss.")] = 5.0,
    tau: Annotated[float, typer.Option(help="Gumbel-softmax temperature.")] = 1.0,
    tau_end: Annotated[float | None, typer.Option(help="Anneal tau to this by the decision point.")] = None,
    one_sided: Annotated[
        bool, typer.Option("--one-sided", help="Penalise only MACs above the target.")
    ] = False,
    decide_at: Annotated[
        float, typer.Option(help="Share of training after which gate decisions are fixed.")
    ] = 0.2,
    distill: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Distillation weight from the ungated model.")
    ] = 0.7,
    bn_recalibrate: Annotated[
        int, typer.Option(min=0, help="Batches to re-estimate BatchNorm before eval.")
    ] = 0,
    workers: Annotated[int, typer.Option(min=0)] = 2,
    seed: Annotated[int, typer.Option()] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    amp: Annotated[bool, typer.Option("--amp/--no-amp", help="bfloat16 autocast on CUDA.")] = True,
    max_steps: Annotated[int | None, typer.Option(min=1, help="Cap on steps per epoch (quick runs).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run saved at --output.")] = False,
    json_output: JsonOption = False,
) -> None:
    """Train the gates toward a MACs target (and the weights with them); checkpoint every epoch."""
    from prunekit.errors import ConfigError
    from prunekit.finetune import FinetuneConfig
    from prunekit.pipeline import finetune_stage

    if not data:
        raise ConfigError("--data is required (an ImageFolder root, or `builtin`)")
    if not resume and target_macs is None:
        raise ConfigError("--target-macs is required, e.g. --target-macs 0.5 to keep half the MACs")
    config = FinetuneConfig(
        target_macs=0.5 if target_macs is None else target_macs,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        gate_lr=gate_lr,
        weight_decay=weight_decay,
        lam=lam,
        tau=tau,
        tau_end=tau_end,
        one_sided=one_sided,
        decide_at=decide_at,
        distill=distill,
        bn_recalibrate=bn_recalibrate,
        workers=workers,
        seed=seed,
        device=device,
        amp=amp,
        max_steps_per_epoch=max_steps,
    )
    progress = _Progress(json_output)
    try:
        result = finetune_stage(gated, data, output, config, resume=resume, callbacks=_callbacks(progress))
    finally:
        progress.stop()
    if json_output:
        render.emit_json(result)
        return
    f = result["final"]
    render.console().print(
        f"val acc {_pct(f['val_acc'])} (baseline {_pct(result['baseline_val_acc'])}) "
        f"at {f['macs_fraction']:.3f} "
        f"of the MACs ({render.human(result['expected_macs'])} of {render.human(result['macs_before'])}); "
        f"wrote {result['output']}" + (f", best {result['best']}" if result["best"] else "")
    )


@app.command("slim", rich_help_panel=PIPELINE)
@user_errors
def slim_command(
    checkpoint: Annotated[
        Path, typer.Argument(help="Fine-tuned (gated) checkpoint, or any prunekit checkpoint with --plan.")
    ],
    output: OutOption,
    export: Annotated[
        str, typer.Option(help="onnx (write ONNX at -o, checkpoint beside it) or none.")
    ] = "onnx",
    plan: Annotated[Path | None, typer.Option(help="Slim by this plan JSON instead of the gates.")] = None,
    data: Annotated[
        str | None, typer.Option(help="Verify and measure accuracy on this data (else random inputs).")
    ] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset.")] = 18,
    latency: Annotated[bool, typer.Option("--latency", help="Time original vs slim in onnxruntime.")] = False,
    threads: Annotated[int, typer.Option(min=1, help="Threads for --latency.")] = 2,
    save_plan: Annotated[Path | None, typer.Option(help="Also write the channel plan as JSON here.")] = None,
    slim_checkpoint: Annotated[
        Path | None, typer.Option("--checkpoint", help="Where to write the slim checkpoint.")
    ] = None,
    json_output: JsonOption = False,
) -> None:
    """Remove the pruned channels physically, verify the result, export and check ONNX."""
    from prunekit.pipeline import slim_stage

    result = slim_stage(
        checkpoint,
        output,
        export=export,
        plan_file=plan,
        data=data,
        opset=opset,
        latency=latency,
        threads=threads,
        checkpoint_out=slim_checkpoint,
        plan_out=save_plan,
    )
    if json_output:
        render.emit_json(result)
        return
    render_slim(result)


def render_slim(result: dict[str, Any]) -> None:
    out = render.console()
    table = Table(title="original vs slimmed", title_justify="left")
    for col in ("", "original", "slimmed", "ratio"):
        table.add_column(col, justify="right" if col else "left")
    o, s = result["original"], result["slim"]
    table.add_row("MACs", render.human(o["macs"]), render.human(s["macs"]), f"{result['macs_ratio']:.3f}")
    table.add_row(
        "params", render.human(o["params"]), render.human(s["params"]), f"{result['params_ratio']:.3f}"
    )
    acc = result.get("accuracy")
    if acc:
        table.add_row("val accuracy", _pct(acc.get("original")), _pct(acc["slim"]), "")
    lat = result.get("latency")
    if lat:
        table.add_row(
            f"onnxruntime ms ({lat['threads']} thr)",
            f"{lat['original_ms']:.2f}",
            f"{lat['slim_ms']:.2f}",
            f"{lat['slim_ms'] / lat['original_ms']:.3f}",
        )
    out.print(table)
    p = result["parity"]
    out.print(f"slim vs gated: max |diff| {p['max_abs_diff']:.2e} (tolerance {p['tolerance']:.2e})")
    if "onnx" in result:
        x = result["onnx"]
        out.print(
            f"ONNX opset {x['opset']} ({x['exporter']}): "
            f"onnxruntime vs PyTorch max |diff| {x['max_abs_diff']:.2e} "
            f"at batch {x['verify_batch']}; wrote {x['path']}"
        )
    out.print(f"wrote {result['checkpoint']}")
    widths = Table(title="channel widths per group", title_justify="left")
    for col in ("group", "before", "after"):
        widths.add_column(col, justify="left" if col == "group" else "right")
    for w in result["widths"]:
        widths.add_row(w["group"], str(w["before"]), str(w["after"]))
    out.print(widths)
    out.print(render.MACS_NOTE, style="dim")


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
    data: Annotated[str | None, typer.Option(help="Override [finetune] data.")] = None,
    target_macs: Annotated[float | None, typer.Option(help="Override [finetune] target_macs.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Override [finetune] epochs.")] = None,
    json_output: JsonOption = False,
) -> None:
    """Run gate -> finetune -> slim -> export from one config file; write report.json (for CI)."""
    from prunekit.config import load_run_config
    from prunekit.pipeline import run_pipeline

    cfg = load_run_config(
        config,
        {
            "ci.max_accuracy_drop": max_accuracy_drop,
            "finetune.data": data,
            "finetune.target_macs": target_macs,
            "finetune.epochs": epochs,
        },
    )
    _run_and_render(lambda cb, st: run_pipeline(cfg, out_dir, cb, st), json_output)


@app.command("demo", rich_help_panel=PIPELINE)
@user_errors
def demo_command(
    out_dir: Annotated[Path, typer.Option("--out-dir", "-o", help="Run directory.")] = Path("demo-run"),
    pretrain_epochs: Annotated[int, typer.Option(min=1, help="Epochs to train the demo model first.")] = 8,
    finetune_epochs: Annotated[int, typer.Option(min=1)] = 3,
    json_output: JsonOption = False,
) -> None:
    """The whole job offline on the built-in data: train resnet18, gate, fine-tune, slim, export."""
    from prunekit.demo import run_demo

    def pre(e: dict[str, Any]) -> None:
        print(
            json.dumps({"event": "pretrain", **e})
            if json_output
            else f"pretrain epoch {e['epoch']}: val {_pct(e['val_acc'])}",
            file=sys.stderr,
            flush=True,
        )

    _run_and_render(
        lambda cb, st: run_demo(
            out_dir,
            pretrain_epochs=pretrain_epochs,
            finetune_epochs=finetune_epochs,
            on_pretrain=pre,
            callbacks=cb,
            on_stage=st,
        ),
        json_output,
    )


def _run_and_render(job: Any, json_output: bool) -> None:
    progress = _Progress(json_output)

    def stage(name: str, result: dict[str, Any]) -> None:
        if json_output:
            print(json.dumps({"event": "stage", "stage": name}), file=sys.stderr, flush=True)
        else:
            print(f"stage {name}: done", file=sys.stderr, flush=True)

    try:
        report = job(_callbacks(progress), stage)
    finally:
        progress.stop()
    if json_output:
        render.emit_json(report)
        return
    render_slim(report["slim"])
    s = report["summary"]
    drop = s["accuracy_drop_points"]
    render.console().print(
        f"accuracy {_pct(s['accuracy_before'])} -> {_pct(s['accuracy_after'])} "
        f"({abs(drop):.2f} points {'lost' if drop >= 0 else 'gained'}), "
        f"MACs x{s['macs_ratio']:.3f}; report: {report['files']['report']}"
    )
