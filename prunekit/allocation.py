"""Allocations of a budget over the channel groups that need no training: the uniform cut (the same
fraction of every group, most important gates first) and the floors it sets under the learned gates.

Why floors: on short fine-tuning the FLOP-weighted activation loss cuts the groups whose channels cost
the most MACs (the early, high-resolution layers) down to whatever minimum width is allowed, while the
cheap late layers stay whole (docs/recipe.md has the widths). A fixed `--min-keep` for every group
limits that, but a floor that suits one target is out of reach for a smaller one. `raise_floors_` ties
the floor to the budget instead: every group keeps at least `share` of what the uniform cut to the same
budget keeps it, and the gates learn the rest of the allocation above that.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from prunekit.gates import GateBank, GateLayout


def uniform_order(bank: GateBank) -> torch.Tensor:
    """The learnable gates ordered so that any prefix keeps about the same fraction of every group:
    by rank within their group relative to the group's size (make_layout numbers a group's gates from
    the most important to the least)."""
    device = bank.logits.device
    learnable = (~bank.fixed_on).nonzero().flatten()
    groups = torch.tensor(bank.layout.gate_group, device=device)
    position = torch.zeros(bank.num_gates, dtype=torch.float64, device=device)
    for g in groups.unique().tolist():
        members = (groups == g).nonzero().flatten()
        position[members] = torch.arange(1, len(members) + 1, dtype=torch.float64, device=device) / len(
            members
        )
    return learnable[torch.argsort(position[learnable], stable=True)]


def within_groups_order(bank: GateBank, score: torch.Tensor) -> torch.Tensor:
    """`uniform_order` with each group's gates re-ranked by `score` (G,), highest first: any prefix
    keeps the uniform cut's number of gates in every group, and chooses them by score."""
    order = uniform_order(bank)
    groups = torch.tensor(bank.layout.gate_group, device=order.device)[order]
    result = order.clone()
    for g in groups.unique().tolist():
        slots = (groups == g).nonzero().flatten()
        members = order[slots]
        result[slots] = members[torch.argsort(score[members], descending=True, stable=True)]
    return result


def prefix_decisions(bank: GateBank, order: torch.Tensor, k: int) -> torch.Tensor:
    """Decisions (G,) bool: the fixed gates and the first `k` gates of `order` on."""
    d = bank.fixed_on.clone()
    d[order[:k]] = True
    return d


def fitting_prefix(bank: GateBank, order: torch.Tensor, fits: Callable[[torch.Tensor], bool]) -> int:
    """The length of the longest prefix of `order` whose decisions still `fit` (a bisection: keeping
    more gates never costs less)."""
    lo, hi = 0, len(order)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(prefix_decisions(bank, order, mid)):
            lo = mid
        else:
            hi = mid - 1
    return lo


def largest_prefix(bank: GateBank, order: torch.Tensor, fits: Callable[[torch.Tensor], bool]) -> torch.Tensor:
    """The decisions of the longest prefix of `order` that fits (`fitting_prefix`)."""
    return prefix_decisions(bank, order, fitting_prefix(bank, order, fits))


@torch.no_grad()
def raise_floors_(bank: GateBank, uniform: torch.Tensor, share: float) -> int:
    """Fix on, in every group, its first ceil(share * kept) gates, where `kept` is how many the
    `uniform` decisions (G,) keep there; never fewer than were fixed already. Returns how many gates
    became fixed."""
    groups = torch.tensor(bank.layout.gate_group)
    fixed = torch.tensor(bank.layout.fixed_on)
    uniform = uniform.cpu()
    for g in groups.unique().tolist():
        members = (groups == g).nonzero().flatten()
        floor = math.ceil(share * int(uniform[members].sum()) - 1e-9)
        fixed[members[:floor]] = True
    added = int(fixed.sum()) - int(bank.fixed_on.sum())
    bank.layout = GateLayout(bank.layout.unit_gate, bank.layout.gate_group, tuple(fixed.tolist()))
    bank.fixed_on.copy_(fixed.to(bank.fixed_on.device))
    return added


__all__ = [
    "fitting_prefix",
    "largest_prefix",
    "prefix_decisions",
    "raise_floors_",
    "uniform_order",
    "within_groups_order",
]
