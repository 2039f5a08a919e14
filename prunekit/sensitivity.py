"""An allocation from measured sensitivity: how far the model's output moves when one group alone
loses gates, traded against the MACs the gates cost.

Why: on short fine-tuning the learned gates put the cuts where the FLOP-weighted activation loss pushes
hardest (the groups whose channels cost the most MACs) and keep the cheap late layers whole, which is
the opposite of what costs the least accuracy (docs/recipe.md, "Where the budget should go"). The
first-order gate gradients do not see that; a zero-order measurement does, cheaply: for every group,
the gates cut at a few widths while every other group keeps all of its gates, and the distillation loss
to the full model measured on a few training batches. BatchNorm layers normalise with the batch's own
statistics while measuring, so a cut is judged after the recalibration a fine-tune starts with, not
through the full model's statistics (which overstate what a cut costs and rank the groups differently).

From the per-group curves, `removal_order` eliminates gates greedily, each time the one whose loss per
MAC saved is the lowest (the classical sensitivity-analysis allocation: the curves are taken as
additive across groups, the MACs counted exactly, as every gate removed changes its neighbours' cost).
Kept gates come in the reverse order of removal, so any prefix is the greedy allocation at some budget
and the decision point's bisection over prefixes (`allocation.fitting_prefix`) applies unchanged;
`fill_to_budget` then adds back what still fits at the run's budget. Within a group the gates go from
the least important (the gate stage's ranking) up.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from prunekit.allocation import fitting_prefix, prefix_decisions
from prunekit.gates import GateBank
from prunekit.graph import ChannelGraph
from prunekit.modes import training_flags
from prunekit.objective import MacModel

SENSITIVITY_LEVELS = 4  # widths measured per group, evenly spaced from its fixed gates to all but one step
UNUSED_BUDGET = 0.2  # fill_to_budget: an allocation below 0.8 of the budget wastes it


@dataclass
class GroupCurve:
    """The measured loss of one group's cuts: `loss[i]` with `kept[i]` of its gates on (every other
    group whole), ascending in `kept`, ending at all gates on (loss 0 by construction)."""

    group: int
    name: str
    kept: list[int]
    loss: list[float]

    def at(self, k: float) -> float:
        """The loss with `k` gates on: linear between the measured widths."""
        xs, ys = self.kept, self.loss
        if k >= xs[-1]:
            return ys[-1]
        if k <= xs[0]:
            return ys[0]
        j = next(i for i in range(1, len(xs)) if xs[i] >= k)
        w = (k - xs[j - 1]) / (xs[j] - xs[j - 1])
        return ys[j - 1] + w * (ys[j] - ys[j - 1])

    def to_dict(self) -> dict[str, Any]:
        return {"group": self.group, "name": self.name, "kept": self.kept, "loss": self.loss}


@dataclass
class Sensitivity:
    curves: list[GroupCurve]
    batches: int
    images: int
    seconds: float

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Sensitivity:
        curves = [GroupCurve(c["group"], c["name"], list(c["kept"]), list(c["loss"])) for c in d["curves"]]
        return cls(curves, int(d["batches"]), int(d["images"]), float(d["seconds"]))

    def to_dict(self) -> dict[str, Any]:
        return {
            "batches": self.batches,
            "images": self.images,
            "seconds": round(self.seconds, 3),
            "curves": [c.to_dict() for c in self.curves],
        }


def mean_sensitivity(measured: list[Sensitivity]) -> Sensitivity:
    """The curves of several processes (each measured on its own batches) averaged: one allocation
    for all of them, from all of their images."""
    first = measured[0]
    curves = [
        GroupCurve(
            c.group,
            c.name,
            c.kept,
            [sum(m.curves[i].loss[j] for m in measured) / len(measured) for j in range(len(c.kept))],
        )
        for i, c in enumerate(first.curves)
    ]
    return Sensitivity(
        curves,
        sum(m.batches for m in measured),
        sum(m.images for m in measured),
        max(m.seconds for m in measured),
    )


@contextmanager
def _decisions(bank: GateBank, states: torch.Tensor) -> Iterator[None]:
    """Run with these gate states; the bank's logits and decided flag are restored on exit."""
    logits, decided = bank.logits.detach().clone(), bank.decided.clone()
    bank.fix_(states)
    try:
        yield
    finally:
        with torch.no_grad():
            bank.logits.copy_(logits)
            bank.decided.copy_(decided)


@contextmanager
def _batch_statistics(model: nn.Module) -> Iterator[None]:
    """Everything in eval mode (no dropout, no stochastic depth) except the BatchNorm layers, which
    normalise with each batch's own statistics; their running statistics are restored on exit."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m, {n: b.clone() for n, b in m.named_buffers(recurse=False)}) for m in bns]
    with training_flags(model):
        model.eval()
        for m in bns:
            m.train()
        try:
            yield
        finally:
            for m, buffers in saved:
                for n, b in buffers.items():
                    getattr(m, n).copy_(b)


def _levels(fixed: int, total: int, levels: int) -> list[int]:
    """Gate counts to measure: from the fixed ones up, evenly spaced, below `total`; then `total`."""
    counts = sorted({fixed + round(j * (total - fixed) / levels) for j in range(levels)} - {total})
    return counts + [total]


@torch.no_grad()
def measure_sensitivity(
    model: nn.Module,
    bank: GateBank,
    graph: ChannelGraph,
    batches: Iterable[Any],
    loss_fn: Any,
    device: torch.device,
    levels: int = SENSITIVITY_LEVELS,
) -> Sensitivity:
    """Every group's loss curve (see the module's docstring). `batches` yields (x, ...) tuples or
    tensors; `loss_fn(student_logits, reference_logits)` is the distance measured (prunekit uses its
    distillation loss). The gated `model` is left as it was: weights, statistics, gates, modes."""
    start = time.perf_counter()
    xs = [(b[0] if isinstance(b, list | tuple) else b).to(device) for b in batches]
    if not xs:
        raise ValueError("measuring sensitivity needs at least one batch")
    groups = torch.tensor(bank.layout.gate_group)
    fixed = bank.fixed_on.cpu()
    all_on = torch.ones(bank.num_gates, dtype=torch.bool)
    curves: list[GroupCurve] = []
    with _batch_statistics(model):
        with _decisions(bank, all_on):
            reference = [model(x).float() for x in xs]

        def loss_of(states: torch.Tensor) -> float:
            with _decisions(bank, states):
                total = sum(
                    float(loss_fn(model(x).float(), r)) * len(x) for x, r in zip(xs, reference, strict=True)
                )
            return total / sum(len(x) for x in xs)

        for group in graph.groups:
            members = (groups == group.index).nonzero().flatten()
            n_fixed = int(fixed[members].sum())
            if n_fixed == len(members):
                continue  # nothing to decide in this group
            counts = _levels(n_fixed, len(members), levels)
            losses = []
            for k in counts[:-1]:
                states = all_on.clone()
                states[members[k:]] = False  # make_layout numbers a group's gates most important first
                losses.append(loss_of(states))
            losses.append(0.0)
            for i in range(len(losses) - 2, -1, -1):  # fewer gates never cost less (noise aside)
                losses[i] = max(losses[i], losses[i + 1])
            curves.append(GroupCurve(group.index, group.name, counts, losses))
    return Sensitivity(curves, len(xs), sum(len(x) for x in xs), time.perf_counter() - start)


class _Counts:
    """Allocations as the number of learnable gates each group keeps (its most important ones), with
    the estimated loss of the curves and the MACs counted by the objective's `mac_model`."""

    def __init__(self, bank: GateBank, sensitivity: Sensitivity, mac_model: MacModel) -> None:
        groups = torch.tensor(bank.layout.gate_group)
        self.fixed = bank.fixed_on.cpu()
        self.members = {}  # group -> its learnable gates, most important first (make_layout's rank)
        self.n_fixed = {}
        for g in groups.unique().tolist():
            idx = (groups == g).nonzero().flatten()
            if not bool(self.fixed[idx].all()):
                self.members[g] = idx[~self.fixed[idx]]
                self.n_fixed[g] = int(self.fixed[idx].sum())
        self.curves = {c.group: c for c in sensitivity.curves}
        self.mac_model = mac_model
        self.device = next(iter(mac_model.buffers()), torch.empty(0)).device
        self.unit_gate = bank.unit_gate.cpu()

    def full(self) -> dict[int, int]:
        return {g: len(idx) for g, idx in self.members.items()}

    def states(self, on: dict[int, int]) -> torch.Tensor:
        d = self.fixed.clone()
        for g, idx in self.members.items():
            d[idx[: on[g]]] = True
        return d

    def macs(self, allocations: list[dict[int, int]]) -> list[float]:
        rows = torch.stack([self.states(a) for a in allocations])
        return self.mac_model(rows[:, self.unit_gate].float().to(self.device)).cpu().tolist()

    def loss(self, g: int, learnable_on: int) -> float:
        curve = self.curves.get(g)
        return 0.0 if curve is None else curve.at(self.n_fixed[g] + learnable_on)

    def total_loss(self, on: dict[int, int]) -> float:
        return sum(self.loss(g, k) for g, k in on.items())

    def cheapest_removal(self, on: dict[int, int], keep: int | None = None) -> int | None:
        """The group whose next gate out costs the least estimated loss per MAC saved (ties: the most
        MACs, then the lowest group), never `keep`; None when no group has a learnable gate left."""
        live = [g for g in self.members if g != keep and on[g] > 0]
        if not live:
            return None
        trials = [dict(on) for _ in live]
        for g, t in zip(live, trials, strict=True):
            t[g] -= 1
        base, *after = self.macs([on, *trials])
        keys = []
        for g, m in zip(live, after, strict=True):
            saved = base - m
            cost = self.loss(g, on[g] - 1) - self.loss(g, on[g])
            keys.append((cost / saved if saved > 0 else math.inf, -saved, g))
        return min(keys)[2]


@torch.no_grad()
def removal_order(bank: GateBank, mac_model: MacModel, sensitivity: Sensitivity) -> torch.Tensor:
    """The learnable gates, the first to keep first: the reverse of a greedy elimination that each
    time removes, from the end of some group's gates, the one with the least estimated loss per MAC
    saved (`_Counts.cheapest_removal`)."""
    counts = _Counts(bank, sensitivity, mac_model)
    on = counts.full()
    removed: list[int] = []
    while (g := counts.cheapest_removal(on)) is not None:
        on[g] -= 1
        removed.append(int(counts.members[g][on[g]]))
    return torch.tensor(removed[::-1], dtype=torch.long, device=bank.logits.device)


@torch.no_grad()
def fill_to_budget(
    bank: GateBank,
    order: torch.Tensor,
    sensitivity: Sensitivity,
    fits: Callable[[torch.Tensor], bool],
    mac_model: MacModel,
    target: float,
    max_rounds: int = 200,
) -> torch.Tensor:
    """`order` rearranged so that its longest fitting prefix uses the budget well. The greedy path moves
    one gate at a time, and on a small model one gate of a narrow group can carry a large share of the
    MACs, so the last state on it that fits may fall far below the budget. From that state: add back the
    gate that saves the most estimated loss while any fits; then try swaps (one more gate in a group,
    the cheapest gates per MAC of the others removed until it fits), kept when they lower the estimated
    loss; repeat. An allocation that leaves more than UNUSED_BUDGET of the `target` (the objective's
    fraction, as `mac_model` counts it) unused ranks below any that does not: the curves measure the
    cut before fine-tuning and give unused MACs no value, though a fine-tune can use them, and a flat
    stretch of a curve (noise, clamped to be monotone) would otherwise trade half the budget for
    nothing. The result lists the chosen gates first: no gate more fits, so the decision point's
    bisection over prefixes finds exactly them."""
    counts = _Counts(bank, sensitivity, mac_model)
    chosen = prefix_decisions(bank, order, fitting_prefix(bank, order, fits))
    on = {g: int(chosen[idx].sum()) for g, idx in counts.members.items()}

    def refill(a: dict[int, int]) -> dict[int, int]:
        a = dict(a)
        while True:
            options = []
            for g, idx in counts.members.items():
                if a[g] < len(idx):
                    trial = dict(a)
                    trial[g] += 1
                    if fits(counts.states(trial)):
                        options.append((counts.loss(g, a[g]) - counts.loss(g, a[g] + 1), g))
            if not options:
                return a
            a[max(options)[1]] += 1

    def shrink_to_fit(a: dict[int, int], keep: int) -> dict[int, int] | None:
        """Remove the cheapest gate per MAC saved (never from group `keep`) until `a` fits."""
        a = dict(a)
        while not fits(counts.states(a)):
            g = counts.cheapest_removal(a, keep)
            if g is None:
                return None
            a[g] -= 1
        return a

    def key(a: dict[int, int]) -> tuple[bool, float]:
        used = counts.macs([a])[0] / mac_model.gateable_macs
        return (used < (1 - UNUSED_BUDGET) * target, counts.total_loss(a))

    on = refill(on)
    for _ in range(max_rounds):
        best, best_key = None, key(on)
        for g, idx in counts.members.items():
            if on[g] >= len(idx):
                continue
            trial = dict(on)
            trial[g] += 1
            swapped = shrink_to_fit(trial, keep=g)
            if swapped is None:
                continue
            swapped = refill(swapped)
            k = key(swapped)
            if k[0] < best_key[0] or (k[0] == best_key[0] and k[1] < best_key[1] - 1e-12):
                best, best_key = swapped, k
        if best is None:
            break
        on = best
    final = counts.states(on)
    first = [int(x) for x in order.tolist() if final[int(x)]]
    rest = [int(x) for x in order.tolist() if not final[int(x)]]
    return torch.tensor(first + rest, dtype=torch.long, device=order.device)


__all__ = [
    "SENSITIVITY_LEVELS",
    "GroupCurve",
    "Sensitivity",
    "fill_to_budget",
    "mean_sensitivity",
    "measure_sensitivity",
    "removal_order",
]
