"""Output for people (rich tables on stdout) and for machines (one JSON document on stdout).

Every rich table of the CLI is drawn here (the progress bar lives in `cli.progress`). Nothing here
imports torch: the CLI imports this module at start-up. Diagnostics (progress, notes, errors) go to
stderr so that stdout stays parseable.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from prunekit.models import ModelInfo
    from prunekit.stages.report import AnalysisReport, TargetReport

# Off a terminal (pipes, CI logs, tests) rich would guess 80 columns; a fixed, wider width keeps tables
# on one line per row and identical from run to run.
NON_TTY_WIDTH = 100
MACS_NOTE = "MACs: multiply-accumulates of conv, linear and matmul layers (norms and pooling not counted)"
_PREFIXES = ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K"))


def console(file: TextIO | None = None) -> Console:
    """A console on `file` (default: the current sys.stdout): colour and terminal width only on a tty."""
    file = sys.stdout if file is None else file
    tty = hasattr(file, "isatty") and file.isatty()
    return _Console(file=file, width=None if tty else NON_TTY_WIDTH, highlight=False)


class _Console(Console):
    def print(self, *objects: Any, **kwargs: Any) -> None:
        # a line of text (a message, a path) is never broken across lines, so paths can be copied;
        # tables still fit the width, and notes are written short enough to fit
        if objects and all(isinstance(o, str) for o in objects):
            kwargs.setdefault("soft_wrap", True)
        super().print(*objects, **kwargs)

    def on_broken_pipe(self) -> None:
        # rich exits with 1 here, the code prunekit keeps for bugs; let the command's wrapper end it as
        # a closed pipe (exit code 141)
        raise BrokenPipeError()


def stderr_console() -> Console:
    return console(sys.stderr)


def human(n: float) -> str:
    """4111512576 -> '4.11 G', 25557032 -> '25.56 M', 512 -> '512'."""
    for scale, prefix in _PREFIXES:
        if abs(n) >= scale:
            return f"{n / scale:.2f} {prefix}"
    return f"{n:.0f}" if float(n).is_integer() else f"{n:.2f}"


def pct(x: float | None) -> str:
    """0.8132 -> '81.32%'; None -> '-'."""
    return "-" if x is None else f"{100 * x:.2f}%"


def pct_top5(top1: float | None, top5: float | None) -> str:
    """Top-1 with top-5 beside it: '81.32% (top-5 95.10%)'; without a top-5 (a document from before
    it was measured) top-1 alone."""
    return pct(top1) + ("" if top5 is None else f" (top-5 {pct(top5)})")


def percent(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def to_jsonable(obj: Any) -> Any:
    """Dataclasses, tuples, paths and mappings -> plain JSON types (dataclass fields keep their names)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None  # JSON has no NaN / Infinity
    return obj


EMITTED = {"document": False}  # whether this process printed its one document already


def emit_json(obj: Any, command: str, file: TextIO | None = None) -> None:
    """Write exactly one JSON document (and a newline) to stdout: `obj` after the envelope every
    document starts with, checked against the command's schema (prunekit.schema) first."""
    from prunekit.schema import envelope, validate

    file = sys.stdout if file is None else file
    head = envelope(command)
    document = head | {k: v for k, v in to_jsonable(obj).items() if k not in head}
    validate(command, document)  # a mismatch is a bug in prunekit: it raises before printing
    file.write(json.dumps(document, indent=2) + "\n")
    file.flush()
    EMITTED["document"] = True


def note(message: str) -> None:
    """A diagnostic line on stderr (never on stdout)."""
    print(message, file=sys.stderr, flush=True)


# -- tables ------------------------------------------------------------------------------------------------


def render_report(report: TargetReport, out: Console | None = None) -> None:
    """Summary of a `prunekit report`, then the per-module table when there is one."""
    out = out or console()
    summary = _Rows()
    summary.add_row("Target", report.target)
    if report.model is not None and report.model != report.target:
        summary.add_row("Architecture", report.model)
    if report.kind == "model":
        summary.add_row("Weights", report.weights or "none (random init)")
    if report.num_classes is not None:
        summary.add_row("Classes", str(report.num_classes))
    summary.add_row("Input", " x ".join(str(d) for d in report.input_shape))
    info = report.checkpoint
    dense = " (dense: every channel)" if info is not None and info.decided_macs is not None else ""
    summary.add_row("MACs", f"{human(report.macs)}  ({report.macs:,} per example){dense}")
    summary.add_row("Params", f"{human(report.params)}  ({report.params:,}){dense}")
    if info is not None:
        _checkpoint_rows(summary, info)
    if report.latency is not None:
        lat = report.latency
        summary.add_row(
            "Latency",
            f"{lat.median_ms:.2f} ms median, {lat.p90_ms:.2f} ms p90 "
            f"({report.latency_backend}, {lat.threads} thread{'s' if lat.threads > 1 else ''}, "
            f"{lat.repeats} runs)",
        )
    summary.print(out)
    if report.modules:
        out.print()
        out.print(module_table(report))
    out.print(MACS_NOTE, style="dim")


class _Rows:
    """Label-value lines, aligned like a two-column table but printed as plain lines, so that a long
    value (a path) is never wrapped (a table would break it to fit the width)."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str]] = []

    def add_row(self, label: str, value: str) -> None:
        self.rows.append((label, value))

    def print(self, out: Console) -> None:
        width = max((len(label) for label, _ in self.rows), default=0)
        for label, value in self.rows:
            first, *rest = value.split("\n") or [""]
            out.print(f"{label:<{width}}  {first}".rstrip(), highlight=False, markup=False)
            for line in rest:  # a multi-line value (the history) continues under its first line
                out.print(f"{'':<{width}}  {line}".rstrip(), highlight=False, markup=False)


def _checkpoint_rows(summary: _Rows, info: Any) -> None:  # CheckpointInfo
    summary.add_row("Stage", info.stage + (" (gate decisions fixed)" if info.decided else ""))
    if info.decided_macs is not None:
        of = f" = {info.decided_macs / info.original_macs:.3f} of the original" if info.original_macs else ""
        label = "Decided MACs" if info.decided else "MACs at decisions"
        summary.add_row(label, f"{human(info.decided_macs)}  ({info.decided_macs:,}){of}; what slim gives")
        summary.add_row("Params at decisions", f"{human(info.decided_params)}  ({info.decided_params:,})")
    if info.target_macs is not None:
        summary.add_row("Target MACs", f"{info.target_macs:g} of the original's MACs")
    lat = info.target_latency
    if lat:
        decision = lat.get("decision") or {}
        measured = decision.get("measured_fraction")
        summary.add_row(
            "Target latency",
            f"{lat['target']} = {lat['target_ms']:.2f} ms of the original's {lat['original_ms']:.2f} ms "
            f"(onnxruntime CPU, batch 1, {lat['threads']} threads)"
            + ("" if measured is None else f"; decided widths measured at {measured:.3f}"),
        )
    if info.macs_per_example:
        m = info.macs_per_example
        summary.add_row(
            "MACs per example",
            f"dynamic gates, last validation: mean {m['mean']:.3f}, p50 {m['p50']:.3f}, p95 {m['p95']:.3f}, "
            f"min {m['min']:.3f}, max {m['max']:.3f}; gate networks {m['gate_nets']:.4f}",
        )
    if info.baseline_val_acc is not None:
        summary.add_row("Baseline val acc", pct_top5(info.baseline_val_acc, info.baseline_val_top5))
    if info.history:
        rows = [
            f"{h['epoch']}: val {pct_top5(h.get('val_acc'), h.get('val_top5'))}, "
            f"MACs {h.get('macs_fraction', float('nan')):.3f}" + (" decided" if h.get("decided") else "")
            for h in info.history
        ]
        summary.add_row("History", "\n".join(rows))
    if info.recipe:
        keys = ("epochs", "batch_size", "lr", "gate_lr", "lam", "decide_at", "distill", "seed")
        summary.add_row("Recipe", ", ".join(f"{k} {info.recipe[k]}" for k in keys if k in info.recipe))


def module_table(report: TargetReport) -> Table:
    table = Table(title="MACs and parameters by module", title_justify="left")
    table.add_column("Module")
    table.add_column("MACs", justify="right")
    table.add_column("% MACs", justify="right")
    table.add_column("Params", justify="right")
    table.add_column("% params", justify="right")
    for row in report.modules:
        table.add_row(
            row.name,
            human(row.macs),
            percent(row.macs, report.macs),
            human(row.params),
            percent(row.params, report.params),
        )
    table.add_section()
    table.add_row("total", human(report.macs), "100.0%", human(report.params), "100.0%", style="bold")
    return table


def render_models(rows: Sequence[ModelInfo], out: Console | None = None) -> None:
    """The `prunekit models` table."""
    out = out or console()
    table = Table(title=f"torchvision classification models ({len(rows)})", title_justify="left")
    table.add_column("Model")
    table.add_column("Input", justify="right")
    table.add_column("MACs", justify="right")
    table.add_column("Params", justify="right")
    table.add_column("Weights")
    table.add_column("Cached", justify="center")
    for row in rows:
        table.add_row(
            row.model,
            str(row.input_shape[1]),
            human(row.macs) if row.macs is not None else "-",
            human(row.params) if row.params is not None else "-",
            ", ".join(row.weights) or "-",
            "yes" if row.cached else ("damaged" if row.cache_damaged else "no"),
        )
    out.print(table)
    out.print(
        "MACs and params: torchvision's metadata for the DEFAULT weights.\n"
        "Cached: DEFAULT weights in the torch hub cache (offline); damaged: a truncated file is there.",
        style="dim",
    )


def render_analysis(report: AnalysisReport, out: Console | None = None) -> None:
    """The `prunekit analyze` table: coupled channel groups, prunable MACs, frozen channels."""
    out = out or console()
    graph = report.graph
    table = Table(title=f"{report.model}: {len(graph.groups)} coupled channel groups", title_justify="left")
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
            g.name, str(g.channels), str(g.units), str(len(g.producers)), str(len(g.consumers)), human(g.macs)
        )
    out.print(table)
    out.print(f"MACs {human(report.macs)}; {100 * report.prunable_fraction:.1f}% depend on prunable channels")
    for f in graph.frozen:
        out.print(f"frozen: {f.where}: {f.reason}", style="dim")
    dyn = report.dynamic
    if dyn is not None:
        if dyn["blocks"]:
            groups = sum(len(b["groups"]) for b in dyn["blocks"])
            out.print(
                f"gate --dynamic: {groups} group(s) in {len(dyn['blocks'])} residual block(s) get "
                f"input-dependent gates, each block's decided from its input (read by "
                f"{dyn['blocks'][0]['reads']}, ...)"
            )
        reasons: dict[str, list[str]] = {}
        for name, why in dyn["static"].items():
            reasons.setdefault(why, []).append(name)
        for why, names in reasons.items():
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            out.print(f"static with --dynamic: {', '.join(names[:3])}{more}: {why}", style="dim")


def render_gate(result: dict[str, Any], output: str, out: Console | None = None) -> None:
    out = out or console()
    shape = "x".join(str(d) for d in result["input_shape"])
    out.print(
        f"{result['model']}: {human(result['macs'])} MACs, {human(result['params'])} params "
        f"at {shape}, {result['num_classes']} classes"
    )
    out.print(
        f"{result['groups']} channel groups, {result['gates']} gates of {result['granularity']} channels "
        f"({result['learnable_gates']} learnable); "
        f"{100 * result['gateable_fraction']:.1f}% of the MACs are gateable"
    )
    if result.get("gate_kind") == "dynamic":
        blocks = result["dynamic"]
        out.print(
            f"dynamic gates on the internal widths of {len(blocks)} residual blocks, decided per example "
            f"from each block's input; residual streams are not gated; gate networks "
            f"{human(result['gate_net_macs'])} MACs ({100 * result['gate_net_fraction']:.2f}% of the model)"
        )
    out.print(f"wrote {output}")


def render_finetune(result: dict[str, Any], out: Console | None = None) -> None:
    f = result["final"]
    (out or console()).print(
        f"val acc {pct_top5(f['val_acc'], f.get('val_top5'))}; "
        f"baseline {pct_top5(result['baseline_val_acc'], result.get('baseline_val_top5'))}; "
        f"at {f['macs_fraction']:.3f} "
        f"of the MACs ({human(result['expected_macs'])} of {human(result['macs_before'])}); "
        f"wrote {result['output']}" + (f", best {result['best']}" if result["best"] else "")
    )


def render_slim(result: dict[str, Any], out: Console | None = None) -> None:
    """original vs slimmed, the parity checks, the files written and the widths per group."""
    out = out or console()
    table = Table(title="original vs slimmed", title_justify="left")
    for col in ("", "original", "slimmed", "ratio"):
        table.add_column(col, justify="right" if col else "left")
    o, s = result["original"], result["slim"]
    table.add_row("MACs", human(o["macs"]), human(s["macs"]), f"{result['macs_ratio']:.3f}")
    table.add_row("params", human(o["params"]), human(s["params"]), f"{result['params_ratio']:.3f}")
    acc = result.get("accuracy")
    if acc:
        table.add_row("val accuracy", pct(acc.get("original")), pct(acc["slim"]), "")
    lat = result.get("latency")
    if lat:
        table.add_row(
            f"onnxruntime ms ({lat['threads']} thr)",
            f"{lat['original_ms']:.2f}",
            f"{lat['slim_ms']:.2f}",
            f"{lat['ratio']:.3f}",
        )
    out.print(table)
    budget = result.get("latency_budget")
    if budget:
        measured = f"; measured now {lat['slim_ms']:.2f} ms ({lat['threads']} threads)" if lat else ""
        out.print(
            f"latency budget {budget['target']}: {budget['target_ms']:.2f} ms of the original's "
            f"{budget['original_ms']:.2f} ms ({budget['threads']} threads, at fine-tuning){measured}"
        )
    if result.get("removes_nothing"):
        out.print("note: every gate is open: the plan removes no channel", style="bold")
    p = result["parity"]
    out.print(f"slim vs gated: max |diff| {p['max_abs_diff']:.2e} (tolerance {p['tolerance']:.2e})")
    if "onnx" in result:
        x = result["onnx"]
        out.print(
            f"ONNX opset {x['opset']} ({x['exporter']}): "
            f"onnxruntime vs PyTorch max |diff| {x['max_abs_diff']:.2e} "
            f"at batch {x['verify_batch']}; wrote {x['path']}"
        )
    if result.get("pt2"):
        x = result["pt2"]
        out.print(
            f"torch.export program: max |diff| {x['max_abs_diff']:.2e} vs PyTorch after loading it back; "
            f"wrote {x['path']}"
        )
    if result.get("quantized"):
        render_shipping(result, out)
    out.print(f"wrote {result['checkpoint']}")
    widths = Table(title="channel widths per group", title_justify="left")
    for col in ("group", "before", "after"):
        widths.add_column(col, justify="left" if col == "group" else "right")
    for w in result["widths"]:
        widths.add_row(w["group"], str(w["before"]), str(w["after"]))
    out.print(widths)
    out.print(MACS_NOTE, style="dim")


def render_dynamic_slim(result: dict[str, Any], out: Console | None = None) -> None:
    """A dynamic model: accuracy, the MACs each example uses (a distribution), the per-example checks
    and the ONNX file."""
    out = out or console()
    d = result["dynamic"]
    m = d["macs_per_example"]
    table = Table(title=f"MACs per example ({d['measured_on']}), of the original", title_justify="left")
    for col in ("mean", "p50", "p95", "min", "max", "gate networks"):
        table.add_column(col, justify="right")
    table.add_row(*(f"{m[k]:.3f}" for k in ("mean", "p50", "p95", "min", "max")), f"{m['gate_nets']:.4f}")
    out.print(table)
    acc = result.get("accuracy")
    if acc:
        before = (
            f" (before removing never-on channels {pct(acc['before_removal'])})"
            if "before_removal" in acc
            else ""
        )
        out.print(f"val accuracy: original {pct(acc.get('original'))}, dynamic {pct(acc['slim'])}{before}")
    if d["removed_never_on_units"]:
        out.print(f"removed {d['removed_never_on_units']} channel(s) no calibration image turned on")
    p = result["parity"]
    out.print(
        f"skipping model vs gated, each of {d['checked_examples']} examples alone and together: "
        f"max |diff| {p['max_abs_diff']:.2e} (tolerance {p['tolerance']:.2e}), same channel decisions"
    )
    if "onnx" in result:
        x = result["onnx"]
        out.print(
            f"ONNX opset {x['opset']} ({x['exporter']}), gate networks inside: onnxruntime vs PyTorch per "
            f"example at batch 1 and {x['per_example']['examples']}: max |diff| "
            f"{x['per_example']['max_abs_diff']:.2e}, same channels selected; wrote {x['path']}"
        )
    if d.get("macs_plot"):
        out.print(f"wrote {d['macs_plot']} (MACs per example: histogram and per class)")


def render_shipping(result: dict[str, Any], out: Console) -> None:
    """Original FP32, slim FP32 and each quantised copy side by side: MACs, file size, latency (with
    --latency, measured interleaved), top-1 on the data and agreement with the FP32 slim model."""
    quantized = result["quantized"]
    models = (result.get("latency") or {}).get("models", {})
    first = next(iter(quantized.values()))["accuracy"]
    table = Table(title=f"shipping (top-1 on {first['examples']} validation images)", title_justify="left")
    for col in ("model", "MACs", "file", "ms", "top-1", "agrees"):
        table.add_column(col, justify="left" if col == "model" else "right")

    def ms(name: str) -> str:
        return f"{models[name]['median_ms']:.2f}" if name in models else "-"

    if "original" in models:
        table.add_row(
            "original FP32",
            human(result["original"]["macs"]),
            mib(models["original"]["size_bytes"]),
            ms("original"),
            "",
            "",
        )
    onnx = result.get("onnx") or {}
    table.add_row(
        "slim FP32",
        human(result["slim"]["macs"]),
        mib(onnx.get("size_bytes")),
        ms("slim"),
        pct(first["fp32_top1"]),
        "",
    )
    for mode, q in quantized.items():
        a = q["accuracy"]
        table.add_row(
            f"slim {mode.upper()}",
            human(result["slim"]["macs"]),
            mib(q["size_bytes"]),
            ms(mode),
            f"{pct(a['top1'])} ({round(-a['drop_points'], 2) + 0.0:+.2f})",  # + 0.0: no "-0.00"
            pct(a["agreement"]),
        )
    out.print(table)
    for q in quantized.values():
        out.print(f"wrote {q['path']}")


def mib(size: int | None) -> str:
    return "-" if size is None else f"{size / 2**20:.1f} MiB"


def render_run(report: dict[str, Any], out: Console | None = None) -> None:
    out = out or console()
    render_slim(report["slim"], out)
    s = report["summary"]
    drop = s["accuracy_drop_points"]
    out.print(
        f"accuracy {pct(s['accuracy_before'])} -> {pct(s['accuracy_after'])} "
        f"({abs(drop):.2f} points {'lost' if drop >= 0 else 'gained'}), "
        f"MACs x{s['macs_ratio']:.3f}; report: {report['files']['report']}"
    )
