"""Stage 2, finetune: train gates and weights toward a MACs target, then fine-tune under fixed decisions.

`finetune(gated, train_loader, val_loader, config=...)` runs in memory on any GateResult or gated
Checkpoint and returns a FinetuneResult. `finetune_stage(path, data, out, ...)` is the file-based shell:
it builds the loaders, checkpoints every epoch (last at `out`, best within budget beside it), saves a
resumable checkpoint on Ctrl-C, and resumes a saved run. `prepare_finetune` builds the pieces one run
needs (trainer, teacher, budget) for callers with their own loop: tests and benchmarks.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed
from torch import nn

from prunekit.allocation import largest_prefix, raise_floors_, uniform_order
from prunekit.checkpoint import Checkpoint, load_checkpoint, non_finite_tensor, save_checkpoint
from prunekit.config import RESUME_MUTABLE, FinetuneConfig, ModelSpec
from prunekit.errors import CheckpointError, ConfigError, Interrupted, TrainingError, WriteError, first_line
from prunekit.fileio import check_writable
from prunekit.gates import GateBank, insert_gates_, remove_gates_, ungated_copy
from prunekit.latency_table import table_path
from prunekit.metrics import MetricsLog, metrics_path
from prunekit.objective import LatencyModel, MacBudget, MacModel, target_to_budget
from prunekit.runtime import Runtime, resolve_runtime, unwrap
from prunekit.stages.gate import original_size
from prunekit.trainer import EpochMetrics, Trainer, evaluate, make_budget, run_epochs


@dataclass(frozen=True)
class Baseline:
    """The ungated starting model's validation accuracy (top-1, top-5), and what it was measured on."""

    val_acc: float
    macs: int
    data: str | None  # the --data it was measured on; None for loaders handed over in memory
    val_top5: float | None = None  # None in checkpoints written before top-5 was measured

    def to_dict(self) -> dict[str, Any]:
        return {"val_acc": self.val_acc, "val_top5": self.val_top5, "macs": self.macs, "data": self.data}


@dataclass(frozen=True)
class FinetuneStart:
    """What a progress display shows before the first step."""

    device: str
    amp: bool
    t: float
    target_macs: float
    steps_per_epoch: int
    baseline_val_acc: float
    start_epoch: int
    gateable_fraction: float
    epochs: int = 0  # of the whole run
    batch_size: int = 0  # per process
    baseline_val_top5: float | None = None
    budget: str = "macs"  # "latency": target_macs and t are fractions of the predicted latency


@dataclass
class FinetuneCallbacks:
    on_start: Callable[[FinetuneStart], None] | None = None
    on_step: Callable[[dict[str, float]], None] | None = None
    on_epoch: Callable[[EpochMetrics], None] | None = None
    on_baseline: Callable[[int], None] | None = None  # before the baseline evaluation: its image count
    on_latency_table: Callable[[str | None], None] | None = None  # before timing the layers: its file

    def also(self, other: FinetuneCallbacks) -> FinetuneCallbacks:
        """These callbacks, then `other`'s, for every event."""

        def both(a: Any, b: Any) -> Any:
            if a is None or b is None:
                return a or b
            return lambda *args: (a(*args), b(*args))[-1]

        return FinetuneCallbacks(
            both(self.on_start, other.on_start),
            both(self.on_step, other.on_step),
            both(self.on_epoch, other.on_epoch),
            both(self.on_baseline, other.on_baseline),
            both(self.on_latency_table, other.on_latency_table),
        )


@dataclass
class FinetuneResult:
    checkpoint: Checkpoint  # stage "finetuned": the trained gated model, its history and budget
    baseline: Baseline
    budget: MacBudget
    config: FinetuneConfig
    files: dict[str, str] = field(default_factory=dict)  # what the file stage wrote ("last", "best")
    original_macs: float | None = None  # the ungated model's MACs (the budget's total with a MACs budget)
    latency: dict[str, Any] | None = None  # a latency budget: its target and table

    @property
    def model(self) -> nn.Module:
        return self.checkpoint.model

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.checkpoint.history

    @property
    def final(self) -> dict[str, Any]:
        return self.history[-1]

    @property
    def expected_macs(self) -> float:
        return self.final["macs_fraction"] * (self.original_macs or self.budget.total_macs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "output": self.files.get("last"),
            "best": self.files.get("best"),
            "metrics": self.files.get("metrics"),
            "baseline_val_acc": self.baseline.val_acc,
            "baseline_val_top5": self.baseline.val_top5,
            "history": self.history,
            "final": self.final,
            "target_macs": self.config.target_macs,
            "target_latency": self.latency,
            "macs_before": self.original_macs or self.budget.total_macs,
            "expected_macs": round(self.expected_macs),  # a count: an integer
        }


@dataclass
class FinetuneSession:
    """Everything one run needs, built once: the trainer (optimisers, schedule), the ungated teacher,
    the MAC budget. The gated checkpoint it trains is `checkpoint` (its model is trained in place)."""

    checkpoint: Checkpoint
    trainer: Trainer
    plain: nn.Module  # the ungated starting model: baseline accuracy and distillation teacher
    budget: MacBudget  # of MACs, or of predicted milliseconds with a latency budget
    steps_per_epoch: int
    latency: dict[str, Any] | None = None  # a latency budget: its target and table (see _latency_budget)
    floors: dict[str, Any] | None = None  # the floors raised under the learned gates (uniform_floor)

    @property
    def runtime(self) -> Runtime:
        return self.trainer.runtime

    def evaluate_baseline(self, val_loader: Any, data: str | None) -> Baseline:
        device = self.runtime.device
        val = evaluate(self.plain.to(device), val_loader, device, runtime=self.runtime)
        return Baseline(
            val.top1, int(self.trainer.total_macs or self.budget.total_macs), data, val_top5=val.top5
        )

    def start_info(self, baseline: Baseline) -> FinetuneStart:
        b = self.budget
        return FinetuneStart(
            device=str(self.runtime.device),
            amp=self.trainer.amp,
            t=b.t,
            target_macs=b.target_fraction,
            steps_per_epoch=self.steps_per_epoch,
            baseline_val_acc=baseline.val_acc,
            start_epoch=self.trainer.epoch,
            gateable_fraction=b.gateable_macs / b.total_macs,
            epochs=self.trainer.config.epochs,
            batch_size=self.trainer.config.batch_size,
            baseline_val_top5=baseline.val_top5,
            budget="macs" if self.latency is None else "latency",
        )


def _bank(ckpt: Checkpoint, where: str) -> GateBank:
    bank = ckpt.gates
    if bank is None:
        raise CheckpointError(f"{where} has no gates: create one with `prunekit gate`")
    return bank


def prepare_finetune(
    gated: Checkpoint,
    config: FinetuneConfig,
    steps_per_epoch: int,
    *,
    runtime: Runtime | None = None,
    start: Checkpoint | None = None,
    latency_cache: Path | None = None,
    on_latency_table: Callable[[str | None], None] | None = None,
) -> FinetuneSession:
    """Build one run's trainer, teacher and budget. `start`: the gated checkpoint the run began from,
    when `gated` is a half-trained one being resumed (the teacher is the starting model, not the
    half-trained weights)."""
    runtime = runtime or resolve_runtime(config.device)
    bank = _bank(gated, "the checkpoint")
    config = config.resolve_method(bank.kind == "dynamic")
    check_gate_kind(bank, config)
    if config.batch_size < 2 and any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) for m in gated.model.modules()
    ):
        raise ConfigError("batch_size 1 cannot train BatchNorm layers (one value per channel): use 2 or more")
    plain = ungated_copy((start or gated).model)
    if config.sync_bn and runtime.distributed:
        _convert_sync_batchnorm(gated, bank, runtime)
    mac_model = MacModel(gated.graph)
    total_macs = original_size(gated).macs
    latency: dict[str, Any] | None = None
    if config.target_latency is None:
        objective, budget = mac_model, make_budget(bank, mac_model, total_macs, config.target_macs)  # type: ignore[arg-type]
    else:  # onnxruntime times a CPU copy of the starting model: the table, then the decided widths
        timing_model = copy.deepcopy(plain).cpu().eval()
        objective, budget, latency = _latency_budget(
            gated, bank, timing_model, config, runtime, latency_cache, on_latency_table
        )
    floors = None
    dynamic = bank.kind == "dynamic"
    if (
        config.method == "gumbel"
        and config.uniform_floor
        and gated.stage == "gated"
        and not bank.is_decided
        and not dynamic  # per-example gates have no uniform cut to start from
    ):
        floors = _raise_floors(bank, objective, budget, config.uniform_floor)
    steps = (
        steps_per_epoch
        if config.max_steps_per_epoch is None
        else min(steps_per_epoch, config.max_steps_per_epoch)
    )
    teacher = plain if config.distill > 0 else None
    trainer = Trainer(
        gated.model,
        bank,
        objective,
        budget,
        config,
        steps,
        runtime,
        teacher,
        mac_counter=None if latency is None else mac_model,
        total_macs=total_macs,
        graph=gated.graph,  # after the decision point, the slimmed model trains
    )
    if latency is not None:  # the decision point times the decided widths for real
        from prunekit.config import DEFAULT_THREADS
        from prunekit.latency_table import MeasuredLatency

        measured = MeasuredLatency(
            timing_model,
            gated.graph,
            gated.spec.input_shape,
            DEFAULT_THREADS,  # type: ignore[arg-type]
        )
        trainer.measure, trainer.decision_record = measured, latency
    return FinetuneSession(gated, trainer, plain, budget, steps, latency, floors)


# FinetuneConfig fields (and the values) that only static gates have a meaning for
_STATIC_ONLY = (
    ("method", "magnitude", "--method magnitude"),
    ("method", "sensitivity", "--method sensitivity"),
    ("allocation", "uniform", "--allocation uniform"),
)


def check_gate_kind(bank: GateBank, config: FinetuneConfig) -> None:
    """Options that only one kind of gates has: a one-line error before any work starts."""
    if bank.kind != "dynamic":
        return
    for key, value, flag in _STATIC_ONLY:
        if getattr(config, key) == value:
            raise ConfigError(
                f"{flag} applies to static gates; this checkpoint has dynamic gates (gate --dynamic)"
            )
    if config.target_latency is not None:
        raise ConfigError(
            "--target-latency applies to static gates (a per-layer table of fixed widths); give dynamic "
            "gates a --target-macs (the mean over examples)"
        )


def _raise_floors(bank: GateBank, objective: MacModel, budget: MacBudget, share: float) -> dict[str, Any]:
    """Floors under the learned gates from the uniform cut to this budget (prunekit.allocation). A
    run starting from the gate stage's checkpoint only: a resumed one has its floors in its layout."""

    def fits(decisions: torch.Tensor) -> bool:
        kept = float(objective(bank.unit_activity(decisions))[0]) / objective.gateable_macs
        return budget.fits(kept)

    before = int(bank.fixed_on.sum())
    uniform = largest_prefix(bank, uniform_order(bank), fits)
    added = raise_floors_(bank, uniform, share)
    return {
        "share": share,
        "fixed_gates_before": before,
        "fixed_gates": before + added,
        "gates": bank.num_gates,
    }


def _latency_budget(
    gated: Checkpoint,
    bank: GateBank,
    timing_model: nn.Module,
    config: FinetuneConfig,
    runtime: Runtime,
    cache: Path | None,
    on_measure: Callable[[str | None], None] | None = None,
) -> tuple[LatencyModel, MacBudget, dict[str, Any]]:
    """The latency objective: the per-layer table (read from `cache` when it was measured for this
    model and machine, else measured on the first process and shared), its LatencyModel and the budget
    of `config.target_latency`. Under torchrun every process gets the first one's table, so all of
    them train toward the same numbers."""
    from prunekit.config import DEFAULT_THREADS, parse_target_latency
    from prunekit.latency_table import LatencyTable, latency_table

    unit, value = parse_target_latency(config.target_latency)  # type: ignore[misc]
    table_dict = None
    source = None
    if runtime.is_primary:
        if on_measure is not None and not (cache is not None and cache.is_file()):
            on_measure(None if cache is None else str(cache))
        table, found = latency_table(
            timing_model,
            gated.graph,
            gated.spec.input_shape,  # type: ignore[arg-type]
            threads=DEFAULT_THREADS,
            granularity=bank.config.granularity,
            cached=[cache] if cache is not None else [],
        )
        table_dict, source = table.to_dict(), (str(found) if found else "measured")
    table_dict, source = runtime.gather((table_dict, source))[0]
    table = LatencyTable.from_dict(table_dict)
    model = LatencyModel(gated.graph, table.beta(), block=table.block)
    fraction = value if unit == "fraction" else value / table.full_ms
    fixed_only = bank.unit_activity(bank.fixed_on)
    min_ms = table.fixed_ms + float(model(fixed_only)[0])
    target_ms = fraction * table.full_ms
    if not 0.0 < fraction < 1.0 or target_ms < min_ms:
        raise ConfigError(
            f"target_latency {config.target_latency} ({target_ms:.2f} ms) cannot be met: the model takes "
            f"{table.full_ms:.2f} ms, and at its minimum widths still {min_ms:.2f} ms "
            f"({min_ms / table.full_ms:.3f} of it; lower --min-keep when gating, or pick a larger budget)"
        )
    if runtime.is_primary and source == "measured" and cache is not None:
        table.save(cache)  # only once the budget is known to be reachable: bad input writes nothing
    budget = target_to_budget(
        fraction, table.full_ms, model.gateable_macs, (min_ms - table.fixed_ms) / model.gateable_macs
    )
    info = {
        "target": config.target_latency,
        "target_ms": target_ms,
        "original_ms": table.full_ms,
        "fixed_ms": table.fixed_ms,
        "threads": table.key["threads"],
        "table": str(cache) if cache is not None else None,
        "table_source": source,
    }
    return model, budget, info


def _convert_sync_batchnorm(gated: Checkpoint, bank: GateBank, runtime: Runtime) -> None:
    """BatchNorm statistics over the global batch. The conversion replaces the BN modules the mask hooks
    are registered on, so the gates come off first and go back on the new modules (by name)."""
    if runtime.device.type != "cuda":
        raise ConfigError("sync_bn needs CUDA devices (SyncBatchNorm has no CPU implementation)")
    remove_gates_(gated.model)
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(gated.model)
    if converted is not gated.model:
        raise ConfigError("sync_bn: the model itself is a BatchNorm layer")
    insert_gates_(gated.model, gated.graph, bank)


def _within_budget(session: FinetuneSession, m: EpochMetrics) -> bool:
    """The decisions fit the budget: by the table, or, once a latency budget's decided widths were timed
    for real, by that measurement (the table may disagree with it on uneven widths)."""
    if m.macs_per_example is not None:  # dynamic gates: the mean cost on the calibration batches
        return m.decided and m.calibrated_fraction is not None and session.budget.fits(m.calibrated_fraction)
    decision = (session.latency or {}).get("decision")
    if m.decided and decision and decision.get("measured_fraction") is not None:
        return decision["measured_fraction"] <= session.budget.target_fraction
    return session.budget.fits(m.gateable_kept)


AfterEpoch = Callable[[FinetuneSession, "FinetuneResult", bool], None]


def _train(
    session: FinetuneSession,
    train_loader: Any,
    val_loader: Any,
    baseline: Baseline,
    callbacks: FinetuneCallbacks,
    after_epoch: AfterEpoch | None = None,
) -> FinetuneResult:
    """Run the remaining epochs; `after_epoch(session, result_so_far, interrupted)` after each epoch and
    once more on Ctrl-C before Interrupted propagates."""
    ckpt, trainer = session.checkpoint, session.trainer
    history = list(ckpt.history)
    extra = ckpt.extra | {"baseline": baseline.to_dict()}
    result = FinetuneResult(
        Checkpoint(ckpt.spec, ckpt.model, ckpt.graph, "finetuned", history=history, extra=extra),
        baseline,
        session.budget,
        trainer.config,
        original_macs=trainer.total_macs,
        latency=session.latency,
    )

    def epoch_end(tr: Trainer, m: EpochMetrics) -> None:
        row = m.to_dict() | {"within_budget": _within_budget(session, m)}
        history.append(row)
        if after_epoch is not None:
            after_epoch(session, result, False)
        if callbacks.on_epoch is not None:
            callbacks.on_epoch(m)

    if callbacks.on_start is not None:
        callbacks.on_start(session.start_info(baseline))
    try:
        run_epochs(trainer, train_loader, val_loader, on_epoch_end=epoch_end, on_step=callbacks.on_step)
    except Interrupted:
        if after_epoch is not None:
            after_epoch(session, result, True)
        raise
    result.checkpoint.extra |= {
        "finetune": trainer.config.to_dict(),
        "budget": session.budget.to_dict(),
        "latency_budget": session.latency,
        "floors": session.floors or ckpt.extra.get("floors"),  # a resumed run: the first run's
        "sensitivity": trainer.sensitivity or ckpt.extra.get("sensitivity"),  # the same
    }
    return result


def finetune(
    gated: Any,
    train_loader: Any,
    val_loader: Any,
    *,
    config: FinetuneConfig,
    callbacks: FinetuneCallbacks | None = None,
    runtime: Runtime | None = None,
) -> FinetuneResult:
    """Train a gated model (a GateResult or a gated Checkpoint) in memory; no file is written.

    The model is trained in place, as an optimiser would: the result holds the same module (pass a
    `copy.deepcopy` to keep the gated one). The loaders yield (images, labels) batches normalised as the
    model expects. Returns the trained gated model (decided once `config.decide_at` of the steps have
    run) with its history."""
    ckpt = gated.checkpoint if hasattr(gated, "checkpoint") else gated
    if not isinstance(ckpt, Checkpoint):
        raise ConfigError("finetune() takes a GateResult or a gated Checkpoint (see prunekit.gate)")
    if ckpt.gates is not None and ckpt.gates.is_decided:
        raise ConfigError("this model's gates are decided already (it was fine-tuned): gate the model afresh")
    runtime = runtime or resolve_runtime(config.device)
    runtime.seed(config.seed)
    session = prepare_finetune(ckpt, config, len(train_loader), runtime=runtime)
    callbacks = callbacks or FinetuneCallbacks()
    _announce_baseline(callbacks, val_loader)
    baseline = session.evaluate_baseline(val_loader, None)
    return _train(session, train_loader, val_loader, baseline, callbacks)


def _announce_baseline(callbacks: FinetuneCallbacks, val_loader: Any) -> None:
    if callbacks.on_baseline is not None:
        dataset = getattr(val_loader, "dataset", None)
        callbacks.on_baseline(len(dataset) if dataset is not None else 0)


# --------------------------------------------------------------------------------------------------
# the file-based stage
# --------------------------------------------------------------------------------------------------


def best_path(out: Path) -> Path:
    return out.with_name(f"{out.stem}.best{out.suffix or '.pt'}")


def resumed_config(saved: FinetuneConfig, overrides: dict[str, Any], epochs_done: int) -> FinetuneConfig:
    """The saved run's config with the `overrides` that are safe to change on resume; any other
    override that differs from the saved value is an error (never silently dropped)."""
    changes: dict[str, Any] = {}
    for key, value in overrides.items():
        if value is None or value == getattr(saved, key):
            continue
        if key not in RESUME_MUTABLE:
            raise ConfigError(
                f"resume continues the saved run, whose {key} is {getattr(saved, key)!r}; it cannot change "
                f"to {value!r} (on resume only {', '.join(RESUME_MUTABLE)} may change)"
            )
        if key == "epochs" and value <= epochs_done:
            raise ConfigError(f"the saved run has done {epochs_done} epochs already; epochs must be more")
        changes[key] = value
    return replace(saved, **changes)


class _EpochSaver:
    """Checkpoints of the file stage, written by the primary process only.

    Every epoch end writes the last checkpoint at `out` (resumable unless the run is finished) and the
    best decided one within the budget beside it. The resumable state is always that of an epoch
    boundary: an interrupt (Ctrl-C, SIGTERM) in the middle of an epoch writes nothing new, so `--resume`
    repeats exactly what the uninterrupted run does from there. An interrupt before the first epoch
    ends writes the state at the start, kept in memory for that. Weights that are no longer finite are
    never written as the last good or the best checkpoint.
    """

    def __init__(self, out: Path, loaders: Any, resumed_epoch: int | None) -> None:
        self.out, self.loaders = out, loaders
        self.best_acc = -1.0
        self.saved_epoch = resumed_epoch  # epoch of the boundary checkpoint at `out`, if any
        self.finished = False  # the checkpoint at `out` is the final one (nothing to resume)
        self.start: dict[str, Any] | None = None

    def remember_start(self, session: FinetuneSession) -> None:
        """Keep the starting state in memory (for an interrupt in the first epoch of a fresh run)."""
        if self.saved_epoch is not None:
            return
        tr = session.trainer
        state = copy.deepcopy(tr.state()) | {"train_loader_rng": self.loaders.train.generator.get_state()}
        weights = {k: v.detach().to("cpu", copy=True) for k, v in unwrap(tr.model).state_dict().items()}
        self.start = {"training": state, "weights": weights}

    def where(self) -> str:
        if self.saved_epoch is None:
            return "no checkpoint was written"
        return f"the last good checkpoint is {self.out} (after epoch {self.saved_epoch})"

    def __call__(self, session: FinetuneSession, result: FinetuneResult, interrupted: bool) -> None:
        if interrupted:
            self._save_start(session, result)
        else:
            self._save_epoch(session, result)

    def _checkpoint(
        self, session: FinetuneSession, result: FinetuneResult, training: Any, history: list[dict[str, Any]]
    ) -> Checkpoint:
        c = result.checkpoint
        extra = c.extra | {
            "finetune": session.trainer.config.to_dict(),
            "budget": session.budget.to_dict(),
            "latency_budget": session.latency,
            "floors": session.floors or c.extra.get("floors"),  # a resumed run: the first run's
            "sensitivity": session.trainer.sensitivity or c.extra.get("sensitivity"),  # the same
        }
        return Checkpoint(
            c.spec, c.model, c.graph, "finetuned", history=history, training=training, extra=extra
        )

    def _save_epoch(self, session: FinetuneSession, result: FinetuneResult) -> None:
        tr, history = session.trainer, result.history
        finished = tr.epoch >= tr.config.epochs
        # every process takes part in gathering the training state (its RNG); rank 0 alone writes
        state = (
            None if finished else tr.state() | {"train_loader_rng": self.loaders.train.generator.get_state()}
        )
        bad = _non_finite(tr.model)  # on every process (their weights are the same): all of them stop
        if bad is not None:
            raise TrainingError(
                f"the weights became non-finite in epoch {tr.epoch} ({bad}): lower --lr / --gate-lr; "
                f"{self.where()}"
            )
        if not session.runtime.is_primary:
            return
        if self.best_acc < 0:
            self.best_acc = max((h["val_acc"] for h in history[:-1] if h.get("within_budget")), default=-1.0)
        ckpt = self._checkpoint(session, result, state, list(history))
        try:
            save_checkpoint(ckpt, self.out)
        except WriteError as exc:
            raise WriteError(f"{exc}; {self.where()}") from exc
        self.saved_epoch = tr.epoch
        self.finished = finished
        result.files["last"] = str(self.out)
        last = history[-1] if history else None
        if last is not None and last["within_budget"] and last["decided"] and last["val_acc"] > self.best_acc:
            self.best_acc = last["val_acc"]
            save_checkpoint(ckpt, best_path(self.out))
        if best_path(self.out).is_file():
            result.files["best"] = str(best_path(self.out))

    def _save_start(self, session: FinetuneSession, result: FinetuneResult) -> None:
        if self.start is None or self.saved_epoch is not None or not session.runtime.is_primary:
            return  # the boundary checkpoint at `out` is the one to resume from
        # the model goes back to its starting weights: the process is ending, and the file must hold
        # one consistent state (the weights, the optimiser and the RNG of the same moment)
        unwrap(session.trainer.model).load_state_dict(self.start["weights"])
        save_checkpoint(self._checkpoint(session, result, self.start["training"], []), self.out)
        self.saved_epoch = 0
        result.files["last"] = str(self.out)


def _non_finite(model: nn.Module) -> str | None:
    """The name of the first floating tensor of `model`'s state with a NaN or an infinity, else None."""
    return non_finite_tensor(unwrap(model).state_dict())


def finetune_stage(
    gated: Path,
    data: str,
    out: Path,
    config: FinetuneConfig | None = None,
    *,
    resume: bool = False,
    overrides: dict[str, Any] | None = None,
    callbacks: FinetuneCallbacks | None = None,
    source: str | None = None,
) -> FinetuneResult:
    """Fine-tune the gated checkpoint at `gated` on `data`; checkpoint every epoch to `out` (last) and
    `<out>.best.pt` (best validation accuracy within the budget). With `resume`, continue the run saved
    at `out`; `overrides` (config field -> value the user gave) may change what is safe to change.
    `source`: the model source the user names, for checkpoints of a model of one's own."""
    check_writable(out)
    if resume:
        ckpt, start, config = _load_resumed(gated, out, overrides or {}, source)
    else:
        if config is None:
            raise ConfigError("finetune_stage needs a FinetuneConfig (or resume=True)")
        ckpt, start = load_checkpoint(gated, source=source), None
        _bank(ckpt, str(gated))
    runtime = resolve_runtime(config.device)
    try:
        loaders = data_loaders(data, ckpt.spec, config, runtime)
        return finetune_to_files(
            ckpt, loaders, data, out, config, start=start, resume=resume, callbacks=callbacks, runtime=runtime
        )
    except torch.distributed.DistError as exc:
        raise TrainingError(
            f"rank {runtime.rank}: a collective operation failed, so another process has probably stopped "
            f"({first_line(exc)}); the last good checkpoint is {out}"
        ) from exc
    finally:
        runtime.close()


def data_loaders(
    data: str, spec: ModelSpec, config: FinetuneConfig, runtime: Runtime, classes_hint: str = "--num-classes"
) -> Any:
    """Training and validation loaders for `data`, as the model `spec` describes expects its inputs;
    under torchrun each process gets its share (`--batch-size` is per process). `classes_hint`: how the
    user sets the class count, for the error when the data has another."""
    from prunekit.data import resolve_data

    loaders = resolve_data(
        data,
        **spec.preprocessing(),
        batch_size=config.batch_size,
        workers=config.workers,
        seed=config.seed,
        train_sampler=runtime.train_sampler(config.seed),
        val_sampler=runtime.eval_sampler(),
        pin_memory=runtime.device.type == "cuda",
        strict=config.strict_data,
    )
    if loaders.num_classes != spec.num_classes:
        raise ConfigError(
            f"the data has {loaders.num_classes} classes but the model {spec.num_classes}: "
            f"gate the model with {classes_hint} {loaders.num_classes}"
        )
    return loaders


def finetune_to_files(
    ckpt: Checkpoint,
    loaders: Any,
    data: str,
    out: Path,
    config: FinetuneConfig,
    *,
    start: Checkpoint | None = None,
    resume: bool = False,
    callbacks: FinetuneCallbacks | None = None,
    runtime: Runtime | None = None,
    metrics: Path | None = None,
) -> FinetuneResult:
    """Fine-tune an in-memory gated (or resumed) checkpoint, saving to `out` every epoch and the
    training curve to `metrics` (default: `<out stem>.metrics.csv`, see prunekit.metrics)."""
    runtime = runtime or resolve_runtime(config.device)
    runtime.seed(config.seed)
    session = prepare_finetune(
        ckpt,
        config,
        len(loaders.train),
        runtime=runtime,
        start=start,
        latency_cache=table_path(out),
        on_latency_table=(callbacks or FinetuneCallbacks()).on_latency_table,
    )
    callbacks = callbacks or FinetuneCallbacks()
    metrics = metrics_path(out) if metrics is None else metrics
    if runtime.is_primary:
        resumed_epoch = int(ckpt.training["epoch"]) if resume else None  # type: ignore[index]
        log = MetricsLog(metrics, every=max(1, session.steps_per_epoch // 10), resume_epoch=resumed_epoch)
        callbacks = callbacks.also(FinetuneCallbacks(on_step=log.on_step, on_epoch=log.on_epoch))
    if resume:
        session.trainer.load_state(ckpt.training)  # type: ignore[arg-type]
        if ckpt.training.get("train_loader_rng") is not None:  # type: ignore[union-attr]
            # continue the shuffling where it stopped, as an uninterrupted run would
            loaders.train.generator.set_state(ckpt.training["train_loader_rng"])  # type: ignore[index]
        baseline = Baseline(**ckpt.extra["baseline"])
    else:
        _announce_baseline(callbacks, loaders.val)
        baseline = session.evaluate_baseline(loaders.val, data)
    saver = _EpochSaver(out, loaders, int(ckpt.training["epoch"]) if resume else None)  # type: ignore[index]
    saver.remember_start(session)
    try:
        result = _train(session, loaders.train, loaders.val, baseline, callbacks, saver)
        if runtime.is_primary:
            result.files["metrics"] = str(metrics)
        return result
    except Interrupted as exc:
        if saver.saved_epoch is None:
            raise
        if saver.finished:
            raise Interrupted.of(exc, f"the run had finished: {out} holds the final model") from None
        raise Interrupted.of(
            exc, f"resume from {out} (after epoch {saver.saved_epoch}) with `prunekit finetune ... --resume`"
        ) from None
    except TrainingError as exc:
        if saver.where() in str(exc):
            raise
        raise TrainingError(f"{exc}; {saver.where()}") from exc
    except torch.OutOfMemoryError as exc:  # the environment, not a bug: one line, exit 2
        raise TrainingError(
            f"out of memory on {runtime.device} ({first_line(exc)[:80]}): lower --batch-size; {saver.where()}"
        ) from None


def _load_resumed(
    gated: Path, out: Path, overrides: dict[str, Any], source: str | None
) -> tuple[Checkpoint, Checkpoint | None, FinetuneConfig]:
    if not out.is_file():
        raise CheckpointError(f"resume: no checkpoint to resume at {out}")
    ckpt = load_checkpoint(out, source=source)
    _bank(ckpt, str(out))
    if ckpt.training is None:
        raise CheckpointError(f"{out} holds no training state to resume (finished or not from finetune)")
    saved = FinetuneConfig.from_dict(ckpt.training["config"])
    config = resumed_config(saved, overrides, int(ckpt.training["epoch"]))
    start = None
    if config.distill > 0:  # the teacher is the run's starting model, not the half-trained weights
        start = load_checkpoint(gated, source=source)
        if start.spec != ckpt.spec or start.gates is None:
            raise CheckpointError(f"{gated} is not the gated checkpoint this run started from")
    return ckpt, start, config


__all__ = [
    "Baseline",
    "FinetuneCallbacks",
    "FinetuneResult",
    "FinetuneSession",
    "FinetuneStart",
    "best_path",
    "finetune",
    "finetune_stage",
    "finetune_to_files",
    "prepare_finetune",
    "resumed_config",
]
