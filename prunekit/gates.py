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

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.config import GateConfig
from prunekit.errors import ConfigError
from prunekit.graph import ChannelGraph, MaskPoint
from prunekit.masking import MaskHook, with_ones
from prunekit.plan import ChannelPlan, plan_from_units

GATES_ATTR = "prunekit_gates"


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
    """All static gates of a model (one logit pair per gate, the same for every input).

    Holds logits (G, 2) and produces unit activity (N, U) in training or (1, U) once deterministic.
    `decided` is a persistent buffer: once `fix_` has set the decisions, the bank gives them in train
    mode too, so a user's `model.train()` (or DDP, or BN recalibration) never turns sampling back on."""

    kind = "static"  # recorded in checkpoints; another kind of bank (input-dependent gates) loads by its own

    def __init__(self, layout: GateLayout, config: GateConfig) -> None:
        super().__init__()
        self.layout = layout
        self.config = config
        self.tau = 1.0
        self.register_buffer("unit_gate", torch.tensor(layout.unit_gate, dtype=torch.long), persistent=False)
        self.register_buffer("fixed_on", torch.tensor(layout.fixed_on, dtype=torch.bool), persistent=False)
        self.register_buffer("decided", torch.tensor(False))
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

    @property
    def is_decided(self) -> bool:
        return bool(self.decided)

    @property
    def sampling(self) -> bool:
        """Whether a forward pass draws Gumbel samples (training and not yet decided)."""
        return self.training and not self.is_decided

    def decisions(self) -> torch.Tensor:
        """Deterministic gate states (G,) bool: on iff logit_on > logit_off (fixed gates always on)."""
        return (self.logits[:, 1] > self.logits[:, 0]) | self.fixed_on

    @torch.no_grad()
    def fix_(self, states: torch.Tensor) -> None:
        """Make `states` (G,) bool the final decisions: logits saturated at +-5, `decided` set."""
        states = states.to(self.logits.device) | self.fixed_on
        self.logits[:, 0] = 0.0
        self.logits[:, 1] = torch.where(states, 5.0, -5.0).to(self.logits.dtype)
        self.decided.fill_(True)

    def gate_values(self, batch: int) -> torch.Tensor:
        """(N, G) samples while sampling, else (1, G) decisions."""
        if self.sampling:
            sampled = sample_gates(self.logits.unsqueeze(0).expand(batch, -1, -1), self.tau)
            return torch.where(self.fixed_on, torch.ones_like(sampled), sampled)
        return self.decisions().to(self.logits.dtype).unsqueeze(0)

    def unit_values(self, gate_values: torch.Tensor) -> torch.Tensor:
        """Gate values (N, G) -> unit activity (N, U)."""
        return gate_values[:, self.unit_gate]

    def unit_activity(self, states: torch.Tensor | None = None) -> torch.Tensor:
        """Unit activity (1, U) of gate states (G,) (default: the current decisions)."""
        states = self.decisions() if states is None else states
        return self.unit_values(states.to(self.logits.dtype).unsqueeze(0))

    def begin(self, batch: int) -> None:
        """Set the unit activity of the forward pass about to run (`batch` examples)."""
        self.current = self.unit_values(self.gate_values(batch))
        self.current_ext = with_ones(self.current)

    def attach_(self, model: nn.Module) -> None:
        """Register any hooks of this kind of bank beyond the model's and the mask points' (none)."""

    @classmethod
    def from_description(
        cls, layout: GateLayout, config: GateConfig, description: dict[str, Any]
    ) -> GateBank:
        return cls(layout, config)

    def describe(self) -> dict[str, Any]:
        """What a checkpoint stores to rebuild this bank (the logits travel in the state_dict)."""
        return {
            "kind": self.kind,
            "config": self.config.to_dict(),
            "layout": self.layout.to_dict(),
            "tau": float(self.tau),
        }


GATE_KINDS: dict[str, type[GateBank]] = {GateBank.kind: GateBank}


def _gate_kinds() -> dict[str, type[GateBank]]:
    from prunekit.dynamic import DynamicGateBank  # imports this module: registered on first use

    return GATE_KINDS | {DynamicGateBank.kind: DynamicGateBank}


def gate_bank_from_description(description: dict[str, Any]) -> GateBank:
    """Rebuild a bank from `GateBank.describe()` output (a missing kind is a format-1 static bank)."""
    kind = description.get("kind", GateBank.kind)
    kinds = _gate_kinds()
    cls = kinds.get(kind)
    if cls is None:
        raise ConfigError(f"unknown gate kind {kind!r} (this prunekit knows {', '.join(kinds)})")
    # a checkpoint from before GateConfig.importance ranked its channels by BatchNorm scale
    config = GateConfig(**({"importance": "bn"} | description["config"]))
    bank = cls.from_description(GateLayout.from_dict(description["layout"]), config, description)
    bank.tau = float(description.get("tau", 1.0))
    return bank


def plan_from_gates(graph: ChannelGraph, bank: GateBank) -> ChannelPlan:
    """The channel plan of the bank's deterministic decisions: the units whose gates are open."""
    return plan_from_units(graph, bank.unit_activity()[0].bool().tolist())


class _GateValues:
    """Forward pre-hook on the model: the gate values of the forward pass about to run, once."""

    def __init__(self, bank: GateBank) -> None:
        self.bank = bank

    def __call__(self, _model: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0] if args else None
        self.bank.begin(x.shape[0] if isinstance(x, torch.Tensor) else 1)


class _GateMask(MaskHook):
    """Forward hook at a mask point: multiply by the bank's current unit activity. Hooks are objects that
    hold their bank, so `copy.deepcopy(gated_model)` gives a copy whose hooks read the copy's bank."""

    def __init__(self, point: MaskPoint, bank: GateBank) -> None:
        super().__init__(point)
        self.bank = bank

    def unit_values(self) -> torch.Tensor:
        if self.bank.current_ext is None:
            raise RuntimeError("gate values requested outside a forward pass")
        return self.bank.current_ext


def insert_gates_(model: nn.Module, graph: ChannelGraph, bank: GateBank) -> nn.Module:
    """Attach `bank` as `model.prunekit_gates` and multiply every mask point by its gate values."""
    if hasattr(model, GATES_ATTR):
        raise ConfigError("the model already has gates")
    if len(bank.layout.unit_gate) != graph.num_units:
        raise ConfigError("the gate layout does not fit this model's channel groups")
    model.add_module(GATES_ATTR, bank)
    model.register_forward_pre_hook(_GateValues(bank))
    for point in graph.mask_points:
        model.get_submodule(point.module).register_forward_hook(_GateMask(point, bank))
    bank.attach_(model)
    return model


def remove_gates_(model: nn.Module) -> GateBank:
    """Detach the gates; the model computes as if every gate were open."""
    bank = getattr(model, GATES_ATTR, None)
    if not isinstance(bank, GateBank):
        raise ConfigError("the model has no gates")
    # found by type rather than by handle: a deep copy's handles would still point at the original
    for m in model.modules():
        for hooks in (m._forward_hooks, m._forward_pre_hooks):
            for key in [k for k, h in hooks.items() if getattr(h, "bank", None) is bank]:
                del hooks[key]
    del model._modules[GATES_ATTR]
    bank.current = bank.current_ext = None
    return bank


def ungated_copy(model: nn.Module) -> nn.Module:
    """A deep copy of `model` without gates (the copy of a model that has none, as it is)."""
    plain = copy.deepcopy(model)
    if get_gates(plain) is not None:
        remove_gates_(plain)
    return plain


def get_gates(model: nn.Module) -> GateBank | None:
    bank = getattr(model, GATES_ATTR, None)
    return bank if isinstance(bank, GateBank) else None


__all__ = [
    "GATE_KINDS",
    "GateBank",
    "GateConfig",
    "GateLayout",
    "get_gates",
    "gate_bank_from_description",
    "insert_gates_",
    "make_layout",
    "plan_from_gates",
    "remove_gates_",
    "sample_gates",
    "ungated_copy",
]
