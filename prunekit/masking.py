"""Masks at the graph's mask points: the reference a slimmed model must equal, and what gates apply.

A mask multiplies a module's output channel by channel by unit activity (1 kept, 0 pruned). Placed after
the last per-channel affine op of every producer (conv -> BN -> [mask] -> ReLU), a zero makes the channel
exactly zero for every consumer, which is why physical removal can be exact.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from prunekit.graph import ChannelGraph, MaskPoint
from prunekit.plan import ChannelPlan


def with_ones(values: torch.Tensor) -> torch.Tensor:
    """Unit activity (U,) or (N, U) -> (N, U + 1) with a trailing column of ones: positions that are not
    prunable index that column, so a mask is one gather, with no branch per call."""
    if values.dim() == 1:
        values = values.unsqueeze(0)
    return torch.cat([values, values.new_ones(values.shape[0], 1)], dim=1)


def mask_hook(point: MaskPoint, unit_values: Callable[[], torch.Tensor]) -> Callable:
    """A forward hook multiplying the module's output by the unit activity at each channel position.

    `unit_values()` returns (N, U + 1) activity as made by `with_ones` (1 kept, 0 pruned)."""
    units = torch.tensor(point.units, dtype=torch.long)
    index_on: dict[torch.device, torch.Tensor] = {}

    def hook(_m: nn.Module, _inp: object, out: torch.Tensor) -> torch.Tensor:
        values = unit_values()
        idx = index_on.get(values.device)
        if idx is None:
            idx = index_on[values.device] = torch.where(units >= 0, units, values.shape[1] - 1).to(
                values.device
            )
        shape = [1] * out.dim()
        shape[0] = values.shape[0]
        shape[point.axis] = idx.shape[0]
        return out * values[:, idx].to(out.dtype).view(shape)

    return hook


@contextlib.contextmanager
def masked(model: nn.Module, graph: ChannelGraph, plan: ChannelPlan) -> Iterator[nn.Module]:
    """`model` with the plan applied as zero masks at every mask point, for the duration."""
    values = with_ones(torch.tensor(plan.unit_mask(graph), dtype=torch.float32))
    handles = [
        model.get_submodule(p.module).register_forward_hook(mask_hook(p, lambda: values))
        for p in graph.mask_points
    ]
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


__all__ = ["mask_hook", "masked", "with_ones"]
