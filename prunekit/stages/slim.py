"""Stage 3, slim: turn gate decisions (or a plan) into a physically smaller model, verify it, export it.

`slim(result)` works in memory on a FinetuneResult, GateResult or Checkpoint and returns a SlimResult
holding the smaller `nn.Module`, its plan and its report; `export_onnx(slim_result, path)` exports it.
`slim_stage(path, out, ...)` is the file-based shell: it also writes the slim checkpoint, the ONNX file
(atomically, as a pair) and the plan, and measures latency on request.
"""

from __future__ import annotations

import copy
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from prunekit.config import DEFAULT_OPSET, ModelSpec, SlimConfig
from prunekit.errors import CheckpointError, ConfigError, VerificationError
from prunekit.fileio import check_writable
from prunekit.gates import get_gates, plan_from_gates, ungated_copy
from prunekit.masking import masked
from prunekit.measure import count_macs
from prunekit.modes import training_flags
from prunekit.parity import Parity
from prunekit.plan import ChannelPlan, group_widths, is_full
from prunekit.runtime import Runtime, model_device, resolve_runtime
from prunekit.stages.gate import OriginalSize, original_size
from prunekit.surgery import slim_, verify_slim
from prunekit.trainer import evaluate


@dataclass
class SlimResult:
    model: nn.Module  # the slimmed model, eval mode, no gates or masks
    plan: ChannelPlan
    checkpoint: Checkpoint  # stage "slim"
    original: OriginalSize
    slim_size: OriginalSize
    predicted_macs: int  # what the plan predicts from the channel graph; fvcore's count must agree
    parity: Parity  # slim vs gated (or masked) model
    plan_source: str  # "gates" or the plan file
    source: str | None = None
    accuracy: dict[str, float | None] | None = None  # {"slim": ..., "original": ...} on the given data
    onnx: dict[str, Any] | None = None
    latency: dict[str, Any] | None = None
    files: dict[str, str] = field(default_factory=dict)  # what the file stage wrote: checkpoint, plan
    checkpoint_bytes: int | None = None
    inputs: torch.Tensor | None = field(default=None, repr=False)  # the real inputs it was verified on

    @property
    def spec(self) -> ModelSpec:
        return self.checkpoint.spec

    @property
    def removes_nothing(self) -> bool:
        return is_full(self.checkpoint.graph, self.plan)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "source": self.source,
            "plan_source": self.plan_source,
            "model": self.spec.name,
            "original": self.original.to_dict(),
            "slim": self.slim_size.to_dict() | {"predicted_macs": self.predicted_macs},
            "macs_ratio": self.slim_size.macs / max(1, self.original.macs),
            "params_ratio": self.slim_size.params / max(1, self.original.params),
            "removes_nothing": self.removes_nothing,
            "parity": self.parity.to_dict(),
            "widths": group_widths(self.checkpoint.graph, self.plan),
        }
        for key in ("accuracy", "onnx", "latency"):
            if getattr(self, key) is not None:
                data[key] = getattr(self, key)
        data |= {k: self.files[k] for k in ("checkpoint", "plan") if k in self.files}
        if self.checkpoint_bytes is not None:
            data["checkpoint_bytes"] = self.checkpoint_bytes
        return data


def _as_checkpoint(source: Any) -> Checkpoint:
    ckpt = source.checkpoint if hasattr(source, "checkpoint") else source
    if not isinstance(ckpt, Checkpoint):
        raise ConfigError("slim() takes a FinetuneResult, GateResult or Checkpoint")
    if ckpt.stage == "slim":
        raise CheckpointError("the model is already slimmed")
    return ckpt


def slim(
    source: Any,
    *,
    plan: ChannelPlan | None = None,
    inputs: torch.Tensor | None = None,
    val_loader: Any = None,
    data: str | None = None,
    rtol: float = 1e-4,
    runtime: Runtime | None = None,
) -> SlimResult:
    """Remove the channels the gate decisions (or `plan`) drop and verify the smaller model against the
    gated (or masked) one on `inputs` (default: the first batch of `val_loader`, else random inputs).
    With `val_loader`, also measure accuracy; `data` names what it holds, so the starting accuracy
    recorded by fine-tuning is reported beside it when it was measured on the same data.
    The source is not changed."""
    ckpt = _as_checkpoint(source)
    graph, spec = ckpt.graph, ckpt.spec
    gated = get_gates(ckpt.model) is not None
    plan_given = plan is not None
    if plan is not None:
        plan.check_fits(graph)
    elif gated:
        plan = plan_from_gates(graph, ckpt.gates)  # type: ignore[arg-type]
    else:
        raise CheckpointError("the checkpoint has no gates: fine-tune it first, or pass a plan")
    # everything here runs on the CPU, on copies: a model fine-tuned on a GPU stays where it is
    source_model = ckpt.model if model_device(ckpt.model).type == "cpu" else copy.deepcopy(ckpt.model).cpu()
    plain = ungated_copy(source_model).eval()
    slimmed = slim_(copy.deepcopy(plain), graph, plan).eval()
    if inputs is None:
        inputs = next(iter(val_loader))[0][:8] if val_loader is not None else spec.example_input(4)
    inputs = inputs.cpu()
    if plan_given:  # the reference is the plan applied as masks
        with masked(plain, graph, plan):
            parity = verify_slim(plain, slimmed, inputs, rtol)
    else:  # the reference is the gated model under its decisions (its training flags left as they were)
        with training_flags(source_model):
            parity = verify_slim(source_model.eval(), slimmed, inputs, rtol)
    original = original_size(ckpt)
    slim_report = count_macs(slimmed, spec.example_input())
    keep = plan.unit_mask(graph)
    predicted = original.macs - graph.macs() + graph.macs(keep)
    if abs(predicted - slim_report.total_macs) > 0.01 * max(1, slim_report.total_macs):
        raise VerificationError(
            f"the slimmed model has {slim_report.total_macs} MACs (fvcore) but the plan predicts {predicted}"
        )
    result = SlimResult(
        model=slimmed,
        plan=plan,
        checkpoint=Checkpoint(
            spec, slimmed, graph, "slim", plan=plan, history=ckpt.history, extra=ckpt.extra
        ),
        original=original,
        slim_size=OriginalSize(slim_report.total_macs, slim_report.params),
        predicted_macs=int(predicted),
        parity=parity,
        plan_source="plan" if plan_given else "gates",
        inputs=inputs,
    )
    if val_loader is not None:
        result.accuracy = _accuracy(ckpt, plain if plan_given else None, slimmed, val_loader, data, runtime)
    return result


def _accuracy(
    ckpt: Checkpoint,
    plain: nn.Module | None,
    slimmed: nn.Module,
    val_loader: Any,
    data: str | None,
    runtime: Runtime | None,
) -> dict[str, float | None]:
    """The slim model's accuracy, and the starting model's beside it: the baseline fine-tuning measured
    when it was measured on the same `data`; with a plan (`plain` given), the checkpoint's own weights
    are the starting point and are measured here."""
    device = (runtime or resolve_runtime()).device
    base = ckpt.extra.get("baseline") or {}
    original = base.get("val_acc") if data is not None and base.get("data") == data else None
    if original is None and plain is not None:
        original = evaluate(_on(plain, device), val_loader, device)[0]
    return {"slim": evaluate(_on(slimmed, device), val_loader, device)[0], "original": original}


def _on(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` itself on the CPU; a copy elsewhere (the result's model stays on the CPU)."""
    return model if device.type == "cpu" else copy.deepcopy(model).to(device)


def export_onnx(
    target: SlimResult | nn.Module,
    path: Path | str,
    *,
    input_shape: tuple[int, int, int] | None = None,
    opset: int = DEFAULT_OPSET,
    inputs: torch.Tensor | None = None,
    rtol: float = 1e-4,
) -> Any:
    """Export a SlimResult's model (or any model, given `input_shape`) to a checked ONNX file with
    onnxruntime parity verified; returns prunekit.export.ExportResult."""
    from prunekit.export import export_onnx as _export

    if isinstance(target, SlimResult):
        model, input_shape = target.model, input_shape or target.spec.input_shape
    else:
        model = target
    if input_shape is None:
        raise ConfigError("export_onnx needs input_shape=(C, H, W) for a plain model")
    return _export(model, Path(path), input_shape=input_shape, opset=opset, rtol=rtol, inputs=inputs)


# --------------------------------------------------------------------------------------------------
# the file-based stage
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SlimOutputs:
    """Where the slim stage writes: the ONNX file (None: no export), the slim checkpoint, the plan."""

    onnx: Path | None
    checkpoint: Path
    plan: Path | None = None

    @classmethod
    def for_output(cls, out: Path, export: str, checkpoint: Path | None, plan: Path | None) -> SlimOutputs:
        onnx = out if export == "onnx" else None
        ckpt = checkpoint or (out.with_suffix(".pt") if onnx is not None else out)
        if onnx is not None and ckpt == onnx:
            raise ConfigError("the ONNX file and the slim checkpoint would have the same path")
        outputs = cls(onnx, ckpt, plan)
        for p in (outputs.onnx, outputs.checkpoint, outputs.plan):
            if p is not None:
                check_writable(p)
        return outputs


def slim_stage(
    source: Path,
    out: Path,
    config: SlimConfig | None = None,
    *,
    plan_file: Path | None = None,
    data: str | None = None,
    checkpoint_out: Path | None = None,
    plan_out: Path | None = None,
    model_source: str | None = None,
) -> SlimResult:
    """Load a fine-tuned checkpoint, slim it (by its gates or `plan_file`), verify, and write the slim
    checkpoint, the ONNX file (unless config.export is "none") and the plan. `model_source`: the model
    source the user names, for checkpoints of a model of one's own."""
    config = config or SlimConfig()
    outputs = SlimOutputs.for_output(out, config.export, checkpoint_out, plan_out)
    ckpt = load_checkpoint(source, source=model_source)
    if ckpt.stage == "slim":
        raise CheckpointError(f"{source} is already slimmed")
    if plan_file is None and ckpt.gates is None:
        raise CheckpointError(
            f"{source} has no gates: run `prunekit finetune` first, or pass --plan PLAN.json"
        )
    plan = ChannelPlan.load(plan_file) if plan_file is not None else None
    val = _val_loader(data, ckpt.spec)
    result = slim(ckpt, plan=plan, val_loader=val, data=data, rtol=config.rtol)
    result.source = str(source)
    if plan_file is not None:
        result.plan_source = str(plan_file)
    write_slim(result, outputs, config, reference=ckpt)
    return result


def write_slim(
    result: SlimResult, outputs: SlimOutputs, config: SlimConfig, *, reference: Checkpoint
) -> None:
    """Write the slim checkpoint and its ONNX export as a pair: the export is staged next to its target,
    checked, then the checkpoint is saved, and only then the ONNX file is put in place, so a failure
    anywhere leaves neither half-done nor one without the other. `reference`: the checkpoint the slim
    model came from (its ungated model is the "original" of the latency comparison)."""
    ckpt = result.checkpoint
    ckpt.extra = ckpt.extra | {"slim_report": {k: v for k, v in result.to_dict().items() if k != "widths"}}
    if outputs.onnx is None:
        save_checkpoint(ckpt, outputs.checkpoint)
    else:
        from prunekit.export import export_onnx as _export
        from prunekit.export import staging

        with staging(outputs.onnx) as staged:
            exported = _export(
                result.model,
                staged,
                staged=True,
                input_shape=result.spec.input_shape,
                opset=config.opset,
                rtol=config.rtol,
                inputs=result.inputs,
            )
            result.onnx = exported.to_dict() | {
                "path": str(outputs.onnx),
                "size_bytes": os.path.getsize(staged),
            }
            if config.latency:
                result.latency = _latency_pair(ungated_copy(reference.model), staged, result.spec, config)
            ckpt.extra["slim_report"] |= {"onnx": result.onnx, "latency": result.latency}
            save_checkpoint(ckpt, outputs.checkpoint)
    result.files["checkpoint"] = str(outputs.checkpoint)
    result.checkpoint_bytes = os.path.getsize(outputs.checkpoint)
    if outputs.plan is not None:
        result.plan.save(outputs.plan)
        result.files["plan"] = str(outputs.plan)


def _val_loader(data: str | None, spec: ModelSpec) -> Any:
    if data is None:
        return None
    from prunekit.data import resolve_data

    loaders = resolve_data(
        data, input_shape=spec.input_shape, mean=spec.mean, std=spec.std, batch_size=64, train_augment=False
    )
    if loaders.num_classes != spec.num_classes:  # an accuracy over other labels would mean nothing
        raise ConfigError(
            f"the data has {loaders.num_classes} classes but the model {spec.num_classes}: "
            "pass the --data the model was fine-tuned on"
        )
    return loaders.val


def _latency_pair(
    original: nn.Module, slim_onnx: Path, spec: ModelSpec, config: SlimConfig
) -> dict[str, Any]:
    """onnxruntime latency of the original and the slimmed export, measured side by side (batch 1)."""
    from prunekit.export import export_onnx as _export
    from prunekit.measure import onnx_latency_ms

    shape = (1, *spec.input_shape)  # type: ignore[misc]
    with tempfile.TemporaryDirectory() as tmp:
        orig_path = Path(tmp) / "original.onnx"
        _export(original, orig_path, input_shape=spec.input_shape, opset=config.opset)
        before = onnx_latency_ms(orig_path, shape, threads=config.threads, warmup=5, repeats=30)
        after = onnx_latency_ms(slim_onnx, shape, threads=config.threads, warmup=5, repeats=30)
    return {
        "threads": config.threads,
        "batch": 1,
        "original_ms": before.median_ms,
        "slim_ms": after.median_ms,
        "ratio": after.median_ms / max(before.median_ms, 1e-9),  # slim / original, as every ratio
    }


__all__ = ["SlimOutputs", "SlimResult", "export_onnx", "slim", "slim_stage", "write_slim"]
