"""Masks at the graph's mask points: the reference a slimmed model must equal, and what gates apply.

A mask multiplies a module's output channel by channel by unit activity (1 kept, 0 pruned). Placed after
the last per-channel affine op of every producer (conv -> BN -> [mask] -> ReLU), a zero makes the channel
exactly zero for every consumer, which is why physical removal can be exact.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

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


class MaskHook:
    """A forward hook multiplying the module's output by the unit activity at each channel position.

    `unit_values()` returns (N, U + 1) activity as made by `with_ones` (1 kept, 0 pruned). A class, not
    a closure, so that a deep copy of a model copies its hooks along with what they read."""

    def __init__(self, point: MaskPoint) -> None:
        self.point = point
        self.units = torch.tensor(point.units, dtype=torch.long)
        self.index_on: dict[torch.device, torch.Tensor] = {}

    def unit_values(self) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, _m: nn.Module, _inp: object, out: torch.Tensor) -> torch.Tensor:
        values = self.unit_values()
        idx = self.index_on.get(values.device)
        if idx is None:
            idx = torch.where(self.units >= 0, self.units, values.shape[1] - 1).to(values.device)
            self.index_on[values.device] = idx
        shape = [1] * out.dim()
        shape[0] = values.shape[0]
        shape[self.point.axis] = idx.shape[0]
        return out * values[:, idx].to(out.dtype).view(shape)


class _FixedMask(MaskHook):
    def __init__(self, point: MaskPoint, values: torch.Tensor) -> None:
        super().__init__(point)
        self.values = values

    def unit_values(self) -> torch.Tensor:
        return self.values


@contextlib.contextmanager
def masked(model: nn.Module, graph: ChannelGraph, plan: ChannelPlan) -> Iterator[nn.Module]:
    """`model` with the plan applied as zero masks at every mask point, for the duration."""
    values = with_ones(torch.tensor(plan.unit_mask(graph), dtype=torch.float32))
    handles = [
        model.get_submodule(p.module).register_forward_hook(_FixedMask(p, values)) for p in graph.mask_points
    ]
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


__all__ = ["MaskHook", "masked", "with_ones"]
