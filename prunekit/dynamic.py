"""Conditional computation: input-dependent Gumbel gates on the internal widths of residual blocks.

The paper's second setting. Per residual block, a small gate network reads only the block's input
x: global average pool -> one Linear(C_in, 16) per gate -> BatchNorm over all hidden units -> ReLU ->
one Linear(16, 2) per gate, its bias starting at [init_off, init_on] ([0.1, 4] in the paper; lowered
for the less important gates of a group, as for static gates). Every decision of a block is known
from x before any of its convolutions runs, which is what lets the exported model skip the work.

Placement (`find_dynamic_blocks`) reads the fx graph and the channel graph: a residual block is an
`add` whose two operands meet at a common input x; a channel group is made dynamic when every layer
that reads or writes it lies inside that block, and every such layer can be sliced per example (a
plain conv or linear on the whole axis, BatchNorm). Residual streams are shared by many blocks, so
they are never dynamic; with `--dynamic` they are not gated at all.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from prunekit.config import GateConfig
from prunekit.errors import ConfigError
from prunekit.gates import GateBank, GateLayout, sample_gates
from prunekit.graph import ChannelGraph, trace
from prunekit.masking import with_ones
from prunekit.modes import training_flags

HIDDEN = 16  # hidden units per gate (the paper's)
_ADDS = {operator.add, operator.iadd, torch.add}


@dataclass(frozen=True)
class DynamicBlock:
    """One residual block's dynamic gates. `reader`: the first module of the block that reads its input
    x (the gate network runs in a forward pre-hook there); `in_units`: the unit of every channel of x
    (-1: not prunable), so that a statically slimmed x can slice the gate network's input; `groups`:
    the channel groups this block's gates switch."""

    name: str
    reader: str
    in_units: tuple[int, ...]
    groups: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "reader": self.reader,
            "in_units": list(self.in_units),
            "groups": list(self.groups),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DynamicBlock:
        return cls(
            str(d["name"]),
            str(d["reader"]),
            tuple(int(u) for u in d["in_units"]),
            tuple(int(g) for g in d["groups"]),
        )


@dataclass(frozen=True)
class Placement:
    """Where dynamic gates go, and why every other group stays static (group name -> reason)."""

    blocks: tuple[DynamicBlock, ...]
    static: dict[str, str]

    def to_dict(self, graph: ChannelGraph) -> dict[str, Any]:
        return {
            "blocks": [
                {"name": b.name, "reads": b.reader, "groups": [graph.groups[g].name for g in b.groups]}
                for b in self.blocks
            ],
            "static": dict(self.static),
        }


def _is_add(n: fx.Node) -> bool:
    if n.op == "call_function" and n.target in _ADDS:
        return True
    return n.op == "call_method" and n.target in ("add", "add_")


def _ancestors(n: fx.Node, memo: dict[fx.Node, frozenset[fx.Node]]) -> frozenset[fx.Node]:
    """Every node `n` depends on, `n` included (iterative: deep networks overflow recursion)."""
    stack = [n]
    while stack:
        cur = stack[-1]
        if cur in memo:
            stack.pop()
            continue
        todo = [a for a in cur.all_input_nodes if a not in memo]
        if todo:
            stack.extend(todo)
            continue
        acc: set[fx.Node] = {cur}
        for a in cur.all_input_nodes:
            acc |= memo[a]
        memo[cur] = frozenset(acc)
        stack.pop()
    return memo[n]


def find_dynamic_blocks(model: nn.Module, graph: ChannelGraph) -> Placement:
    """The residual blocks of `model` whose internal channel groups can be gated per example."""
    gm = trace(model)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    memo: dict[fx.Node, frozenset[fx.Node]] = {}
    slices = {s.module: s for s in graph.module_slices}
    touching: dict[int, set[str]] = {g.index: set() for g in graph.groups}
    for s in graph.module_slices:
        for u in (*s.in_units, *s.out_units):
            if u >= 0:
                touching[graph.unit_group[u]].add(s.module)
    masked: dict[int, set[str]] = {g.index: set() for g in graph.groups}
    for p in graph.mask_points:
        for u in p.units:
            if u >= 0:
                masked[graph.unit_group[u]].add(p.module)
    param_groups = {graph.unit_group[u] for p in graph.param_slices for u in p.units if u >= 0}

    candidates: list[tuple[int, fx.Node, fx.Node, set[str]]] = []  # (body size, add, x, body modules)
    for n in gm.graph.nodes:
        if not _is_add(n):
            continue
        operands = [a for a in n.args[:2] if isinstance(a, fx.Node)]
        if len(operands) != 2:
            continue
        common = _ancestors(operands[0], memo) & _ancestors(operands[1], memo)
        if not common:
            continue
        x = max(common, key=order.__getitem__)  # the latest node both branches depend on: the block input
        body = [m for m in _ancestors(n, memo) if m is not x and x in _ancestors(m, memo) and m is not n]
        modules = {str(m.target) for m in body if m.op == "call_module"}
        candidates.append((len(body), n, x, modules))
    candidates.sort(key=lambda c: c[0])  # innermost blocks first: a nested group belongs to the inner one

    blocks: list[DynamicBlock] = []
    claimed: set[int] = set()
    reasons: dict[int, str] = {}  # group index -> why an inner block could not take it
    for _, add, x, modules in candidates:
        readers = sorted(
            (
                u
                for u in x.users
                if u.op == "call_module"
                and u.args
                and u.args[0] is x
                and str(u.target) in slices
                and str(u.target) in modules  # this block's own layer, not a later block's
            ),
            key=order.__getitem__,
        )
        groups = []
        for g in graph.groups:
            if g.index in claimed or not touching[g.index] or not touching[g.index] <= modules:
                continue
            why = _not_sliceable(model, graph, g.index, touching[g.index], masked[g.index], modules, slices)
            if g.index in param_groups:
                why = "a parameter read outside any layer (e.g. a layer scale) depends on it"
            if why is None and not readers:
                why = "no layer of its block reads the block's input directly"
            if why is not None:
                reasons[g.index] = why
                continue
            groups.append(g.index)
        if groups:
            reader = str(readers[0].target)
            claimed.update(groups)
            blocks.append(DynamicBlock(str(add.name), reader, tuple(slices[reader].in_units), tuple(groups)))
    blocks.sort(key=lambda b: order[next(n for n in gm.graph.nodes if n.name == b.name)])
    # a group an inner block could not take may belong to an outer one: then it is not static
    static = {
        g.name: reasons.get(g.index, "shared across blocks (a residual stream or outside any residual block)")
        for g in graph.groups
        if g.index not in claimed
    }
    return Placement(tuple(blocks), static)


def _not_sliceable(
    model: nn.Module,
    graph: ChannelGraph,
    group: int,
    touching: set[str],
    masks: set[str],
    body: set[str],
    slices: dict[str, Any],
) -> str | None:
    """Why per-example slicing of `group` cannot be exact, or None: every layer on it is a dense conv
    or linear using the group as a whole axis, or a BatchNorm; the group's mask points lie inside."""
    if graph.groups[group].unit_width != 1:
        return "its units span several channels (grouped convolution)"
    if not masks or not masks <= body:
        return "it is masked outside its block"
    for name in touching:
        s = slices[name]
        m = model.get_submodule(name)
        for units in (s.in_units, s.out_units):
            mine = [u >= 0 and graph.unit_group[u] == group for u in units]
            if any(mine) and not all(mine):
                return f"{name} uses it together with other channels"
        if s.kind == "batchnorm":
            continue
        if s.kind not in ("conv", "linear") or getattr(m, "groups", 1) != 1:
            return f"{name} is a grouped or depthwise convolution (ONNX fixes a Conv's group count)"
        if isinstance(m, nn.Conv2d) and (m.padding_mode != "zeros" or isinstance(m.padding, str)):
            return f"{name} has padding the sliced convolution cannot repeat"
    return None


# --------------------------------------------------------------------------------------------------
# The gate networks and the bank
# --------------------------------------------------------------------------------------------------


class GateNet(nn.Module):
    """One block's gate network: (N, C_in, ...) input -> (N, G, 2) logits [off, on]."""

    def __init__(self, in_channels: int, gates: int, off: float, on: torch.Tensor) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_channels, HIDDEN * gates)  # G per-gate Linear(C_in, 16), side by side
        self.bn = nn.BatchNorm1d(HIDDEN * gates)
        self.weight2 = nn.Parameter(torch.empty(gates, 2, HIDDEN))  # G per-gate Linear(16, 2)
        nn.init.kaiming_uniform_(self.weight2.view(gates * 2, HIDDEN), a=math.sqrt(5))
        self.weight2.data.mul_(0.1)  # start close to the bias: every gate on, as the paper's init intends
        bias = torch.stack([torch.full_like(on, off), on], dim=1)
        self.bias2 = nn.Parameter(bias)

    @property
    def gates(self) -> int:
        return self.bias2.shape[0]

    @staticmethod
    def pool(x: torch.Tensor) -> torch.Tensor:
        """(N, C, ...) -> (N, C): the global average the network reads."""
        return x.float().flatten(2).mean(2) if x.dim() > 2 else x.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(x))

    def head(self, pooled: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.fc1(pooled)))
        h = h.view(h.shape[0], self.gates, HIDDEN)
        return torch.einsum("ngh,gkh->ngk", h, self.weight2) + self.bias2

    def macs(self) -> int:
        """Multiply-accumulates per example (the pool's additions counted as one per input element
        would be spatial; counted as fvcore does for linear layers only)."""
        return self.fc1.in_features * self.fc1.out_features + self.gates * 2 * HIDDEN


class DynamicGateBank(GateBank):
    """Input-dependent gates. Gate j's logits come from its block's GateNet, per example; the units of
    groups that are not dynamic are always on. `unit_values`/`current` follow GateBank: (N, U) activity
    of the forward pass in flight, complete once every block has run.

    `logits` (G, 2) are kept for the layout's bookkeeping only (fixed gates, the static API); the
    decision offset `offset` shifts every learnable gate's margin, set at the decision point so that
    the mean cost of the deterministic decisions fits the budget."""

    kind = "dynamic"

    def __init__(self, layout: GateLayout, config: GateConfig, blocks: Sequence[DynamicBlock] = ()) -> None:
        super().__init__(layout, config)
        self.blocks = tuple(blocks)
        self.register_buffer("offset", torch.tensor(0.0))
        self.logits.requires_grad_(False)
        gate_ids = torch.arange(layout.num_gates)
        self.nets = nn.ModuleList()
        self.block_gates: list[torch.Tensor] = []
        self.current_gates: torch.Tensor | None = None  # (N, G) gate values of the forward in flight
        # while a trainer records them: per block, the last forward's pooled (N, C_in) inputs
        self.recording: dict[int, torch.Tensor] | None = None
        initial = self._initial_logits()
        group_block = {g: i for i, b in enumerate(self.blocks) for g in b.groups}
        for i, b in enumerate(self.blocks):
            # a network per learnable gate only: the always-on ones stay 1 from `begin`
            mine = torch.tensor(
                [
                    group_block.get(g, -1) == i and not f
                    for g, f in zip(layout.gate_group, layout.fixed_on, strict=True)
                ],
                dtype=torch.bool,
            )
            ids = gate_ids[mine]
            self.block_gates.append(ids)
            self.nets.append(GateNet(len(b.in_units), len(ids), config.init_off, initial[ids, 1]))
        units = torch.tensor(layout.unit_gate, dtype=torch.long)
        self.register_buffer(
            "unit_gate_ext", torch.where(units < 0, layout.num_gates, units), persistent=False
        )

    # -- the static API, read as "every dynamic gate may open" -----------------------------------
    def decisions(self) -> torch.Tensor:
        """The gates that are on for some input: all of them (a dynamic bank removes nothing by itself)."""
        return torch.ones(self.num_gates, dtype=torch.bool, device=self.logits.device)

    @torch.no_grad()
    def fix_(self, states: torch.Tensor | None = None) -> None:
        """Deterministic per-example decisions from here on, in train mode too; the gate networks
        freeze (their BatchNorm statistics included)."""
        self.decided.fill_(True)
        self.nets.eval()

    def train(self, mode: bool = True) -> DynamicGateBank:
        super().train(mode)
        if self.is_decided:
            self.nets.eval()
        return self

    def unit_values(self, gate_values: torch.Tensor) -> torch.Tensor:
        ones = gate_values.new_ones(gate_values.shape[0], 1)
        return torch.cat([gate_values, ones], 1)[:, self.unit_gate_ext]

    def gate_values(self, batch: int) -> torch.Tensor:
        """Before any block has run: every gate on (one row, broadcast over the batch)."""
        return torch.ones(1, self.num_gates, device=self.logits.device)

    def begin(self, batch: int) -> None:
        """Every gate on until the blocks' hooks write their decisions."""
        self.current_gates = self.gate_values(batch)
        self.current = self.unit_values(self.current_gates)
        self.current_ext = with_ones(self.current)

    def attach_(self, model: nn.Module) -> None:
        for i, b in enumerate(self.blocks):
            model.get_submodule(b.reader).register_forward_pre_hook(_BlockGates(self, i))

    # -- per block --------------------------------------------------------------------------------
    def block_logits(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """(N, G_i, 2) logits of block i's gates for its input x, the decision offset applied."""
        logits = self.nets[i](x)
        shift = torch.stack([torch.zeros_like(self.offset), self.offset]).to(logits.dtype)
        return logits + shift

    def block_values(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """(N, G_i) gate values of block i: Gumbel samples while sampling, else hard decisions. While
        recording, the pooled input is kept (half precision, CPU) for the decision point."""
        if self.recording is not None:
            self.recording[i] = GateNet.pool(x).detach().to("cpu", torch.float16)
        logits = self.block_logits(i, x)
        if self.sampling:
            values = sample_gates(logits, self.tau)
        else:
            values = (logits[..., 1] > logits[..., 0]).to(logits.dtype)
        fixed = self.fixed_on[self.block_gates[i].to(self.fixed_on.device)]
        return torch.where(fixed, torch.ones_like(values), values)

    def set_block(self, i: int, values: torch.Tensor) -> None:
        """Write block i's gate values into the activity of the forward pass in flight."""
        gates = self.block_gates[i].to(values.device)
        full = self.current_gates
        if full.shape[0] != values.shape[0]:
            full = full.expand(values.shape[0], -1)
        self.current_gates = full.index_copy(1, gates, values.to(full.dtype))
        self.current = self.unit_values(self.current_gates)
        self.current_ext = with_ones(self.current)

    def recorded(self) -> list[torch.Tensor]:
        """The pooled inputs of every block in the last forward pass."""
        assert self.recording is not None and len(self.recording) == len(self.blocks)
        return [self.recording[i] for i in range(len(self.blocks))]

    @torch.no_grad()
    def margins(self, pooled: Sequence[torch.Tensor]) -> torch.Tensor:
        """(N, G) margins (logit_on - logit_off, without the offset) of the gate networks as they are
        now (their mode decides the BatchNorm statistics) for recorded pooled inputs; fixed gates +inf."""
        device = self.offset.device
        n = pooled[0].shape[0]
        out = torch.full((n, self.num_gates), math.inf, device=device)
        for i, p in enumerate(pooled):
            logits = self.nets[i].head(p.to(device, torch.float32))
            out[:, self.block_gates[i].to(device)] = logits[..., 1] - logits[..., 0]
        return out

    def states(self, margins: torch.Tensor, offset: float) -> torch.Tensor:
        """(N, G) 0/1 gate states of margins under a decision offset."""
        return ((margins + offset > 0) | self.fixed_on.to(margins.device)).float()

    def gate_net_macs(self) -> int:
        return int(sum(net.macs() for net in self.nets))

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"blocks": [b.to_dict() for b in self.blocks]}

    @classmethod
    def from_description(
        cls, layout: GateLayout, config: GateConfig, description: dict[str, Any]
    ) -> DynamicGateBank:
        return cls(layout, config, [DynamicBlock.from_dict(b) for b in description.get("blocks", [])])


def dynamic_layout(
    graph: ChannelGraph, config: GateConfig, placement: Placement, importance: Sequence[float] | None
) -> GateLayout:
    """Gates on the dynamic groups only (every other unit: -1, always on), most important first."""
    from prunekit.gates import make_layout

    full = make_layout(graph, config, importance)
    dynamic = {g for b in placement.blocks for g in b.groups}
    keep = [gi for gi, g in enumerate(full.gate_group) if g in dynamic]
    new_id = {old: new for new, old in enumerate(keep)}
    unit_gate = tuple(new_id.get(full.unit_gate[u], -1) for u in range(graph.num_units))
    return GateLayout(
        unit_gate, tuple(full.gate_group[g] for g in keep), tuple(full.fixed_on[g] for g in keep)
    )


class _BlockGates:
    """Forward pre-hook on a block's reader: its gate network decides from the block input."""

    def __init__(self, bank: DynamicGateBank, index: int) -> None:
        self.bank, self.index = bank, index

    def __call__(self, _m: nn.Module, args: tuple[Any, ...]) -> None:
        self.bank.set_block(self.index, self.bank.block_values(self.index, args[0]))


def dynamic_bank(
    model: nn.Module, graph: ChannelGraph, config: GateConfig, importance: Sequence[float] | None, name: str
) -> DynamicGateBank:
    """The dynamic gates of `model`, or a one-line error naming why it has none."""
    placement = find_dynamic_blocks(model, graph)
    if not placement.blocks:
        reasons = sorted(set(placement.static.values()))
        raise ConfigError(
            f"--dynamic: {name} has no residual block whose internal channels can be gated per example "
            f"({'; '.join(reasons[:2]) or 'it has no prunable channel group'}); gate it without --dynamic"
        )
    layout = dynamic_layout(graph, config, placement, importance)
    learnable = {layout.gate_group[g] for g in range(layout.num_gates) if not layout.fixed_on[g]}
    # a block whose gates are all always on (a narrow width under min_keep) decides nothing: no network
    blocks = [b for b in placement.blocks if learnable & set(b.groups)]
    if not blocks:
        raise ConfigError(
            f"--dynamic: every gate of {name}'s residual blocks is always on at min_keep {config.min_keep}: "
            "lower --min-keep or --granularity"
        )
    return DynamicGateBank(layout, config, blocks)


@torch.no_grad()
def check_block_order(model: nn.Module, graph: ChannelGraph, bank: DynamicGateBank, x: torch.Tensor) -> None:
    """Run `x` once and check that every block's gate network ran before any layer its gates mask:
    the forward code must call the block's reader first (a model that reads its modules in another
    order than it traced would mask with stale decisions)."""
    pending: dict[str, int] = {}
    for i, b in enumerate(bank.blocks):
        groups = set(b.groups)
        for p in graph.mask_points:
            if any(u >= 0 and graph.unit_group[u] in groups for u in p.units):
                pending[p.module] = i
    done: set[int] = set()
    late: list[str] = []
    handles = []
    for i, b in enumerate(bank.blocks):
        handles.append(model.get_submodule(b.reader).register_forward_pre_hook(lambda *_a, i=i: done.add(i)))
    for name, i in pending.items():
        handles.append(
            model.get_submodule(name).register_forward_hook(
                lambda *_a, i=i, name=name: None if i in done else late.append(name)
            )
        )
    try:
        with training_flags(model):
            model.eval()
            model(x[:1])
    finally:
        for h in handles:
            h.remove()
    if late:
        raise ConfigError(
            f"--dynamic: {late[0]} runs before its block's gate network; gate it without --dynamic"
        )


def dynamic_summary(bank: GateBank, graph: ChannelGraph, total_macs: int) -> dict[str, Any]:
    """What `gate` reports for dynamic gates: the blocks, what stays static, the gate networks' cost."""
    assert isinstance(bank, DynamicGateBank)
    macs = bank.gate_net_macs()
    return {
        "dynamic": Placement(bank.blocks, {}).to_dict(graph)["blocks"],
        "gate_net_macs": macs,
        "gate_net_fraction": macs / max(1, total_macs),
    }


def gated_macs(graph: ChannelGraph, layout: GateLayout) -> int:
    """MACs of the layers whose cost depends on a unit that has a gate (with dynamic gates, the blocks'
    internal layers: the residual streams have none)."""
    gated = [g >= 0 for g in layout.unit_gate]

    def has_gate(units: tuple[int, ...]) -> bool:
        return any(u >= 0 and gated[u] for u in units)

    return int(sum(t.macs() for t in graph.mac_terms if has_gate((*t.in_units, *t.out_units, *t.units))))


def mac_stats(fractions: Sequence[float], gate_nets: float) -> dict[str, float]:
    """Per-example MACs (fractions of the original model's) summarised: mean, p50, p95, min, max, and
    the gate networks' own share, counted separately (`with_gate_nets`: the mean plus it)."""
    t = torch.tensor(list(fractions), dtype=torch.float64)
    return {
        "mean": float(t.mean()),
        "p50": float(t.quantile(0.5)),
        "p95": float(t.quantile(0.95)),
        "min": float(t.min()),
        "max": float(t.max()),
        "gate_nets": gate_nets,
        "with_gate_nets": float(t.mean()) + gate_nets,
        "examples": int(t.numel()),
    }


__all__ = [
    "DynamicBlock",
    "DynamicGateBank",
    "GateNet",
    "Placement",
    "check_block_order",
    "dynamic_bank",
    "dynamic_layout",
    "dynamic_summary",
    "find_dynamic_blocks",
    "gated_macs",
    "mac_stats",
]
