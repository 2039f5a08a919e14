"""Stage 3 for dynamic gates: the skipping inference model, verified per example, exported to ONNX.

A dynamic model cannot become one smaller dense network: which channels run depends on the input.
`slim_dynamic(checkpoint)` builds the skipping model (prunekit.dynamic_slim), checks it against the
gated model example by example, and measures accuracy and the MACs each validation example uses;
`write_dynamic(result, out)` exports it to ONNX with the gate networks inside the graph and checks
onnxruntime against PyTorch per example at batch 1 (the same channels selected) and at a larger batch.
With `drop_never_on`, the channels whose gate no calibration example turned on are removed for good
first: that changes the output for any input that would have turned them on, so it is never implicit.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from prunekit.checkpoint import Checkpoint
from prunekit.config import SlimConfig
from prunekit.dynamic import DynamicGateBank, mac_stats
from prunekit.dynamic_slim import DynamicModel, dynamic_inference_model, never_on, verify_dynamic
from prunekit.errors import ConfigError
from prunekit.measure import count_params
from prunekit.objective import MacModel
from prunekit.stages.gate import OriginalSize, original_size
from prunekit.trainer import evaluate

TORCHSCRIPT_MAX_OPSET = 20  # data-dependent shapes (NonZero feeding Conv weights) go through it


@dataclass
class DynamicSlimResult:
    model: DynamicModel
    checkpoint: Checkpoint  # the decided gated checkpoint it was built from
    original: OriginalSize
    params: int
    check: dict[str, Any]  # the skipping model vs the gated model, per example
    macs: dict[str, float]  # per-example MACs (fractions of the original's), prunekit.dynamic.mac_stats
    macs_measured_on: str  # "validation data" or "verification inputs"
    removed_units: int
    accuracy: dict[str, float | None] | None = None
    onnx: dict[str, Any] | None = None
    source: str | None = None
    inputs: torch.Tensor | None = field(default=None, repr=False)
    fractions: list[float] = field(default_factory=list, repr=False)  # per validation example
    labels: list[int] = field(default_factory=list, repr=False)
    classes: list[str] = field(default_factory=list, repr=False)
    files: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The slim document (prunekit.schema.SlimDoc) with a `dynamic` section."""
        mean_macs = int(self.macs["mean"] * self.original.macs)
        data: dict[str, Any] = {
            "source": self.source,
            "plan_source": "dynamic gates",
            "model": self.checkpoint.spec.name or "model",
            "original": self.original.to_dict(),
            "slim": {"macs": mean_macs, "params": self.params, "predicted_macs": mean_macs},
            "macs_ratio": self.macs["mean"],
            "params_ratio": self.params / max(1, self.original.params),
            "removes_nothing": self.removed_units == 0,
            "parity": {
                "max_abs_diff": self.check["max_abs_diff"],
                "max_abs_ref": self.check["output_scale"],
                "rtol": self.check["rtol"],
                "tolerance": self.check["rtol"] * max(1.0, self.check["output_scale"]),
            },
            "widths": [],
            "dynamic": {
                "macs_per_example": self.macs,
                "measured_on": self.macs_measured_on,
                "removed_never_on_units": self.removed_units,
                "checked_examples": self.check["examples"],
            },
        }
        for key in ("accuracy", "onnx"):
            if getattr(self, key) is not None:
                data[key] = getattr(self, key)
        if "macs_plot" in self.files:
            data["dynamic"]["macs_plot"] = self.files["macs_plot"]
        return data


def check_dynamic_options(config: SlimConfig, plan_file: Path | None, checkpoint_out: Path | None) -> None:
    """What a dynamic checkpoint cannot do in the slim stage: a one-line error each."""
    if config.formats != ("onnx",):
        raise ConfigError(
            "a dynamic model ships as ONNX with its gate networks inside: use --export onnx "
            f"(got {config.export!r})"
        )
    for given, flag in (
        (plan_file is not None, "--plan"),
        (bool(config.quantize_modes), "--quantize"),
        (config.latency, "--latency"),
        (checkpoint_out is not None, "--checkpoint"),
    ):
        if given:
            raise ConfigError(
                f"{flag} applies to static gates; this checkpoint has dynamic gates (its latency per "
                "example is measured by benchmarks/dynamic.py)"
            )


def slim_dynamic(
    ckpt: Checkpoint,
    *,
    val_loader: Any = None,
    calibration: list[Any] | None = None,
    data: str | None = None,
    rtol: float = 1e-4,
    classes: list[str] | None = None,
) -> DynamicSlimResult:
    """The skipping model of a decided dynamic checkpoint, verified. `calibration`: batches (arrays or
    tensors, as `stages.slim.calibration_batches` gives them) whose never-on channels are removed for
    good (None: nothing removed)."""
    bank = ckpt.gates
    if not isinstance(bank, DynamicGateBank):
        raise ConfigError("slim_dynamic takes a checkpoint with dynamic gates")
    if not bank.is_decided:
        raise ConfigError("the dynamic gates are not decided yet: fine-tune the model first")
    gated = copy.deepcopy(ckpt.model).cpu().eval()
    if calibration is not None:
        calibration = [torch.as_tensor(b) for b in calibration]
    drop = never_on(gated, calibration) if calibration is not None else set()
    model = dynamic_inference_model(gated, ckpt.graph, drop)
    if calibration is not None:  # removed channels are off there, so the check is exact there
        inputs = calibration[0][:8]
    elif val_loader is not None:
        inputs = next(iter(val_loader))[0][:8]
    else:
        inputs = ckpt.spec.example_input(4)
    check = verify_dynamic(gated, model, inputs.cpu(), rtol) | {"rtol": rtol}
    original = original_size(ckpt)
    mac_model = MacModel(ckpt.graph)
    fixed = original.macs - mac_model.gateable_macs

    def cost() -> torch.Tensor:
        kept = mac_model(model.activity(ckpt.graph.num_units))
        return (fixed + kept) / original.macs

    nets = bank.gate_net_macs() / original.macs
    accuracy = None
    if val_loader is not None:
        ev = evaluate(model, val_loader, torch.device("cpu"), example_cost=cost)
        fractions, where = ev.example_costs, "validation data"
        labels = list(ev.example_labels or ())
        base = ckpt.extra.get("baseline") or {}
        same = data is not None and base.get("data") == data
        accuracy = {
            "slim": ev.top1,
            "slim_top5": ev.top5,
            "original": base.get("val_acc") if same else None,
            "original_top5": base.get("val_top5") if same else None,
        }
        if drop:
            before = evaluate(gated, val_loader, torch.device("cpu"))
            accuracy |= {"before_removal": before.top1}
    else:
        with torch.no_grad():
            model(inputs)
        fractions, where = tuple(cost().tolist()), "verification inputs"
        labels = []
    return DynamicSlimResult(
        model=model,
        checkpoint=ckpt,
        original=original,
        params=count_params(model),  # the gate networks included
        check=check,
        macs=mac_stats(fractions, nets),  # type: ignore[arg-type]
        macs_measured_on=where,
        removed_units=len(drop),
        accuracy=accuracy,
        inputs=inputs.cpu(),
        fractions=list(fractions),  # type: ignore[arg-type]
        labels=labels,
        classes=list(classes or []),
    )


def write_dynamic(result: DynamicSlimResult, out: Path, config: SlimConfig) -> None:
    """Export the skipping model to `out` (atomically): the exporter's own checks, then onnxruntime
    against PyTorch per example at batch 1 and on the batch, on the real verification inputs."""
    from prunekit.dynamic_slim import verify_onnx_dynamic
    from prunekit.export import export_onnx, staging

    with staging(out) as staged:
        exported = export_onnx(
            result.model,
            staged,
            staged=True,
            input_shape=result.checkpoint.spec.input_shape,  # type: ignore[arg-type]
            opset=min(config.opset, TORCHSCRIPT_MAX_OPSET),
            dynamo=False,
            rtol=config.rtol,
            inputs=result.inputs,
        )
        per_example = verify_onnx_dynamic(staged, result.model, result.inputs, config.rtol)  # type: ignore[arg-type]
        result.onnx = exported.to_dict() | {
            "path": str(out),
            "size_bytes": os.path.getsize(staged),
            "per_example": per_example,
        }
    if result.labels:  # validation data given: the distribution as a picture, when matplotlib is there
        from prunekit.plots import write_macs_plot

        plot = write_macs_plot(result.fractions, result.labels, result.classes, out.with_suffix(".macs.png"))
        if plot is not None:
            result.files["macs_plot"] = plot


__all__ = ["DynamicSlimResult", "check_dynamic_options", "slim_dynamic", "write_dynamic"]
