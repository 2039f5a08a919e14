"""Gumbel gates (straight-through sampling, eval decisions, layouts, hooks) and the MAC objective."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import randomize
from torch import nn

from prunekit.errors import ConfigError
from prunekit.gates import (
    GATES_ATTR,
    GateBank,
    GateConfig,
    gate_bank_from_description,
    get_gates,
    insert_gates_,
    make_layout,
    remove_gates_,
    sample_gates,
)
from prunekit.graph import ChannelGraph, analyze
from prunekit.measure import count_macs
from prunekit.models import build_model
from prunekit.objective import MacModel, activation_loss, target_to_budget
from prunekit.plan import l1_scores, plan_from_units, taylor_importance
from prunekit.surgery import slim_


def _model_graph(arch: str, size: int) -> tuple[nn.Module, ChannelGraph, torch.Tensor]:
    """A model with random weights and BatchNorm statistics (nothing zeroed that could hide an error)."""
    model = randomize(build_model(arch, 10), seed=0).eval()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    return model, analyze(model, x[:1]), x


@pytest.fixture(scope="module")
def r18() -> tuple[nn.Module, ChannelGraph, torch.Tensor]:
    return _model_graph("resnet18", 32)


@pytest.fixture(scope="module")
def mbv2() -> tuple[nn.Module, ChannelGraph, torch.Tensor]:
    return _model_graph("mobilenet_v2", 64)


@pytest.fixture(scope="module")
def alexnet() -> tuple[nn.Module, ChannelGraph, torch.Tensor]:
    """Flatten into Linear: one channel feeds 36 inputs of the first classifier layer."""
    return _model_graph("alexnet", 64)


def _bank(graph: ChannelGraph, seed: int = 0) -> GateBank:
    """A bank whose learnable gates are randomly open or closed (margin +-2)."""
    config = GateConfig()
    bank = GateBank(make_layout(graph, config), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bank.logits[:, 0] = 0.0
        bank.logits[:, 1] = torch.where(torch.rand(bank.num_gates, generator=g) < 0.5, -2.0, 2.0)
    return bank


# -- straight-through Gumbel ------------------------------------------------------------------------


def test_sample_gates_forward_is_binary_and_gradients_flow() -> None:
    torch.manual_seed(0)
    logits = torch.randn(64, 2, requires_grad=True)
    values = sample_gates(logits.unsqueeze(0).expand(16, -1, -1), tau=1.0)
    assert values.shape == (16, 64)
    assert set(values.unique().tolist()) == {0.0, 1.0}  # exactly 0/1, both seen
    weights = torch.randn(16, 64)
    (values * weights).sum().backward()
    assert logits.grad is not None
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad.abs().sum(1) > 0).float().mean() > 0.9  # (almost) every gate gets a gradient
    assert torch.allclose(logits.grad.sum(1), torch.zeros(64), atol=1e-5)  # softmax: d/d_off = -d/d_on


def test_sample_gates_follow_the_logits() -> None:
    torch.manual_seed(0)
    logits = torch.tensor([[0.0, 6.0], [6.0, 0.0], [0.0, 0.0]])
    mean = sample_gates(logits.unsqueeze(0).expand(4000, -1, -1), tau=1.0).mean(0)
    assert mean[0] > 0.99 and mean[1] < 0.01
    assert abs(mean[2] - 0.5) < 0.05


def test_eval_gate_values_are_deterministic_decisions(r18) -> None:
    _, graph, _ = r18
    bank = _bank(graph).eval()
    first, second = bank.gate_values(5), bank.gate_values(3)
    assert torch.equal(first, second)
    assert first.shape == (1, bank.num_gates)
    assert torch.equal(first[0], bank.decisions().float())
    decisions = bank.decisions()
    learnable = ~bank.fixed_on
    on = bank.logits[:, 1] > bank.logits[:, 0]
    assert torch.equal(decisions[learnable], on[learnable])
    assert 0 < int(decisions[learnable].sum()) < int(learnable.sum())  # both states present


def test_train_gate_values_are_sampled_per_example(r18) -> None:
    _, graph, _ = r18
    bank = GateBank(make_layout(graph, GateConfig()), GateConfig()).train()
    with torch.no_grad():
        bank.logits.zero_()  # P(on) = 0.5: samples differ between examples
    torch.manual_seed(0)
    values = bank.gate_values(4)
    assert values.shape == (4, bank.num_gates)
    assert not torch.equal(values[0], values[1])


def test_fixed_gates_are_always_on(r18) -> None:
    _, graph, _ = r18
    config = GateConfig(min_keep=0.25)
    bank = GateBank(make_layout(graph, config), config)
    with torch.no_grad():
        bank.logits[:, 0] = 20.0  # every gate strongly off
        bank.logits[:, 1] = -20.0
    fixed = bank.fixed_on
    assert fixed.any() and not fixed.all()
    torch.manual_seed(0)
    sampled = bank.train().gate_values(32)
    assert (sampled[:, fixed] == 1).all()
    assert (sampled[:, ~fixed] == 0).all()
    assert torch.equal(bank.decisions(), fixed)
    assert torch.equal(bank.eval().gate_values(1)[0], fixed.float())
    # P(on) per gate at temperature 1 (fixed gates: 1), from the logits: the sampled frequencies follow it
    p_on = torch.where(fixed, 1.0, torch.softmax(bank.logits.detach(), dim=-1)[:, 1])
    assert torch.equal(p_on[fixed], torch.ones(int(fixed.sum())))
    assert float(p_on[~fixed].max()) < 1e-6
    torch.testing.assert_close(sampled.mean(0), p_on, rtol=0, atol=1e-6)


def test_fixed_decisions_survive_train_mode(r18) -> None:
    """After `fix_` the bank gives its decisions in train mode too: `model.train()` never turns the
    Gumbel sampling back on, and the decided flag travels in the state_dict."""
    model, graph, x = r18
    model = copy.deepcopy(model)
    bank = GateBank(make_layout(graph, GateConfig()), GateConfig())
    with torch.no_grad():
        bank.logits.zero_()  # P(on) = 0.5: sampling would show
    insert_gates_(model, graph, bank)
    model.train()
    torch.manual_seed(0)
    assert bank.sampling and not bank.is_decided
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))  # sampled gates before the decision

    states = torch.rand(bank.num_gates, generator=torch.Generator().manual_seed(0)) < 0.5
    bank.fix_(states)
    model.train()
    expected = states | bank.fixed_on
    assert bank.training and bank.is_decided and not bank.sampling
    assert torch.equal(bank.decisions(), expected) and 0 < int(expected.sum()) < bank.num_gates
    assert torch.equal(bank.gate_values(4), expected.float().unsqueeze(0))
    with torch.no_grad():
        first, second = model(x), model(x)
    torch.testing.assert_close(first, second, rtol=0, atol=0)

    state = model.state_dict()
    assert bool(state[f"{GATES_ATTR}.decided"])
    fresh = GateBank(make_layout(graph, GateConfig()), GateConfig())
    fresh.load_state_dict(
        {k.removeprefix(f"{GATES_ATTR}."): v for k, v in state.items() if k.startswith(GATES_ATTR)}
    )
    fresh.train()
    assert fresh.is_decided and not fresh.sampling
    assert torch.equal(fresh.gate_values(4), expected.float().unsqueeze(0))


# -- expected MACs ----------------------------------------------------------------------------------


def _ungateable(graph: ChannelGraph) -> float:
    return float(sum(t.macs() for t in graph.mac_terms if not t.prunable))


@pytest.mark.parametrize("fixture", ["r18", "mbv2", "alexnet"])
def test_mac_model_all_open_matches_fvcore(fixture: str, request: pytest.FixtureRequest) -> None:
    model, graph, x = request.getfixturevalue(fixture)
    mac_model = MacModel(graph)
    gateable = float(mac_model(torch.ones(3, graph.num_units))[0])
    assert gateable == pytest.approx(mac_model.gateable_macs)
    fvcore = count_macs(model, x[:1]).total_macs
    assert gateable + _ungateable(graph) == pytest.approx(fvcore, rel=0.01)
    assert gateable > 0.5 * fvcore  # most of the model is gateable


@pytest.mark.parametrize("fixture", ["r18", "mbv2", "alexnet"])
def test_mac_model_closed_gates_match_the_slimmed_model(fixture: str, request: pytest.FixtureRequest) -> None:
    model, graph, x = request.getfixturevalue(fixture)
    mac_model = MacModel(graph)
    bank = _bank(graph, seed=3)
    keep = bank.unit_values(bank.decisions().float().unsqueeze(0))  # (1, U)
    assert 0 < keep.mean() < 1
    expected = float(mac_model(keep)[0]) + _ungateable(graph)
    slim = slim_(copy.deepcopy(model), graph, plan_from_units(graph, keep[0].bool().tolist()))
    full = count_macs(model, x[:1]).total_macs
    slimmed = count_macs(slim, x[:1]).total_macs
    assert slimmed < 0.9 * full
    assert expected == pytest.approx(slimmed, rel=0.01)


def test_mac_model_is_bilinear_in_adjacent_groups(r18) -> None:
    """Halving every unit halves conv-to-conv MACs twice over: the loss is FLOP-weighted."""
    _, graph, _ = r18
    mac_model = MacModel(graph)
    half = float(mac_model(torch.full((1, graph.num_units), 0.5))[0])
    dense = sum(t.macs() for t in graph.mac_terms if t.kind == "bilinear" and t.prunable)
    assert half < 0.5 * mac_model.gateable_macs  # quadratic terms fall faster than linearly
    assert half >= 0.25 * dense * 0.99
    # exactly: the vectorised model equals the per-term formula (n_in * n_out * factor, or n * factor)
    activity = torch.rand(3, graph.num_units, generator=torch.Generator().manual_seed(0))
    for row in range(3):
        expected = sum(t.macs(lambda u, r=row: float(activity[r, u])) for t in graph.mac_terms if t.prunable)
        assert float(mac_model(activity)[row]) == pytest.approx(expected, rel=1e-5)
    assert float(mac_model(torch.full((1, graph.num_units), 0.5))[0]) == pytest.approx(
        sum(t.macs(lambda u: 0.5) for t in graph.mac_terms if t.prunable), rel=1e-6
    )


def test_mac_model_gradient_reaches_units(r18) -> None:
    _, graph, _ = r18
    mac_model = MacModel(graph)
    a = torch.ones(2, graph.num_units, requires_grad=True)
    b = mac_model(a) / mac_model.gateable_macs
    activation_loss(b, 0.5).backward()
    assert a.grad is not None and (a.grad > 0).float().mean() > 0.9  # lowering any unit lowers the loss


def test_activation_loss_one_sided() -> None:
    b = torch.tensor([0.3, 0.5])  # mean 0.4
    assert float(activation_loss(b, 0.5)) == pytest.approx(0.01)
    assert float(activation_loss(b, 0.5, one_sided=True)) == 0.0
    assert float(activation_loss(b, 0.2, one_sided=True)) == pytest.approx(0.04)


# -- target -> budget -------------------------------------------------------------------------------


def test_target_to_budget_math() -> None:
    budget = target_to_budget(0.5, total_macs=100.0, gateable_macs=80.0, min_fraction=0.1)
    assert budget.fixed_macs == pytest.approx(20.0)
    assert budget.t == pytest.approx((50.0 - 20.0) / 80.0)
    assert budget.total_fraction(budget.t) == pytest.approx(0.5)
    assert budget.total_fraction(1.0) == pytest.approx(1.0)
    everything = target_to_budget(0.3, total_macs=10.0, gateable_macs=10.0, min_fraction=0.0)
    assert everything.t == pytest.approx(0.3)


@pytest.mark.parametrize("target", [0.0, 1.0, 1.5, -0.2])
def test_target_out_of_range(target: float) -> None:
    with pytest.raises(ConfigError, match=r"target_macs must be between 0 and 1") as err:
        target_to_budget(target, 100.0, 80.0, 0.1)
    assert "\n" not in str(err.value)


def test_target_out_of_reach_names_the_minimum() -> None:
    # fixed 20 + 0.1 * 80 = 28 of 100: 0.25 cannot be reached
    with pytest.raises(ConfigError, match=r"out of reach.*at least 0\.280.*min_keep") as err:
        target_to_budget(0.25, 100.0, 80.0, 0.1)
    assert "\n" not in str(err.value)
    assert target_to_budget(0.29, 100.0, 80.0, 0.1).t == pytest.approx(0.1125)


def test_nothing_gateable() -> None:
    with pytest.raises(ConfigError, match="nothing in this model can be gated"):
        target_to_budget(0.5, 100.0, 0.0, 0.0)


# -- layout -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("granularity", [1, 8, 16])
def test_layout_granularity(r18, granularity: int) -> None:
    _, graph, _ = r18
    layout = make_layout(graph, GateConfig(granularity=granularity))
    assert len(layout.unit_gate) == graph.num_units
    assert len(layout.fixed_on) == layout.num_gates
    for group in graph.groups:
        per_gate = max(1, math.ceil(granularity / group.unit_width))
        gates = [layout.unit_gate[group.offset + k] for k in range(group.units)]
        sizes = [gates.count(g) for g in sorted(set(gates))]
        assert len(sizes) == math.ceil(group.units / per_gate)
        assert all(s == per_gate for s in sizes[:-1]) and 1 <= sizes[-1] <= per_gate
        assert {layout.gate_group[g] for g in gates} == {group.index}
    # resnet18 widths are multiples of 16: granularity 8 gives 8 channels per gate everywhere
    if granularity == 8:
        assert layout.num_gates == sum(g.channels for g in graph.groups) // 8


def test_layout_first_gate_of_each_group_fixed(r18) -> None:
    _, graph, _ = r18
    layout = make_layout(graph, GateConfig(granularity=8, min_keep=0.0))
    first = {}
    for gate, group in enumerate(layout.gate_group):
        first.setdefault(group, gate)
    assert set(first) == {g.index for g in graph.groups}
    assert all(layout.fixed_on[g] for g in first.values())
    assert sum(layout.fixed_on) == len(graph.groups)  # min_keep 0: only the first


@pytest.mark.parametrize("min_keep", [0.25, 0.5, 0.9])
def test_layout_min_keep(r18, min_keep: float) -> None:
    _, graph, _ = r18
    layout = make_layout(graph, GateConfig(granularity=8, min_keep=min_keep))
    for group in graph.groups:
        units = range(group.offset, group.offset + group.units)
        kept = sum(layout.fixed_on[layout.unit_gate[u]] for u in units)
        assert kept >= min_keep * group.units
        assert kept < min_keep * group.units + 8  # not more than one gate beyond the minimum


def test_layout_groups_units_by_importance(r18) -> None:
    _, graph, _ = r18
    importance = [float((u * 7919) % 97) for u in range(graph.num_units)]
    layout = make_layout(graph, GateConfig(granularity=8), importance)
    for group in graph.groups:
        units = list(range(group.offset, group.offset + group.units))
        best = sorted(units, key=lambda u: -importance[u])[:8]
        first_gate = layout.unit_gate[best[0]]
        assert layout.fixed_on[first_gate]
        assert {layout.unit_gate[u] for u in best} == {first_gate}  # the 8 most important share gate 0


def test_gate_config_validation() -> None:
    with pytest.raises(ConfigError, match="granularity"):
        GateConfig(granularity=0)
    with pytest.raises(ConfigError, match="min_keep"):
        GateConfig(min_keep=1.0)
    with pytest.raises(ConfigError, match="importance must be one of l1, bn, taylor, got 'fisher'"):
        GateConfig(importance="fisher")
    with pytest.raises(ConfigError, match="importance_batches must be >= 1"):
        GateConfig(importance="taylor", importance_batches=0)


def test_l1_importance_sums_every_weight_a_channel_touches() -> None:
    """Group L1: producer filters + consumer input slices + BatchNorm scales, per channel."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 1), nn.Flatten(1), nn.LazyLinear(2)
    )
    model(torch.randn(1, 3, 5, 5))
    randomize(model, seed=3).eval()
    graph = analyze(model, torch.randn(1, 3, 5, 5))
    group = next(g for g in graph.groups if g.units == 6)  # the first conv's output channels
    scores = l1_scores(model, graph)[group.offset : group.offset + 6]
    w1, bn, w2 = model[0].weight.abs(), model[1].weight.abs(), model[3].weight.abs()
    expected = w1.flatten(1).sum(1) + bn + w2.transpose(0, 1).flatten(1).sum(1)
    torch.testing.assert_close(torch.tensor(scores), expected.detach(), rtol=1e-5, atol=0)


def _conv_bn_conv() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 1), nn.Flatten(1), nn.LazyLinear(2)
    )
    model(torch.randn(1, 3, 5, 5))
    return randomize(model, seed=3).eval()


def test_taylor_importance_sums_weight_times_gradient_over_everything_a_channel_touches() -> None:
    """Group Taylor: |w * dL/dw| of producer filters, consumer input slices and the BatchNorm's scale
    and shift, per channel, from the summed gradients of the batches given, taken in train mode."""
    model = _conv_bn_conv()
    graph = analyze(model, torch.randn(1, 3, 5, 5))
    group = next(g for g in graph.groups if g.units == 6)
    torch.manual_seed(1)
    batches = [(torch.randn(4, 3, 5, 5), torch.randint(0, 2, (4,))) for _ in range(3)]
    scores = taylor_importance(model, graph, batches, n_batches=2)[group.offset : group.offset + 6]

    reference = copy.deepcopy(model).train()
    for x, y in batches[:2]:  # only the first n_batches
        nn.functional.cross_entropy(reference(x), y).backward()
    conv1, bn, conv2 = reference[0], reference[1], reference[3]
    expected = (
        (conv1.weight * conv1.weight.grad).abs().flatten(1).sum(1)
        + (bn.weight * bn.weight.grad).abs()
        + (bn.bias * bn.bias.grad).abs()
        + (conv2.weight * conv2.weight.grad).abs().transpose(0, 1).flatten(1).sum(1)
    )
    torch.testing.assert_close(torch.tensor(scores), expected.detach(), rtol=1e-4, atol=1e-7)
    assert int((expected > 0).sum()) >= 5  # a real signal (one channel may be dead under the ReLU)


def test_taylor_importance_leaves_the_model_as_it_was() -> None:
    model = _conv_bn_conv()
    graph = analyze(model, torch.randn(1, 3, 5, 5))
    before = copy.deepcopy(model.state_dict())
    taylor_importance(model, graph, [(torch.randn(4, 3, 5, 5), torch.tensor([0, 1, 0, 1]))], n_batches=8)
    assert all(p.grad is None for p in model.parameters())
    assert not model.training
    for key, value in model.state_dict().items():  # BatchNorm statistics included
        assert torch.equal(value, before[key]), key
    with pytest.raises(ConfigError, match="needs training batches"):
        taylor_importance(model, graph, [], n_batches=8)


def test_gate_with_taylor_importance_needs_data_and_only_taylor_takes_it(r18) -> None:
    from prunekit.stages.gate import gate

    model, _, _ = r18
    with pytest.raises(ConfigError, match="--importance taylor ranks channels by the loss's gradients"):
        gate(copy.deepcopy(model), input_shape=(3, 32, 32), config=GateConfig(importance="taylor"))
    with pytest.raises(ConfigError, match="--data is used by --importance taylor only"):
        gate(copy.deepcopy(model), input_shape=(3, 32, 32), data=[(torch.randn(2, 3, 32, 32), torch.ones(2))])


def test_taylor_ranking_orders_the_gates_by_the_data(r18) -> None:
    """The gates of a taylor-ranked bank group the units by their Taylor scores (most important gate
    first), and the ranking differs from the weights-only L1 one on the same model."""
    from prunekit.stages.gate import gate

    model, _, _ = r18
    torch.manual_seed(0)
    batches = [(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))) for _ in range(2)]
    result = gate(
        copy.deepcopy(model), input_shape=(3, 32, 32), config=GateConfig(importance="taylor"), data=batches
    )
    graph, layout = result.graph, result.bank.layout
    scores = taylor_importance(model, graph, batches, n_batches=8)
    l1 = l1_scores(model, graph)
    differs = False
    for group in graph.groups:
        units = list(range(group.offset, group.offset + group.units))
        best = sorted(units, key=lambda u: (-scores[u], u))[: min(8, group.units)]
        assert {layout.unit_gate[u] for u in best} == {layout.unit_gate[best[0]]}
        assert layout.fixed_on[layout.unit_gate[best[0]]]
        differs |= set(best) != set(sorted(units, key=lambda u: (-l1[u], u))[: len(best)])
    assert differs
    assert result.bank.config.importance == "taylor"


def test_an_old_checkpoints_gates_say_they_were_ranked_by_batchnorm_scale(r18) -> None:
    _, graph, _ = r18
    bank = GateBank(make_layout(graph, GateConfig()), GateConfig())
    old = bank.describe()
    del old["config"]["importance"]  # what a checkpoint from before the option holds
    assert gate_bank_from_description(old).config.importance == "bn"
    assert gate_bank_from_description(bank.describe()).config.importance == "l1"


def test_initial_logits_mostly_on(r18) -> None:
    _, graph, _ = r18
    bank = GateBank(make_layout(graph, GateConfig()), GateConfig())
    assert bank.decisions().all()  # every gate starts open (paper: P(on) ~ 0.98)
    margin = (bank.logits[:, 1] - bank.logits[:, 0]).detach()
    assert float(margin.min()) == pytest.approx(4.0 - 2.0 - 0.1)
    assert float(margin.max()) == pytest.approx(4.0 - 0.1)


# -- insertion and removal --------------------------------------------------------------------------


def _hook_counts(model: nn.Module) -> tuple[int, int]:
    forward = sum(len(m._forward_hooks) for m in model.modules())
    return len(model._forward_pre_hooks), forward


def test_insert_and_remove_gates(r18) -> None:
    model, graph, x = r18
    model = copy.deepcopy(model)
    with torch.no_grad():
        reference = model(x)
    assert _hook_counts(model) == (0, 0)

    bank = _bank(graph)
    insert_gates_(model, graph, bank)
    assert get_gates(model) is bank and getattr(model, GATES_ATTR) is bank
    assert _hook_counts(model) == (1, len(graph.mask_points))
    assert f"{GATES_ATTR}.logits" in model.state_dict()
    with pytest.raises(ConfigError, match="already has gates"):
        insert_gates_(model, graph, _bank(graph))

    with torch.no_grad():
        gated = model(x)
        assert not torch.allclose(gated, reference, atol=1e-4)  # closed gates change the output
        bank.logits[:, 1] = 10.0  # every gate open: the gated model is the plain one
        opened = model(x)
    torch.testing.assert_close(opened, reference, rtol=0, atol=0)

    assert remove_gates_(model) is bank
    assert _hook_counts(model) == (0, 0)
    assert get_gates(model) is None and GATES_ATTR not in dict(model.named_children())
    assert not any(k.startswith(GATES_ATTR) for k in model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="has no gates"):
        remove_gates_(model)


def test_remove_after_closed_gates_restores_outputs(r18) -> None:
    model, graph, x = r18
    model = copy.deepcopy(model)
    with torch.no_grad():
        reference = model(x)
    insert_gates_(model, graph, _bank(graph, seed=5))
    with torch.no_grad():
        model(x)
    remove_gates_(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference, rtol=0, atol=0)


def test_closed_gates_zero_their_channels(r18) -> None:
    model, graph, x = r18
    model = copy.deepcopy(model)
    bank = _bank(graph, seed=2).eval()
    insert_gates_(model, graph, bank)
    seen: dict[str, torch.Tensor] = {}
    point = next(p for p in graph.mask_points if p.module == "bn1")
    model.bn1.register_forward_hook(lambda _m, _i, out: seen.setdefault("bn1", out.detach()))
    with torch.no_grad():
        model(x)
    keep = bank.unit_values(bank.decisions().float().unsqueeze(0))[0]
    out = seen["bn1"]  # bn1's hook registered after the mask hook: sees the masked output
    for pos, unit in enumerate(point.units):
        if unit >= 0 and keep[unit] == 0:
            assert out[:, pos].abs().max() == 0
    closed = [pos for pos, unit in enumerate(point.units) if unit >= 0 and keep[unit] == 0]
    assert closed, "the random bank should close some of bn1's channels"
    assert out[:, [p for p in range(out.shape[1]) if p not in closed]].abs().max() > 0


def test_insert_rejects_a_layout_of_another_model(r18, mbv2) -> None:
    model, _, _ = r18
    _, other_graph, _ = mbv2
    with pytest.raises(ConfigError, match="does not fit"):
        insert_gates_(copy.deepcopy(model), r18[1], _bank(other_graph))


def test_shared_scale_adam_keeps_the_gates_relative_step_sizes() -> None:
    """Per-element Adam moves a gate with a steady small gradient as far as one with a steady large
    one; with one shared scale, the steps stay proportional to the gradients."""
    from prunekit.gate_optim import SharedScaleAdam

    grads = torch.tensor([[1.0, -1.0], [0.1, -0.1], [0.0, 0.0]])
    shared, per_element = nn.Parameter(torch.zeros(3, 2)), nn.Parameter(torch.zeros(3, 2))
    opts = [SharedScaleAdam([shared], lr=0.1), torch.optim.Adam([per_element], lr=0.1)]
    for _ in range(5):
        for p, opt in zip((shared, per_element), opts, strict=True):
            p.grad = grads.clone()
            opt.step()
    torch.testing.assert_close(shared[1] / shared[0, 0].abs(), torch.tensor([-0.1, 0.1]))
    assert float(shared.detach()[2].abs().sum()) == 0.0
    torch.testing.assert_close(per_element[1], per_element[0])  # what per-element Adam does instead
    # the state round-trips (resume)
    again = SharedScaleAdam([nn.Parameter(shared.detach().clone())], lr=0.1)
    again.load_state_dict(opts[0].state_dict())
    state = next(iter(again.state.values()))
    assert float(state["step"]) == 5 and state["exp_avg_sq"].ndim == 0
