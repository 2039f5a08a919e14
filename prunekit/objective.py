"""Expected MACs as a differentiable function of unit activity, and the batch activation loss.

    L = CrossEntropy + lambda * (t - B)^2

B is the batch mean of the fraction of *gateable* MACs left on. A conv's MACs are
k_h * k_w * H_out * W_out * active_in * active_out, so B is bilinear in the gate values of adjacent
groups: the loss is FLOP-weighted, not a count of open gates. The user's target is a fraction of
the WHOLE model's MACs (what fvcore counts); `target_to_budget` converts it to t for the gateable part.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from prunekit.errors import ConfigError
from prunekit.graph import ChannelGraph


def _sparse(lists: list[tuple[int, ...]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per list: the count of fixed (-1) entries, and (term, unit, count) triples for the others."""
    fixed = torch.tensor([sum(1 for u in lst if u < 0) for lst in lists], dtype=torch.float64)
    terms, units, counts = [], [], []
    for i, lst in enumerate(lists):
        c: dict[int, int] = {}
        for u in lst:
            if u >= 0:
                c[u] = c.get(u, 0) + 1
        for u, k in c.items():
            terms.append(i)
            units.append(u)
            counts.append(k)
    return (
        fixed,
        torch.tensor(terms, dtype=torch.long),
        torch.tensor(units, dtype=torch.long),
        torch.tensor(counts, dtype=torch.float64),
    )


class MacModel(nn.Module):
    """Gateable MACs of a graph given unit activity a (N, U) in [0, 1] -> (N,)."""

    def __init__(self, graph: ChannelGraph) -> None:
        super().__init__()
        gateable = [t for t in graph.mac_terms if t.prunable]
        dense = [t for t in gateable if t.kind == "bilinear"]
        linear = [t for t in gateable if t.kind != "bilinear"]
        self.num_units = graph.num_units
        self.n_dense, self.n_linear = len(dense), len(linear)
        for prefix, lists in (
            ("in", [t.in_units for t in dense]),
            ("out", [t.out_units for t in dense]),
            ("lin", [t.units for t in linear]),
        ):
            fixed, terms, units, counts = _sparse(lists)
            self.register_buffer(f"{prefix}_fixed", fixed.float(), persistent=False)
            self.register_buffer(f"{prefix}_term", terms, persistent=False)
            self.register_buffer(f"{prefix}_unit", units, persistent=False)
            self.register_buffer(f"{prefix}_count", counts.float(), persistent=False)
        self.register_buffer("dense_factor", torch.tensor([float(t.factor) for t in dense]), persistent=False)
        self.register_buffer("lin_factor", torch.tensor([float(t.factor) for t in linear]), persistent=False)
        self.gateable_macs = float(sum(t.macs() for t in gateable))  # every gate open

    def _active(self, a: torch.Tensor, prefix: str, n_terms: int) -> torch.Tensor:
        fixed = getattr(self, f"{prefix}_fixed")
        term, unit, count = (getattr(self, f"{prefix}_{k}") for k in ("term", "unit", "count"))
        out = fixed.to(a.dtype).expand(a.shape[0], n_terms).clone()
        return out.index_add(1, term, a[:, unit] * count.to(a.dtype))

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        a = a.float()
        macs = torch.zeros(a.shape[0], device=a.device)
        if self.n_dense:
            n_in = self._active(a, "in", self.n_dense)
            n_out = self._active(a, "out", self.n_dense)
            macs = macs + (n_in * n_out * self.dense_factor).sum(1)
        if self.n_linear:
            macs = macs + (self._active(a, "lin", self.n_linear) * self.lin_factor).sum(1)
        return macs


class LatencyModel(MacModel):
    """Predicted milliseconds of the gateable layers given unit activity: a MacModel whose factor per
    term is the layer's measured latency slope (prunekit.latency_table) instead of its MACs per channel
    pair, so the activation loss and the budget rule work on latency unchanged. `gateable_macs` is then
    the gateable milliseconds at full width."""

    def __init__(self, graph: ChannelGraph, beta: dict[str, float], block: int = 1) -> None:
        super().__init__(graph)
        self.block = block
        gateable = [t for t in graph.mac_terms if t.prunable]
        missing = [t.name for t in gateable if t.name not in beta]
        if missing:
            raise ConfigError(f"the latency table has no entry for layer(s) {missing[:3]}: measure it again")
        dense = [t for t in gateable if t.kind == "bilinear"]
        linear = [t for t in gateable if t.kind != "bilinear"]
        self.dense_factor = torch.tensor([beta[t.name] for t in dense], dtype=torch.float32)
        self.lin_factor = torch.tensor([beta[t.name] for t in linear], dtype=torch.float32)
        full = torch.ones(1, graph.num_units)
        self.gateable_macs = float(self(full)[0])

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        """Smooth in the activity for training; on hard decisions (0/1, no gradient) the channel counts
        are rounded up to the runtime's block, as the decided widths will cost."""
        hard = self.block > 1 and not a.requires_grad and bool(((a == 0) | (a == 1)).all())
        if not hard:
            return super().forward(a)
        a = a.float()
        b = float(self.block)
        macs = torch.zeros(a.shape[0], device=a.device)
        if self.n_dense:
            n_in = torch.ceil(self._active(a, "in", self.n_dense) / b - 1e-6) * b
            n_out = torch.ceil(self._active(a, "out", self.n_dense) / b - 1e-6) * b
            macs = macs + (n_in * n_out * self.dense_factor).sum(1)
        if self.n_linear:
            n = torch.ceil(self._active(a, "lin", self.n_linear) / b - 1e-6) * b
            macs = macs + (n * self.lin_factor).sum(1)
        return macs


BUDGET_EPS = 1e-9


@dataclass(frozen=True)
class MacBudget:
    """How a whole-model MACs target maps to the gateable part."""

    total_macs: float  # the model's MACs (fvcore) with every channel kept
    gateable_macs: float  # the part that depends on gates
    target_fraction: float  # of total_macs, as the user gave it
    t: float  # of gateable_macs: the loss target

    @property
    def fixed_macs(self) -> float:
        return self.total_macs - self.gateable_macs

    def total_fraction(self, gateable_fraction: float) -> float:
        return (self.fixed_macs + gateable_fraction * self.gateable_macs) / self.total_macs

    def fits(self, gateable_fraction: float) -> bool:
        """The one budget rule: decisions fit when their gateable fraction is at most t (up to rounding
        error of the float sums, never a visible slack)."""
        return gateable_fraction <= self.t + BUDGET_EPS

    def to_dict(self) -> dict[str, float]:
        return {
            "total_macs": self.total_macs,
            "gateable_macs": self.gateable_macs,
            "target_fraction": self.target_fraction,
            "t": self.t,
        }


def target_to_budget(
    target_fraction: float, total_macs: float, gateable_macs: float, min_fraction: float
) -> MacBudget:
    """Convert "keep F of the model's MACs" into t; `min_fraction` is the smallest gateable fraction the
    gates can reach (fixed gates on, all others off)."""
    if not 0.0 < target_fraction < 1.0:
        raise ConfigError(f"target_macs must be between 0 and 1 (exclusive), got {target_fraction}")
    if gateable_macs <= 0:
        raise ConfigError("nothing in this model can be gated")
    fixed = total_macs - gateable_macs
    t = (target_fraction * total_macs - fixed) / gateable_macs
    reachable = (fixed + min_fraction * gateable_macs) / total_macs
    if t < min_fraction:
        raise ConfigError(
            f"target_macs {target_fraction:g} is out of reach: with the minimum widths the model keeps at "
            f"least {reachable:.3f} of its MACs (lower min_keep or pick a target above that)"
        )
    return MacBudget(total_macs, gateable_macs, target_fraction, t)


def activation_loss(b: torch.Tensor, t: float, one_sided: bool = False) -> torch.Tensor:
    """(t - B)^2 on the batch mean B of the gateable-MACs fraction; one-sided: only when B > t."""
    gap = b.mean() - t
    if one_sided:
        gap = torch.clamp(gap, min=0.0)
    return gap * gap


__all__ = ["LatencyModel", "MacBudget", "MacModel", "activation_loss", "target_to_budget"]
