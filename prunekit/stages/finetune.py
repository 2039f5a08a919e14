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

from prunekit.checkpoint import Checkpoint, load_checkpoint, non_finite_tensor, save_checkpoint
from prunekit.config import RESUME_MUTABLE, FinetuneConfig, ModelSpec
from prunekit.errors import CheckpointError, ConfigError, Interrupted, TrainingError, WriteError, first_line
from prunekit.fileio import check_writable
from prunekit.gates import GateBank, insert_gates_, remove_gates_, ungated_copy
from prunekit.metrics import MetricsLog, metrics_path
from prunekit.objective import MacBudget, MacModel
from prunekit.runtime import Runtime, resolve_runtime, unwrap
from prunekit.stages.gate import original_size
from prunekit.trainer import EpochMetrics, Trainer, evaluate, make_budget, run_epochs


@dataclass(frozen=True)
class Baseline:
    """The ungated starting model's validation accuracy, and what it was measured on."""

    val_acc: float
    macs: int
    data: str | None  # the --data it was measured on; None for loaders handed over in memory

    def to_dict(self) -> dict[str, Any]:
        return {"val_acc": self.val_acc, "macs": self.macs, "data": self.data}


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


@dataclass
class FinetuneCallbacks:
    on_start: Callable[[FinetuneStart], None] | None = None
    on_step: Callable[[dict[str, float]], None] | None = None
    on_epoch: Callable[[EpochMetrics], None] | None = None
    on_baseline: Callable[[int], None] | None = None  # before the baseline evaluation: its image count

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
        )


@dataclass
class FinetuneResult:
    checkpoint: Checkpoint  # stage "finetuned": the trained gated model, its history and budget
    baseline: Baseline
    budget: MacBudget
    config: FinetuneConfig
    files: dict[str, str] = field(default_factory=dict)  # what the file stage wrote ("last", "best")

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
        return self.final["macs_fraction"] * self.budget.total_macs

    def to_dict(self) -> dict[str, Any]:
        return {
            "output": self.files.get("last"),
            "best": self.files.get("best"),
            "metrics": self.files.get("metrics"),
            "baseline_val_acc": self.baseline.val_acc,
            "history": self.history,
            "final": self.final,
            "target_macs": self.config.target_macs,
            "macs_before": self.budget.total_macs,
            "expected_macs": round(self.expected_macs),  # a count: an integer
        }


@dataclass
class FinetuneSession:
    """Everything one run needs, built once: the trainer (optimisers, schedule), the ungated teacher,
    the MAC budget. The gated checkpoint it trains is `checkpoint` (its model is trained in place)."""

    checkpoint: Checkpoint
    trainer: Trainer
    plain: nn.Module  # the ungated starting model: baseline accuracy and distillation teacher
    budget: MacBudget
    steps_per_epoch: int

    @property
    def runtime(self) -> Runtime:
        return self.trainer.runtime

    def evaluate_baseline(self, val_loader: Any, data: str | None) -> Baseline:
        device = self.runtime.device
        acc, _ = evaluate(self.plain.to(device), val_loader, device, runtime=self.runtime)
        return Baseline(acc, int(self.budget.total_macs), data)

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
) -> FinetuneSession:
    """Build one run's trainer, teacher and budget. `start`: the gated checkpoint the run began from,
    when `gated` is a half-trained one being resumed (the teacher is the starting model, not the
    half-trained weights)."""
    runtime = runtime or resolve_runtime(config.device)
    bank = _bank(gated, "the checkpoint")
    if config.batch_size < 2 and any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) for m in gated.model.modules()
    ):
        raise ConfigError("batch_size 1 cannot train BatchNorm layers (one value per channel): use 2 or more")
    plain = ungated_copy((start or gated).model)
    if config.sync_bn and runtime.distributed:
        _convert_sync_batchnorm(gated, bank, runtime)
    mac_model = MacModel(gated.graph)
    budget = make_budget(bank, mac_model, original_size(gated).macs, config.target_macs)
    steps = (
        steps_per_epoch
        if config.max_steps_per_epoch is None
        else min(steps_per_epoch, config.max_steps_per_epoch)
    )
    teacher = plain if config.distill > 0 else None
    trainer = Trainer(gated.model, bank, mac_model, budget, config, steps, runtime, teacher)
    return FinetuneSession(gated, trainer, plain, budget, steps)


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
    )

    def epoch_end(tr: Trainer, m: EpochMetrics) -> None:
        row = m.to_dict() | {"within_budget": session.budget.fits(m.gateable_kept)}
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
    result.checkpoint.extra |= {"finetune": trainer.config.to_dict(), "budget": session.budget.to_dict()}
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
        extra = c.extra | {"finetune": session.trainer.config.to_dict(), "budget": session.budget.to_dict()}
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
        input_shape=spec.input_shape,  # type: ignore[arg-type]
        mean=spec.mean,
        std=spec.std,
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
    session = prepare_finetune(ckpt, config, len(loaders.train), runtime=runtime, start=start)
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
