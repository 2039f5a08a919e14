"""The training loop: cross-entropy + lambda * (t - B)^2 with straight-through Gumbel gates.

Schedule (a short-budget version of the paper's recipe, see docs/recipe.md): gates and weights train
jointly until `decide_at` of the steps; then the gate decisions are fixed -- the gates ranked by learned
margin (logit_on - logit_off) and the largest set that fits the MAC budget kept -- and the remaining
steps fine-tune the weights under those fixed decisions. `decide_at=1` decides only at the end.
Given the channel graph, those remaining steps train the physically slimmed model (a DensePhase,
`prunekit.dense_phase`) rather than the masked full-width one: the same function, at a plain loop's
speed; the gated model is kept in step with it and stays what checkpoints hold.

`Trainer` holds one run's state (optimisers, schedule, step) and is given its device by a Runtime; it
never writes files. `evaluate` and `recalibrate_batchnorm` are plain functions. The stage that wires
data, checkpoints and callbacks around it is `prunekit.stages.finetune`.
"""

from __future__ import annotations

import itertools
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.allocation import fitting_prefix, prefix_decisions, uniform_order, within_groups_order
from prunekit.config import FinetuneConfig
from prunekit.dense_phase import DensePhase
from prunekit.errors import ConfigError, Interrupted, TrainingError
from prunekit.gate_optim import SharedScaleAdam
from prunekit.gates import GateBank
from prunekit.graph import ChannelGraph
from prunekit.modes import training_flags
from prunekit.objective import MacBudget, MacModel, activation_loss, target_to_budget
from prunekit.runtime import Runtime, decisions_hash
from prunekit.sensitivity import (
    Sensitivity,
    fill_to_budget,
    mean_sensitivity,
    measure_sensitivity,
    removal_order,
)

KD_TEMPERATURE = 2.0
TOP_K = 5


@dataclass(frozen=True)
class Evaluation:
    """What `evaluate` measures: top-1 and top-5 accuracy (fractions from 0 to 1) and the mean
    cross-entropy. With fewer than 5 classes, top-5 counts the top num_classes, so it is 1.0."""

    top1: float
    top5: float
    loss: float
    # dynamic gates: the gateable-MACs fraction of every example evaluated (all processes)
    example_costs: tuple[float, ...] | None = None
    example_labels: tuple[int, ...] | None = None  # their labels, in the same order


@dataclass
class EpochMetrics:
    epoch: int
    loss: float
    ce: float
    act_loss: float
    train_acc: float
    val_acc: float  # top-1
    val_top5: float  # top-5 (top-k, k = min(5, classes))
    val_loss: float
    macs_fraction: float  # of the whole model, under the deterministic decisions
    gateable_kept: float  # B: the fraction of the gateable MACs the deterministic decisions keep
    decided: bool
    seconds: float
    images_per_s: float
    latency_fraction: float | None = None  # a latency budget: the predicted fraction of the original's
    # dynamic gates: the distribution of the whole model's MACs fraction over the validation examples
    # (prunekit.dynamic.mac_stats); macs_fraction and gateable_kept are then its means
    macs_per_example: dict[str, float] | None = None
    # dynamic gates: the mean gateable-MACs fraction of the decisions on the calibration batches, the
    # one the budget is checked against (validation examples may use a little more or less)
    calibrated_fraction: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------------


class Trainer:
    """Holds the state of one fine-tuning run (model, optimizers, budget) between epochs."""

    def __init__(
        self,
        model: nn.Module,
        bank: GateBank,
        mac_model: MacModel,
        budget: MacBudget,
        config: FinetuneConfig,
        steps_per_epoch: int,
        runtime: Runtime,
        teacher: nn.Module | None = None,
        mac_counter: MacModel | None = None,
        total_macs: float | None = None,
        graph: ChannelGraph | None = None,
    ) -> None:
        """`mac_model` is the cost the objective and the budget use: MACs, or predicted latency (a
        LatencyModel). With a latency budget, `mac_counter` and `total_macs` still count MACs for the
        reports. With `graph` (the model's channel graph), the steps after the decision point train
        the slimmed model; without it, the masked full-width one."""
        config = config.resolve_method(bank.kind == "dynamic")
        self.graph = graph
        self.dense: DensePhase | None = None
        self.mac_counter, self.total_macs = mac_counter, total_macs
        # a latency budget may time the decided widths for real (prunekit.latency_table.MeasuredLatency):
        # given a unit mask, the measured latency fraction (its `close()`, if any, is called once the
        # decision is made); `decision_record` receives what it measured
        self.measure: Callable[[list[bool]], float] | None = None
        self.decision_record: dict[str, Any] | None = None
        self.sensitivity: dict[str, Any] | None = None  # the sensitivity method: what it measured
        self.model, self.bank, self.mac_model, self.budget, self.config = (
            model,
            bank,
            mac_model,
            budget,
            config,
        )
        self.runtime = runtime
        self.device = runtime.device
        self.teacher = teacher
        self.model.to(self.device)
        self.mac_model.to(self.device)
        if mac_counter is not None:
            mac_counter.to(self.device)
        if teacher is not None:
            teacher.to(self.device).eval().requires_grad_(False)
        # gate parameters by identity, not by name: a wrapper (DDP's "module.") cannot make them match both
        gate_ids = {id(p) for p in bank.parameters()}
        weights = [p for p in model.parameters() if id(p) not in gate_ids]
        # a frozen gate phase: the weights take no gradient until the decision (no weight gradients
        # computed either: the backward pass only reaches the gates); these are given it back then
        self._frozen = [p for p in weights if p.requires_grad] if config.gate_phase == "frozen" else []
        if not bank.is_decided:
            for p in self._frozen:
                p.requires_grad_(False)
        self.opt = torch.optim.SGD(
            weights, lr=config.lr, momentum=0.9, nesterov=True, weight_decay=config.weight_decay
        )
        gate_optimizer = torch.optim.Adam if config.gate_optimizer == "adam" else SharedScaleAdam
        self.gate_opt = gate_optimizer(
            bank.parameters(), lr=config.gate_lr, weight_decay=config.gate_weight_decay
        )
        self.total_steps = max(1, steps_per_epoch * config.epochs)
        self.decide_step = (
            0  # a magnitude criterion, or measured sensitivity, decides before the first step
            if config.method in DECIDED_BEFORE_TRAINING
            else min(self.total_steps, max(1, round(config.decide_at * self.total_steps)))
        )
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, self.total_steps) / self.total_steps))
        )
        self.step = 0
        self.epoch = 0
        self.amp = config.amp and runtime.amp_dtype is not None
        # dynamic gates: the decision offset is calibrated on training batches (`calibrate_dynamic`)
        self.dynamic = bank.kind == "dynamic"
        self.calibrated_fraction: float | None = None  # the decided mean cost on those examples
        self._train_loader: Any = None
        if bank.is_decided:  # a resumed run past its decision point
            bank.requires_grad_(False)
        self.train_model = runtime.wrap(model)  # DistributedDataParallel under torchrun

    @property
    def decided(self) -> bool:
        return self.bank.is_decided

    @property
    def inference_model(self) -> nn.Module:
        """The model to evaluate and recalibrate: the slimmed one once training uses it (the same
        function, less work), else the gated model. Call `sync()` before reading `model` afterwards."""
        return self.dense.model if self.dense is not None else self.model

    def sync(self) -> None:
        """Bring the gated model (and the optimiser state saved with it) up to date with the slimmed
        model being trained; nothing to do before the decision point."""
        if self.dense is not None:
            self.dense.sync()

    def _enter_dense_phase(self, x: torch.Tensor) -> None:
        """From the first step after the decision: train the slimmed model, checked on this batch."""
        # building the twin creates modules, whose initialisation draws from the global RNG: a run resumed
        # after the decision point builds it again, and must draw the same augmentation as one that did not
        with torch.random.fork_rng(devices=[]):
            self.dense = DensePhase(self.model, self.graph, self.opt)  # type: ignore[arg-type]
        self.dense.verify(x[:8])
        self.dense.set_lr(self.opt.param_groups[0]["lr"])
        self.train_model = None  # type: ignore[assignment]  # release a DDP wrapper's reducer first
        self.train_model = self.runtime.wrap(self.dense.model)

    # -- state for --resume ---------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        self.sync()  # the saved weights and momentum are the gated model's: one format, resumable
        return {
            "epoch": self.epoch,
            "step": self.step,
            "config": self.config.to_dict(),
            "optimizer": self.opt.state_dict(),
            "gate_optimizer": self.gate_opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "rng": torch.get_rng_state(),
            "rng_per_rank": self.runtime.gather(torch.get_rng_state()),  # a collective under torchrun
            # the Gumbel noise of gates on a GPU comes from the device's generator
            "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            "calibrated_fraction": self.calibrated_fraction,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.step = int(state["step"])
        self.opt.load_state_dict(state["optimizer"])
        self.gate_opt.load_state_dict(state["gate_optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        per_rank = state.get("rng_per_rank") or [state["rng"]]
        if len(per_rank) != self.runtime.world_size:
            raise ConfigError(
                f"the saved run used {len(per_rank)} process(es); resume it with the same number "
                f"(this run has {self.runtime.world_size})"
            )
        self.calibrated_fraction = state.get("calibrated_fraction")
        rng = per_rank[self.runtime.rank]
        torch.set_rng_state(rng.cpu() if isinstance(rng, torch.Tensor) else rng)
        if state.get("cuda_rng") is not None and self.device.type == "cuda" and not self.runtime.distributed:
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), self.device)

    # -- gates ----------------------------------------------------------------------------------
    def tau(self) -> float:
        c = self.config
        if c.tau_end is None:
            return c.tau
        progress = min(1.0, self.step / max(1, self.decide_step))
        return c.tau * (c.tau_end / c.tau) ** progress

    @torch.no_grad()
    def decision_fraction(self, decisions: torch.Tensor | None = None) -> float:
        a = self.bank.unit_activity(decisions).to(self.device)
        return float(self.mac_model(a)[0]) / self.mac_model.gateable_macs

    @torch.no_grad()
    def macs_fraction(self) -> float:
        """The whole model's MACs under the deterministic decisions, as a fraction of the original's."""
        if self.mac_counter is None:  # the budget counts MACs itself
            return self.budget.total_fraction(self.decision_fraction())
        a = self.bank.unit_activity(None).to(self.device)
        kept = float(self.mac_counter(a)[0])
        total = float(self.total_macs or 0.0)
        return (total - self.mac_counter.gateable_macs + kept) / max(total, 1e-9)

    @torch.no_grad()
    def example_cost(self) -> torch.Tensor:
        """The gateable-MACs fraction each example of the last forward pass used (dynamic gates)."""
        return self.mac_model(self.bank.current) / self.mac_model.gateable_macs

    def mac_stats(self, gateable: Sequence[float]) -> dict[str, float]:
        """The whole model's MACs fraction per example, summarised (prunekit.dynamic.mac_stats)."""
        from prunekit.dynamic import mac_stats

        nets = self.bank.gate_net_macs() / self.budget.total_macs  # type: ignore[attr-defined]
        return mac_stats([self.budget.total_fraction(g) for g in gateable], nets)

    def _gate_order(self) -> torch.Tensor:
        """The learnable gates, the first to keep first. Learned gates: by margin (logit_on -
        logit_off), across all groups, or within each group with allocation "uniform"
        (`allocation.within_groups_order`: every group keeps the uniform cut's count). The magnitude
        method: `allocation.uniform_order`, so that any prefix keeps about the same fraction of every
        group."""
        bank = self.bank
        if self.config.method == "magnitude":
            return uniform_order(bank)
        if self.config.method == "sensitivity":
            measured = self._measure_sensitivity()
            order = removal_order(bank, self.mac_model, measured)
            return fill_to_budget(
                bank,
                order,
                measured,
                lambda d: self.budget.fits(self.decision_fraction(d)),
                self.mac_model,
                self.budget.t,
            )
        margin = (bank.logits[:, 1] - bank.logits[:, 0]).detach()
        if self.config.allocation == "uniform":
            return within_groups_order(bank, margin)
        learnable = (~bank.fixed_on).nonzero().flatten()
        return learnable[torch.argsort(margin[learnable], descending=True, stable=True)]

    def _measure_sensitivity(self) -> Sensitivity:
        """Every process measures the groups' curves on its own first training batches (all of them
        run the same forward passes, which SyncBatchNorm needs); the averaged curves are everyone's."""
        if self._train_loader is None or self.graph is None:
            raise TrainingError("the sensitivity method needs training batches and the model's graph")
        # the measurement's own pass over the loader must not move the run's random state (the data
        # order, the augmentation; a resumed run, which measures nothing, must continue as an
        # uninterrupted one): the loader's generator and the global one are restored after it
        generator = getattr(self._train_loader, "generator", None)
        saved = generator.get_state() if generator is not None else None
        try:
            with torch.random.fork_rng(devices=[]):
                batches = list(itertools.islice(self._train_loader, self.config.sensitivity_batches))
        finally:
            if generator is not None:
                generator.set_state(saved)
        if not batches:
            raise TrainingError("the sensitivity method needs training batches; the training data gave none")
        mine = measure_sensitivity(
            self.model, self.bank, self.graph, batches, distillation_loss, self.device
        ).to_dict()
        measured = mean_sensitivity([Sensitivity.from_dict(d) for d in self.runtime.gather(mine)])
        self.sensitivity = measured.to_dict()
        return measured

    @torch.no_grad()
    def decide(self) -> None:
        """Fix the gates: order the learnable gates (`_gate_order`), keep the largest prefix within
        the budget."""
        bank = self.bank
        if self.dynamic:
            self._decide_dynamic()
            return
        order = self._gate_order()

        def decisions(k: int) -> torch.Tensor:
            return prefix_decisions(bank, order, k)

        lo = fitting_prefix(bank, order, lambda d: self.budget.fits(self.decision_fraction(d)))
        if self.measure is not None:
            lo = self._measured_prefix(decisions, lo, len(order))
        final = decisions(lo)
        hashes = set(self.runtime.gather(decisions_hash(final)))
        if len(hashes) > 1:  # the logits are kept in sync by the gradient all-reduce; never decide apart
            raise TrainingError(f"the processes reached different gate decisions ({sorted(hashes)})")
        bank.fix_(final)  # deterministic gates from here on, in train mode too
        # with a graph, the next step wraps the slimmed model instead
        self._after_decision(rewrap=self.graph is None)

    def _after_decision(self, rewrap: bool) -> None:
        """What every decision ends with: the gates take no gradient and no optimiser step, a frozen
        gate phase gives the weights back their gradients, and (`rewrap`) DDP wraps the model again,
        since it tracks the parameters that required gradients when it wrapped."""
        self.bank.requires_grad_(False)
        for p in self._frozen:
            p.requires_grad_(True)
        if self.runtime.distributed and rewrap:
            self.train_model = None  # type: ignore[assignment]  # release the old wrapper's reducer first
            self.train_model = self.runtime.wrap(self.model)

    @torch.no_grad()
    def _decide_dynamic(self) -> None:
        """Dynamic gates: deterministic per-example decisions from here on, the gate networks frozen
        (their BatchNorm statistics too), and the decision offset calibrated."""
        self.bank.fix_()
        self._after_decision(rewrap=True)  # no slimmed twin: the gated model keeps training
        self.calibrate_dynamic(self._train_loader)

    @torch.no_grad()
    def calibrate_dynamic(self, loader: Any) -> None:
        """Set the offset added to every learnable gate's margin: by bisection, the largest whose mean
        cost fits the budget on the first CALIBRATION_BATCHES training batches (of every process), run
        in eval mode, as the model will be used: the analogue of keeping the largest set of static
        gates that fits. Called at the decision point and after every later epoch, since the weights
        still train and the blocks' inputs, and with them the decisions, drift."""
        bank = self.bank
        if loader is None:
            raise TrainingError("dynamic gates need training batches to calibrate their decisions")
        pooled_batches = []
        with training_flags(self.model):
            self.model.eval()
            bank.recording = {}  # type: ignore[attr-defined]
            try:
                for i, (x, _) in enumerate(loader):
                    if i >= CALIBRATION_BATCHES:
                        break
                    self.model(x.to(self.device))
                    pooled_batches.append(bank.recorded())  # type: ignore[attr-defined]
            finally:
                bank.recording = None  # type: ignore[attr-defined]
        pooled = [torch.cat([b[i] for b in pooled_batches]) for i in range(len(pooled_batches[0]))]
        local = bank.margins(pooled).cpu()  # type: ignore[attr-defined]
        m = torch.cat(self.runtime.gather(local)).to(self.device)

        def cost(offset: float) -> float:
            a = bank.unit_values(bank.states(m, offset))  # type: ignore[attr-defined]
            return float((self.mac_model(a) / self.mac_model.gateable_macs).mean())

        lo, hi = -DYNAMIC_OFFSET_RANGE, DYNAMIC_OFFSET_RANGE
        if self.budget.fits(cost(hi)):
            lo = hi
        else:
            for _ in range(40):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if self.budget.fits(cost(mid)) else (lo, mid)
        bank.offset.fill_(lo)  # type: ignore[attr-defined]
        self.calibrated_fraction = cost(lo)

    def _measured_prefix(self, decisions: Callable[[int], torch.Tensor], predicted: int, n: int) -> int:
        """The largest number of learnable gates whose decided widths, timed for real, fit the target
        fraction: a bisection that starts at the table's choice `predicted` (at most MEASURED_PROBES
        timings). The first process measures; every process takes its answer."""
        target = self.budget.target_fraction
        chosen, log = None, []
        if self.runtime.is_primary:
            assert self.measure is not None

            def fits(k: int) -> bool:
                keep = self.bank.unit_activity(decisions(k))[0].bool().tolist()
                fraction = self.measure(keep)  # type: ignore[misc]
                log.append({"gates": k, "fraction": fraction})
                return fraction <= target

            try:
                lo, hi = (predicted, n) if fits(predicted) else (0, predicted - 1)
                while lo < hi and len(log) < MEASURED_PROBES:
                    mid = (lo + hi + 1) // 2
                    if fits(mid):
                        lo = mid
                    else:
                        hi = mid - 1
            finally:
                close = getattr(self.measure, "close", None)
                if close is not None:
                    close()
            chosen = lo
        chosen, log = self.runtime.gather((chosen, log))[0]
        if self.decision_record is not None:
            fitting = [m["fraction"] for m in log if m["gates"] == chosen]
            self.decision_record["decision"] = {
                "table_gates": predicted,
                "gates": chosen,
                "measured_fraction": fitting[-1] if fitting else None,
                "measurements": log,
            }
        return int(chosen)

    # -- loops ----------------------------------------------------------------------------------
    def train_one_epoch(
        self, loader: Any, on_step: Callable[[dict[str, float]], None] | None = None
    ) -> dict[str, float]:
        model, bank, cfg = self.train_model, self.bank, self.config
        self._train_loader = loader
        model.train()
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):  # DistributedSampler: a new, shared order every epoch
            sampler.set_epoch(self.epoch)
        sums = {"loss": 0.0, "ce": 0.0, "act": 0.0, "correct": 0.0, "n": 0.0}
        start = time.perf_counter()
        for i, (x, y) in enumerate(loader):
            if cfg.max_steps_per_epoch is not None and i >= cfg.max_steps_per_epoch:
                break
            if not self.decided and self.step >= self.decide_step:
                self.decide()
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            if self.decided and self.dense is None and self.graph is not None and not self.dynamic:
                self._enter_dense_phase(x)
            bank.tau = self.tau()
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                logits = self.train_model(x)  # re-wrapped at the decision point
                ce = F.cross_entropy(logits.float(), y)
                loss = ce
                if self.teacher is not None and cfg.distill > 0:
                    with torch.inference_mode():
                        soft = self.teacher(x).float()
                    loss = (1 - cfg.distill) * ce + cfg.distill * distillation_loss(
                        logits.float(), soft.clone()
                    )
            # the gated model sets bank.current when it runs; the slimmed one has the decisions
            current = bank.current if self.dense is None else bank.unit_activity().to(self.device)
            b = self.mac_model(current) / self.mac_model.gateable_macs
            act = activation_loss(b, self.budget.t, cfg.one_sided)
            if not self.decided:
                loss = loss + cfg.lam * act
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"non-finite loss at epoch {self.epoch + 1}, step {i + 1}: lower --lr / --gate-lr"
                )
            opt = self.opt if self.dense is None else self.dense.optimizer
            opt.zero_grad(set_to_none=True)
            self.gate_opt.zero_grad(set_to_none=True)
            loss.backward()
            if self.decided or not self._frozen:
                opt.step()
            if not self.decided:
                self.gate_opt.step()
            self._schedule_step()
            self.step += 1
            n = y.shape[0]
            sums["loss"] += loss.item() * n
            sums["ce"] += ce.item() * n
            sums["act"] += act.item() * n
            sums["correct"] += float((logits.argmax(1) == y).sum())
            sums["n"] += n
            if on_step is not None:
                on_step(
                    {
                        "epoch": self.epoch + 1,
                        "step": i + 1,
                        "loss": loss.item(),
                        "b": b.mean().item(),
                        "decided": float(self.decided),
                        "images": n,  # of this process
                    }
                )
        if not self.decided and self.step >= self.decide_step:
            self.decide()
        self.sync()
        seconds = time.perf_counter() - start
        keys = list(sums)
        sums = dict(zip(keys, self.runtime.sum([sums[k] for k in keys]), strict=True))  # over all processes
        n = max(1.0, sums["n"])
        return {
            "loss": sums["loss"] / n,
            "ce": sums["ce"] / n,
            "act": sums["act"] / n,
            "acc": sums["correct"] / n,
            "seconds": seconds,
            "images_per_s": sums["n"] / max(seconds, 1e-9),
        }

    def _schedule_step(self) -> None:
        """One step of the cosine schedule; it lives on the gated model's optimiser (its state is what
        a checkpoint saves), and the slimmed model's optimiser takes its rate."""
        with warnings.catch_warnings():  # a frozen gate phase steps the schedule before the optimiser
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler", UserWarning)
            self.sched.step()
        if self.dense is not None:
            self.dense.set_lr(self.opt.param_groups[0]["lr"])


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Any,
    device: torch.device,
    max_batches: int | None = None,
    runtime: Runtime | None = None,
    example_cost: Callable[[], torch.Tensor] | None = None,
) -> Evaluation:
    """Top-1 and top-5 accuracy and the mean cross-entropy, in eval mode (deterministic gates). Top-5
    is top-k with k = min(5, classes): with fewer than 5 classes every label is among them (1.0).
    Under torchrun each process evaluates its shard (a ShardSampler) and the counts are summed, so
    every example counts exactly once. `example_cost()`, called after each batch, gives the cost of
    each of its examples (dynamic gates: the gateable-MACs fraction it used)."""
    correct = correct5 = total = 0
    costs: list[float] = []
    labels: list[int] = []
    loss = 0.0
    with training_flags(model):
        model.eval()
        for i, (x, y) in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            x, y = x.to(device), y.to(device)
            out = model(x).float()
            loss += float(F.cross_entropy(out, y, reduction="sum"))
            correct += int((out.argmax(1) == y).sum())
            top = out.topk(min(TOP_K, out.shape[1]), dim=1).indices
            correct5 += int((top == y[:, None]).any(1).sum())
            total += y.shape[0]
            if example_cost is not None:
                costs.extend(example_cost().tolist())
                labels.extend(y.tolist())
    if runtime is not None:
        correct, correct5, total, loss = runtime.sum([correct, correct5, total, loss])
        if example_cost is not None:
            costs = [c for part in runtime.gather(costs) for c in part]
            labels = [c for part in runtime.gather(labels) for c in part]
    n = max(1, total)
    return Evaluation(
        top1=correct / n,
        top5=correct5 / n,
        loss=loss / n,
        example_costs=tuple(costs) if example_cost else None,
        example_labels=tuple(labels) if example_cost else None,
    )


def distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float = KD_TEMPERATURE
) -> torch.Tensor:
    """Hinton et al.'s soft-target loss: KL(teacher || student) at `temperature`, scaled by T^2 so its
    gradients keep the size of the cross-entropy's."""
    t = temperature
    return F.kl_div(F.log_softmax(student / t, 1), F.softmax(teacher / t, 1), reduction="batchmean") * t * t


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, loader: Any, device: torch.device, batches: int) -> None:
    """Re-estimate BatchNorm running statistics with the current (deterministic) gates."""
    # a dynamic bank's gate networks keep their statistics: they are part of how it decides
    in_banks = {id(m) for bank in model.modules() if isinstance(bank, GateBank) for m in bank.modules()}
    bns = [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and id(m) not in in_banks
    ]
    if not bns or batches <= 0:
        return
    saved = {m: m.momentum for m in bns}
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches seen
    with training_flags(model):
        model.train()
        for bank in (m for m in model.modules() if isinstance(m, GateBank)):
            bank.eval()  # statistics under the deterministic decisions, not under sampled gates
        try:
            for i, (x, _) in enumerate(loader):
                if i >= batches:
                    break
                model(x.to(device))
        finally:
            for m, mom in saved.items():
                m.momentum = mom


DECIDED_BEFORE_TRAINING = ("magnitude", "sensitivity")  # methods that train no gates
CALIBRATION_BATCHES = 8  # dynamic gates: training batches that calibrate the decision offset
DYNAMIC_OFFSET_RANGE = 30.0
MEASURED_PROBES = 8  # timings at the decision point of a latency budget (a bisection over ~250 gates)


def make_budget(bank: GateBank, mac_model: MacModel, total_macs: float, target: float) -> MacBudget:
    """The MAC budget of `target` (a fraction of `total_macs`) for this bank's gates."""
    fixed_only = bank.unit_activity(bank.fixed_on).to(next(mac_model.buffers()).device)
    full = mac_model.gateable_macs
    min_fraction = float(mac_model(fixed_only)[0]) / full if full else 1.0
    return target_to_budget(target, total_macs, full, min_fraction)


def run_epochs(
    trainer: Trainer,
    train_loader: Any,
    val_loader: Any,
    *,
    on_epoch_end: Callable[[Trainer, EpochMetrics], None] | None = None,
    on_step: Callable[[dict[str, float]], None] | None = None,
) -> list[EpochMetrics]:
    """Run the remaining epochs, calling `on_epoch_end(trainer, metrics)` after each. Ctrl-C anywhere in
    an epoch raises Interrupted (exit code 130); the caller decides what to save."""
    history: list[EpochMetrics] = []
    cfg = trainer.config
    while trainer.epoch < cfg.epochs:
        try:
            history.append(_one_epoch(trainer, train_loader, val_loader, on_step))
            if on_epoch_end is not None:  # saving and printing: a Ctrl-C there is an interrupt too
                on_epoch_end(trainer, history[-1])
        except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM under the CLI (a Terminated)
            raise Interrupted.of(exc) from None
    return history


def _one_epoch(trainer: Trainer, train_loader: Any, val_loader: Any, on_step: Any) -> EpochMetrics:
    cfg = trainer.config
    stats = trainer.train_one_epoch(train_loader, on_step)
    if trainer.dynamic and trainer.decided:
        trainer.calibrate_dynamic(train_loader)  # the weights trained on: the decisions drifted
    model = trainer.inference_model
    if cfg.bn_recalibrate:
        recalibrate_batchnorm(model, train_loader, trainer.device, cfg.bn_recalibrate)
    trainer.runtime.broadcast_buffers(model)  # every process evaluates the model rank 0 saves
    val = evaluate(
        model,
        val_loader,
        trainer.device,
        runtime=trainer.runtime,
        example_cost=trainer.example_cost if trainer.dynamic else None,
    )
    trainer.sync()  # the recalibrated or broadcast BatchNorm statistics
    per_example = None
    if val.example_costs:  # dynamic gates: the mean over the validation examples
        b = sum(val.example_costs) / len(val.example_costs)
        per_example = trainer.mac_stats(val.example_costs)
        macs_fraction = per_example["mean"]
    else:
        b = trainer.decision_fraction()
        macs_fraction = trainer.macs_fraction()
    trainer.epoch += 1  # only once the epoch is evaluated: an interrupted one is redone on --resume
    return EpochMetrics(
        epoch=trainer.epoch,
        loss=stats["loss"],
        ce=stats["ce"],
        act_loss=stats["act"],
        train_acc=stats["acc"],
        val_acc=val.top1,
        val_top5=val.top5,
        val_loss=val.loss,
        macs_fraction=macs_fraction,
        gateable_kept=b,
        decided=trainer.decided,
        seconds=stats["seconds"],
        images_per_s=stats["images_per_s"],
        latency_fraction=None if trainer.mac_counter is None else trainer.budget.total_fraction(b),
        macs_per_example=per_example,
        calibrated_fraction=trainer.calibrated_fraction,
    )


__all__ = [
    "EpochMetrics",
    "Evaluation",
    "Trainer",
    "distillation_loss",
    "evaluate",
    "make_budget",
    "recalibrate_batchnorm",
    "run_epochs",
]
