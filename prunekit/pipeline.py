"""The stages, and the one place where they are chained: gate -> finetune -> slim (+ export).

Each stage function takes paths and configs, returns a plain-data result (what the CLI renders and
what `report.json` holds), and writes its outputs atomically.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.checkpoint import Checkpoint, ModelSpec, example_batch, load_checkpoint, save_checkpoint
from prunekit.config import RunConfig
from prunekit.errors import AccuracyGateError, CheckpointError, ConfigError, VerificationError
from prunekit.fileio import atomic_path, atomic_write_text, check_writable
from prunekit.finetune import (
    EpochMetrics,
    FinetuneConfig,
    Interrupted,
    Trainer,
    evaluate,
    finetune,
    make_budget,
)
from prunekit.gates import GateBank, GateConfig, get_gates, insert_gates_, make_layout, remove_gates_
from prunekit.graph import ChannelGraph, analyze
from prunekit.models import check_runs
from prunekit.objective import MacModel
from prunekit.plan import ChannelPlan, magnitude_scores, plan_from_units
from prunekit.slim import masked, slim_, verify_slim


def _macs(model: nn.Module, spec: ModelSpec) -> tuple[int, int]:
    from prunekit.measure import count_macs

    bank = get_gates(model)
    if bank is not None:  # count the architecture, not the gate hooks
        model = copy.deepcopy(model)
        remove_gates_(model)
    report = count_macs(model, example_batch(spec))
    return report.total_macs, report.params


def group_widths(graph: ChannelGraph, plan: ChannelPlan | None) -> list[dict[str, Any]]:
    rows = []
    for g, kept in zip(
        graph.groups, plan.keep if plan else [range(g.units) for g in graph.groups], strict=True
    ):
        rows.append(
            {"group": g.name, "before": g.channels, "after": len(kept) * g.unit_width, "units": g.units}
        )
    return rows


# --------------------------------------------------------------------------------------------------
# gate
# --------------------------------------------------------------------------------------------------


def gate_stage(
    arch: str,
    out: Path,
    *,
    weights: str | None = None,
    num_classes: int | None = None,
    config: GateConfig | None = None,
    input_size: int | None = None,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Load a torchvision model, analyse it, insert gates and write the gated checkpoint. `mean`/`std`:
    the input normalisation the weights were trained with (default: the weights' own, else ImageNet's)."""
    from prunekit.models import load_model

    check_writable(out)
    config = config or GateConfig()
    torch.manual_seed(seed)  # reproducible random init (no weights, or a fresh --num-classes head)
    loaded = load_model(arch, weights=weights, num_classes=num_classes)
    spec = ModelSpec(
        loaded.arch,
        loaded.num_classes,
        input_size or loaded.input_size,
        mean or loaded.mean,
        std or loaded.std,
        weights,
    )
    return gate_model(loaded.model, spec, out, config)


def gate_model(model: nn.Module, spec: ModelSpec, out: Path, config: GateConfig) -> dict[str, Any]:
    model.eval()
    check_runs(model, spec.arch, example_batch(spec))
    macs, params = _macs(model, spec)
    graph = analyze(model, example_batch(spec))
    layout = make_layout(graph, config, magnitude_scores(model, graph))
    bank = GateBank(layout, config)
    insert_gates_(model, graph, bank)
    mac_model = MacModel(graph)
    summary = {
        "arch": spec.arch,
        "num_classes": spec.num_classes,
        "input_size": spec.input_size,
        "weights": spec.weights,
        "macs": macs,
        "params": params,
        "groups": len(graph.groups),
        "gates": bank.num_gates,
        "learnable_gates": int((~bank.fixed_on).sum()),
        "granularity": config.granularity,
        "gateable_macs": int(mac_model.full),
        "gateable_fraction": mac_model.full / max(1, macs),
        "frozen": [{"where": f.where, "reason": f.reason} for f in graph.frozen],
        "output": str(out),
    }
    ckpt = Checkpoint(spec, model, graph, "gated", extra={"original": {"macs": macs, "params": params}})
    save_checkpoint(ckpt, out)
    return summary


# --------------------------------------------------------------------------------------------------
# finetune
# --------------------------------------------------------------------------------------------------


@dataclass
class FinetuneCallbacks:
    on_start: Callable[[dict[str, Any]], None] | None = None
    on_step: Callable[[dict[str, float]], None] | None = None
    on_epoch: Callable[[EpochMetrics], None] | None = None


def _load_start(gated: Path, needed: bool, spec: ModelSpec) -> Checkpoint | None:
    """The gated checkpoint a resumed run started from (needed for its distillation teacher)."""
    if not needed:
        return None
    start = load_checkpoint(gated)
    if start.spec.arch != spec.arch or start.spec.num_classes != spec.num_classes or start.gates is None:
        raise CheckpointError(f"{gated} is not the gated checkpoint this run started from")
    return start


def best_path(out: Path) -> Path:
    return out.with_name(f"{out.stem}.best{out.suffix or '.pt'}")


def finetune_stage(
    gated: Path,
    data: str,
    out: Path,
    config: FinetuneConfig,
    *,
    resume: bool = False,
    callbacks: FinetuneCallbacks | None = None,
) -> dict[str, Any]:
    """Train gates and weights toward `config.target_macs`; checkpoint every epoch to `out` (last) and
    `<out>.best.pt` (best validation accuracy within the budget)."""
    from prunekit.data import resolve_data
    from prunekit.measure import count_macs

    check_writable(out)
    callbacks = callbacks or FinetuneCallbacks()
    source = out if resume else gated
    if resume and not out.is_file():
        raise CheckpointError(f"--resume: no checkpoint to resume at {out}")
    ckpt = load_checkpoint(source)
    bank = ckpt.gates
    if bank is None:
        raise CheckpointError(f"{source} has no gates: create one with `prunekit gate`")
    if resume:
        if ckpt.training is None:
            raise CheckpointError(f"{out} holds no training state to resume (finished or not from finetune)")
        config = FinetuneConfig.from_dict(ckpt.training["config"])
    torch.manual_seed(config.seed)
    spec = ckpt.spec
    loaders = resolve_data(
        data,
        input_size=spec.input_size,
        mean=spec.mean,
        std=spec.std,
        batch_size=config.batch_size,
        workers=config.workers,
        seed=config.seed,
    )
    if loaders.num_classes != spec.num_classes:
        raise ConfigError(
            f"the data has {loaders.num_classes} classes but the model {spec.num_classes}: "
            f"gate the model with --num-classes {loaders.num_classes}"
        )
    # the ungated starting model: baseline accuracy and distillation teacher; on --resume it comes from
    # the original gated checkpoint, not from the half-trained weights being resumed
    start = ckpt if not resume else _load_start(gated, config.distill > 0, spec)
    plain = copy.deepcopy(start.model if start is not None else ckpt.model)
    remove_gates_(plain)
    total_macs = count_macs(plain, example_batch(spec)).total_macs
    mac_model = MacModel(ckpt.graph)
    budget = make_budget(bank, mac_model, total_macs, config.target_macs)
    teacher = plain if config.distill > 0 else None
    steps = (
        len(loaders.train)
        if config.max_steps_per_epoch is None
        else min(len(loaders.train), config.max_steps_per_epoch)
    )
    trainer = Trainer(ckpt.model, bank, mac_model, budget, config, steps, teacher)
    history = list(ckpt.history)
    extra = dict(ckpt.extra)
    if resume:
        trainer.load_state(ckpt.training)  # type: ignore[arg-type]
        if ckpt.training.get("train_loader_rng") is not None:  # type: ignore[union-attr]
            # continue the shuffling where it stopped, as an uninterrupted run would
            loaders.train.generator.set_state(ckpt.training["train_loader_rng"])  # type: ignore[index]
    else:
        acc, _ = evaluate(plain.to(trainer.device), loaders.val, trainer.device)
        extra["baseline"] = {"val_acc": acc, "macs": total_macs, "data": data}
    if callbacks.on_start:
        callbacks.on_start(
            {
                "device": str(trainer.device),
                "amp": trainer.amp,
                "t": budget.t,
                "target_macs": config.target_macs,
                "steps_per_epoch": steps,
                "baseline_val_acc": extra["baseline"]["val_acc"],
                "start_epoch": trainer.epoch,
                "gateable_fraction": budget.gateable_macs / budget.total_macs,
            }
        )
    best_acc = max((h["val_acc"] for h in history if h.get("within_budget")), default=-1.0)

    def save(tr: Trainer, m: EpochMetrics | None, interrupted: bool) -> None:
        nonlocal best_acc
        if m is not None:
            row = m.to_dict()
            row["within_budget"] = m.macs_fraction <= config.target_macs + 0.01
            history.append(row)
        finished = tr.epoch >= config.epochs and not interrupted
        state = None if finished else tr.state() | {"train_loader_rng": loaders.train.generator.get_state()}
        out_ckpt = Checkpoint(
            spec,
            tr.model,
            ckpt.graph,
            "finetuned",
            history=history,
            training=state,
            extra=extra | {"finetune": config.to_dict(), "budget": vars(budget)},
        )
        save_checkpoint(out_ckpt, out)
        if m is not None and history[-1]["within_budget"] and m.val_acc > best_acc and m.decided:
            best_acc = m.val_acc
            save_checkpoint(out_ckpt, best_path(out))

    try:
        finetune(
            trainer,
            loaders.train,
            loaders.val,
            save=save,
            on_step=callbacks.on_step,
            on_epoch=callbacks.on_epoch,
        )
    except Interrupted:
        save(trainer, None, True)
        raise Interrupted() from None
    last = history[-1]
    return {
        "output": str(out),
        "best": str(best_path(out)) if best_path(out).is_file() else None,
        "baseline_val_acc": extra["baseline"]["val_acc"],
        "history": history,
        "final": last,
        "target_macs": config.target_macs,
        "macs_before": total_macs,
        "expected_macs": last["macs_fraction"] * total_macs,
    }


# --------------------------------------------------------------------------------------------------
# slim (+ export)
# --------------------------------------------------------------------------------------------------


def slim_stage(
    source: Path,
    out: Path,
    *,
    export: str = "onnx",
    plan_file: Path | None = None,
    data: str | None = None,
    opset: int = 18,
    latency: bool = False,
    threads: int = 2,
    checkpoint_out: Path | None = None,
    rtol: float = 1e-4,
    plan_out: Path | None = None,
) -> dict[str, Any]:
    """Decide, slim, verify against the gated model, save the slim checkpoint, export and check ONNX."""
    if export not in ("onnx", "none"):
        raise ConfigError(f"--export must be onnx or none, got {export}")
    onnx_path = out if export == "onnx" else None
    ckpt_path = checkpoint_out or (out.with_suffix(".pt") if export == "onnx" else out)
    if onnx_path is not None and ckpt_path == onnx_path:
        raise ConfigError("the ONNX file and the slim checkpoint would have the same path")
    for p in (onnx_path, ckpt_path, plan_out):
        if p is not None:
            check_writable(p)
    ckpt = load_checkpoint(source)
    if ckpt.stage == "slim":
        raise CheckpointError(f"{source} is already slimmed")
    spec, graph = ckpt.spec, ckpt.graph
    bank = ckpt.gates
    if plan_file is not None:
        plan = ChannelPlan.load(plan_file)
        plan.check_fits(graph)
        reference_model = ckpt.model
        if bank is not None:
            remove_gates_(reference_model)
        plan_source = str(plan_file)
    elif bank is not None:
        decisions = bank.decisions()
        plan = plan_from_units(graph, bank.unit_values(decisions.float().unsqueeze(0))[0].bool().tolist())
        reference_model = ckpt.model
        plan_source = "gates"
    else:
        raise CheckpointError(
            f"{source} has no gates: run `prunekit finetune` first, or pass --plan PLAN.json"
        )

    plain = copy.deepcopy(reference_model)
    if get_gates(plain) is not None:
        remove_gates_(plain)
    macs_before, params_before = _macs(plain, spec)
    slim = slim_(copy.deepcopy(plain), graph, plan).eval()

    loaders = _maybe_loaders(data, spec)
    inputs = next(iter(loaders.val))[0][:8] if loaders else example_batch(spec, 4)
    if plan_file is not None:
        with masked(reference_model, graph, plan):
            parity = verify_slim(reference_model.eval(), slim, inputs, rtol)
    else:
        parity = verify_slim(reference_model.eval(), slim, inputs, rtol)

    macs_after, params_after = _macs(slim, spec)
    keep = plan.unit_mask(graph)
    predicted = macs_before - graph.macs() + graph.macs(keep)
    result: dict[str, Any] = {
        "source": str(source),
        "plan_source": plan_source,
        "arch": spec.arch,
        "original": {"macs": macs_before, "params": params_before},
        "slim": {"macs": macs_after, "params": params_after, "predicted_macs": predicted},
        "macs_ratio": macs_after / max(1, macs_before),
        "params_ratio": params_after / max(1, params_before),
        "parity": parity.to_dict(),
        "widths": group_widths(graph, plan),
        "checkpoint": str(ckpt_path),
    }
    if abs(predicted - macs_after) > 0.01 * max(1, macs_after):
        raise VerificationError(
            f"the slimmed model has {macs_after} MACs (fvcore) but the plan predicts {predicted}"
        )
    if loaders is not None:
        device = torch.device("cpu")
        # "original": the starting model as fine-tuning measured it on the same data; with --plan the
        # checkpoint's own weights are the starting point, so measure them here
        base = ckpt.extra.get("baseline", {})
        original = base.get("val_acc") if base.get("data") == data else None
        if original is None and plan_file is not None:
            original = evaluate(plain, loaders.val, device)[0]
        result["accuracy"] = {"slim": evaluate(slim, loaders.val, device)[0], "original": original}

    slim_ckpt = Checkpoint(
        spec,
        slim,
        graph,
        "slim",
        plan=plan,
        history=ckpt.history,
        extra=ckpt.extra | {"slim_report": {k: v for k, v in result.items() if k != "widths"}},
    )
    if onnx_path is None:
        save_checkpoint(slim_ckpt, ckpt_path)
    else:
        from prunekit.export import export_onnx

        # export next to the target, save the checkpoint, and only then put the ONNX file in place: a
        # failure anywhere leaves neither file half-done nor one without the other
        with atomic_path(onnx_path) as staged:
            exported = export_onnx(
                slim, staged, input_shape=(3, spec.input_size, spec.input_size), opset=opset, inputs=inputs
            )
            result["onnx"] = exported.to_dict() | {
                "path": str(onnx_path),
                "size_bytes": os.path.getsize(staged),
            }
            if latency:
                result["latency"] = _latency_pair(plain, staged, spec, opset, threads)
            save_checkpoint(slim_ckpt, ckpt_path)
    result["checkpoint_bytes"] = os.path.getsize(ckpt_path)
    if plan_out is not None:
        plan.save(plan_out)
        result["plan"] = str(plan_out)
    return result


# --------------------------------------------------------------------------------------------------
# run: the whole job from one config
# --------------------------------------------------------------------------------------------------

RUN_FILES = {
    "gated": "gated.pt",
    "tuned": "tuned.pt",
    "onnx": "model.onnx",
    "slim": "model.pt",
    "plan": "plan.json",
    "report": "report.json",
}


def run_pipeline(
    config: RunConfig,
    out_dir: Path,
    callbacks: FinetuneCallbacks | None = None,
    on_stage: Callable[[str, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """gate -> finetune -> slim -> export into `out_dir`, then `report.json`. With `max_accuracy_drop`,
    raises AccuracyGateError (exit code 3) after writing everything when the slimmed model lost more."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create run directory {out_dir}: {exc.strerror or exc}") from exc
    files = {k: out_dir / v for k, v in RUN_FILES.items()}
    m = config.model
    gate = gate_stage(
        m.arch,
        files["gated"],
        weights=m.weights,
        num_classes=m.num_classes,
        config=config.gates,
        input_size=m.input_size,
        mean=m.mean,
        std=m.std,
    )
    if on_stage:
        on_stage("gate", gate)
    tuned = finetune_stage(files["gated"], config.data, files["tuned"], config.finetune, callbacks=callbacks)
    if on_stage:
        on_stage("finetune", tuned)
    exports = config.slim.export == "onnx"
    slim = slim_stage(
        files["tuned"],
        files["onnx"] if exports else files["slim"],
        export=config.slim.export,
        data=config.data,
        opset=config.slim.opset,
        latency=config.slim.latency and exports,
        threads=config.slim.threads,
        checkpoint_out=files["slim"],
        plan_out=files["plan"],
    )
    if on_stage:
        on_stage("slim", slim)
    before = tuned["baseline_val_acc"]
    after = slim["accuracy"]["slim"]
    drop = 100.0 * (before - after)
    allowed = config.max_accuracy_drop
    report = {
        "config": config.to_dict(),
        "files": {k: str(v) for k, v in files.items() if v.exists() or k == "report"},
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
            "passed": allowed is None or drop <= allowed,
            "latency_speedup": slim.get("latency", {}).get("speedup"),
        },
    }
    atomic_write_text(files["report"], json.dumps(report, indent=1, default=str) + "\n")
    if not report["summary"]["passed"]:
        raise AccuracyGateError(
            f"the slimmed model lost {drop:.2f} accuracy points (allowed {allowed:g}); "
            f"everything is in {out_dir}, see report.json"
        )
    return report


def _maybe_loaders(data: str | None, spec: ModelSpec):  # noqa: ANN202
    if data is None:
        return None
    from prunekit.data import resolve_data

    return resolve_data(
        data, input_size=spec.input_size, mean=spec.mean, std=spec.std, batch_size=64, train_augment=False
    )


def _latency_pair(
    original: nn.Module, slim_onnx: Path, spec: ModelSpec, opset: int, threads: int
) -> dict[str, Any]:
    """onnxruntime latency of the original and the slimmed export, measured side by side."""
    from prunekit.export import export_onnx
    from prunekit.measure import onnx_latency_ms

    shape = (1, 3, spec.input_size, spec.input_size)
    with tempfile.TemporaryDirectory() as tmp:
        orig_path = Path(tmp) / "original.onnx"
        export_onnx(original, orig_path, input_shape=shape[1:], opset=opset)
        before = onnx_latency_ms(orig_path, shape, threads=threads, warmup=5, repeats=30)
        after = onnx_latency_ms(slim_onnx, shape, threads=threads, warmup=5, repeats=30)
    return {
        "threads": threads,
        "batch": 1,
        "original_ms": before.median_ms,
        "slim_ms": after.median_ms,
        "speedup": before.median_ms / max(after.median_ms, 1e-9),
    }


__all__ = [
    "FinetuneCallbacks",
    "best_path",
    "finetune_stage",
    "gate_model",
    "gate_stage",
    "group_widths",
    "run_pipeline",
    "slim_stage",
]
