"""Gumbel channel gates (Herrmann, Bowen, Zabih, ECCV 2020) on the coupled groups of a ChannelGraph.

One gate switches a block of `granularity` channels of one group. Each gate holds two logits
[off, on]. Training draws one hard straight-through Gumbel-softmax sample per gate and per example
(forward: exact 0/1, backward: the soft gradient); eval mode uses the deterministic decision
on iff logit_on > logit_off. The gate values multiply every mask point of the group (after the
producer's last per-channel affine op), so a closed gate makes its channels exactly zero everywhere.

The sampling is written over a (batch, gates) logit tensor so that an input-dependent variant
(conditional computation: logits predicted per example) can reuse it unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.errors import ConfigError
from prunekit.graph import ChannelGraph
from prunekit.slim import mask_hook, with_ones

GATES_ATTR = "prunekit_gates"


@dataclass(frozen=True)
class GateConfig:
    granularity: int = 8  # channels per gate; surviving widths come out in multiples of it
    min_keep: float = 0.5  # fraction of each group always kept (its most important gates); see docs/recipe.md
    init_on: float = 4.0  # initial on-logit of the most important gate (paper: [0.1, 4] for every gate)
    init_off: float = 0.1  # initial off-logit
    init_spread: float = 2.0  # the least important gate starts with its on-logit lowered by this much

    def __post_init__(self) -> None:
        if self.granularity < 1:
            raise ConfigError(f"granularity must be >= 1, got {self.granularity}")
        if not 0.0 <= self.min_keep < 1.0:
            raise ConfigError(f"min_keep must be in [0, 1), got {self.min_keep}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class GateLayout:
    """Which units each gate covers. `unit_gate[u]` is the gate of unit u; gates of one group are
    ordered from most to least important; `fixed_on[g]` marks gates that are never closed."""

    unit_gate: tuple[int, ...]
    gate_group: tuple[int, ...]
    fixed_on: tuple[bool, ...]

    @property
    def num_gates(self) -> int:
        return len(self.gate_group)

    def to_dict(self) -> dict[str, Any]:
        return {
            "unit_gate": list(self.unit_gate),
            "gate_group": list(self.gate_group),
            "fixed_on": list(self.fixed_on),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GateLayout:
        return cls(
            tuple(int(x) for x in d["unit_gate"]),
            tuple(int(x) for x in d["gate_group"]),
            tuple(bool(x) for x in d["fixed_on"]),
        )


def make_layout(
    graph: ChannelGraph, config: GateConfig, importance: Sequence[float] | None = None
) -> GateLayout:
    """Split every group into gates of about `granularity` channels, most important units first.

    The first gate of every group is always on (as in the paper), so no group can vanish; `min_keep`
    fixes more. Grouping units by importance rank (not position) means a gate decides on channels of
    similar importance; any subset of units can be removed exactly, so position does not matter."""
    unit_gate = [0] * graph.num_units
    gate_group: list[int] = []
    fixed_on: list[bool] = []
    for group in graph.groups:
        per_gate = max(1, math.ceil(config.granularity / group.unit_width))
        local = list(range(group.units))
        if importance is not None:
            local.sort(key=lambda k: (-importance[group.offset + k], k))
        n_gates = math.ceil(group.units / per_gate)
        n_fixed = max(1, math.ceil(config.min_keep * group.units / per_gate - 1e-9))
        for j in range(n_gates):
            gate = len(gate_group)
            gate_group.append(group.index)
            fixed_on.append(j < n_fixed)
            for k in local[j * per_gate : (j + 1) * per_gate]:
                unit_gate[group.offset + k] = gate
    return GateLayout(tuple(unit_gate), tuple(gate_group), tuple(fixed_on))


def sample_gates(logits: torch.Tensor, tau: float, hard: bool = True) -> torch.Tensor:
    """Straight-through Gumbel-softmax over [off, on]: (..., 2) logits -> (...) on-values in {0, 1}
    forward, with the soft sample's gradient."""
    return F.gumbel_softmax(logits, tau=tau, hard=hard, dim=-1)[..., 1]


class GateBank(nn.Module):
    """All gates of a model. Holds logits (G, 2); produces unit activity (N, U) or (1, U)."""

    def __init__(self, layout: GateLayout, config: GateConfig) -> None:
        super().__init__()
        self.layout = layout
        self.config = config
        self.tau = 1.0
        self.register_buffer("unit_gate", torch.tensor(layout.unit_gate, dtype=torch.long), persistent=False)
        self.register_buffer("fixed_on", torch.tensor(layout.fixed_on, dtype=torch.bool), persistent=False)
        self.logits = nn.Parameter(self._initial_logits())
        self.current: torch.Tensor | None = None  # unit activity (N, U) for the forward pass in flight
        self.current_ext: torch.Tensor | None = None  # the same with a trailing ones column (mask hooks)

    def _initial_logits(self) -> torch.Tensor:
        cfg = self.config
        logits = torch.empty(self.layout.num_gates, 2)
        logits[:, 0] = cfg.init_off
        rank = torch.zeros(self.layout.num_gates)
        groups = torch.tensor(self.layout.gate_group)
        for gi in groups.unique().tolist():
            idx = (groups == gi).nonzero().flatten()
            rank[idx] = torch.linspace(0, 1, len(idx)) if len(idx) > 1 else torch.zeros(1)
        logits[:, 1] = cfg.init_on - cfg.init_spread * rank
        return logits

    @property
    def num_gates(self) -> int:
        return self.layout.num_gates

    def decisions(self) -> torch.Tensor:
        """Deterministic gate states (G,) bool: on iff logit_on > logit_off (fixed gates always on)."""
        return (self.logits[:, 1] > self.logits[:, 0]) | self.fixed_on

    def gate_values(self, batch: int) -> torch.Tensor:
        """(N, G) samples in training, (1, G) decisions in eval."""
        if self.training:
            sampled = sample_gates(self.logits.unsqueeze(0).expand(batch, -1, -1), self.tau)
            return torch.where(self.fixed_on, torch.ones_like(sampled), sampled)
        return self.decisions().to(self.logits.dtype).unsqueeze(0)

    def unit_values(self, gate_values: torch.Tensor) -> torch.Tensor:
        return gate_values[:, self.unit_gate]

    def probabilities(self) -> torch.Tensor:
        """P(on) per gate under the Gumbel-softmax with temperature 1 (fixed gates: 1)."""
        p = torch.softmax(self.logits, dim=-1)[:, 1]
        return torch.where(self.fixed_on, torch.ones_like(p), p)


def _pre_hook(bank: GateBank):
    def hook(_model: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0] if args else None
        batch = x.shape[0] if isinstance(x, torch.Tensor) else 1
        bank.current = bank.unit_values(bank.gate_values(batch))
        bank.current_ext = with_ones(bank.current)

    return hook


def insert_gates_(model: nn.Module, graph: ChannelGraph, bank: GateBank) -> nn.Module:
    """Attach `bank` as `model.prunekit_gates` and multiply every mask point by its gate values."""
    if hasattr(model, GATES_ATTR):
        raise ConfigError("the model already has gates")
    if len(bank.layout.unit_gate) != graph.num_units:
        raise ConfigError("the gate layout does not fit this model's channel groups")
    model.add_module(GATES_ATTR, bank)

    def current() -> torch.Tensor:
        if bank.current_ext is None:
            raise RuntimeError("gate values requested outside a forward pass")
        return bank.current_ext

    handles = [model.register_forward_pre_hook(_pre_hook(bank))]
    for point in graph.mask_points:
        handles.append(model.get_submodule(point.module).register_forward_hook(mask_hook(point, current)))
    bank._handles = handles  # type: ignore[attr-defined]  # kept for remove_gates_
    return model


def remove_gates_(model: nn.Module) -> GateBank:
    """Detach the gates; the model computes as if every gate were open."""
    bank = getattr(model, GATES_ATTR, None)
    if not isinstance(bank, GateBank):
        raise ConfigError("the model has no gates")
    for h in getattr(bank, "_handles", []):
        h.remove()
    del model._modules[GATES_ATTR]
    return bank


def get_gates(model: nn.Module) -> GateBank | None:
    bank = getattr(model, GATES_ATTR, None)
    return bank if isinstance(bank, GateBank) else None


__all__ = [
    "GateBank",
    "GateConfig",
    "GateLayout",
    "get_gates",
    "insert_gates_",
    "make_layout",
    "remove_gates_",
    "sample_gates",
]
