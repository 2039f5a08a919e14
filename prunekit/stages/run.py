"""`prunekit run`: gate -> finetune -> slim -> export from one config, into one run directory.

The stages hand their results to each other in memory: the model is loaded and traced once, and the
original MACs are counted once. Each stage still writes its file (gated.pt, tuned.pt, model.pt,
model.onnx, plan.json), so a run can be inspected or continued stage by stage, and report.json last.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from prunekit.config import RunConfig
from prunekit.errors import AccuracyGateError, ConfigError, DataError, Interrupted, PrunekitError, first_line
from prunekit.fileio import atomic_write_text, check_writable, remove_stale_temporaries
from prunekit.models import load_model
from prunekit.plots import PLOT_FILES, write_run_plots
from prunekit.runtime import resolve_runtime
from prunekit.schema import envelope
from prunekit.stages.finetune import FinetuneCallbacks, best_path, data_loaders, finetune_to_files
from prunekit.stages.gate import gate
from prunekit.stages.slim import SlimOutputs, calibration_batches, quantization_failure, slim, write_slim
from prunekit.stages.slim import data_loaders as plain_loaders

RUN_FILES = {
    "gated": "gated.pt",
    "tuned": "tuned.pt",
    "onnx": "model.onnx",
    "pt2": "model.pt2",  # [slim] export = "onnx,pt2" (or "pt2")
    "onnx_int8": "model.int8.onnx",  # [slim] quantize
    "onnx_fp16": "model.fp16.onnx",
    "slim": "model.pt",
    "plan": "plan.json",
    "metrics": "metrics.csv",
    **PLOT_FILES,  # with matplotlib installed
    "report": "report.json",
}

OnStage = Callable[[str, Any], None]


def run_dir(out_dir: Path) -> dict[str, Path]:
    """Create the run directory (if needed) and check that every file of the run can be written there.
    Nothing is removed or written yet."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"the run directory {out_dir} exists and is not a directory")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create run directory {out_dir}: {exc.strerror or exc}") from exc
    files = {k: out_dir / v for k, v in RUN_FILES.items()}
    for path in [*files.values(), best_path(files["tuned"])]:
        check_writable(path)
    return files


def clear_previous_run(files: dict[str, Path]) -> list[Path]:
    """Remove the files an earlier run left in this run directory (only the run's own file names, and
    their hidden temporaries from a killed write): a run directory holds one run's files, never a mix
    in which report.json could point at a stale model.onnx. Other files there are left alone."""
    removed = []
    for path in [*files.values(), best_path(files["tuned"])]:
        remove_stale_temporaries(path)
        if path.is_file():
            path.unlink()
            removed.append(path)
    return removed


def _check_data(data: str) -> None:
    """Fail before any stage runs when the data cannot be there (the loaders check the rest)."""
    from prunekit.data import BUILTIN

    if data != BUILTIN and not Path(data).expanduser().is_dir():
        raise DataError(f"data folder not found: {data}")


def run_pipeline(
    config: RunConfig,
    out_dir: Path,
    callbacks: FinetuneCallbacks | None = None,
    on_stage: OnStage | None = None,
) -> dict[str, Any]:
    """Run every stage into `out_dir` and write `report.json`. With `max_accuracy_drop`, raises
    AccuracyGateError (exit code 3) after writing everything when the slimmed model lost more."""
    out_dir = Path(out_dir)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(
            "prunekit run is one process; under torchrun run `prunekit finetune` (then slim in one process)"
        )
    _check_data(config.data)
    files = run_dir(out_dir)
    formats = config.slim.formats
    outputs = SlimOutputs.for_output(
        files[formats[0]] if formats else files["slim"], config.slim, files["slim"], files["plan"]
    )
    on_stage = on_stage or (lambda name, result: None)

    torch.manual_seed(0)  # reproducible random init (no weights, or a fresh head), as `prunekit gate`
    model, spec = load_model(config.model)
    runtime = resolve_runtime(config.finetune.device)  # one process (torchrun is refused above)
    # the data is checked against the model before any stage writes a file
    loaders = data_loaders(config.data, spec, config.finetune, runtime, "[model] num_classes =")
    # quantisation calibrates on the training images without augmentation, checked before training
    dynamic = config.gates.dynamic
    if dynamic:  # what the slim stage of a dynamic model refuses, refused before training
        from prunekit.stages.slim_dynamic import check_dynamic_options

        check_dynamic_options(config.slim, None, None)
    elif config.slim.drop_never_on:
        raise ConfigError("[slim] drop_never_on applies to dynamic gates: set [gates] dynamic = true")
    needs_plain = config.slim.quantize_modes or config.slim.drop_never_on
    plain = plain_loaders(config.data, spec) if needs_plain else None
    calibration = calibration_batches(plain, config.slim)
    clear_previous_run(files)  # everything is validated: from here on the directory is this run's
    done: dict[str, Any] = {}
    stage = "gate"
    try:
        # taylor importance takes its gradients on the run's training batches
        batches = loaders.train if config.gates.importance == "taylor" else None
        gated = gate(model, spec=spec, config=config.gates, data=batches)
        gated.save(files["gated"])
        done["gate"] = gated.to_dict() | {"output": str(files["gated"])}
        on_stage("gate", gated)

        stage = "finetune"
        tuned = finetune_to_files(
            gated.checkpoint,
            loaders,
            config.data,
            files["tuned"],
            config.finetune,
            callbacks=callbacks,
            runtime=runtime,
            metrics=files["metrics"],
        )
        done["finetune"] = tuned.to_dict()
        on_stage("finetune", tuned)

        stage = "slim"
        if dynamic:  # the skipping model, shipped as ONNX only (prunekit.stages.slim_dynamic)
            from prunekit.stages.slim_dynamic import slim_dynamic, write_dynamic

            slimmed = slim_dynamic(
                tuned.checkpoint,
                val_loader=loaders.val,
                data=config.data,
                rtol=config.slim.rtol,
                calibration=calibration,
                classes=list(loaders.classes),
            )
            slimmed.source = str(files["tuned"])
            write_dynamic(slimmed, outputs.onnx, config.slim)  # type: ignore[arg-type]
        else:
            slimmed = slim(tuned, val_loader=loaders.val, data=config.data, rtol=config.slim.rtol)
            slimmed.source = str(files["tuned"])
            write_slim(
                slimmed,
                outputs,
                config.slim,
                reference=tuned.checkpoint,
                val_loader=loaders.val,
                calibration=calibration,
            )
        done["slim"] = slimmed.to_dict()
        on_stage("slim", slimmed)

        stage = "report"
        return _report(config, files, out_dir, done["gate"], done["finetune"], done["slim"])
    except AccuracyGateError:
        raise  # its report is complete and written
    except (PrunekitError, KeyboardInterrupt) as exc:
        error = exc if isinstance(exc, PrunekitError) else Interrupted.of(exc)
        _failure_report(config, files, done, stage, error)
        if error is exc:
            raise
        raise error from None


def _existing(files: dict[str, Path]) -> dict[str, str]:
    """The run's files that exist (all of this run: a previous run's were cleared), and report.json."""
    return {k: str(v) for k, v in files.items() if v.exists() or k == "report"}


def _failure_report(
    config: RunConfig, files: dict[str, Path], done: dict[str, Any], stage: str, error: PrunekitError
) -> None:
    """report.json for a run that stopped in `stage`: what was done, which files exist, and why it
    stopped. The error carries the document (`error.report`) for `run --json` to print."""
    report = envelope("run") | {
        "config": config.to_dict(),
        "files": _existing(files),
        "gate": done.get("gate"),
        "finetune": done.get("finetune"),
        "slim": done.get("slim"),
        "summary": {"passed": False, "max_accuracy_drop": config.max_accuracy_drop},
        "error": {"stage": stage, "message": " ".join(str(error).split()), "exit_code": error.exit_code},
    }
    with contextlib.suppress(PrunekitError):  # a full disk must not hide the error that stopped the run
        atomic_write_text(files["report"], json.dumps(report, indent=1, default=str) + "\n")
    error.report = report  # type: ignore[attr-defined]


def _report(
    config: RunConfig,
    files: dict[str, Path],
    out_dir: Path,
    gate: dict[str, Any],
    tuned: dict[str, Any],
    slim: dict[str, Any],
) -> dict[str, Any]:
    try:
        write_run_plots(tuned["history"], slim["widths"], out_dir)
    except Exception as exc:  # noqa: BLE001 - a plot is a convenience: it never fails the run
        from prunekit.data import warn

        warn(f"no plots written: {type(exc).__name__}: {first_line(exc)}")
    before = tuned["baseline_val_acc"]
    after = slim["accuracy"]["slim"]
    drop = 100.0 * (before - after)
    allowed = config.max_accuracy_drop
    quantization = quantization_failure(slim, config.slim)
    report = envelope("run") | {
        "config": config.to_dict(),
        "files": _existing(files),
        "gate": gate,
        "finetune": tuned,
        "slim": slim,
        "summary": {
            "macs_before": slim["original"]["macs"],
            "macs_after": slim["slim"]["macs"],
            "macs_ratio": slim["macs_ratio"],
            "params_before": slim["original"]["params"],
            "params_after": slim["slim"]["params"],
            "accuracy_before": before,
            "accuracy_after": after,
            "accuracy_drop_points": drop,
            "max_accuracy_drop": allowed,
            "passed": (allowed is None or drop <= allowed) and quantization is None,
            "max_quantization_drop": config.slim.max_quantization_drop,
            "latency_ratio": (slim.get("latency") or {}).get("ratio"),  # slim / original
        },
    }
    message = None
    if allowed is not None and drop > allowed:
        message = (
            f"the slimmed model lost {drop:.2f} accuracy points (allowed {allowed:g}); "
            f"everything is in {out_dir}, see report.json"
        )
    elif quantization is not None:
        message = f"{quantization}; everything is in {out_dir}, see report.json"
    report["error"] = None if message is None else {"stage": "ci", "message": message, "exit_code": 3}
    atomic_write_text(files["report"], json.dumps(report, indent=1, default=str) + "\n")
    if message is not None:
        error = AccuracyGateError(message)
        error.report = report  # type: ignore[attr-defined]  # for `run --json` to print
        raise error
    return report


__all__ = ["RUN_FILES", "clear_previous_run", "run_dir", "run_pipeline"]
