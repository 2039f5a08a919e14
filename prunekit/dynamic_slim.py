"""A dynamic model that skips work: per example, only the channels its gates chose are computed.

`dynamic_inference_model(gated)` turns a decided dynamic checkpoint's model into a plain module
(no hooks) in which every block's reader first runs the block's gate network on the block input and
computes, per dynamic channel group, the channel blocks any example of the batch uses (`nonzero` of
the batch's union; a block is the channels of one gate, made adjacent when the model is built, or a
common divisor of unequal gates). Every layer on the group then works on those channels only: the
producing convolutions gather their output filters (`index_select` on the weight), BatchNorm gathers
its statistics, the consuming layers gather their input slices block by block, and the mask points
multiply by each example's own 0/1 values on the gathered channels. At batch 1 the union is the
example's own choice, so the work really shrinks with its MACs (in PyTorch eager and in the exported
ONNX graph, where `NonZero`/`Gather` feed the `Conv` weights); a larger batch computes the union and
stays exact through the masks.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.dynamic import DynamicGateBank
from prunekit.errors import ConfigError
from prunekit.gates import get_gates, ungated_copy
from prunekit.graph import ChannelGraph
from prunekit.modes import training_flags
from prunekit.surgery import _set_submodule


class _Selection:
    """Per forward pass, for every dynamic group: the chosen channel blocks (`index`, what the graph's
    `NonZero` gives), the chosen channels (`channels`, K positions) and the examples' 0/1 values on
    them (`values`, N x K). Shared by a block's reader and the layers it feeds. `block` (fixed at
    build time) is each group's channels per block."""

    def __init__(self) -> None:
        self.index: dict[int, torch.Tensor] = {}
        self.channels: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.block: dict[int, int] = {}

    def clear(self) -> None:
        self.index.clear()
        self.channels.clear()
        self.values.clear()


class DecidingReader(nn.Module):
    """A block's reader: decide from the block input (gate network, offset, fixed gates), select the
    channel blocks of every group of the block, then run the reader itself."""

    def __init__(
        self,
        inner: nn.Module,
        net: nn.Module,
        offset: float,
        fixed: torch.Tensor,
        block_gates: dict[int, torch.Tensor],
        selection: _Selection,
    ) -> None:
        super().__init__()
        self.inner, self.net = inner, net
        self.offset = offset
        self.register_buffer("fixed", fixed)
        self.groups = list(block_gates)
        for g, idx in block_gates.items():  # (B_g,) each block's position in [gate values..., 1]
            self.register_buffer(f"block_gates_{g}", idx)
            # (S,): a block's channel offsets, and ones to spread a block's value over its channels
            self.register_buffer(f"block_offsets_{g}", torch.arange(selection.block[g]))
            self.register_buffer(f"block_ones_{g}", torch.ones(selection.block[g]))
        self.selection = selection

    def decisions(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net(x)
        on = (logits[..., 1] + self.offset > logits[..., 0]) | self.fixed
        return on.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ext = F.pad(self.decisions(x), (0, 1), value=1.0)  # [gate values..., 1]
        sel = self.selection
        for g in self.groups:
            blocks = ext[:, getattr(self, f"block_gates_{g}")]  # (N, B_g)
            index = torch.nonzero(blocks.amax(0) > 0).flatten()
            chosen = blocks.index_select(1, index)  # (N, K_b)
            sel.index[g] = index
            if sel.block[g] == 1:
                sel.channels[g], sel.values[g] = index, chosen
            else:
                size = sel.block[g]
                offsets, ones = getattr(self, f"block_offsets_{g}"), getattr(self, f"block_ones_{g}")
                sel.channels[g] = (index.unsqueeze(1) * size + offsets).flatten()
                sel.values[g] = (chosen.unsqueeze(2) * ones).flatten(1)
        return self.inner(x)


class SlicedLayer(nn.Module):
    """A conv, linear or BatchNorm on a dynamic group: computed on the selected channels only (its
    output channels for `out_group`, its input channels for `in_group`), and, as a mask point, times
    each example's values along `mask_axis`."""

    def __init__(
        self,
        inner: nn.Module,
        selection: _Selection,
        in_group: int | None,
        out_group: int | None,
        mask_axis: int | None,
    ) -> None:
        super().__init__()
        self.inner, self.selection = inner, selection
        self.in_group, self.out_group, self.mask_axis = in_group, out_group, mask_axis
        self._record_shape()

    def _record_shape(self) -> None:
        weight = getattr(self.inner, "weight", None)
        self.weight_shape = () if weight is None else tuple(int(d) for d in weight.shape)

    @torch.no_grad()
    def keep_(self, in_keep: torch.Tensor | None, out_keep: torch.Tensor | None) -> None:
        """Remove for good the channels outside `in_keep`/`out_keep` (positions on the dynamic axes):
        those no calibration example ever turned on."""
        m = self.inner
        if isinstance(m, nn.Identity):
            return
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            assert out_keep is not None
            for name in ("weight", "bias"):
                p = getattr(m, name)
                if p is not None:
                    setattr(m, name, nn.Parameter(p.index_select(0, out_keep)))
            for name in ("running_mean", "running_var"):
                m.register_buffer(name, getattr(m, name).index_select(0, out_keep))
            m.num_features = int(out_keep.numel())
            return
        w = m.weight
        if in_keep is not None:
            w = w.index_select(1, in_keep)
        if out_keep is not None:
            w = w.index_select(0, out_keep)
            if m.bias is not None:
                m.bias = nn.Parameter(m.bias.index_select(0, out_keep))
        m.weight = nn.Parameter(w)
        self._record_shape()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m, sel = self.inner, self.selection
        out_index = None if self.out_group is None else sel.channels[self.out_group]
        if isinstance(m, nn.Identity):  # a BatchNorm folded into the convolution before it
            y = x
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            assert out_index is not None
            y = F.batch_norm(
                x,
                m.running_mean.index_select(0, out_index),  # type: ignore[union-attr]
                m.running_var.index_select(0, out_index),  # type: ignore[union-attr]
                None if m.weight is None else m.weight.index_select(0, out_index),
                None if m.bias is None else m.bias.index_select(0, out_index),
                False,
                0.0,
                m.eps,
            )
        else:
            w = m.weight
            if self.in_group is not None:
                w = _gather_inputs(w, self.weight_shape, sel, self.in_group)
            b = m.bias
            if out_index is not None:
                w = w.index_select(0, out_index)
                b = None if b is None else b.index_select(0, out_index)
            if isinstance(m, nn.Linear):
                y = F.linear(x, w, b)
            else:
                y = F.conv2d(x, w, b, m.stride, m.padding, m.dilation, 1)  # type: ignore[arg-type]
        if self.mask_axis is not None:
            assert self.out_group is not None
            values = sel.values[self.out_group].to(y.dtype)
            # (N, K) -> broadcastable along the mask axis: unsqueezes, not a computed shape (in an ONNX
            # graph, one op each instead of a Shape/Gather/Concat/Reshape chain)
            for _ in range(1, self.mask_axis % y.dim()):
                values = values.unsqueeze(1)
            while values.dim() < y.dim():
                values = values.unsqueeze(-1)
            y = y * values
        return y


def _gather_inputs(w: torch.Tensor, shape: tuple[int, ...], sel: _Selection, group: int) -> torch.Tensor:
    """The weight's input slices of the chosen channels. Input channels are the weight's axis 1, so a
    gather of single channels copies only k*k values per (output, input) pair, which is slow in
    onnxruntime (about 3.4x the cost per byte of an axis-0 gather); gathering whole blocks of S
    channels copies S*k*k values at a time (about 5x faster on resnet18's largest layer)."""
    size = sel.block[group]
    if size == 1:
        return w.index_select(1, sel.index[group])
    return _GatherInputBlocks.apply(w, sel.index[group], shape, size)


class _GatherInputBlocks(torch.autograd.Function):
    """`w` (out, in, *kernel) -> (out, K*S, *kernel): the input channels of the K chosen blocks of S.

    The ONNX form is Reshape (to out x blocks x S*k*k, a constant that the exporter folds into the
    initializer), Gather on axis 1, Reshape back. It needs its own symbolic because the exporter's
    shape inference loses the kernel size through the second Reshape, and its Conv then refuses a
    kernel of unknown shape; this one states the output's type. `shape` is the weight's, as Python
    numbers recorded before any trace (a traced `w.shape` would become computed shapes)."""

    @staticmethod
    def forward(
        ctx: Any, w: torch.Tensor, index: torch.Tensor, shape: tuple[int, ...], size: int
    ) -> torch.Tensor:
        out_c, in_c, *rest = shape
        blocks = w.reshape(out_c, in_c // size, size * math.prod(rest)).index_select(1, index)
        return blocks.reshape(out_c, -1, *rest)

    @staticmethod
    def symbolic(g: Any, w: Any, index: Any, shape: tuple[int, ...], size: int) -> Any:
        out_c, in_c, *rest = shape
        blocks = g.op("Reshape", w, g.op("Constant", value_t=torch.tensor([out_c, in_c // size, -1])))
        chosen = g.op("Gather", blocks, index, axis_i=1)
        out = g.op("Reshape", chosen, g.op("Constant", value_t=torch.tensor([out_c, -1, *rest])))
        out.setType(w.type().with_sizes([out_c, None, *rest]))
        return out


class DynamicModel(nn.Module):
    """The inference model of dynamic gates; `selection` and `activity()` give the last batch's
    per-group channel values (for checks against the gated model)."""

    def __init__(
        self,
        model: nn.Module,
        selection: _Selection,
        groups: dict[int, list[int]],
        removed: dict[int, list[int]],
    ) -> None:
        super().__init__()
        self.model = model
        self.selection = selection
        self.group_units = groups  # group -> its unit ids in channel order (those kept)
        self.removed = removed  # group -> its units removed for good (never on)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.selection.clear()
        return self.model(x)

    def activity(self, num_units: int) -> torch.Tensor:
        """(N, U) unit activity of the last forward pass: the dynamic groups' per-example values,
        every other unit on (removed units: off)."""
        some = next(iter(self.selection.values.values()))
        a = torch.ones(some.shape[0], num_units, dtype=some.dtype)
        for g, units in self.group_units.items():
            a[:, self.removed[g]] = 0
            full = torch.zeros(some.shape[0], len(units), dtype=some.dtype)
            full[:, self.selection.channels[g]] = self.selection.values[g]
            a[:, units] = full
        return a


def dynamic_inference_model(
    model: nn.Module, graph: ChannelGraph, drop: set[int] | None = None
) -> DynamicModel:
    """The skipping inference model of a gated `model` whose dynamic gates are decided (a copy; the
    model itself is not changed). `drop`: units of dynamic groups to remove for good (`never_on`)."""
    bank = get_gates(model)
    if not isinstance(bank, DynamicGateBank):
        raise ConfigError("the model has no dynamic gates")
    if not bank.is_decided:
        raise ConfigError("the dynamic gates are not decided yet: fine-tune the model first")
    plain = ungated_copy(model).eval()
    nets = copy.deepcopy(bank.nets).eval()
    _fold_batchnorms_(plain, graph)
    selection = _Selection()
    slices = {s.module: s for s in graph.module_slices}
    group_units: dict[int, list[int]] = {}
    dynamic_groups = {g for b in bank.blocks for g in b.groups}
    drop = drop or set()
    all_units: dict[int, list[int]] = {}
    for g in dynamic_groups:
        group = graph.groups[g]
        all_units[g] = list(range(group.offset, group.offset + group.units))
        if all(u in drop for u in all_units[g]):
            raise ConfigError(f"no channel of group {group.name} would remain")
    block_gates: dict[int, torch.Tensor] = {}
    for i, b in enumerate(bank.blocks):
        # position of each gate in [this block's learnable gate values..., 1] (fixed gates: the 1)
        local = {gate: k for k, gate in enumerate(bank.block_gates[i].tolist())}
        for g in b.groups:
            kept = [u for u in all_units[g] if u not in drop]
            keys = [local.get(bank.layout.unit_gate[u], len(local)) for u in kept]
            group_units[g], blocks, selection.block[g] = _channel_blocks(kept, keys)
            block_gates[g] = torch.tensor(blocks, dtype=torch.long)

    def group_of(units: tuple[int, ...]) -> int | None:
        gs = {graph.unit_group[u] for u in units if u >= 0}
        g = next(iter(gs)) if len(gs) == 1 else None
        if g is None or g not in dynamic_groups:
            return None
        if list(units) != all_units[g]:
            raise ConfigError(
                f"the channels of group {graph.groups[g].name} are permuted: cannot slice per example"
            )
        return g

    mask_axes = {}
    for p in graph.mask_points:
        g = group_of(p.units)
        if g is not None:
            mask_axes[p.module] = p.axis
    wrapped: dict[str, nn.Module] = {}
    for name, s in slices.items():
        in_g, out_g = group_of(s.in_units), group_of(s.out_units)
        if in_g is None and out_g is None:
            continue
        if s.kind == "batchnorm":
            in_g = None
        layer = SlicedLayer(plain.get_submodule(name), selection, in_g, out_g, mask_axes.get(name))
        # keep the units not dropped, in block order (a permutation of the group's channels)
        layer.keep_(*(None if g is None else _positions(all_units[g], group_units[g]) for g in (in_g, out_g)))
        wrapped[name] = layer
    missing = [m for m in mask_axes if m not in wrapped]
    if missing:
        raise ConfigError(f"{missing[0]} masks a dynamic group but is not a layer that can be sliced")
    offset = float(bank.offset)
    for i, b in enumerate(bank.blocks):
        fixed = bank.fixed_on[bank.block_gates[i]].clone()
        inner = wrapped.get(b.reader, plain.get_submodule(b.reader))
        gates = {g: block_gates[g] for g in b.groups}
        wrapped[b.reader] = DecidingReader(inner, nets[i], offset, fixed, gates, selection)
    for name, module in wrapped.items():
        _set_submodule(plain, name, module)
    removed = {g: [u for u in all_units[g] if u in drop] for g in group_units}
    return DynamicModel(plain, selection, group_units, removed).eval()


def _channel_blocks(units: list[int], keys: list[int]) -> tuple[list[int], list[int], int]:
    """A group's channels ordered so that each gate's channels are adjacent, cut into blocks of one
    size S (the gcd of the gates' channel counts: 16 for `--dynamic`'s default granularity): the
    units in that order, each block's gate key, and S. The skipping model then selects whole blocks,
    so it gathers S channels at a time."""
    parts: dict[int, list[int]] = {}
    for u, k in zip(units, keys, strict=True):
        parts.setdefault(k, []).append(u)
    size = math.gcd(*(len(p) for p in parts.values()))
    ordered = [u for p in parts.values() for u in p]
    blocks = [k for k, p in parts.items() for _ in range(len(p) // size)]
    return ordered, blocks, size


def _positions(units: list[int], kept: list[int]) -> torch.Tensor:
    where = {u: i for i, u in enumerate(units)}
    return torch.tensor([where[u] for u in kept], dtype=torch.long)


@torch.no_grad()
def _fold_batchnorms_(model: nn.Module, graph: ChannelGraph) -> None:
    """Fold every BatchNorm into the convolution that feeds it alone (eval-mode statistics). A
    gathered convolution then needs no separate normalisation: onnxruntime fuses a BatchNorm only
    into a convolution with constant weights, and a block's convolutions here are computed in the
    graph (on a dynamic group, or reading one)."""
    from prunekit.graph import trace

    gm = trace(model)
    slices = {s.module: s for s in graph.module_slices}
    for n in gm.graph.nodes:
        if n.op != "call_module" or slices.get(str(n.target), None) is None:
            continue
        bn_name = str(n.target)
        s = slices[bn_name]
        prev = n.args[0] if n.args else None
        if s.kind != "batchnorm" or getattr(prev, "op", None) != "call_module" or len(prev.users) != 1:
            continue
        conv = model.get_submodule(str(prev.target))
        bn = model.get_submodule(bn_name)
        if type(conv) is not nn.Conv2d or conv.groups != 1 or not bn.track_running_stats:
            continue
        scale = (bn.weight if bn.affine else torch.ones_like(bn.running_var)) / torch.sqrt(
            bn.running_var + bn.eps
        )
        shift = (bn.bias if bn.affine else torch.zeros_like(bn.running_mean)) - bn.running_mean * scale
        fused = nn.Conv2d(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            1,
            True,
        )
        fused.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
        fused.bias.copy_(shift + (0 if conv.bias is None else conv.bias * scale))
        _set_submodule(model, str(prev.target), fused)
        _set_submodule(model, bn_name, nn.Identity())


@torch.no_grad()
def verify_dynamic(
    gated: nn.Module, dynamic: DynamicModel, x: torch.Tensor, rtol: float = 1e-4
) -> dict[str, Any]:
    """The skipping model against the gated one, example by example: the same channel decisions and
    outputs within `rtol` of the output scale, at batch 1 (each example alone) and at the batch as a
    whole. A mismatch is a VerificationError."""
    from prunekit.errors import VerificationError

    bank = get_gates(gated)
    assert bank is not None
    worst = 0.0
    scale = 0.0
    for batch in [x[i : i + 1] for i in range(x.shape[0])] + [x]:
        ref = gated(batch)
        activity = bank.current
        out = dynamic(batch)
        scale = max(scale, float(ref.abs().max()))
        worst = max(worst, float((out - ref).abs().max()))
        for g, units in dynamic.group_units.items():
            if dynamic.removed[g] and bool(activity[:, dynamic.removed[g]].any()):  # type: ignore[index]
                raise VerificationError(
                    "an example turns on a channel removed as never on: verify on the calibration data"
                )
            want = activity[:, units]  # type: ignore[index]
            got = torch.zeros_like(want)
            got[:, dynamic.selection.channels[g]] = dynamic.selection.values[g].to(got.dtype)
            if not torch.equal(got, want):
                raise VerificationError(
                    "the skipping model's channel decisions differ from the gated model's"
                )
    if worst > rtol * max(1.0, scale):
        raise VerificationError(
            f"the skipping model differs from the gated one by {worst:.3g} "
            f"(allowed {rtol * max(1.0, scale):.3g})"
        )
    return {"max_abs_diff": worst, "output_scale": scale, "examples": int(x.shape[0])}


@torch.no_grad()
def never_on(model: nn.Module, batches: Any) -> set[int]:
    """Units of dynamic groups whose gate is on for no example of `batches` (eval mode)."""
    bank = get_gates(model)
    assert isinstance(bank, DynamicGateBank)
    ever = None
    with training_flags(model):
        model.eval()
        for x in batches:
            model(x)
            on = bank.current.amax(0) > 0  # type: ignore[union-attr]
            ever = on if ever is None else ever | on
    if ever is None:
        raise ConfigError("no calibration examples to find channels that are never on")
    gated = torch.tensor(bank.layout.unit_gate) >= 0
    return set((gated & ~ever.cpu()).nonzero().flatten().tolist())


@torch.no_grad()
def verify_onnx_dynamic(path: Path, dynamic: DynamicModel, x: torch.Tensor, rtol: float) -> dict[str, Any]:
    """onnxruntime against the PyTorch skipping model on real inputs: every example alone (batch 1:
    the same channels selected, read from the graph's NonZero outputs, and the same outputs) and the
    batch as a whole (the same outputs per example)."""
    import onnx
    import onnxruntime as ort

    from prunekit.errors import VerificationError

    proto = onnx.load(str(path))
    nonzeros = [n.output[0] for n in proto.graph.node if n.op_type == "NonZero"]
    if len(nonzeros) != len(dynamic.group_units):
        raise VerificationError(
            f"the ONNX graph selects channels in {len(nonzeros)} places, the model in "
            f"{len(dynamic.group_units)}"
        )
    for name in nonzeros:
        proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.INT64, None))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    worst = scale = 0.0
    for batch in [x[i : i + 1] for i in range(x.shape[0])] + [x]:
        ref = dynamic(batch)
        order = list(dynamic.selection.index)  # groups in the order the model selected them
        got = session.run(None, {input_name: batch.numpy()})
        scale = max(scale, float(ref.abs().max()))
        worst = max(worst, float(abs(got[0] - ref.numpy()).max()))
        for g, chosen in zip(order, got[1:], strict=True):
            if not torch.equal(torch.from_numpy(chosen).flatten(), dynamic.selection.index[g]):
                raise VerificationError(
                    f"onnxruntime selects other channels than PyTorch (batch of {batch.shape[0]})"
                )
    if worst > rtol * max(1.0, scale):
        raise VerificationError(
            f"onnxruntime differs from PyTorch by {worst:.3g} on the dynamic model "
            f"(allowed {rtol * max(1.0, scale):.3g})"
        )
    return {
        "max_abs_diff": worst,
        "output_scale": scale,
        "examples": int(x.shape[0]),
        "batch_sizes": [1, int(x.shape[0])],
    }


__all__ = ["DynamicModel", "dynamic_inference_model", "never_on", "verify_dynamic", "verify_onnx_dynamic"]
