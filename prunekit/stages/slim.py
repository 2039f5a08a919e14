"""Stage 3, slim: turn gate decisions (or a plan) into a physically smaller model, verify it, export it.

`slim(result)` works in memory on a FinetuneResult, GateResult or Checkpoint and returns a SlimResult
holding the smaller `nn.Module`, its plan and its report; `export_onnx(slim_result, path)` exports it.
`slim_stage(path, out, ...)` is the file-based shell: it also writes the slim checkpoint, the ONNX file
(atomically, as a pair) and the plan, and measures latency on request.
"""

from __future__ import annotations

import contextlib
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
from prunekit.errors import AccuracyGateError, CheckpointError, ConfigError, VerificationError
from prunekit.fileio import check_writable
from prunekit.gates import get_gates, plan_from_gates, ungated_copy
from prunekit.masking import masked
from prunekit.measure import count_macs
from prunekit.modes import training_flags
from prunekit.parity import Parity
from prunekit.plan import ChannelPlan, group_widths, is_full
from prunekit.quantize import quantized_path
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
    pt2: dict[str, Any] | None = None  # the torch.export program, when exported
    quantized: dict[str, dict[str, Any]] | None = None  # mode -> QuantizedExport.to_dict()
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
        for key in ("accuracy", "onnx", "pt2", "quantized", "latency"):
            if getattr(self, key) is not None:
                data[key] = getattr(self, key)
        if self.checkpoint.extra.get("latency_budget"):  # fine-tuned toward a latency budget
            data["latency_budget"] = self.checkpoint.extra["latency_budget"]
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
    if ckpt.gates is not None and ckpt.gates.kind == "dynamic":  # per-example channels: no one plan
        from prunekit.stages.slim_dynamic import slim_dynamic

        if plan is not None:
            raise ConfigError("a plan applies to static gates; this model has dynamic gates")
        return slim_dynamic(ckpt, val_loader=val_loader, data=data, rtol=rtol)  # type: ignore[return-value]
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
    """The slim model's accuracy (top-1 and top-5), and the starting model's beside it: the baseline
    fine-tuning measured when it was measured on the same `data` (its top-5 is None in checkpoints
    from before top-5 was measured); with a plan (`plain` given), the checkpoint's own weights are the
    starting point and are measured here."""
    device = (runtime or resolve_runtime()).device
    base = ckpt.extra.get("baseline") or {}
    same = data is not None and base.get("data") == data
    original, original_top5 = (base.get("val_acc"), base.get("val_top5")) if same else (None, None)
    if original is None and plain is not None:
        before = evaluate(_on(plain, device), val_loader, device)
        original, original_top5 = before.top1, before.top5
    after = evaluate(_on(slimmed, device), val_loader, device)
    return {"slim": after.top1, "original": original, "slim_top5": after.top5, "original_top5": original_top5}


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
    from prunekit.stages.slim_dynamic import DynamicSlimResult, write_dynamic

    if isinstance(target, DynamicSlimResult):  # the gate networks inside, checked per example
        write_dynamic(target, Path(path), SlimConfig(opset=opset, rtol=rtol))
        return target.onnx
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
    """Where the slim stage writes: the ONNX file and the torch.export program (None: not exported),
    the slim checkpoint, the plan, and the quantised copies of the ONNX file (mode -> path)."""

    onnx: Path | None
    checkpoint: Path
    plan: Path | None = None
    pt2: Path | None = None
    quantized: dict[str, Path] = field(default_factory=dict)

    @classmethod
    def for_output(
        cls,
        out: Path,
        config: SlimConfig,
        checkpoint: Path | None,
        plan: Path | None,
    ) -> SlimOutputs:
        """The first export format is written at `out`, a second one beside it with its own suffix
        (model.onnx and model.pt2); the checkpoint defaults to `out` with `.pt` when something is
        exported, else to `out`; quantised copies sit beside the ONNX file (model.int8.onnx)."""
        formats = config.formats
        paths = {fmt: out if i == 0 else out.with_suffix(f".{fmt}") for i, fmt in enumerate(formats)}
        ckpt = checkpoint or (out.with_suffix(".pt") if formats else out)
        onnx = paths.get("onnx")
        quantized = {m: quantized_path(onnx, m) for m in config.quantize_modes} if onnx else {}
        outputs = cls(onnx, ckpt, plan, paths.get("pt2"), quantized)
        named = [("the slim checkpoint", ckpt), *((f"the {f} file", p) for f, p in paths.items())]
        named += [(f"the {m} file", p) for m, p in quantized.items()]
        if plan is not None:
            named.append(("the plan", plan))
        seen: dict[Path, str] = {}
        for what, path in named:
            key = Path(os.path.abspath(path))
            if key in seen:
                raise ConfigError(f"{seen[key]} and {what} would have the same path: {path}")
            seen[key] = what
        for _, path in named:
            check_writable(path)
        return outputs

    def files(self) -> dict[str, Path]:
        """Every file this stage writes, by role."""
        files = {"checkpoint": self.checkpoint}
        files |= {k: v for k, v in (("onnx", self.onnx), ("pt2", self.pt2), ("plan", self.plan)) if v}
        return files | {f"onnx_{mode}": path for mode, path in self.quantized.items()}


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
    loaded = None
    if Path(source).is_file():  # a dynamic model writes only the ONNX file: known once it is loaded
        ckpt = loaded = load_checkpoint(source, source=model_source)
        if ckpt.gates is not None and ckpt.gates.kind == "dynamic" and ckpt.stage != "slim":
            if Path(os.path.abspath(out)) == Path(os.path.abspath(source)):
                raise ConfigError(f"the ONNX output would overwrite the input {source}")
            check_writable(out)
            return _slim_stage_dynamic(ckpt, source, out, config, plan_file, data, checkpoint_out)  # type: ignore[return-value]
    outputs = SlimOutputs.for_output(out, config, checkpoint_out, plan_out)
    for role, path in outputs.files().items():  # the input is never overwritten by an output
        if Path(source).exists() and os.path.abspath(path) == os.path.abspath(source):
            hint = "; pass --checkpoint PATH for the slim checkpoint" if role == "checkpoint" else ""
            raise ConfigError(f"the {role} output would overwrite the input {source}{hint}")
    if config.quantize_modes and data is None:
        modes = ",".join(config.quantize_modes)
        raise ConfigError(
            f"--quantize {modes} needs --data: the calibration images and the accuracy check come from it"
        )
    ckpt = loaded or load_checkpoint(source, source=model_source)
    if ckpt.stage == "slim":
        raise CheckpointError(f"{source} is already slimmed")
    if config.drop_never_on:
        raise ConfigError(f"--drop-never-on applies to dynamic gates; {source} has static gates")
    if plan_file is None and ckpt.gates is None:
        raise CheckpointError(
            f"{source} has no gates: run `prunekit finetune` first, or pass --plan PLAN.json"
        )
    plan = ChannelPlan.load(plan_file) if plan_file is not None else None
    loaders = data_loaders(data, ckpt.spec)
    calibration = calibration_batches(loaders, config)  # before the long work: a too small set is an error
    val = loaders.val if loaders is not None else None
    result = slim(ckpt, plan=plan, val_loader=val, data=data, rtol=config.rtol)
    result.source = str(source)
    if plan_file is not None:
        result.plan_source = str(plan_file)
    write_slim(result, outputs, config, reference=ckpt, val_loader=val, calibration=calibration)
    quantization_gate(result, config)
    return result


def _slim_stage_dynamic(
    ckpt: Checkpoint,
    source: Path,
    out: Path,
    config: SlimConfig,
    plan_file: Path | None,
    data: str | None,
    checkpoint_out: Path | None,
) -> Any:
    """The slim stage of a dynamic checkpoint (prunekit.stages.slim_dynamic): the ONNX file only."""
    from prunekit.stages.slim_dynamic import check_dynamic_options, slim_dynamic, write_dynamic

    check_dynamic_options(config, plan_file, checkpoint_out)
    if config.drop_never_on and data is None:
        raise ConfigError("--drop-never-on needs --data: the channels are those no training image turns on")
    loaders = data_loaders(data, ckpt.spec)
    result = slim_dynamic(
        ckpt,
        val_loader=None if loaders is None else loaders.val,
        calibration=calibration_batches(loaders, config),
        data=data,
        rtol=config.rtol,
        classes=None if loaders is None else list(loaders.classes),
    )
    result.source = str(source)
    write_dynamic(result, out, config)
    return result


def write_slim(
    result: SlimResult,
    outputs: SlimOutputs,
    config: SlimConfig,
    *,
    reference: Checkpoint,
    val_loader: Any = None,
    calibration: list[Any] | None = None,
) -> None:
    """Write the slim checkpoint and its exports as one set: every export (ONNX, its quantised copies,
    the torch.export program) is staged next to its target and checked, then the checkpoint is saved,
    and only then the exports are put in place, so a failure anywhere leaves nothing half-done and no
    export without its checkpoint. `reference`: the checkpoint the slim model came from (its ungated
    model is the "original" of the latency comparison). Quantised copies are checked by accuracy on
    `val_loader` (INT8 is calibrated on `calibration`, see `calibration_batches`); the caller applies
    `quantization_gate` once everything is written."""
    ckpt = result.checkpoint
    ckpt.extra = ckpt.extra | {"slim_report": {k: v for k, v in result.to_dict().items() if k != "widths"}}
    with contextlib.ExitStack() as stack:
        staged: dict[str, Path] = {}  # role -> staging file, put in place when the stack closes
        if outputs.onnx is not None:
            from prunekit.export import export_onnx as _export
            from prunekit.export import staging

            staged["onnx"] = stack.enter_context(staging(outputs.onnx))
            exported = _export(
                result.model,
                staged["onnx"],
                staged=True,
                input_shape=result.spec.input_shape,
                opset=config.opset,
                rtol=config.rtol,
                inputs=result.inputs,
            )
            result.onnx = exported.to_dict() | {
                "path": str(outputs.onnx),
                "size_bytes": os.path.getsize(staged["onnx"]),
            }
            if outputs.quantized:
                result.quantized = _quantized(outputs, staged, stack, config, val_loader, calibration)
        if outputs.pt2 is not None:
            from prunekit.pt2 import export_pt2, pt2_staging

            staged["pt2"] = stack.enter_context(pt2_staging(outputs.pt2))
            result.pt2 = export_pt2(
                result.model,
                staged["pt2"],
                input_shape=result.spec.input_shape,  # type: ignore[arg-type]
                inputs=result.inputs,
                rtol=config.rtol,
                staged=True,
            ).to_dict() | {"path": str(outputs.pt2)}
        if config.latency and "onnx" in staged:
            result.latency = _latency_table(ungated_copy(reference.model), staged, result, config)
        ckpt.extra["slim_report"] |= {
            "onnx": result.onnx,
            "pt2": result.pt2,
            "quantized": result.quantized,
            "latency": result.latency,
        }
        save_checkpoint(ckpt, outputs.checkpoint)
    result.files["checkpoint"] = str(outputs.checkpoint)
    result.checkpoint_bytes = os.path.getsize(outputs.checkpoint)
    if outputs.plan is not None:
        result.plan.save(outputs.plan)
        result.files["plan"] = str(outputs.plan)


def _quantized(
    outputs: SlimOutputs,
    staged: dict[str, Path],
    stack: contextlib.ExitStack,
    config: SlimConfig,
    val_loader: Any,
    calibration: list[Any] | None,
) -> dict[str, dict[str, Any]]:
    """Stage each quantised copy of the staged FP32 ONNX file and check it by accuracy on `val_loader`
    against the FP32 file (both run in onnxruntime)."""
    from prunekit.export import staging
    from prunekit.quantize import check_accuracy, onnx_predictions, quantize

    if val_loader is None:
        raise ConfigError("quantisation needs data: the accuracy check runs on its validation split")
    made = {}
    for mode, path in outputs.quantized.items():
        staged[mode] = stack.enter_context(staging(path))
        made[mode] = quantize(mode, staged["onnx"], staged[mode], calibration=calibration)
        made[mode].path = path
    files = {"fp32": staged["onnx"]} | {mode: staged[mode] for mode in made}
    predictions, labels = onnx_predictions(
        files, ((x.numpy(), y.numpy()) for x, y in val_loader), config.threads
    )
    for mode, q in made.items():
        q.accuracy = check_accuracy(predictions["fp32"], predictions[mode], labels)
    return {mode: q.to_dict() for mode, q in made.items()}


def quantization_failure(result: SlimResult | dict[str, Any], config: SlimConfig) -> str | None:
    """With max_quantization_drop: why the quantised copies fail it (the one that lost the most top-1
    points against FP32), else None."""
    allowed = config.max_quantization_drop
    quantized = result.get("quantized") if isinstance(result, dict) else result.quantized
    if allowed is None or not quantized:
        return None
    worst = max(quantized.values(), key=lambda q: q["accuracy"]["drop_points"])
    drop = worst["accuracy"]["drop_points"]
    if drop <= allowed:
        return None
    return f"the {worst['mode']} model lost {drop:.2f} top-1 points against FP32 (allowed {allowed:g})"


def quantization_gate(result: SlimResult, config: SlimConfig) -> None:
    """Raise AccuracyGateError (exit 3) when `quantization_failure` says so; files stay written."""
    failure = quantization_failure(result, config)
    if failure is not None:
        written = ", ".join(q["path"] for q in (result.quantized or {}).values())
        raise AccuracyGateError(f"{failure}; the files are written: {written}")


def calibration_batches(loaders: Any, config: SlimConfig) -> list[Any] | None:
    """The calibration batches of INT8 and of `drop_never_on` from the data's training split, with
    evaluation transforms (the accuracy check uses the validation split, so the two do not overlap)."""
    if not ("int8" in config.quantize_modes or config.drop_never_on) or loaders is None:
        return None
    from prunekit.quantize import calibration_inputs

    return calibration_inputs(loaders.train.dataset, config.calibration_batches)


def data_loaders(data: str | None, spec: ModelSpec) -> Any:
    """prunekit.data.DataLoaders of `data` without augmentation (None without data)."""
    if data is None:
        return None
    from prunekit.data import resolve_data

    loaders = resolve_data(data, **spec.preprocessing(), batch_size=64, train_augment=False)
    if loaders.num_classes != spec.num_classes:  # an accuracy over other labels would mean nothing
        raise ConfigError(
            f"the data has {loaders.num_classes} classes but the model {spec.num_classes}: "
            "pass the --data the model was fine-tuned on"
        )
    return loaders


def _latency_table(
    original: nn.Module, staged: dict[str, Path], result: SlimResult, config: SlimConfig
) -> dict[str, Any]:
    """onnxruntime latency at batch 1 of the original model and of every staged ONNX file (slim FP32
    and its quantised copies), measured interleaved in one run, with each one's MACs and file size."""
    from prunekit.export import export_onnx as _export
    from prunekit.measure import onnx_latency_interleaved

    spec = result.spec
    shape = (1, *spec.input_shape)  # type: ignore[misc]
    with tempfile.TemporaryDirectory() as tmp:
        files = {"original": Path(tmp) / "original.onnx"}
        _export(original, files["original"], input_shape=spec.input_shape, opset=config.opset)
        files |= {"slim": staged["onnx"]} | {m: staged[m] for m in config.quantize_modes if m in staged}
        timed = onnx_latency_interleaved(files, shape, config.threads, warmup=5, repeats=30)
        sizes = {name: os.path.getsize(path) for name, path in files.items()}
    macs = {"original": result.original.macs} | {
        name: result.slim_size.macs for name in files if name != "original"
    }
    before, after = timed["original"].median_ms, timed["slim"].median_ms
    return {
        "threads": config.threads,
        "batch": 1,
        "repeats": 30,
        "interleaved": True,
        "original_ms": before,
        "slim_ms": after,
        "ratio": after / max(before, 1e-9),  # slim / original, as every ratio
        "models": {
            name: {
                "median_ms": timed[name].median_ms,
                "p90_ms": timed[name].p90_ms,
                "ratio": timed[name].median_ms / max(before, 1e-9),
                "macs": int(macs[name]),
                "size_bytes": sizes[name],
            }
            for name in files
        },
    }


__all__ = [
    "SlimOutputs",
    "SlimResult",
    "calibration_batches",
    "data_loaders",
    "export_onnx",
    "quantization_failure",
    "quantization_gate",
    "slim",
    "slim_stage",
    "write_slim",
]
