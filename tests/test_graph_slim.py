"""Channel analysis (prunekit.graph), plans (prunekit.plan) and slimming (prunekit.surgery).

The central property: for a random plan, the physically slimmed model computes what the masked model
computes. Models are built with weights=None and then randomised (conftest.randomize), because torchvision
zero-initialises some layers and a zeroed branch would hide any error in it. The whole zoo runs in
benchmarks/coverage.py (docs/coverage.md).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize
from torch import nn
from torchvision.ops.misc import SqueezeExcitation

from prunekit.errors import ConfigError
from prunekit.graph import ChannelGraph, ChannelGroup, ModuleSlice, analyze
from prunekit.masking import masked
from prunekit.measure import count_macs, count_params
from prunekit.models import build_model, last_linear
from prunekit.plan import (
    NO_ROUNDING,
    ChannelPlan,
    Rounding,
    fraction_plan,
    full_plan,
    random_plan,
    round_units,
)
from prunekit.surgery import slim_

RTOL = 1e-4  # max |slim - masked| <= RTOL * max |masked|
KEEP = 0.5  # random plans keep about half of every group

# The fast subset: one model per family of channel structure (torchvision test-harness style: one dict
# of per-model overrides, small inputs, weights=None).
FAST = [
    "resnet18",  # residual adds
    "resnet50",  # bottlenecks, projection shortcuts
    "mobilenet_v2",  # depthwise convs, inverted residuals
    "mobilenet_v3_small",  # squeeze-excitation multiply, hardswish
    "efficientnet_b0",  # SE with SiLU, stochastic depth
    "densenet121",  # concatenation
    "regnet_x_400mf",  # grouped convs
    "shufflenet_v2_x0_5",  # chunk + concat + channel shuffle
    "convnext_tiny",  # LayerNorm2d, layer scale parameters, 7x7 depthwise
    "vgg11_bn",  # flatten into Linear after AdaptiveAvgPool2d(7)
    "googlenet",  # inception concatenation, input transform
]
INPUT_SIZE: dict[str, int] = {"convnext_tiny": 32, "vgg11_bn": 32}  # default 64
# Plan seeds, default (0, 1); vgg11_bn (133M parameters to copy) is the slowest.
SEEDS: dict[str, tuple[int, ...]] = {"vgg11_bn": (0,)}


@dataclass(frozen=True)
class Analysed:
    name: str
    model: nn.Module  # never changed by the tests: slimming works on copies
    x: torch.Tensor  # a batch of 2
    graph: ChannelGraph


def analysed(name: str, size: int | None = None) -> Analysed:
    size = size or INPUT_SIZE.get(name, 64)
    model = randomize(build_model(name), seed=0)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    return Analysed(name, model, x, analyze(model, x))


@pytest.fixture(scope="module", params=FAST, ids=str)
def zoo(request: pytest.FixtureRequest) -> Analysed:
    """One fast-subset model at a time (module scope: pytest runs all tests of one model together)."""
    return analysed(request.param)


def slim_and_compare(a: Analysed, plan: ChannelPlan) -> tuple[nn.Module, torch.Tensor]:
    """Slim a copy of `a.model` with `plan`; assert it equals the masked model. Returns (slim, masked out)."""
    with torch.no_grad(), masked(a.model, a.graph, plan):
        reference = a.model(a.x)
    slim = slim_(copy.deepcopy(a.model), a.graph, plan)
    with torch.no_grad():
        out = slim(a.x)
    assert out.shape == reference.shape
    diff, peak = (out - reference).abs().max().item(), reference.abs().max().item()
    assert diff <= RTOL * peak, f"{a.name}: max |slim - masked| {diff:.3g} > {RTOL} * max |masked| {peak:.3g}"
    return slim, reference


def module_slice(graph: ChannelGraph, name: str) -> ModuleSlice:
    return next(s for s in graph.module_slices if s.module == name)


def group_named(graph: ChannelGraph, name: str) -> ChannelGroup:
    return next(g for g in graph.groups if g.name == name)


def groups_of(graph: ChannelGraph, units: tuple[int, ...]) -> set[str]:
    return {graph.groups[graph.unit_group[u]].name for u in units if u >= 0}


# -- the exactness property on the fast subset --------------------------------------------------------


def test_slim_equals_masked(zoo: Analysed) -> None:
    graph = zoo.graph
    assert graph.groups, "nothing prunable"
    one = zoo.x[:1]
    full_macs = count_macs(zoo.model, one).total_macs
    unmodeled = full_macs - graph.macs()  # ops the graph does not model (attention matmuls...)
    assert unmodeled >= 0
    params = count_params(zoo.model)
    with torch.no_grad():
        unmasked = zoo.model(zoo.x)
    for seed in SEEDS.get(zoo.name, (0, 1)):
        plan = random_plan(graph, KEEP, seed)
        slim, reference = slim_and_compare(zoo, plan)
        # the plan changes the function: the comparison above is not between two unpruned models
        assert (reference - unmasked).abs().max() > 1e-3 * unmasked.abs().max()
        slim_macs = count_macs(slim, one).total_macs
        assert slim_macs < full_macs and count_params(slim) < params
        predicted = graph.macs(plan.unit_mask(graph)) + unmodeled
        assert slim_macs == pytest.approx(predicted, rel=0.01), f"seed {seed}"


def test_full_plan_masks_nothing(zoo: Analysed) -> None:
    with torch.no_grad():
        plain = zoo.model(zoo.x)
        with masked(zoo.model, zoo.graph, full_plan(zoo.graph)):
            reference = zoo.model(zoo.x)
    assert torch.equal(plain, reference)
    assert fraction_plan(zoo.graph, 1.0) == full_plan(zoo.graph)


def test_model_input_and_classifier_output_are_never_prunable(zoo: Analysed) -> None:
    head, _ = last_linear(zoo.model)
    assert all(u < 0 for u in module_slice(zoo.graph, head).out_units)
    first = zoo.graph.module_slices[0]  # slices are in execution order: the first layer reads the input
    assert first.kind == "conv" and all(u < 0 for u in first.in_units)
    reasons = {f.reason for f in zoo.graph.frozen}
    assert {"model input", "model output"} <= reasons


# -- analysis is pure ----------------------------------------------------------------------------------


def _hooks(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules()
    )


@pytest.mark.parametrize("mode", ["eval", "train", "mixed"])
def test_analyze_does_not_change_the_model(mode: str) -> None:
    model = randomize(build_model("mobilenet_v3_small"))  # BN, dropout, SE: state that a forward can touch
    if mode != "eval":
        model.train()
    if mode == "mixed":
        model.features.eval()
    flags = {name: m.training for name, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    params = {name: (p, p.requires_grad) for name, p in model.named_parameters()}
    x = torch.randn(2, 3, 64, 64)
    x_before = x.clone()

    first = analyze(model, x)

    assert {name: m.training for name, m in model.named_modules()} == flags
    after = model.state_dict()
    assert after.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(after[k], v), k  # BN running stats included (train mode must not update them)
    for name, p in model.named_parameters():
        assert p is params[name][0] and p.requires_grad == params[name][1] and p.grad is None
    assert _hooks(model) == 0
    assert torch.equal(x, x_before)
    assert repr(analyze(model, x)) == repr(first)  # deterministic


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_slimmed_model_keeps_its_dtype(dtype: torch.dtype) -> None:
    model = randomize(build_model("resnet18")).to(dtype)
    graph = analyze(model, torch.randn(1, 3, 32, 32, dtype=dtype))
    slim = slim_(copy.deepcopy(model), graph, random_plan(graph, KEEP, 0))
    assert {t.dtype for t in [*slim.parameters(), *slim.buffers()] if t.is_floating_point()} == {dtype}
    with torch.no_grad():
        assert slim(torch.randn(2, 3, 32, 32, dtype=dtype)).dtype == dtype


def test_masked_removes_its_hooks_even_on_error() -> None:
    a = analysed("resnet18", 32)
    plan = random_plan(a.graph, KEEP, 0)
    with pytest.raises(RuntimeError, match="boom"), masked(a.model, a.graph, plan):
        assert _hooks(a.model) == len(a.graph.mask_points) > 0
        raise RuntimeError("boom")
    assert _hooks(a.model) == 0


# -- fail closed -------------------------------------------------------------------------------------


class FailClosedNet(nn.Module):
    """Convs separated by ops that mix channels or have no rule. Groups (first producer):
    conv1 -> torch.roll over channels: no rule            -> frozen
    conv2 -> ReLU                                          -> prunable
    conv3 -> LayerNorm over channels                       -> frozen
    conv4 -> reshape to a literal channel count            -> frozen
    conv5 -> reshape(n, c // 2, 2 * h, w): channel pairs   -> prunable in pairs
    conv6 -> .cumsum(1): no rule                           -> frozen
    conv7 -> ReLU                                          -> prunable
    conv8 -> + 1.0, no module between it and conv9         -> frozen (no place for a mask)
    conv9 -> 2.0 / x: the division rule does not fit       -> frozen
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv3, self.norm3 = nn.Conv2d(16, 24, 3, padding=1), nn.LayerNorm(24)
        self.conv4, self.bn4 = nn.Conv2d(24, 32, 1), nn.BatchNorm2d(32)
        self.conv5, self.bn5 = nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.conv6 = nn.Conv2d(16, 16, 3, padding=1)
        self.conv7, self.bn7 = nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.conv8 = nn.Conv2d(32, 32, 1)
        self.conv9 = nn.Conv2d(32, 32, 1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = torch.roll(x, 1, dims=1)
        x = F.relu(self.bn2(self.conv2(x)))
        x = self.conv3(x)
        x = self.norm3(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = F.relu(self.bn4(self.conv4(x)))
        n, c, h, w = x.shape
        x = x.reshape(n, 16, 2 * h, w)
        x = F.relu(self.bn5(self.conv5(x)))
        n, c, h, w = x.shape
        x = x.reshape(n, c // 2, 2 * h, w)
        x = self.conv6(x).cumsum(1)
        x = F.relu(self.bn7(self.conv7(x)))
        x = self.conv8(x) + 1.0
        x = 2.0 / (F.relu(self.conv9(x)) + 1.0)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def test_ops_without_a_rule_freeze_their_channels_with_a_reason() -> None:
    model = randomize(FailClosedNet().eval())
    a = Analysed("FailClosedNet", model, torch.randn(2, 3, 8, 8), analyze(model, torch.randn(1, 3, 8, 8)))
    graph = a.graph
    frozen = {(f.where, f.reason) for f in graph.frozen}
    assert ("roll", "no rule for function roll") in frozen
    assert ("norm3", "LayerNorm normalises across channels") in frozen
    assert ("reshape", "reshape with a fixed size across channels") in frozen
    assert ("cumsum", "no rule for method .cumsum()") in frozen
    assert ("add", "no module to mask before conv9") in frozen
    division = "no rule fits this function truediv (ValueError: division by a tensor)"
    assert ("truediv", division) in frozen
    for conv in ("conv1", "conv3", "conv4", "conv6", "conv8", "conv9"):
        assert all(u < 0 for u in module_slice(graph, conv).out_units), conv

    # everything else is still prunable, and slims exactly
    assert [(g.name, g.units, g.unit_width) for g in graph.groups] == [
        ("conv2", 16, 1),
        ("conv5", 16, 2),  # channels 2j and 2j+1 land in one channel after the reshape
        ("conv7", 32, 1),
    ]
    for seed in range(3):
        plan = random_plan(graph, KEEP, seed, NO_ROUNDING)
        slim, _ = slim_and_compare(a, plan)
        assert count_macs(slim, a.x[:1]).total_macs == graph.macs(plan.unit_mask(graph))


class UnmaskableBeforeHead(nn.Module):
    """conv1's channels reach the head through `+ 1.0`: no module can mask them, so a pruned channel
    would still feed the head in the masked model. The head's own output is frozen (model output)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 1)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv1(x) + 1.0)


def test_dense_layer_with_a_frozen_output_still_freezes_its_unmaskable_input() -> None:
    graph = analyze(UnmaskableBeforeHead().eval(), torch.randn(1, 3, 4, 4))
    assert graph.groups == ()  # before the fix: conv1 prunable with no mask point, slim != masked
    assert ("add", "no module to mask before head") in {(f.where, f.reason) for f in graph.frozen}


class HardtanhNet(nn.Module):
    """Hardtanh maps 0 to min_val when min_val > 0: not zero-preserving."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1, self.act1 = nn.Conv2d(3, 16, 1), nn.BatchNorm2d(16), nn.Hardtanh(0.1, 1.0)
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 1), nn.BatchNorm2d(16)
        self.conv3, self.bn3 = nn.Conv2d(16, 16, 1), nn.BatchNorm2d(16)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))  # masked after the Hardtanh module
        x = F.hardtanh(self.bn2(self.conv2(x)), 0.1, 1.0)  # no module after it to mask: frozen
        x = F.hardtanh(self.bn3(self.conv3(x)))  # the usual [-1, 1]: zero-preserving
        return self.head(x)


def test_hardtanh_away_from_zero_is_not_treated_as_zero_preserving() -> None:
    model = randomize(HardtanhNet().eval())
    a = Analysed("HardtanhNet", model, torch.randn(2, 3, 4, 4), analyze(model, torch.randn(1, 3, 4, 4)))
    assert [g.name for g in a.graph.groups] == ["conv1", "conv3"]
    assert "act1" in {p.module for p in a.graph.mask_points}
    for seed in range(3):
        slim_and_compare(a, random_plan(a.graph, KEEP, seed, NO_ROUNDING))


# -- specific structures -------------------------------------------------------------------------------


def test_residual_add_couples_the_stream() -> None:
    a = analysed("resnet18", 32)
    graph = a.graph
    stream = group_named(graph, "conv1")
    writers = {"conv1", "layer1.0.conv2", "layer1.1.conv2"}
    assert set(stream.producers) == writers
    assert {"layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1", "layer2.0.downsample.0"} <= set(
        stream.consumers
    )
    units = module_slice(graph, "conv1").out_units
    assert groups_of(graph, units) == {"conv1"} and min(units) >= 0
    for bn in ("bn1", "layer1.0.bn2", "layer1.1.bn2"):  # masks after each writer's BatchNorm, same units
        assert module_slice(graph, bn).in_units == units
        assert next(p for p in graph.mask_points if p.module == bn).units == units

    slim, _ = slim_and_compare(a, random_plan(graph, KEEP, 0))
    widths = {
        slim.conv1.out_channels,
        slim.bn1.num_features,
        slim.layer1[0].conv2.out_channels,
        slim.layer1[1].conv2.out_channels,
        slim.layer1[1].conv1.in_channels,
        slim.layer2[0].downsample[0].in_channels,
    }
    assert len(widths) == 1 and widths.pop() < 64


def test_grouped_convs_keep_their_group_structure() -> None:
    a = analysed("regnet_x_400mf")
    slim, _ = slim_and_compare(a, random_plan(a.graph, KEEP, 0))
    grouped = [(n, m) for n, m in a.model.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert grouped
    fewer = 0
    for name, old in grouped:
        new = slim.get_submodule(name)
        assert new.in_channels // new.groups == old.in_channels // old.groups, name  # group width kept
        assert new.out_channels // new.groups == old.out_channels // old.groups, name
        assert new.weight.shape[1] * new.groups == new.in_channels
        fewer += new.groups < old.groups
    assert fewer > len(grouped) // 2


def test_channel_shuffle_slims_exactly() -> None:
    a = analysed("shufflenet_v2_x0_5")
    # the branch-internal widths are prunable; the shuffled stage streams are tied into coarse units
    assert group_named(a.graph, "stage2.0.branch2.0").units == 24
    assert group_named(a.graph, "stage2.0.branch1.2").unit_width > 1
    for seed in range(2, 5):  # seeds beyond the ones of test_slim_equals_masked
        slim_and_compare(a, random_plan(a.graph, KEEP, seed))


def test_flatten_into_linear_slims_whole_7x7_blocks() -> None:
    a = analysed("vgg11_bn", 32)
    fc = module_slice(a.graph, "classifier.0")
    last_conv = module_slice(a.graph, "features.25").out_units  # 512 channels, pooled to 7x7, flattened
    assert fc.in_units == tuple(u for u in last_conv for _ in range(49))
    plan = random_plan(a.graph, KEEP, 1)  # seed 0 ran in test_slim_equals_masked
    slim, _ = slim_and_compare(a, plan)
    keep = plan.unit_mask(a.graph)
    kept = [c for c, u in enumerate(last_conv) if keep[u]]
    assert slim.classifier[0].in_features == 49 * len(kept) == 49 * slim.features[25].out_channels
    rows = torch.tensor([i for i, u in enumerate(fc.out_units) if keep[u]])  # its outputs are pruned too
    columns = torch.tensor([49 * c + j for c in kept for j in range(49)])
    assert torch.equal(slim.classifier[0].weight, a.model.classifier[0].weight[rows][:, columns])


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "efficientnet_b0"])
def test_squeeze_excitation_multiply_couples_scale_and_features(name: str) -> None:
    a = analysed(name)
    blocks = [(n, m) for n, m in a.model.named_modules() if isinstance(m, SqueezeExcitation)]
    assert blocks
    for n, _ in blocks:
        fc1, fc2 = module_slice(a.graph, f"{n}.fc1"), module_slice(a.graph, f"{n}.fc2")
        assert fc2.out_units == fc1.in_units  # the scale multiplies the very channels it was computed from
        assert min(fc1.out_units) >= 0  # the squeeze width is a group of its own
        assert groups_of(a.graph, fc1.out_units).isdisjoint(groups_of(a.graph, fc1.in_units))
    slim, _ = slim_and_compare(a, random_plan(a.graph, KEEP, 0))
    for n, _ in blocks:
        se = slim.get_submodule(n)
        assert se.fc2.out_channels == se.fc1.in_channels


def test_concatenation_densenet() -> None:
    a = analysed("densenet121")
    layer1 = group_named(a.graph, "features.denseblock1.denselayer1.conv2")
    readers = {f"features.denseblock1.denselayer{i}.conv1" for i in range(2, 7)}
    assert set(layer1.consumers) == readers | {"features.transition1.conv"}
    slim, _ = slim_and_compare(a, random_plan(a.graph, KEEP, 0))
    block = slim.features.denseblock1
    assert block.denselayer3.conv1.in_channels == (
        slim.features.conv0.out_channels
        + block.denselayer1.conv2.out_channels
        + block.denselayer2.conv2.out_channels
    )


def test_concatenation_googlenet() -> None:
    a = analysed("googlenet")
    branches = ["inception3a.branch1.conv", "inception3a.branch2.1.conv"]
    branches += ["inception3a.branch3.1.conv", "inception3a.branch4.1.conv"]
    assert groups_of(a.graph, module_slice(a.graph, "inception3b.branch1.conv").in_units) == set(branches)
    slim, _ = slim_and_compare(a, random_plan(a.graph, KEEP, 0))
    widths = sum(slim.get_submodule(b).out_channels for b in branches)
    assert slim.inception3b.branch1.conv.in_channels == widths < 256


@pytest.mark.parametrize(
    ("name", "patch_embed", "mlp"),
    [
        ("vit_b_32", "conv_proj", "encoder.layers.encoder_layer_0.mlp"),
        pytest.param("swin_t", "features.0.0", "features.1.0.mlp", marks=pytest.mark.slow),
    ],
)
def test_transformer_mlp_prunable_residual_stream_frozen(name: str, patch_embed: str, mlp: str) -> None:
    a = analysed(name, 224)
    assert all(u < 0 for u in module_slice(a.graph, patch_embed).out_units)  # the residual stream
    assert "LayerNorm normalises across channels" in {f.reason for f in a.graph.frozen}
    hidden = module_slice(a.graph, f"{mlp}.0").out_units
    assert min(hidden) >= 0 and groups_of(a.graph, hidden) == {f"{mlp}.0"}
    assert all(g.name.endswith("mlp.0") for g in a.graph.groups)
    slim, _ = slim_and_compare(a, random_plan(a.graph, KEEP, 0))
    fc1, fc2 = slim.get_submodule(f"{mlp}.0"), slim.get_submodule(f"{mlp}.3")
    assert fc1.out_features == fc2.in_features < a.model.get_submodule(f"{mlp}.0").out_features


# -- plans ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_graph() -> ChannelGraph:
    return analyze(build_model("resnet18"), torch.randn(1, 3, 32, 32))


def test_plan_json_round_trip(small_graph: ChannelGraph, tmp_path: Path) -> None:
    plan = random_plan(small_graph, KEEP, 3)
    path = tmp_path / "plan.json"
    plan.save(path)
    data = json.loads(path.read_text())
    assert data["format"] == "prunekit-plan" and len(data["groups"]) == len(small_graph.groups)
    loaded = ChannelPlan.load(path)
    assert loaded == plan and loaded.unit_mask(small_graph) == plan.unit_mask(small_graph)
    assert ChannelPlan.from_dict(plan.to_dict()) == plan


def test_plan_for_another_model_is_rejected(small_graph: ChannelGraph) -> None:
    other = analyze(build_model("resnet34"), torch.randn(1, 3, 32, 32))
    plan = random_plan(other, KEEP, 0)
    model = build_model("resnet18")
    with pytest.raises(ConfigError, match="does not fit"):
        plan.unit_mask(small_graph)
    with pytest.raises(ConfigError, match="does not fit"):
        slim_(model, small_graph, plan)
    with pytest.raises(ConfigError, match="does not fit"), masked(model, small_graph, plan):
        pass
    # same group names, one group of another size
    data = random_plan(small_graph, KEEP, 0).to_dict()
    data["groups"][0]["units"] += 8
    with pytest.raises(ConfigError, match="does not fit"):
        ChannelPlan.from_dict(data).unit_mask(small_graph)


def _group(units: int, unit_width: int = 1) -> ChannelGroup:
    return ChannelGroup(0, "g", 0, units, units * unit_width, ("g",), (), 0)


@pytest.mark.parametrize(("units", "unit_width"), [(64, 1), (20, 1), (100, 1), (32, 2), (12, 16), (4, 8)])
def test_round_units_gives_multiples_of_8_channels(units: int, unit_width: int) -> None:
    group = _group(units, unit_width)
    step = max(1, 8 // unit_width)  # units per 8 channels
    for wanted in range(1, units + 1):
        n = round_units(group, wanted)
        assert 1 <= n <= units
        assert n * unit_width >= min(8, units * unit_width)  # minimum width
        if n < units:
            assert (n * unit_width) % 8 == 0, (wanted, n)
            assert abs(n - max(wanted, 8 // unit_width)) <= step / 2, (wanted, n)
    assert round_units(group, units) == units  # all of a group stays all of it


def test_round_units_minimum_width_and_small_groups() -> None:
    assert round_units(_group(64), 1) == 8
    assert round_units(_group(64), 1, Rounding(min_channels=24)) == 24
    assert round_units(_group(64), 30) == 32
    assert round_units(_group(64), 30, Rounding(round_to=1)) == 30
    assert round_units(_group(12), 3) == 8  # too small to round to 8, still at least 8 channels
    assert round_units(_group(6), 1) == 6  # smaller than the minimum: kept whole
    assert round_units(_group(20), 19) == 20  # the whole group is nearer than 16
    assert round_units(_group(20), 17) == 16


def _plan_json(groups: str) -> str:
    return '{"format": "prunekit-plan", "version": 1, "groups": ' + groups + "}"


@pytest.mark.parametrize(
    "content",
    [
        "",
        "{",
        "null",
        "[]",
        '{"format": "something-else", "version": 1, "groups": []}',
        '{"format": "prunekit-plan", "version": 99, "groups": []}',
        '{"format": "prunekit-plan", "version": 1}',
        _plan_json('{"a": 1}'),
        _plan_json('["conv1"]'),
        _plan_json('[{"name": "conv1", "units": 64}]'),
        _plan_json('[{"name": "conv1", "units": 64, "keep": []}]'),
        _plan_json('[{"name": "conv1", "units": 64, "keep": [64]}]'),
        _plan_json('[{"name": "conv1", "units": 64, "keep": [-1]}]'),
        _plan_json('[{"name": "conv1", "units": 64, "keep": 3}]'),
        _plan_json('[{"name": "conv1", "units": 64, "keep": [1.5]}]'),
        _plan_json('[{"name": "conv1", "units": 64, "keep": [true]}]'),
        _plan_json('[{"name": "conv1", "units": "x", "keep": [1]}]'),
    ],
    ids=lambda c: c[-40:] or "empty",
)
def test_malformed_plan_file_is_a_config_error(tmp_path: Path, content: str) -> None:
    path = tmp_path / "plan.json"
    path.write_text(content)
    with pytest.raises(ConfigError):
        ChannelPlan.load(path)


def test_unreadable_plan_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        ChannelPlan.load(tmp_path / "missing.json")
    with pytest.raises(ConfigError):
        ChannelPlan.load(tmp_path)  # a directory
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError):
        ChannelPlan.load(tmp_path / "binary.json")
