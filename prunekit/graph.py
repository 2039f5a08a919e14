"""Channel dependency analysis: which channels of which layers are coupled, and which are prunable.

Pure: `analyze(model, example_input)` reads the model and returns a `ChannelGraph`; it never changes it.

How it works. The model is traced with torch.fx and run once on the example input. Next to every real
tensor the interpreter carries a *label tensor* of the same shape whose entries are "atom" ids: an atom
is one channel's identity. A layer that creates channels (conv, linear) creates fresh atoms; shape ops
(view, permute, flatten, cat, chunk, getitem...) are applied to the label tensor itself, so channel
positions follow the data exactly, channel shuffles included; element-wise ops between two tensors
unify the atoms they line up (residual adds, squeeze-excitation multiplies). A union-find over atoms
then yields the coupled channels, and atoms are grouped into spaces (one per coupled channel group).

Fail closed: an op without a rule freezes every atom of every tensor it touches, with a reason; so do
ops that mix channels (LayerNorm, softmax over channels, attention), the model's input and its outputs.

Exactness: a pruned channel must read exactly zero wherever a dense consumer (conv, linear) sees it.
Masks (later: gates) go after each module whose output may be non-zero on pruned channels, past its
trailing per-channel affine ops (conv -> BN -> [mask] -> ReLU). Where no module can carry the mask, the
affected channels are frozen instead.
"""

from __future__ import annotations

import contextlib
import operator
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from prunekit.errors import AnalysisError
from prunekit.modes import training_flags

# Large parameters get a single frozen atom instead of one per element (memory).
_MAX_PARAM_ATOMS = 1 << 20


# --------------------------------------------------------------------------------------------------
# Public result types
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChannelGroup:
    """One coupled channel space. Its prunable units are global unit ids offset..offset+units-1."""

    index: int
    name: str  # the first producer module that writes into the group
    offset: int
    units: int  # prunable units (a unit is a channel, or a whole conv group for grouped convs)
    channels: int  # width of the group's first producer output
    producers: tuple[str, ...]
    consumers: tuple[str, ...]
    macs: int  # MACs of the layers whose cost depends on this group (all channels kept)

    @property
    def unit_width(self) -> int:
        return max(1, self.channels // max(1, self.units))

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "name": self.name,
            "units": self.units,
            "channels": self.channels,
            "unit_width": self.unit_width,
            "producers": list(self.producers),
            "consumers": list(self.consumers),
            "macs": self.macs,
        }


@dataclass(frozen=True)
class FrozenChannels:
    """Channels that will never be pruned, and why."""

    where: str
    reason: str
    channels: int


@dataclass(frozen=True)
class MaskPoint:
    """A module whose output gets multiplied by the channel mask. `units[i]` is the unit of position i
    along `axis` (-1: not prunable, mask value 1)."""

    module: str
    axis: int
    units: tuple[int, ...]


@dataclass(frozen=True)
class ModuleSlice:
    """How to slice one module. `in_units`/`out_units`: the unit of each input/output position (-1: kept
    always). For `blockwise` convs the unit of each conv group is `out_units[g * out_per_group]`."""

    module: str
    kind: str  # "conv", "conv_blockwise", "linear", "batchnorm"
    in_units: tuple[int, ...]
    out_units: tuple[int, ...]


@dataclass(frozen=True)
class ParamSlice:
    """A parameter read through get_attr (layer scale, class token...), sliced along `axis`."""

    target: str
    axis: int
    units: tuple[int, ...]


@dataclass(frozen=True)
class MacTerm:
    """MACs of one op as a function of unit activity a[u] in {0, 1} (a[-1] = 1), by `kind`:
    - "bilinear": factor * sum(a[in_units]) * sum(a[out_units])  (conv, linear)
    - "per_unit": factor * sum(a[units])  (grouped convs: one entry per conv group)
    """

    name: str
    kind: str
    factor: int
    in_units: tuple[int, ...] = ()
    out_units: tuple[int, ...] = ()
    units: tuple[int, ...] = ()

    def macs(self, active: Callable[[int], float] | None = None) -> float:
        a = active or (lambda _u: 1.0)
        if self.kind == "bilinear":
            return (
                self.factor
                * sum(a(u) if u >= 0 else 1.0 for u in self.in_units)
                * sum(a(u) if u >= 0 else 1.0 for u in self.out_units)
            )
        return self.factor * sum(a(u) if u >= 0 else 1.0 for u in self.units)

    @property
    def prunable(self) -> bool:
        """Whether the cost depends on at least one prunable unit."""
        return any(u >= 0 for u in (*self.in_units, *self.out_units, *self.units))


@dataclass(frozen=True)
class ChannelGraph:
    input_shape: tuple[int, ...]
    groups: tuple[ChannelGroup, ...]
    frozen: tuple[FrozenChannels, ...]
    mask_points: tuple[MaskPoint, ...]
    module_slices: tuple[ModuleSlice, ...]
    param_slices: tuple[ParamSlice, ...]
    mac_terms: tuple[MacTerm, ...]
    unit_group: tuple[int, ...]  # group index of every unit

    @property
    def num_units(self) -> int:
        return len(self.unit_group)

    @property
    def modeled_macs(self) -> int:
        return int(sum(t.macs() for t in self.mac_terms))

    @property
    def prunable_macs(self) -> int:
        """MACs of the ops whose cost depends on at least one prunable unit."""
        return int(sum(t.macs() for t in self.mac_terms if t.prunable))

    def macs(self, keep: Iterable[bool] | None = None) -> int:
        """Modeled MACs with the given units kept (None: all kept)."""
        if keep is None:
            return self.modeled_macs
        kept = list(keep)
        return int(sum(t.macs(lambda u: 1.0 if kept[u] else 0.0) for t in self.mac_terms))

    def summary(self) -> dict[str, Any]:
        return {
            "input_shape": list(self.input_shape),
            "groups": [g.to_dict() for g in self.groups],
            "num_units": self.num_units,
            "modeled_macs": self.modeled_macs,
            "prunable_macs": self.prunable_macs,
            "prunable_fraction": self.prunable_macs / max(1, self.modeled_macs),
            "frozen": [{"where": f.where, "reason": f.reason, "channels": f.channels} for f in self.frozen],
        }


# --------------------------------------------------------------------------------------------------
# Union-find over atoms, with spaces and frozen reasons
# --------------------------------------------------------------------------------------------------


def _find_root(parent: list[int], x: int) -> int:
    """Root of `x` in the union-find forest `parent`; compresses the path from `x` to it in place."""
    root = x
    while parent[root] != root:
        root = parent[root]
    while parent[x] != root:
        parent[x], x = root, parent[x]
    return root


class _Atoms:
    def __init__(self) -> None:
        self.parent: list[int] = []
        self.space: list[int] = []  # space id per atom (only meaningful at roots after unions)
        self.frozen: dict[int, tuple[str, str]] = {}  # root -> (where, reason)
        self._space_parent: list[int] = []
        self._frozen_cache: dict[tuple[str, str], int] = {}

    def new(self, n: int) -> torch.Tensor:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        space = len(self._space_parent)
        self._space_parent.append(space)
        self.space.extend([space] * n)
        return torch.arange(start, start + n, dtype=torch.int64)

    def frozen_atom(self, where: str, reason: str) -> int:
        key = (where, reason)
        if key not in self._frozen_cache:
            atom = int(self.new(1)[0])
            self.frozen[atom] = key
            self._frozen_cache[key] = atom
        return self._frozen_cache[key]

    def find(self, a: int) -> int:
        return _find_root(self.parent, a)

    def find_space(self, s: int) -> int:
        return _find_root(self._space_parent, s)

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if rb < ra:
            ra, rb = rb, ra
        self.parent[rb] = ra
        if rb in self.frozen:
            self.frozen.setdefault(ra, self.frozen.pop(rb))
        sa, sb = self.find_space(self.space[ra]), self.find_space(self.space[rb])
        if sa != sb:
            self._space_parent[max(sa, sb)] = min(sa, sb)

    def union_pairs(self, a: torch.Tensor, b: torch.Tensor) -> None:
        a, b = torch.broadcast_tensors(a, b)
        a, b = a.reshape(-1), b.reshape(-1)
        keep = (a >= 0) & (b >= 0) & (a != b)
        if not bool(keep.any()):
            return
        # one int64 code per pair: 1-D unique is far faster than unique(dim=0) on big label tensors
        n = len(self.parent)
        codes = torch.unique(a[keep] * n + b[keep])
        for x, y in zip((codes // n).tolist(), (codes % n).tolist(), strict=True):
            self.union(x, y)

    def freeze(self, labels: torch.Tensor, where: str, reason: str) -> None:
        for a in torch.unique(labels[labels >= 0]).tolist():
            root = self.find(a)
            self.frozen.setdefault(root, (where, reason))

    def frozen_flags(self) -> torch.Tensor:
        """A bool per atom: frozen now (a snapshot; later unions or freezes do not update it)."""
        frozen = self.frozen
        return torch.tensor([self.find(a) in frozen for a in range(len(self.parent))], dtype=torch.bool)

    def root_space(self, a: int) -> int:
        return self.find_space(self.space[self.find(a)])


# --------------------------------------------------------------------------------------------------
# Rules
# --------------------------------------------------------------------------------------------------

# Node kinds for the zero-propagation pass.
SOURCE = "source"  # creates values: non-zero on pruned channels until masked
AFFINE = "affine"  # per-channel op that can turn zero into non-zero (BN, bias, depthwise conv)
ZERO = "zero"  # per-channel op with f(0) = 0 (ReLU, pooling, dropout, shape ops)
NONZERO = "nonzero"  # per-channel op with f(0) != 0 (sigmoid)
ADD = "add"  # zero iff every tensor operand is zero
MUL = "mul"  # zero iff any tensor operand is zero
DIV = "div"  # zero iff the numerator is zero
PARAM = "param"  # a parameter read by get_attr: never masked itself
OPAQUE = "opaque"  # all its atoms are frozen

_ZERO_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.Hardswish,
    nn.Mish,
    nn.LeakyReLU,
    nn.ELU,
    nn.Tanh,
    nn.Hardtanh,
    nn.Identity,
    nn.Dropout,
    nn.Dropout2d,
    nn.AlphaDropout,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
)
_NONZERO_MODULES = (nn.Sigmoid, nn.Hardsigmoid)

_ZERO_FUNCTIONS: set[Any] = {
    F.relu,
    F.relu6,
    F.gelu,
    F.silu,
    F.hardswish,
    F.mish,
    F.leaky_relu,
    F.elu,
    F.dropout,
    F.max_pool2d,
    F.avg_pool2d,
    F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d,
    torch.relu,
    torch.tanh,
    torch.nn.functional.hardtanh,
}
_NONZERO_FUNCTIONS: set[Any] = {torch.sigmoid, F.sigmoid, F.hardsigmoid}
_ZERO_METHODS = {"relu", "relu_", "tanh", "contiguous", "clone", "float", "to", "type_as"}
_NONZERO_METHODS = {"sigmoid", "sigmoid_"}
_ADD_FUNCS = {operator.add, operator.sub, operator.iadd, operator.isub, torch.add, torch.sub}
_ADD_METHODS = {"add", "add_", "sub", "sub_"}
_MUL_FUNCS = {operator.mul, operator.imul, torch.mul}
_MUL_METHODS = {"mul", "mul_"}
_DIV_FUNCS = {operator.truediv, torch.div}
_DIV_METHODS = {"div", "div_"}

# Pure shape ops: applied to label tensors directly. Reshapes get extra checks (see _reshape_rule).
_RESHAPE_FUNCS = {torch.reshape, torch.flatten}
_RESHAPE_METHODS = {"view", "reshape", "flatten"}
_MOVE_FUNCS = {torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze, torch.movedim}
_MOVE_METHODS = {"permute", "transpose", "squeeze", "unsqueeze", "expand", "expand_as", "movedim"}


def _stochastic_depth_targets() -> set[Any]:
    try:
        from torchvision.ops import stochastic_depth

        return {stochastic_depth}
    except ImportError:  # pragma: no cover - torchvision is a hard dependency
        return set()


_ZERO_FUNCTIONS |= _stochastic_depth_targets()

# Every function `_Analyzer._function` has a rule for. One missing here only costs precision: a
# parameter that nothing else reads is then frozen (see the get_attr rule).
_RULE_FUNCTIONS: frozenset[Any] = frozenset(
    {operator.getitem, torch.cat, torch.concat, torch.chunk, torch.split, torch.mean, torch.sum, torch.amax}
    | _ADD_FUNCS
    | _MUL_FUNCS
    | _DIV_FUNCS
    | _ZERO_FUNCTIONS
    | _NONZERO_FUNCTIONS
    | _RESHAPE_FUNCS
    | _MOVE_FUNCS
)


def _may_have_rule(user: fx.Node) -> bool:
    """False only for a function without a rule: such an op freezes everything it reads."""
    return user.op != "call_function" or user.target in _RULE_FUNCTIONS


def _is_tensor(x: Any) -> bool:
    return isinstance(x, torch.Tensor)


def _tree_tensors(x: Any) -> list[Any]:
    if _is_tensor(x):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for item in x for t in _tree_tensors(item)]
    if isinstance(x, dict):
        return [t for item in x.values() for t in _tree_tensors(item)]
    return []


def _tree_map_tensors(fn: Callable[[torch.Tensor], Any], x: Any) -> Any:
    if _is_tensor(x):
        return fn(x)
    if isinstance(x, tuple) and hasattr(x, "_fields"):
        return type(x)(*(_tree_map_tensors(fn, i) for i in x))
    if isinstance(x, (list, tuple)):
        return type(x)(_tree_map_tensors(fn, i) for i in x)
    if isinstance(x, dict):
        return {k: _tree_map_tensors(fn, v) for k, v in x.items()}
    return x


def _with_size(t: torch.Tensor, dim: int, size: int) -> list[int]:
    shape = list(t.shape)
    shape[dim] = size
    return shape


def _broadcast_channel(atoms: torch.Tensor, shape: torch.Size, axis: int) -> torch.Tensor:
    view = [1] * len(shape)
    view[axis] = -1
    return atoms.view(view).expand(shape).contiguous()


# --------------------------------------------------------------------------------------------------
# The analysis interpreter
# --------------------------------------------------------------------------------------------------


@dataclass
class _ModuleRecord:
    name: str
    kind: str
    in_atoms: torch.Tensor | None
    out_atoms: torch.Tensor | None
    factor: int
    extra: dict[str, Any] = field(default_factory=dict)


class _Analyzer(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, call_counts: dict[str, int]) -> None:
        super().__init__(gm)
        self.atoms = _Atoms()
        self.labels: dict[fx.Node, Any] = {}
        self.kind: dict[fx.Node, str] = {}
        self.records: list[_ModuleRecord] = []
        self.param_nodes: dict[fx.Node, str] = {}
        self.mask_axis: dict[fx.Node, int] = {}  # maskable module nodes -> channel axis of their output
        self.call_counts = call_counts

    # -- helpers --------------------------------------------------------------------------------
    def _label_args(self, n: fx.Node) -> tuple[tuple[Any, ...], dict[str, Any]]:
        def get(a: Any) -> Any:
            if isinstance(a, fx.Node):
                return self.labels[a]
            if isinstance(a, (list, tuple)):
                return type(a)(get(i) for i in a)
            if isinstance(a, dict):
                return {k: get(v) for k, v in a.items()}
            return a

        return get(n.args), get(n.kwargs)

    def _freeze_all(self, labels: Any, where: str, reason: str) -> None:
        for t in _tree_tensors(labels):
            self.atoms.freeze(t, where, reason)

    def _opaque(self, n: fx.Node, result: Any, reason: str) -> Any:
        largs, lkwargs = self._label_args(n)
        self._freeze_all((largs, lkwargs), n.name, reason)
        atom = self.atoms.frozen_atom(n.name, reason)
        self.kind[n] = OPAQUE
        return _tree_map_tensors(lambda t: torch.full(t.shape, atom, dtype=torch.int64), result)

    def channel_atoms(self, labels: torch.Tensor, axis: int) -> torch.Tensor:
        """Atoms along `axis`, unifying whatever shares a position there (a consumer sees one channel)."""
        rows = labels.movedim(axis, -1).reshape(-1, labels.shape[axis])
        first = rows[0]
        differs = rows != first
        if bool(differs.any()):
            self.atoms.union_pairs(first.expand_as(rows)[differs], rows[differs])
        return first.clone()

    # -- fx.Interpreter hooks ---------------------------------------------------------------------
    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        try:
            self.labels[n] = self._label(n, result)
        except AnalysisError:
            raise
        except Exception as exc:  # a rule that does not fit this call: fail closed, keep going
            reason = f"no rule fits this {self._op_name(n)} ({type(exc).__name__}: {exc})".splitlines()[0]
            self.labels[n] = self._opaque(n, result, reason)
        return result

    def _op_name(self, n: fx.Node) -> str:
        if n.op == "call_module":
            return type(self.module.get_submodule(str(n.target))).__name__
        if n.op == "call_function":
            return f"function {getattr(n.target, '__name__', n.target)}"
        if n.op == "call_method":
            return f"method .{n.target}()"
        return n.op

    def _label(self, n: fx.Node, result: Any) -> Any:
        if n.op == "placeholder":
            self.kind[n] = OPAQUE
            atom = self.atoms.frozen_atom("input", "model input")
            return _tree_map_tensors(lambda t: torch.full(t.shape, atom, dtype=torch.int64), result)
        if n.op == "output":
            largs, _ = self._label_args(n)
            self._freeze_all(largs, "output", "model output")
            return largs[0] if largs else None
        if n.op == "get_attr":
            self.kind[n] = PARAM
            if not _is_tensor(result):
                return result
            if result.numel() > _MAX_PARAM_ATOMS:
                atom = self.atoms.frozen_atom(str(n.target), "large parameter used outside a layer")
                return torch.full(result.shape, atom, dtype=torch.int64)
            if not any(_may_have_rule(u) for u in n.users):
                # Only read by ops without a channel rule (e.g. Swin's fused attention function), which
                # freeze it whole anyway: one atom instead of one per element (millions in big models).
                atom = self.atoms.frozen_atom(str(n.target), "parameter read by an op without a rule")
                return torch.full(result.shape, atom, dtype=torch.int64)
            self.param_nodes[n] = str(n.target)
            return self.atoms.new(result.numel()).view(result.shape)
        if n.op == "call_module":
            return self._module(n, self.module.get_submodule(str(n.target)), result)
        if n.op == "call_function":
            return self._function(n, n.target, result)
        if n.op == "call_method":
            return self._method(n, str(n.target), result)
        raise AnalysisError(f"unexpected fx node {n.op}")

    # -- modules ----------------------------------------------------------------------------------
    def _module(self, n: fx.Node, m: nn.Module, out: Any) -> Any:
        name = str(n.target)
        largs, _ = self._label_args(n)
        lx = largs[0] if largs else None
        x = self.env_value(n.args[0]) if n.args else None
        shared = self.call_counts.get(name, 1) > 1
        if isinstance(m, nn.Conv2d) and _is_tensor(out) and not shared and m.padding_mode == "zeros":
            return self._conv(n, name, m, lx, out)
        if isinstance(m, nn.Linear) and _is_tensor(out) and not shared:
            in_atoms = self.channel_atoms(lx, -1)
            out_atoms = self.atoms.new(m.out_features)
            tokens = out.numel() // out.shape[0] // m.out_features
            self.records.append(_ModuleRecord(name, "linear", in_atoms, out_atoms, tokens))
            self.kind[n] = SOURCE
            self.mask_axis[n] = out.dim() - 1
            return _broadcast_channel(out_atoms, out.shape, -1)
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not shared and x is not None and x.dim() >= 2:
            atoms = self.channel_atoms(lx, 1)
            self.records.append(_ModuleRecord(name, "batchnorm", atoms, atoms, 0))
            self.kind[n] = AFFINE
            self.mask_axis[n] = 1
            return _broadcast_channel(atoms, out.shape, 1)
        if isinstance(m, _ZERO_MODULES + _NONZERO_MODULES) and _is_tensor(out) and _is_tensor(lx):
            # Hardtanh(min_val=0.1) maps 0 to 0.1: zero-preserving only when 0 lies in its range
            nonzero = isinstance(m, _NONZERO_MODULES) or (
                isinstance(m, nn.Hardtanh) and not m.min_val <= 0.0 <= m.max_val
            )
            self.kind[n] = NONZERO if nonzero else ZERO
            if nonzero and not shared:
                self.mask_axis[n] = 1 if out.dim() == 4 else out.dim() - 1
            if isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.MaxPool2d, nn.AvgPool2d)):
                atoms = self.channel_atoms(lx, 1)
                return _broadcast_channel(atoms, out.shape, 1)
            if out.shape != lx.shape:
                raise ValueError("shape-changing activation")
            return lx
        if isinstance(m, nn.Flatten) and _is_tensor(out):
            self.kind[n] = ZERO
            return self._reshape_labels(n, lx, out, dynamic=True)
        if isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)):
            return self._opaque(n, out, f"{type(m).__name__} normalises across channels")
        if isinstance(m, nn.MultiheadAttention):
            return self._opaque(n, out, "attention projections are not pruned")
        if shared:
            return self._opaque(n, out, f"module {name} is called more than once")
        return self._opaque(n, out, f"no rule for {type(m).__name__}")

    def env_value(self, a: Any) -> Any:
        return self.env[a] if isinstance(a, fx.Node) else a

    def _conv(self, n: fx.Node, name: str, m: nn.Conv2d, lx: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        in_atoms = self.channel_atoms(lx, 1)
        spatial = out.shape[2] * out.shape[3]
        kernel = m.kernel_size[0] * m.kernel_size[1]
        if m.groups == 1:
            out_atoms = self.atoms.new(m.out_channels)
            self.records.append(_ModuleRecord(name, "conv", in_atoms, out_atoms, kernel * spatial))
            self.kind[n] = SOURCE
        else:
            # A grouped conv is pruned a whole conv group at a time: its input block and output block
            # share one unit (a depthwise conv is the case of blocks of one channel).
            g = m.groups
            cin, cout = m.in_channels // g, m.out_channels // g
            out_atoms = torch.empty(m.out_channels, dtype=torch.int64)
            for i in range(g):
                block = in_atoms[i * cin : (i + 1) * cin]
                for a in block[1:].tolist():
                    self.atoms.union(int(block[0]), a)
                out_atoms[i * cout : (i + 1) * cout] = block[0]
            factor = kernel * spatial * cin * cout
            self.records.append(
                _ModuleRecord(name, "conv_blockwise", in_atoms, out_atoms, factor, {"groups": g})
            )
            # per-block op: a pruned block is removed whole, so its input need not be zero, but its
            # output must be masked before any dense consumer
            self.kind[n] = AFFINE
        self.mask_axis[n] = 1
        return _broadcast_channel(out_atoms, out.shape, 1)

    # -- functions and methods --------------------------------------------------------------------
    def _elementwise(self, n: fx.Node, kind: str, labels: list[Any], out: torch.Tensor) -> torch.Tensor:
        tensors = [t for t in labels if _is_tensor(t)]
        if not tensors:
            raise ValueError("no tensor operand")
        for t in tensors[1:]:
            self.atoms.union_pairs(tensors[0], t)
        result = torch.broadcast_to(tensors[0], out.shape)
        for t in tensors[1:]:
            bt = torch.broadcast_to(t, out.shape)
            result = torch.where(result >= 0, result, bt)
        self.kind[n] = kind
        if kind == ADD and any(not _is_tensor(a) and a != 0 for a in labels):
            self.kind[n] = AFFINE  # adding a non-zero constant
        return result.contiguous()

    def _function(self, n: fx.Node, fn: Any, out: Any) -> Any:
        largs, lkwargs = self._label_args(n)
        if fn is operator.getitem:
            return self._getitem(n, largs[0], largs[1], out)
        if not _tree_tensors(out):
            return out  # arithmetic on sizes
        if fn in _ADD_FUNCS:
            return self._elementwise(n, ADD, list(largs[:2]), out)
        if fn in _MUL_FUNCS:
            return self._elementwise(n, MUL, list(largs[:2]), out)
        if fn in _DIV_FUNCS:
            if not _is_tensor(largs[0]) or (len(largs) > 1 and _is_tensor(largs[1])):
                raise ValueError("division by a tensor")
            self.kind[n] = DIV
            return largs[0]
        if fn in _ZERO_FUNCTIONS or fn in _NONZERO_FUNCTIONS:
            zero = fn in _ZERO_FUNCTIONS
            if fn is F.hardtanh:  # hardtanh(0) = min_val when min_val > 0
                low = lkwargs.get("min_val", largs[1] if len(largs) > 1 else -1.0)
                high = lkwargs.get("max_val", largs[2] if len(largs) > 2 else 1.0)
                zero = low <= 0.0 <= high
            return self._unary(n, zero, largs[0], out, fn)
        if fn is torch.cat or fn is torch.concat:
            dim = lkwargs.get("dim", largs[1] if len(largs) > 1 else 0)
            self.kind[n] = ZERO
            return torch.cat(list(largs[0]), dim=dim)
        if fn in _RESHAPE_FUNCS:
            return self._reshape(n, largs, lkwargs, out)
        if fn in _MOVE_FUNCS:
            self.kind[n] = ZERO
            return fn(*largs, **lkwargs)
        if fn in (torch.chunk, torch.split):
            return self._split(n, fn.__name__, largs, lkwargs, out)
        if fn in (torch.mean, torch.sum, torch.amax):
            return self._reduce(n, largs, lkwargs, out)
        if fn is F.pad:
            return self._pad(n, largs, lkwargs, out)
        return self._opaque(n, out, f"no rule for function {getattr(fn, '__name__', fn)}")

    def _pad(self, n: fx.Node, largs: tuple, lkwargs: dict, out: Any) -> Any:
        """F.pad with zeros. Padded spatial positions belong to their channel. Padded *channels* (the
        parameter-free shortcut of CIFAR ResNets) are constant zeros whose count the code fixes: they are
        frozen where they land, while the input's channels pass through and stay prunable."""
        lx = largs[0]
        pad = lkwargs.get("pad", largs[1] if len(largs) > 1 else None)
        mode = lkwargs.get("mode", largs[2] if len(largs) > 2 else "constant")
        value = lkwargs.get("value", largs[3] if len(largs) > 3 else None)
        if (
            not _is_tensor(lx)
            or not isinstance(pad, (list, tuple))
            or mode != "constant"
            or value not in (None, 0)
        ):
            return self._opaque(n, out, "padding that is not constant zeros")
        if any(p < 0 for p in pad):
            return self._opaque(n, out, "negative padding (cropping)")
        labels = lx
        for i in range(len(pad) // 2):
            dim, before, after = lx.dim() - 1 - i, int(pad[2 * i]), int(pad[2 * i + 1])
            if before == after == 0:
                continue
            if dim == 1 or self._carries_channels(lx, dim):
                fill = self.atoms.frozen_atom(
                    n.name, "padding adds constant channels; the code fixes their count"
                )
                parts = [labels.new_full(_with_size(labels, dim, k), fill) for k in (before, after)]
            else:  # spatial: a padded position is zero exactly when its channel is
                parts = [
                    labels.narrow(dim, 0, 1).expand(_with_size(labels, dim, before)),
                    labels.narrow(dim, labels.shape[dim] - 1, 1).expand(_with_size(labels, dim, after)),
                ]
            labels = torch.cat([parts[0], labels, parts[1]], dim=dim)
        self.kind[n] = ZERO
        return labels

    def _method(self, n: fx.Node, name: str, out: Any) -> Any:
        largs, lkwargs = self._label_args(n)
        if name in ("size", "dim") or not _tree_tensors(out) and name not in ("chunk", "split"):
            return out
        if name in _ADD_METHODS:
            return self._elementwise(n, ADD, list(largs[:2]), out)
        if name in _MUL_METHODS:
            return self._elementwise(n, MUL, list(largs[:2]), out)
        if name in _DIV_METHODS:
            if _is_tensor(largs[1]):
                raise ValueError("division by a tensor")
            self.kind[n] = DIV
            return largs[0]
        if name in _ZERO_METHODS or name in _NONZERO_METHODS:
            if (
                name in ("to", "type_as", "float")
                and out.dtype != torch.float32
                and not out.is_floating_point()
            ):
                raise ValueError("dtype change")
            return self._unary(n, name in _ZERO_METHODS, largs[0], out, name)
        if name in _RESHAPE_METHODS:
            return self._reshape(n, largs, lkwargs, out)
        if name in _MOVE_METHODS:
            self.kind[n] = ZERO
            if name == "expand_as":
                return largs[0].expand_as(self.env_value(n.args[1]))
            return getattr(largs[0], name)(*largs[1:], **lkwargs)
        if name in ("chunk", "split"):
            return self._split(n, name, largs, lkwargs, out)
        if name in ("mean", "sum", "amax"):
            return self._reduce(n, largs, lkwargs, out)
        return self._opaque(n, out, f"no rule for method .{name}()")

    def _unary(self, n: fx.Node, zero: bool, lx: Any, out: Any, what: Any) -> Any:
        if not _is_tensor(lx) or not _is_tensor(out):
            raise ValueError("non-tensor")
        self.kind[n] = ZERO if zero else NONZERO
        if lx.shape == out.shape:
            return lx
        # pooling functions: per-channel along dim 1
        return _broadcast_channel(self.channel_atoms(lx, 1), out.shape, 1)

    def _getitem(self, n: fx.Node, lx: Any, index: Any, out: Any) -> Any:
        if not _is_tensor(lx):
            self.kind[n] = ZERO
            return lx[index]
        x = self.env_value(n.args[0])
        idx = index if isinstance(index, tuple) else (index,)
        if any(i is Ellipsis for i in idx) or any(_is_tensor(i) or isinstance(i, list) for i in idx):
            raise ValueError("advanced indexing")
        for dim, i in enumerate(idx):
            if i is None:
                raise ValueError("newaxis indexing")
            full = isinstance(i, slice) and slice(None).indices(x.shape[dim]) == i.indices(x.shape[dim])
            if not full and self._carries_channels(lx, dim):
                self._freeze_all(lx, n.name, "indexing across channels")
        self.kind[n] = ZERO
        return lx[index]

    def _carries_channels(self, labels: torch.Tensor, dim: int) -> bool:
        """Whether prunable atoms vary along `dim` (conservative: any variation at all counts)."""
        if labels.shape[dim] <= 1:
            return False
        first = labels.narrow(dim, 0, 1)
        return bool((labels != first).any())

    def _reduce(self, n: fx.Node, largs: tuple, lkwargs: dict, out: Any) -> Any:
        lx = largs[0]
        dims = lkwargs.get("dim", largs[1] if len(largs) > 1 else None)
        keepdim = lkwargs.get("keepdim", largs[2] if len(largs) > 2 else False)
        if dims is None:
            raise ValueError("full reduction")
        dims = [dims] if isinstance(dims, int) else list(dims)
        for d in dims:
            if self._carries_channels(lx, d):
                self._freeze_all(lx, n.name, "reduction across channels")
        self.kind[n] = ZERO
        return torch.amax(lx, dim=dims, keepdim=bool(keepdim))

    def _split(self, n: fx.Node, name: str, largs: tuple, lkwargs: dict, out: Any) -> Any:
        lx = largs[0]
        dim = lkwargs.get("dim", largs[2] if len(largs) > 2 else 0)
        arg = largs[1] if len(largs) > 1 else lkwargs.get("chunks", lkwargs.get("split_size_or_sections"))
        self.kind[n] = ZERO
        pieces = lx.chunk(arg, dim) if name == "chunk" else lx.split(arg, dim)
        if self._carries_channels(lx, dim):
            sizes = {p.shape[dim] for p in pieces}
            if name == "chunk" and len(sizes) == 1:
                # The slimmed model chunks its smaller tensor into equal parts again: keep the parts in
                # step by tying position i of every part together.
                for p in pieces[1:]:
                    self.atoms.union_pairs(pieces[0], p)
            else:
                self._freeze_all(lx, n.name, f"{name} with fixed sizes across channels")
        return tuple(pieces)

    def _reshape(self, n: fx.Node, largs: tuple, lkwargs: dict, out: torch.Tensor) -> torch.Tensor:
        self.kind[n] = ZERO
        lx = largs[0]
        if n.target in ("flatten",) or n.target is torch.flatten:
            return self._reshape_labels(n, lx, out, dynamic=True)
        shape_args = list(n.args[1:]) + list(n.kwargs.values())
        if len(shape_args) == 1 and isinstance(shape_args[0], (list, tuple)):
            shape_args = list(shape_args[0])
        return self._reshape_labels(n, lx, out, dynamic=False, shape_args=shape_args)

    def _reshape_labels(
        self,
        n: fx.Node,
        lx: torch.Tensor,
        out: torch.Tensor,
        dynamic: bool,
        shape_args: list[Any] | None = None,
    ) -> torch.Tensor:
        """Reshape the labels; the slimmed model re-runs the same code on a smaller tensor, so every
        output dim that covers channels must be computed (-1 or from .size()), not a literal, except a
        literal factor split off the channel axis, which is then tied across (channel shuffle)."""
        result = lx.reshape(out.shape)
        if dynamic:
            return result
        literal = [not isinstance(a, fx.Node) and a != -1 for a in shape_args or []]
        if len(literal) != len(out.shape):
            raise ValueError("unrecognised reshape arguments")
        for in_dims, out_dims in _reshape_blocks(tuple(lx.shape), tuple(out.shape)):
            carries = any(self._carries_channels(lx, d) for d in in_dims)
            if not carries:
                continue
            lit = [d for d in out_dims if literal[d] and out.shape[d] > 1]
            dyn = [d for d in out_dims if not literal[d] and out.shape[d] > 1]
            if len(in_dims) == 1 and len(dyn) == 1 and lit:
                # split: tie positions across the literal factors
                rows = result.movedim(dyn[0], -1).reshape(-1, out.shape[dyn[0]])
                self.atoms.union_pairs(rows[0].expand_as(rows), rows)
            elif lit:
                self._freeze_all(lx, n.name, "reshape with a fixed size across channels")
        return result


def _reshape_blocks(a: tuple[int, ...], b: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
    """Pair up minimal runs of dims of `a` and `b` with equal products (size-1 dims attach anywhere)."""
    blocks: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(a) or j < len(b):
        ia, jb = [i] if i < len(a) else [], [j] if j < len(b) else []
        pa = a[i] if i < len(a) else 1
        pb = b[j] if j < len(b) else 1
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb and i < len(a):
                ia.append(i)
                pa *= a[i]
                i += 1
            elif j < len(b):
                jb.append(j)
                pb *= b[j]
                j += 1
            else:
                raise ValueError("incompatible reshape")
        blocks.append((ia, jb))
    return blocks


# --------------------------------------------------------------------------------------------------
# Zero propagation and mask placement
# --------------------------------------------------------------------------------------------------


def _place_masks(an: _Analyzer, graph: fx.Graph) -> tuple[dict[fx.Node, int], bool]:
    """Decide mask points; freeze what cannot be made exactly zero. Returns (mask points, froze_any)."""
    # Frozen flags as of the start of this pass: a freeze made during the pass sets `froze`, and the
    # caller runs another pass, so only a pass that froze nothing (whose snapshot was exact) is kept.
    # A trailing True: label -1 (no atom) indexes it and counts as frozen, with no masking copy.
    frozen = torch.cat([an.atoms.frozen_flags(), torch.ones(1, dtype=torch.bool)])

    def prunable(n: fx.Node) -> bool:
        return any(not bool(frozen[t].all()) for t in _tree_tensors(an.labels.get(n)))

    zero: dict[fx.Node, bool] = {}
    masks: dict[fx.Node, int] = {}
    froze = False
    consumers_of = {r.name for r in an.records if r.kind in ("conv", "linear")}
    for n in graph.nodes:
        if n.op in ("placeholder", "output"):
            zero[n] = True
            continue
        tensor_inputs = [a for a in n.all_input_nodes if _tree_tensors(an.labels.get(a))]
        # Dense consumers need zero inputs on pruned channels. Checked before the shortcut below: a
        # consumer whose own output is frozen (a classifier head) still mixes its input channels.
        if n.op == "call_module" and str(n.target) in consumers_of:
            for a in tensor_inputs:
                if not zero.get(a, True):
                    atoms_in = an.labels[a]
                    an._freeze_all(atoms_in, str(a.name), f"no module to mask before {n.target}")
                    froze = True
        if not prunable(n):
            zero[n] = True
            continue
        kind = an.kind.get(n, OPAQUE)
        if kind in (SOURCE, AFFINE, NONZERO, PARAM):
            z = False
        elif kind == ZERO:
            z = all(zero.get(a, True) for a in tensor_inputs)
        elif kind == ADD:
            z = all(zero.get(a, True) for a in tensor_inputs)
        elif kind == MUL:
            z = any(zero.get(a, True) for a in tensor_inputs)
        elif kind == DIV:
            z = zero.get(tensor_inputs[0], True) if tensor_inputs else True
        else:
            z = True  # opaque: frozen
        if not z and kind != PARAM and n in an.mask_axis:
            users_need_zero = any(an.kind.get(u) != AFFINE for u in n.users)
            if users_need_zero:
                masks[n] = an.mask_axis[n]
                z = True
        zero[n] = z
    return masks, froze


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def trace(model: nn.Module) -> fx.GraphModule:
    """fx-trace `model` as in eval mode (control flow on `self.training` takes the inference path).
    The GraphModule shares the model's submodules."""
    with _eval_mode(model):
        try:
            tracer = _Tracer()
            graph = tracer.trace(model)
            return fx.GraphModule(tracer.root, graph, type(model).__name__)
        except Exception as exc:
            where = _failing_line(exc)
            raise AnalysisError(
                f"cannot trace {type(model).__name__} with torch.fx: {type(exc).__name__}: "
                + f"{exc}".strip().split("\n")[0][:200]
                + (f" (at {where})" if where else "")
                + "; fx cannot follow Python control flow on tensor values: rewrite that line with tensor "
                "ops, or wrap the code in a module fx treats as a leaf"
            ) from exc


class _Tracer(fx.Tracer):
    """torch.fx's tracer, with every BatchNorm subclass kept whole. Libraries fuse an activation into
    their BatchNorm (timm's BatchNormAct2d calls F.batch_norm, then its act); traced through, the
    functional call would have no rule and freeze the channels. As one module it is a per-channel
    affine op followed by a per-channel activation: a mask point like any BatchNorm."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, nn.modules.batchnorm._BatchNorm) or super().is_leaf_module(m, qualname)


def _failing_line(exc: BaseException) -> str | None:
    """file:line and code of the innermost frame of the traceback outside torch (the user's code)."""
    import traceback

    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/torch/" not in f.filename]
    if not frames:
        return None
    f = frames[-1]
    return f"{f.filename}:{f.lineno}: {(f.line or '').strip()}"


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Every submodule in eval mode for the duration; each one's own flag restored afterwards."""
    with training_flags(model):
        model.eval()
        yield


def analyze(model: nn.Module, example_input: torch.Tensor) -> ChannelGraph:
    """Trace `model`, find coupled channel groups, mask points, slicing rules and MAC terms."""
    gm = trace(model)
    counts: dict[str, int] = defaultdict(int)
    for n in gm.graph.nodes:
        if n.op == "call_module":
            counts[str(n.target)] += 1
    an = _Analyzer(gm, counts)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    x = example_input[:1].to(device)
    with torch.no_grad(), _eval_mode(model):
        an.run(x)
    # Each pass that freezes something freezes at least one more atom, so this ends; only the masks of
    # a pass that froze nothing are consistent with the final frozen set.
    froze = True
    while froze:
        masks, froze = _place_masks(an, gm.graph)
    return _build(an, masks, tuple(example_input.shape[1:]))


# --------------------------------------------------------------------------------------------------
# Assembling the ChannelGraph
# --------------------------------------------------------------------------------------------------


def _build(an: _Analyzer, masks: dict[fx.Node, int], input_shape: tuple[int, ...]) -> ChannelGraph:
    num = _number_units(an)
    module_slices, mac_terms = _slices_and_terms(an, num)
    return ChannelGraph(
        input_shape=input_shape,
        groups=_groups(num, module_slices, mac_terms),
        frozen=_frozen_channels(an),
        mask_points=_mask_points(an, masks, num),
        module_slices=module_slices,
        param_slices=_param_slices(an, num),
        mac_terms=mac_terms,
        unit_group=tuple(num.unit_group),
    )


@dataclass(frozen=True)
class _Numbering:
    """Global unit ids of the non-frozen atom roots, numbered group by group."""

    atoms: _Atoms
    unit_of_root: dict[int, int]
    unit_group: list[int]  # group index of every unit
    groups_meta: list[tuple[int, str, int, int]]  # (offset, name, units, channels) per group

    def units(self, t: torch.Tensor | None) -> tuple[int, ...]:
        """The unit of each atom of `t` (-1: no atom, or frozen)."""
        if t is None:
            return ()
        find, unit_of_root = self.atoms.find, self.unit_of_root
        return tuple(unit_of_root.get(find(a), -1) if a >= 0 else -1 for a in t.tolist())


def _number_units(an: _Analyzer) -> _Numbering:
    """One unit per non-frozen atom root; one group per space, named after its first producer."""
    atoms = an.atoms
    unit_of_root: dict[int, int] = {}
    units_by_space: dict[int, list[int]] = defaultdict(list)
    space_order: list[int] = []
    space_name: dict[int, str] = {}
    space_channels: dict[int, int] = {}

    def visit(atom_list: torch.Tensor, owner: str) -> None:
        for a in atom_list.tolist():
            if a < 0:
                continue
            root = atoms.find(a)
            if root in atoms.frozen or root in unit_of_root:
                continue
            space = atoms.root_space(root)
            if space not in units_by_space:
                space_order.append(space)
                space_name[space] = owner
                space_channels[space] = len(atom_list)
            unit_of_root[root] = -1  # numbered below, in space order
            units_by_space[space].append(root)

    # units are numbered in the order producers create them
    for r in an.records:
        if r.kind in ("conv", "linear", "conv_blockwise") and r.out_atoms is not None:
            visit(r.out_atoms, r.name)
    for r in an.records:
        for t in (r.in_atoms, r.out_atoms):
            if t is not None:
                visit(t, r.name)
    for node in an.param_nodes:
        visit(an.labels[node].reshape(-1), str(node.target))

    unit_group: list[int] = []
    groups_meta: list[tuple[int, str, int, int]] = []
    for gi, space in enumerate(space_order):
        roots = units_by_space[space]
        offset = len(unit_group)
        for k, root in enumerate(roots):
            unit_of_root[root] = offset + k
            unit_group.append(gi)
        groups_meta.append((offset, space_name[space], len(roots), space_channels[space]))
    return _Numbering(atoms, unit_of_root, unit_group, groups_meta)


def _slices_and_terms(an: _Analyzer, num: _Numbering) -> tuple[tuple[ModuleSlice, ...], tuple[MacTerm, ...]]:
    """How to slice each layer, and the MAC term of each layer that multiplies-accumulates."""
    module_slices: list[ModuleSlice] = []
    mac_terms: list[MacTerm] = []
    for r in an.records:
        u_in, u_out = num.units(r.in_atoms), num.units(r.out_atoms)
        if r.kind in ("conv", "linear"):
            module_slices.append(ModuleSlice(r.name, r.kind, u_in, u_out))
            mac_terms.append(MacTerm(r.name, "bilinear", r.factor, in_units=u_in, out_units=u_out))
        elif r.kind == "conv_blockwise":
            module_slices.append(ModuleSlice(r.name, r.kind, u_in, u_out))
            g = r.extra["groups"]
            cout = len(u_out) // g
            units = tuple(u_out[i * cout] for i in range(g))
            mac_terms.append(MacTerm(r.name, "per_unit", r.factor, units=units))
        # No MAC term for the rest: BatchNorm folds into the conv before it at export and pooling is
        # not a multiply-accumulate (the convention of prunekit.measure).
        elif r.kind == "batchnorm":
            module_slices.append(ModuleSlice(r.name, r.kind, u_in, u_out))
    return tuple(module_slices), tuple(mac_terms)


def _groups(
    num: _Numbering, module_slices: tuple[ModuleSlice, ...], mac_terms: tuple[MacTerm, ...]
) -> tuple[ChannelGroup, ...]:
    """The channel groups with their roles: producers write a group's channels, dense consumers (conv,
    linear) read them; a group's MACs are those of every term that touches one of its units."""
    unit_group = num.unit_group
    producers: dict[int, list[str]] = defaultdict(list)
    consumers: dict[int, list[str]] = defaultdict(list)
    for s in module_slices:
        if s.kind in ("conv", "linear", "conv_blockwise"):
            _add_roles(producers, s.out_units, unit_group, s.module)
        if s.kind in ("conv", "linear"):
            _add_roles(consumers, s.in_units, unit_group, s.module)
    group_macs: dict[int, float] = defaultdict(float)
    for term in mac_terms:
        macs = term.macs()
        for gi in {unit_group[u] for u in (*term.in_units, *term.out_units, *term.units) if u >= 0}:
            group_macs[gi] += macs
    return tuple(
        ChannelGroup(
            index=gi,
            name=name,
            offset=offset,
            units=n_units,
            channels=channels,
            producers=tuple(dict.fromkeys(producers[gi])),
            consumers=tuple(dict.fromkeys(consumers[gi])),
            macs=int(group_macs[gi]),
        )
        for gi, (offset, name, n_units, channels) in enumerate(num.groups_meta)
    )


def _add_roles(roles: dict[int, list[str]], units: tuple[int, ...], unit_group: list[int], name: str) -> None:
    for gi in {unit_group[u] for u in units if u >= 0}:
        roles[gi].append(name)


def _mask_points(an: _Analyzer, masks: dict[fx.Node, int], num: _Numbering) -> tuple[MaskPoint, ...]:
    """The unit of each position along each mask point's axis."""
    mask_points = []
    for node, axis in masks.items():
        out = an.labels[node]
        along = out.movedim(axis, -1).reshape(-1, out.shape[axis])[0]
        mask_points.append(
            MaskPoint(str(node.target), axis if axis >= 0 else out.dim() + axis, num.units(along))
        )
    return tuple(mask_points)


def _param_slices(an: _Analyzer, num: _Numbering) -> tuple[ParamSlice, ...]:
    """The axis and units of each get_attr parameter that holds prunable channels."""
    param_slices = []
    for node, target in an.param_nodes.items():
        labels = an.labels[node]
        u = torch.tensor(num.units(labels.reshape(-1))).view(labels.shape)
        if not bool((u >= 0).any()):
            continue
        axes = [d for d in range(u.dim()) if u.shape[d] > 1 and bool((u != u.narrow(d, 0, 1)).any())]
        if len(axes) != 1:
            raise AnalysisError(f"parameter {target} couples channels along several axes")
        param_slices.append(
            ParamSlice(
                target, axes[0], tuple(u.movedim(axes[0], -1).reshape(-1, u.shape[axes[0]])[0].tolist())
            )
        )
    return tuple(param_slices)


def _frozen_channels(an: _Analyzer) -> tuple[FrozenChannels, ...]:
    """Channels frozen per reason: the widest tensor a layer reads or writes with that reason's channels."""
    atoms = an.atoms
    frozen_counts: dict[tuple[str, str], int] = defaultdict(int)
    for r in an.records:
        for t in (r.in_atoms, r.out_atoms):
            if t is None:
                continue
            per_reason: dict[tuple[str, str], int] = defaultdict(int)
            for a in t.tolist():
                root = atoms.find(a) if a >= 0 else -1
                if root >= 0 and root in atoms.frozen:
                    per_reason[atoms.frozen[root]] += 1
            for key, count in per_reason.items():
                frozen_counts[key] = max(frozen_counts[key], count)
    return tuple(
        FrozenChannels(where, reason, count) for (where, reason), count in sorted(frozen_counts.items())
    )


__all__ = [
    "ChannelGraph",
    "ChannelGroup",
    "FrozenChannels",
    "MacTerm",
    "MaskPoint",
    "ModuleSlice",
    "ParamSlice",
    "analyze",
    "trace",
]
