"""Physical channel removal (`slim_`) and the check that the smaller model computes what the masked
or gated one did (`verify_slim`). The masked reference itself lives in `prunekit.masking`.

`slim_` builds smaller Conv/BN/Linear modules from the kept weights and sets them on the original
module tree, so module names and state_dict keys stay familiar. One table maps a slice kind to the
function that builds the smaller module.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import nn

from prunekit.errors import VerificationError
from prunekit.graph import ChannelGraph, ModuleSlice
from prunekit.modes import training_flags
from prunekit.parity import Parity, compare_outputs
from prunekit.plan import ChannelPlan


def _kept_positions(units: Sequence[int], keep: Sequence[bool]) -> list[int]:
    return [i for i, u in enumerate(units) if u < 0 or keep[u]]


def _index(t: torch.Tensor | None, dim: int, idx: list[int]) -> torch.Tensor | None:
    if t is None:
        return None
    return t.index_select(dim, torch.tensor(idx, dtype=torch.long, device=t.device)).clone()


def _slim_conv(m: nn.Conv2d, s: ModuleSlice, keep: Sequence[bool]) -> nn.Module:
    k_in, k_out = _kept_positions(s.in_units, keep), _kept_positions(s.out_units, keep)
    new = _like_conv(m, len(k_in), len(k_out), groups=1)
    with torch.no_grad():
        new.weight.copy_(_index(_index(m.weight, 0, k_out), 1, k_in))
        if m.bias is not None:
            new.bias.copy_(_index(m.bias, 0, k_out))
    return new


def _slim_conv_blockwise(m: nn.Conv2d, s: ModuleSlice, keep: Sequence[bool]) -> nn.Module:
    cin, cout = m.in_channels // m.groups, m.out_channels // m.groups
    blocks = [b for b in range(m.groups) if s.out_units[b * cout] < 0 or keep[s.out_units[b * cout]]]
    k_out = [b * cout + j for b in blocks for j in range(cout)]
    new = _like_conv(m, len(blocks) * cin, len(blocks) * cout, groups=len(blocks))
    with torch.no_grad():
        new.weight.copy_(_index(m.weight, 0, k_out))
        if m.bias is not None:
            new.bias.copy_(_index(m.bias, 0, k_out))
    return new


def _like_conv(m: nn.Conv2d, cin: int, cout: int, groups: int) -> nn.Conv2d:
    return nn.Conv2d(
        cin,
        cout,
        m.kernel_size,
        stride=m.stride,
        padding=m.padding,
        dilation=m.dilation,
        groups=groups,
        bias=m.bias is not None,
        padding_mode=m.padding_mode,
        device=m.weight.device,
        dtype=m.weight.dtype,
    )


def _slim_linear(m: nn.Linear, s: ModuleSlice, keep: Sequence[bool]) -> nn.Module:
    k_in, k_out = _kept_positions(s.in_units, keep), _kept_positions(s.out_units, keep)
    new = nn.Linear(
        len(k_in), len(k_out), bias=m.bias is not None, device=m.weight.device, dtype=m.weight.dtype
    )
    with torch.no_grad():
        new.weight.copy_(_index(_index(m.weight, 0, k_out), 1, k_in))
        if m.bias is not None:
            new.bias.copy_(_index(m.bias, 0, k_out))
    return new


def _slim_batchnorm(m: nn.modules.batchnorm._BatchNorm, s: ModuleSlice, keep: Sequence[bool]) -> nn.Module:
    """A copy of the BatchNorm module with the kept channels. Copied rather than constructed, so that a
    subclass keeps what its constructor set up (timm's BatchNormAct2d: its activation and dropout),
    and dtype and device stay the model's."""
    k = _kept_positions(s.in_units, keep)
    new = copy.deepcopy(m)
    new.num_features = len(k)
    with torch.no_grad():
        for name in ("weight", "bias"):
            old = getattr(m, name)
            if isinstance(old, nn.Parameter):
                setattr(new, name, nn.Parameter(_index(old.data, 0, k), requires_grad=old.requires_grad))
        for name in ("running_mean", "running_var"):
            if getattr(m, name, None) is not None:
                setattr(new, name, _index(getattr(m, name), 0, k))
    return new


_SLICERS: dict[str, Callable[[nn.Module, ModuleSlice, Sequence[bool]], nn.Module]] = {
    "conv": _slim_conv,
    "conv_blockwise": _slim_conv_blockwise,
    "linear": _slim_linear,
    "batchnorm": _slim_batchnorm,
}


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def slim_(model: nn.Module, graph: ChannelGraph, plan: ChannelPlan) -> nn.Module:
    """Remove the channels `plan` drops, in place; returns `model` for chaining."""
    keep = plan.unit_mask(graph)
    for s in graph.module_slices:
        if all(u < 0 or keep[u] for u in (*s.in_units, *s.out_units)):
            continue
        old = model.get_submodule(s.module)
        new = _SLICERS[s.kind](old, s, keep)
        new.train(old.training)
        _set_submodule(model, s.module, new)
    for p in graph.param_slices:
        parent_name, _, attr = p.target.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old_t = getattr(parent, attr)
        new_t = _index(old_t.data, p.axis, _kept_positions(p.units, keep))
        if isinstance(old_t, nn.Parameter):
            setattr(parent, attr, nn.Parameter(new_t, requires_grad=old_t.requires_grad))
        else:
            parent.register_buffer(attr, new_t)
    return model


@torch.no_grad()
def verify_slim(
    reference: Callable[[torch.Tensor], torch.Tensor],
    slimmed: nn.Module,
    inputs: torch.Tensor,
    rtol: float = 1e-4,
) -> Parity:
    """Compare the slimmed model with the reference (the masked or gated model) on `inputs`, eval mode.
    A mismatch raises VerificationError: a slimmed model that computes something else is never kept."""
    with training_flags(slimmed):
        slimmed.eval()
        parity = compare_outputs(reference(inputs), slimmed(inputs), rtol)
    if not parity.ok:
        raise VerificationError(f"slimmed model differs from the gated model: {parity.describe()}")
    return parity


__all__ = ["slim_", "verify_slim"]
