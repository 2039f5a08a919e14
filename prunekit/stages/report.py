"""What `prunekit report` and `prunekit analyze` measure: a model by source, a prunekit checkpoint, or
an ONNX file. Library functions returning typed reports; the CLI only renders them."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from torch import nn

from prunekit.config import ModelSpec
from prunekit.errors import ConfigError
from prunekit.measure import (
    LatencyResult,
    ModuleRow,
    count_macs,
    module_rows,
    onnx_input_shape,
    onnx_latency_ms,
    onnx_macs_params,
    torch_latency_ms,
)


@dataclass(frozen=True)
class TargetReport:
    """What `prunekit report` shows for a model, a checkpoint or an ONNX file."""

    target: str
    kind: str  # "model" or "onnx"
    model: str | None  # the model source (None for an ONNX file)
    weights: str | None
    num_classes: int | None
    input_shape: tuple[int, ...]  # (C, H, W) of one example
    macs: int  # per example
    params: int
    modules: tuple[ModuleRow, ...]  # empty for ONNX files
    latency: LatencyResult | None
    latency_backend: str | None  # "torch" or "onnxruntime"
    checkpoint: CheckpointInfo | None = None  # what a prunekit checkpoint knows about itself


@dataclass(frozen=True)
class CheckpointInfo:
    """A prunekit checkpoint's own record: its stage, what its gates decide, its target and history.

    `macs`/`params` of the report are the dense architecture's; `decided_macs`/`decided_params` are
    those of the model its gates' deterministic decisions give, counted on that model slimmed (so they
    equal what `prunekit slim` produces)."""

    stage: str
    decided: bool  # the gate decisions are fixed (fine-tuned past the decision point)
    decided_macs: int | None  # None without gates (a slim checkpoint is measured as it is)
    decided_params: int | None
    target_macs: float | None  # fraction of the original's MACs the run aimed for
    original_macs: int | None  # MACs of the model before gating
    history: tuple[dict[str, Any], ...]  # per epoch: val_acc, val_top5, macs_fraction, decided, ...
    recipe: dict[str, Any] | None  # the fine-tune config
    baseline_val_acc: float | None  # top-1 of the model before gating, as fine-tuning measured it
    baseline_val_top5: float | None = None  # None also for checkpoints from before top-5 was measured
    target_latency: dict[str, Any] | None = None  # a latency budget: target, target_ms, decision, ...
    gate_kind: str | None = None  # "static" or "dynamic" (None: no gates)
    macs_per_example: dict[str, float] | None = None  # dynamic gates: the last validation's distribution


def report_target(
    target: str,
    weights: str | None = None,
    num_classes: int | None = None,
    input_shape: tuple[int, int, int] | None = None,
    depth: int = 1,
    latency: bool = False,
    threads: int = 1,
    model_args: dict[str, Any] | None = None,
    source: str | None = None,
) -> TargetReport:
    """Measure a model by source, a prunekit checkpoint (.pt / .pth; `source` names the model source of
    a checkpoint of a model of one's own) or an .onnx file."""
    if depth < 0:
        raise ConfigError(f"--depth must be 0 or more, got {depth}")
    if target.lower().endswith(".onnx"):
        return _report_onnx(target, input_shape, latency, threads, weights, num_classes)
    model, spec, info = _load_report_target(
        target, weights, num_classes, input_shape, model_args or {}, source
    )
    from prunekit.models import check_runs

    check_runs(model, spec)
    inputs = spec.example_input()
    mac_report = count_macs(model, inputs)
    timing = torch_latency_ms(model, inputs, threads) if latency else None
    return TargetReport(
        target=target,
        kind="model",
        model=spec.name,
        weights=spec.weights,
        num_classes=spec.num_classes,
        input_shape=tuple(inputs.shape[1:]),
        macs=mac_report.total_macs,
        params=mac_report.params,
        modules=module_rows(mac_report, depth),
        latency=timing,
        latency_backend="torch" if latency else None,
        checkpoint=info,
    )


def _checkpoint_info(ckpt: Any) -> CheckpointInfo:
    from prunekit.gates import get_gates, plan_from_gates, remove_gates_, ungated_copy
    from prunekit.surgery import slim_

    bank = get_gates(ckpt.model)
    decided_macs = decided_params = None
    if bank is not None and bank.kind == "dynamic":  # no single decided architecture: per example
        remove_gates_(ckpt.model)
    elif bank is not None:
        plan = plan_from_gates(ckpt.graph, bank)
        slimmed = slim_(ungated_copy(ckpt.model), ckpt.graph, plan)
        counted = count_macs(slimmed, ckpt.spec.example_input())
        decided_macs, decided_params = counted.total_macs, counted.params
        remove_gates_(ckpt.model)
    extra = ckpt.extra or {}
    budget = extra.get("budget") or {}
    recipe = extra.get("finetune") or (ckpt.training or {}).get("config")
    original = extra.get("original") or {}
    return CheckpointInfo(
        stage=ckpt.stage,
        decided=bool(bank is not None and bank.is_decided),
        decided_macs=decided_macs,
        decided_params=decided_params,
        target_macs=(recipe or {}).get("target_macs", budget.get("target_fraction")),
        original_macs=original.get("macs", budget.get("total_macs")),
        history=tuple(ckpt.history),
        recipe=recipe,
        baseline_val_acc=(extra.get("baseline") or {}).get("val_acc"),
        baseline_val_top5=(extra.get("baseline") or {}).get("val_top5"),
        target_latency=extra.get("latency_budget"),
        gate_kind=None if bank is None else bank.kind,
        macs_per_example=next(
            (h["macs_per_example"] for h in reversed(ckpt.history) if h.get("macs_per_example")), None
        ),
    )


def _load_report_target(
    target: str,
    weights: str | None,
    num_classes: int | None,
    input_shape: tuple[int, int, int] | None,
    model_args: dict[str, Any],
    source: str | None,
) -> tuple[nn.Module, ModelSpec, CheckpointInfo | None]:
    """A model source, or a prunekit checkpoint measured as the architecture it holds (a gated model
    without its gate hooks, a slim model at its reduced widths)."""
    if target.lower().endswith((".pt", ".pth")) or (Path(target).is_file() and ":" not in target):
        if weights is not None or num_classes is not None:
            raise ConfigError("--weights and --num-classes apply to model names, not to checkpoints")
        from prunekit.checkpoint import load_checkpoint

        ckpt = load_checkpoint(Path(target), source=source)
        info = _checkpoint_info(ckpt)  # takes the gate hooks off: the dense architecture is measured
        shown = replace(ckpt.spec, weights=f"{target} ({ckpt.stage})")
        return ckpt.model, shown if input_shape is None else shown.with_input_shape(input_shape), info
    from prunekit.models import load_model

    spec = ModelSpec(
        target, weights=weights, num_classes=num_classes, input_shape=input_shape, model_args=model_args
    )
    return (*load_model(spec), None)


def _report_onnx(
    target: str,
    input_shape: tuple[int, int, int] | None,
    latency: bool,
    threads: int,
    weights: str | None,
    num_classes: int | None,
) -> TargetReport:
    if weights is not None or num_classes is not None:
        raise ConfigError("--weights and --num-classes apply to model names, not to ONNX files")
    size = None if input_shape is None else input_shape[1]
    shape = onnx_input_shape(target, size)
    macs, params = onnx_macs_params(target, size)
    timing = onnx_latency_ms(target, shape, threads) if latency else None
    return TargetReport(
        target=target,
        kind="onnx",
        model=None,
        weights=None,
        num_classes=None,
        input_shape=tuple(shape[1:]),
        macs=macs,
        params=params,
        modules=(),
        latency=timing,
        latency_backend="onnxruntime" if latency else None,
    )


@dataclass(frozen=True)
class AnalysisReport:
    """What `prunekit analyze` shows: the channel graph of a model and the share of MACs it can prune."""

    model: str
    macs: int
    graph: Any  # ChannelGraph
    dynamic: dict[str, Any] | None = None  # where `gate --dynamic` would put gates, and why not elsewhere

    @property
    def prunable_fraction(self) -> float:
        return self.graph.prunable_macs / max(1, self.macs)

    def to_dict(self) -> dict[str, Any]:
        return self.graph.summary() | {
            "model": self.model,
            "macs": self.macs,
            "prunable_fraction": self.prunable_fraction,
            "dynamic": self.dynamic,
        }


def analyze_model(spec: ModelSpec) -> AnalysisReport:
    """Load the model `spec` names (weights as given, else random) and analyse its channel groups."""
    from prunekit.dynamic import find_dynamic_blocks
    from prunekit.graph import analyze
    from prunekit.models import check_runs, load_model

    model, full = load_model(spec)
    check_runs(model, full)
    x = full.example_input()
    graph = analyze(model, x)
    placement = find_dynamic_blocks(model, graph).to_dict(graph)
    return AnalysisReport(full.name, count_macs(model, x).total_macs, graph, placement)


__all__ = ["AnalysisReport", "TargetReport", "analyze_model", "report_target"]
