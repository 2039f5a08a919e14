"""Channel plans: which units of each channel group stay. Pure data, stored as JSON.

A plan is tied to the graph it was made for by group names and unit counts; applying it to another
model is an error, not a silent mismatch.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prunekit.errors import ConfigError
from prunekit.graph import ChannelGraph, ChannelGroup

if TYPE_CHECKING:
    from torch import nn

PLAN_FORMAT = "prunekit-plan"
PLAN_VERSION = 1


@dataclass(frozen=True)
class ChannelPlan:
    """`keep[g]`: sorted local unit indices kept in group g (same order as `graph.groups`)."""

    group_names: tuple[str, ...]
    group_units: tuple[int, ...]
    keep: tuple[tuple[int, ...], ...]

    def unit_mask(self, graph: ChannelGraph) -> list[bool]:
        """Global per-unit keep flags for `graph` (validated)."""
        self.check_fits(graph)
        mask = [False] * graph.num_units
        for group, kept in zip(graph.groups, self.keep, strict=True):
            for k in kept:
                mask[group.offset + k] = True
        return mask

    def check_fits(self, graph: ChannelGraph) -> None:
        names = tuple(g.name for g in graph.groups)
        units = tuple(g.units for g in graph.groups)
        if names != self.group_names or units != self.group_units:
            raise ConfigError(
                f"the plan does not fit this model: it has {len(self.group_names)} channel groups, "
                f"the model {len(names)} (or their names/sizes differ)"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "groups": [
                {"name": n, "units": u, "keep": list(k)}
                for n, u, k in zip(self.group_names, self.group_units, self.keep, strict=True)
            ],
        }

    @classmethod
    def from_dict(cls, data: Any) -> ChannelPlan:
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise ConfigError(f"not a prunekit channel plan (expected format {PLAN_FORMAT!r})")
        if data.get("version") != PLAN_VERSION:
            raise ConfigError(f"unsupported plan version {data.get('version')!r}")
        try:
            groups = data["groups"]
            if not isinstance(groups, list):
                raise TypeError(f"'groups' must be a list, got {type(groups).__name__}")
            names = tuple(str(g["name"]) for g in groups)
            units = tuple(_integer(g["units"], "units") for g in groups)
            keep = tuple(tuple(sorted({_integer(k, "keep") for k in g["keep"]})) for g in groups)
        except KeyError as exc:
            raise ConfigError(f"malformed channel plan: missing key {exc}") from exc
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"malformed channel plan: {exc}") from exc
        for name, n, kept in zip(names, units, keep, strict=True):
            if not kept:
                raise ConfigError(f"plan keeps no channel of group {name}")
            if kept[0] < 0 or kept[-1] >= n:
                raise ConfigError(f"plan keeps unit {kept[-1]} of group {name}, which has {n}")
        return cls(names, units, keep)

    def save(self, path: Path) -> None:
        from prunekit.fileio import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> ChannelPlan:
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"plan file not found: {path}") from exc
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read plan {path}: {exc}") from exc
        return cls.from_dict(data)


def _integer(value: Any, what: str) -> int:
    """JSON integers only: 1.5 or true as a unit index is a broken file, not something to truncate."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be integers, got {value!r}")
    return value


def full_plan(graph: ChannelGraph) -> ChannelPlan:
    return _plan(graph, [tuple(range(g.units)) for g in graph.groups])


def _plan(graph: ChannelGraph, keep: Sequence[Sequence[int]]) -> ChannelPlan:
    return ChannelPlan(
        tuple(g.name for g in graph.groups),
        tuple(g.units for g in graph.groups),
        tuple(tuple(sorted(k)) for k in keep),
    )


@dataclass(frozen=True)
class Rounding:
    """How plan makers round widths: to multiples of `round_to` channels (hardware-friendly widths) and
    never below `min_channels` channels. One value for every plan maker, as Torch-Pruning's `round_to`."""

    round_to: int = 8
    min_channels: int = 8

    def __post_init__(self) -> None:
        if self.round_to < 1 or self.min_channels < 1:
            raise ConfigError(
                f"round_to and min_channels must be >= 1, got {self.round_to}, {self.min_channels}"
            )


NO_ROUNDING = Rounding(1, 1)


def round_units(group: ChannelGroup, wanted: int, rounding: Rounding = Rounding()) -> int:
    """Units to keep: `wanted` rounded to the nearest multiple of `round_to` channels where the group is
    large enough (or to the whole group, the original width, when that is nearer), at least `min_channels`
    channels (or the whole group if smaller), at least one unit."""
    round_to, min_channels = rounding.round_to, rounding.min_channels
    width = group.unit_width
    step = max(1, math.ceil(round_to / width)) if group.units * width >= 2 * round_to else 1
    floor_units = min(group.units, max(1, math.ceil(min_channels / width)))
    n = max(wanted, floor_units)
    if step > 1:
        rounded = int(round(n / step)) * step
        # A group whose width is no multiple of `round_to` (20 channels) must still be kept whole when
        # asked for all of it, not rounded down to 16.
        if rounded > group.units or group.units - n < abs(n - rounded):
            rounded = group.units
        n = rounded
    n = max(n, min(step, group.units), floor_units)
    return min(n, group.units)


def plan_from_scores(
    graph: ChannelGraph,
    scores: Sequence[float],
    counts: Sequence[int],
    rounding: Rounding = Rounding(),
) -> ChannelPlan:
    """Keep, in each group, its `counts[g]` (after rounding) highest-scoring units."""
    if len(scores) != graph.num_units:
        raise ConfigError(f"{len(scores)} scores for {graph.num_units} units")
    keep = []
    for group, wanted in zip(graph.groups, counts, strict=True):
        n = round_units(group, wanted, rounding)
        local = sorted(range(group.units), key=lambda k: (-scores[group.offset + k], k))
        keep.append(local[:n])
    return _plan(graph, keep)


def fraction_plan(
    graph: ChannelGraph,
    fraction: float,
    scores: Sequence[float] | None = None,
    rounding: Rounding = Rounding(),
) -> ChannelPlan:
    """Keep about `fraction` of every group, the highest-scoring units first (default: the first ones)."""
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"keep fraction must be in (0, 1], got {fraction}")
    scores = scores if scores is not None else [-float(u) for u in range(graph.num_units)]
    counts = [max(1, round(g.units * fraction)) for g in graph.groups]
    return plan_from_scores(graph, scores, counts, rounding)


def random_plan(
    graph: ChannelGraph, fraction: float, seed: int = 0, rounding: Rounding = Rounding()
) -> ChannelPlan:
    """Keep about `fraction` of every group, chosen at random (tests and baselines)."""
    rng = random.Random(seed)
    scores = [rng.random() for _ in range(graph.num_units)]
    return fraction_plan(graph, fraction, scores, rounding)


def magnitude_scores(model: nn.Module, graph: ChannelGraph) -> list[float]:
    """Importance of every unit: mean |BatchNorm scale| over its BN positions where it has any, else the
    mean L2 norm of the filters that produce it (the classic magnitude criteria)."""
    import torch

    bn_sum = [0.0] * graph.num_units
    bn_n = [0] * graph.num_units
    w_sum = [0.0] * graph.num_units
    w_n = [0] * graph.num_units
    with torch.no_grad():
        for s in graph.module_slices:
            m = model.get_submodule(s.module)
            if s.kind == "batchnorm" and getattr(m, "weight", None) is not None:
                values = m.weight.detach().abs().float().cpu().tolist()
                for u, v in zip(s.in_units, values, strict=True):
                    if u >= 0:
                        bn_sum[u] += v
                        bn_n[u] += 1
            elif s.kind in ("conv", "linear", "conv_blockwise"):
                norms = m.weight.detach().float().flatten(1).norm(dim=1).cpu().tolist()
                for u, v in zip(s.out_units, norms, strict=True):
                    if u >= 0:
                        w_sum[u] += v
                        w_n[u] += 1
    return [
        bn_sum[u] / bn_n[u] if bn_n[u] else (w_sum[u] / w_n[u] if w_n[u] else 0.0)
        for u in range(graph.num_units)
    ]


def l1_scores(model: nn.Module, graph: ChannelGraph) -> list[float]:
    """Importance of every unit by group L1 magnitude: the summed |weight| of everything the unit
    touches, the filters that produce it, the input slices of the layers that consume it, and its
    BatchNorm scales. This is the group criterion of Torch-Pruning's GroupMagnitudeImportance (p=1),
    which ranks channels better than the BatchNorm scale alone on short fine-tuning (docs/recipe.md)."""
    import torch

    score = [0.0] * graph.num_units
    with torch.no_grad():
        for s in graph.module_slices:
            weight = getattr(model.get_submodule(s.module), "weight", None)
            if not isinstance(weight, torch.Tensor):
                continue
            w = weight.detach().abs().float()
            if s.kind == "batchnorm":
                pairs = [(s.in_units, w)]
            elif s.kind in ("conv", "linear"):
                pairs = [
                    (s.out_units, w.flatten(1).sum(1)),
                    (s.in_units, w.transpose(0, 1).flatten(1).sum(1)),
                ]
            else:  # conv_blockwise: each output channel's own filter
                pairs = [(s.out_units, w.flatten(1).sum(1))]
            for units, values in pairs:
                for u, v in zip(units, values.cpu().tolist(), strict=True):
                    if u >= 0:
                        score[u] += v
    return score


def taylor_scores(model: nn.Module, graph: ChannelGraph) -> list[float]:
    """Importance of every unit by group first-order Taylor expansion: the summed |weight * grad| of
    everything the unit touches (as `l1_scores` sums |weight|), from the gradients the model's
    parameters hold (`taylor_importance` fills them from a few batches of data). This is the
    criterion of Torch-Pruning's GroupTaylorImportance: the loss change to first order when a unit's
    weights go to zero."""
    import torch

    score = [0.0] * graph.num_units
    with torch.no_grad():
        for s in graph.module_slices:
            module = model.get_submodule(s.module)
            terms = []
            for name in ("weight", "bias") if s.kind == "batchnorm" else ("weight",):
                p = getattr(module, name, None)
                if isinstance(p, torch.Tensor) and p.grad is not None:
                    terms.append((p.detach() * p.grad.detach()).abs().float())
            for w in terms:
                if s.kind == "batchnorm":
                    pairs = [(s.in_units, w)]
                elif s.kind in ("conv", "linear"):
                    pairs = [
                        (s.out_units, w.flatten(1).sum(1)),
                        (s.in_units, w.transpose(0, 1).flatten(1).sum(1)),
                    ]
                else:
                    pairs = [(s.out_units, w.flatten(1).sum(1))]
                for units, values in pairs:
                    for u, v in zip(units, values.cpu().tolist(), strict=True):
                        if u >= 0:
                            score[u] += v
    return score


def taylor_importance(
    model: nn.Module, graph: ChannelGraph, batches: Any, n_batches: int, device: Any = None
) -> list[float]:
    """`taylor_scores` from the cross-entropy gradients of the first `n_batches` (x, y) batches of
    `batches`, summed. They are computed on a copy in train mode (BatchNorm on batch statistics, as
    fine-tuning will run) on `device` (default: the model's), so the model itself keeps its weights,
    statistics and empty gradients."""
    import copy

    import torch
    import torch.nn.functional as F

    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    work = copy.deepcopy(model).to(device).train()
    work.zero_grad(set_to_none=True)
    seen = 0
    for x, y in batches:
        if seen >= n_batches:
            break
        F.cross_entropy(work(x.to(device)), y.to(device)).backward()
        seen += 1
    if seen == 0:
        raise ConfigError("importance taylor needs training batches: the data gave none")
    return taylor_scores(work, graph)


# GateConfig.importance -> unit scores from the weights alone; "taylor" needs data (taylor_importance)
IMPORTANCE = {"l1": l1_scores, "bn": magnitude_scores}


def magnitude_plan(
    model: nn.Module, graph: ChannelGraph, fraction: float, rounding: Rounding = Rounding()
) -> ChannelPlan:
    """Keep about `fraction` of every group, largest magnitude first (a baseline to compare with)."""
    return fraction_plan(graph, fraction, magnitude_scores(model, graph), rounding)


def group_widths(graph: ChannelGraph, plan: ChannelPlan | None) -> list[dict[str, Any]]:
    """Channels per group before and after `plan` (None: nothing removed), one row per group."""
    kept = plan.keep if plan is not None else [range(g.units) for g in graph.groups]
    return [
        {"group": g.name, "before": g.channels, "after": len(k) * g.unit_width, "units": g.units}
        for g, k in zip(graph.groups, kept, strict=True)
    ]


def is_full(graph: ChannelGraph, plan: ChannelPlan) -> bool:
    """Whether `plan` keeps every unit (slimming by it removes nothing)."""
    return all(len(k) == g.units for g, k in zip(graph.groups, plan.keep, strict=True))


def plan_from_units(graph: ChannelGraph, keep: Sequence[bool]) -> ChannelPlan:
    """The plan keeping exactly the given units (e.g. the units whose gates are open)."""
    if len(keep) != graph.num_units:
        raise ConfigError(f"{len(keep)} unit decisions for {graph.num_units} units")
    kept = [[k for k in range(g.units) if keep[g.offset + k]] for g in graph.groups]
    for group, k in zip(graph.groups, kept, strict=True):
        if not k:
            raise ConfigError(f"the decisions keep no channel of group {group.name}; a layer cannot be empty")
    return _plan(graph, kept)


__all__ = [
    "NO_ROUNDING",
    "ChannelPlan",
    "Rounding",
    "fraction_plan",
    "full_plan",
    "group_widths",
    "is_full",
    "magnitude_plan",
    "IMPORTANCE",
    "l1_scores",
    "magnitude_scores",
    "plan_from_scores",
    "taylor_importance",
    "taylor_scores",
    "plan_from_units",
    "random_plan",
    "round_units",
]
