"""Fine-tuning gates and weights: cross-entropy + lambda * (t - B)^2 with straight-through Gumbel gates.

Schedule (a short-budget version of the paper's recipe, see docs): gates and weights train jointly
until `decide_at` of the steps; then the gate decisions are fixed -- the gates ranked by learned
margin (logit_on - logit_off) and the largest set that fits the MAC budget kept -- and the remaining
steps fine-tune the weights under those fixed decisions. `decide_at=1` decides only at the end.

Plain functions (`train_one_epoch`, `evaluate`) with callbacks for progress, so the CLI renders and
the loop stays usable under torchrun/DDP later.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.errors import ConfigError, PrunekitError, TrainingError
from prunekit.gates import GateBank
from prunekit.objective import MacBudget, MacModel, activation_loss, target_to_budget


@dataclass(frozen=True)
class FinetuneConfig:
    target_macs: float  # fraction of the whole model's MACs to keep (fvcore count)
    epochs: int = 3
    batch_size: int = 64
    lr: float = 0.01  # weights: SGD momentum 0.9, cosine decay per step
    gate_lr: float = 0.05  # gate logits: Adam
    weight_decay: float = 1e-4
    gate_weight_decay: float = 0.0
    lam: float = 5.0  # weight of the activation loss
    tau: float = 1.0  # Gumbel-softmax temperature at the start
    tau_end: float | None = None  # anneal geometrically to this by the decision point (None: constant)
    one_sided: bool = False  # penalise only B > t
    decide_at: float = 0.2  # fraction of training steps after which gate decisions are fixed
    distill: float = 0.7  # weight of distillation from the ungated model (temperature 2)
    bn_recalibrate: int = 0  # batches used to re-estimate BatchNorm statistics before evaluation
    workers: int = 2
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    amp: bool = True  # bfloat16 autocast on CUDA
    max_steps_per_epoch: int | None = None  # cap (quick runs, tests)

    def __post_init__(self) -> None:
        checks = [
            (0.0 < self.target_macs < 1.0, f"--target-macs must be between 0 and 1, got {self.target_macs}"),
            (self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.lr > 0 and self.gate_lr > 0, "learning rates must be positive"),
            (self.lam >= 0, f"--lambda must be >= 0, got {self.lam}"),
            (self.tau > 0 and (self.tau_end is None or self.tau_end > 0), "--tau must be positive"),
            (0.0 < self.decide_at <= 1.0, f"--decide-at must be in (0, 1], got {self.decide_at}"),
            (0.0 <= self.distill <= 1.0, f"--distill must be in [0, 1], got {self.distill}"),
            (
                self.device in ("auto", "cpu", "cuda"),
                f"--device must be auto, cpu or cuda, got {self.device}",
            ),
            (self.workers >= 0, "--workers must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FinetuneConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def resolve_device(spec: str) -> torch.device:
    if spec == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA GPU is available")
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


@dataclass
class EpochMetrics:
    epoch: int
    loss: float
    ce: float
    act_loss: float
    train_acc: float
    val_acc: float
    val_loss: float
    macs_fraction: float  # of the whole model, under the deterministic decisions
    gateable_fraction: float  # B under the deterministic decisions
    decided: bool
    seconds: float
    images_per_s: float

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
        teacher: nn.Module | None = None,
    ) -> None:
        self.model, self.bank, self.mac_model, self.budget, self.config = (
            model,
            bank,
            mac_model,
            budget,
            config,
        )
        self.device = resolve_device(config.device)
        self.teacher = teacher
        self.model.to(self.device)
        self.mac_model.to(self.device)
        if teacher is not None:
            teacher.to(self.device).eval()
        gate_params = [bank.logits]
        weights = [p for n, p in model.named_parameters() if not n.startswith("prunekit_gates.")]
        self.opt = torch.optim.SGD(
            weights, lr=config.lr, momentum=0.9, nesterov=True, weight_decay=config.weight_decay
        )
        self.gate_opt = torch.optim.Adam(
            gate_params, lr=config.gate_lr, weight_decay=config.gate_weight_decay
        )
        self.total_steps = max(1, steps_per_epoch * config.epochs)
        self.decide_step = min(self.total_steps, max(1, round(config.decide_at * self.total_steps)))
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, self.total_steps) / self.total_steps))
        )
        self.step = 0
        self.epoch = 0
        self.decided = False
        self.amp = config.amp and self.device.type == "cuda"

    # -- state for --resume ---------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "step": self.step,
            "decided": self.decided,
            "config": self.config.to_dict(),
            "optimizer": self.opt.state_dict(),
            "gate_optimizer": self.gate_opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "rng": torch.get_rng_state(),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.step = int(state["step"])
        self.decided = bool(state["decided"])
        self.opt.load_state_dict(state["optimizer"])
        self.gate_opt.load_state_dict(state["gate_optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"].cpu() if isinstance(state["rng"], torch.Tensor) else state["rng"])
        if self.decided:
            self.bank.eval()

    # -- gates ----------------------------------------------------------------------------------
    def tau(self) -> float:
        c = self.config
        if c.tau_end is None:
            return c.tau
        progress = min(1.0, self.step / max(1, self.decide_step))
        return c.tau * (c.tau_end / c.tau) ** progress

    @torch.no_grad()
    def decision_fraction(self, decisions: torch.Tensor | None = None) -> float:
        d = self.bank.decisions() if decisions is None else decisions
        a = self.bank.unit_values(d.to(self.bank.logits.dtype).unsqueeze(0)).to(self.device)
        return float(self.mac_model(a)[0]) / self.mac_model.full

    @torch.no_grad()
    def decide(self) -> None:
        """Fix the gates: rank learnable gates by margin, keep the largest prefix within the budget."""
        bank = self.bank
        margin = (bank.logits[:, 1] - bank.logits[:, 0]).detach()
        learnable = (~bank.fixed_on).nonzero().flatten()
        order = learnable[torch.argsort(margin[learnable], descending=True, stable=True)]

        def decisions(k: int) -> torch.Tensor:
            d = bank.fixed_on.clone()
            d[order[:k]] = True
            return d

        lo, hi = 0, len(order)  # largest k with fraction(k) <= t (fraction grows with k)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.decision_fraction(decisions(mid)) <= self.budget.t + 1e-9:
                lo = mid
            else:
                hi = mid - 1
        final = decisions(lo)
        bank.logits[:, 0] = 0.0
        bank.logits[:, 1] = torch.where(final, torch.full_like(margin, 5.0), torch.full_like(margin, -5.0))
        bank.eval()  # deterministic gates from here on, also in train mode
        self.decided = True

    # -- loops ----------------------------------------------------------------------------------
    def train_one_epoch(
        self, loader: Any, on_step: Callable[[dict[str, float]], None] | None = None
    ) -> dict[str, float]:
        model, bank, cfg = self.model, self.bank, self.config
        model.train()
        if self.decided:
            bank.eval()
        sums = {"loss": 0.0, "ce": 0.0, "act": 0.0, "correct": 0.0, "n": 0.0}
        start = time.perf_counter()
        for i, (x, y) in enumerate(loader):
            if cfg.max_steps_per_epoch is not None and i >= cfg.max_steps_per_epoch:
                break
            if not self.decided and self.step >= self.decide_step:
                self.decide()
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            bank.tau = self.tau()
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp):
                logits = model(x)
                ce = F.cross_entropy(logits.float(), y)
                loss = ce
                if self.teacher is not None and cfg.distill > 0:
                    with torch.no_grad():
                        soft = self.teacher(x).float()
                    kd = (
                        F.kl_div(
                            F.log_softmax(logits.float() / 2, 1),
                            F.softmax(soft / 2, 1),
                            reduction="batchmean",
                        )
                        * 4
                    )
                    loss = (1 - cfg.distill) * ce + cfg.distill * kd
            b = self.mac_model(bank.current) / self.mac_model.full
            act = activation_loss(b, self.budget.t, cfg.one_sided)
            if not self.decided:
                loss = loss + cfg.lam * act
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"non-finite loss at epoch {self.epoch + 1}, step {i + 1}: lower --lr / --gate-lr "
                    "(the last good checkpoint is kept)"
                )
            self.opt.zero_grad(set_to_none=True)
            self.gate_opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            if not self.decided:
                self.gate_opt.step()
            self.sched.step()
            self.step += 1
            n = y.shape[0]
            sums["loss"] += loss.item() * n
            sums["ce"] += ce.item() * n
            sums["act"] += act.item() * n
            sums["correct"] += float((logits.argmax(1) == y).sum())
            sums["n"] += n
            if on_step is not None:
                on_step(
                    {"step": i + 1, "loss": loss.item(), "b": b.mean().item(), "decided": float(self.decided)}
                )
        if not self.decided and self.step >= self.decide_step:
            self.decide()
        n = max(1.0, sums["n"])
        seconds = time.perf_counter() - start
        return {
            "loss": sums["loss"] / n,
            "ce": sums["ce"] / n,
            "act": sums["act"] / n,
            "acc": sums["correct"] / n,
            "seconds": seconds,
            "images_per_s": sums["n"] / max(seconds, 1e-9),
        }


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: Any, device: torch.device, max_batches: int | None = None
) -> tuple[float, float]:
    """(top-1 accuracy, mean cross-entropy) in eval mode (deterministic gates)."""
    was = model.training
    model.eval()
    correct = total = 0
    loss = 0.0
    try:
        for i, (x, y) in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            x, y = x.to(device), y.to(device)
            out = model(x).float()
            loss += float(F.cross_entropy(out, y, reduction="sum"))
            correct += int((out.argmax(1) == y).sum())
            total += y.shape[0]
    finally:
        model.train(was)
    return correct / max(1, total), loss / max(1, total)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, loader: Any, device: torch.device, batches: int) -> None:
    """Re-estimate BatchNorm running statistics with the current (deterministic) gates."""
    bns = [
        m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    if not bns or batches <= 0:
        return
    saved = {m: m.momentum for m in bns}
    was = model.training
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches seen
    model.train()
    bank = getattr(model, "prunekit_gates", None)
    if bank is not None:
        bank.eval()
    try:
        for i, (x, _) in enumerate(loader):
            if i >= batches:
                break
            model(x.to(device))
    finally:
        for m, mom in saved.items():
            m.momentum = mom
        model.train(was)


def make_budget(bank: GateBank, mac_model: MacModel, total_macs: float, target: float) -> MacBudget:
    fixed_only = bank.unit_values(bank.fixed_on.to(bank.logits.dtype).unsqueeze(0)).to(
        next(mac_model.buffers()).device
    )
    min_fraction = float(mac_model(fixed_only)[0]) / mac_model.full if mac_model.full else 1.0
    return target_to_budget(target, total_macs, mac_model.full, min_fraction)


def finetune(
    trainer: Trainer,
    train_loader: Any,
    val_loader: Any,
    *,
    save: Callable[[Trainer, EpochMetrics, bool], None],
    on_step: Callable[[dict[str, float]], None] | None = None,
    on_epoch: Callable[[EpochMetrics], None] | None = None,
) -> list[EpochMetrics]:
    """Run the remaining epochs; `save(trainer, metrics, interrupted)` is called after each epoch. Ctrl-C
    anywhere in an epoch raises Interrupted (exit code 130); the caller saves a resumable checkpoint."""
    history: list[EpochMetrics] = []
    cfg = trainer.config
    while trainer.epoch < cfg.epochs:
        try:
            history.append(_one_epoch(trainer, train_loader, val_loader, on_step))
        except KeyboardInterrupt:
            raise Interrupted() from None
        save(trainer, history[-1], False)
        if on_epoch is not None:
            on_epoch(history[-1])
    return history


def _one_epoch(trainer: Trainer, train_loader: Any, val_loader: Any, on_step: Any) -> EpochMetrics:
    cfg = trainer.config
    stats = trainer.train_one_epoch(train_loader, on_step)
    if cfg.bn_recalibrate:
        recalibrate_batchnorm(trainer.model, train_loader, trainer.device, cfg.bn_recalibrate)
    val_acc, val_loss = evaluate(trainer.model, val_loader, trainer.device)
    b = trainer.decision_fraction()
    trainer.epoch += 1  # only once the epoch is evaluated: an interrupted one is redone on --resume
    return EpochMetrics(
        epoch=trainer.epoch,
        loss=stats["loss"],
        ce=stats["ce"],
        act_loss=stats["act"],
        train_acc=stats["acc"],
        val_acc=val_acc,
        val_loss=val_loss,
        macs_fraction=trainer.budget.total_fraction(b),
        gateable_fraction=b,
        decided=trainer.decided,
        seconds=stats["seconds"],
        images_per_s=stats["images_per_s"],
    )


class Interrupted(PrunekitError):
    """Ctrl-C during training; the CLI saves a resumable checkpoint and exits 130."""

    exit_code = 130

    def __init__(self) -> None:
        super().__init__("interrupted")


__all__ = [
    "EpochMetrics",
    "FinetuneConfig",
    "Interrupted",
    "Trainer",
    "evaluate",
    "finetune",
    "make_budget",
    "recalibrate_batchnorm",
    "resolve_device",
]
