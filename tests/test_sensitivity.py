"""The allocation from measured sensitivity (prunekit.sensitivity, FinetuneConfig.method "sensitivity"):
the measurement leaves the model as it was, the curves mean what they say, and the greedy order keeps
what costs the most to cut."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import prunekit
from prunekit.allocation import fitting_prefix, prefix_decisions
from prunekit.config import FinetuneConfig, GateConfig, ModelSpec
from prunekit.models import load_model
from prunekit.objective import MacModel
from prunekit.runtime import resolve_runtime
from prunekit.sensitivity import (
    GroupCurve,
    Sensitivity,
    fill_to_budget,
    mean_sensitivity,
    measure_sensitivity,
    removal_order,
)
from prunekit.testing import randomize_
from prunekit.trainer import Trainer, distillation_loss, make_budget


@pytest.fixture(scope="module")
def gated() -> prunekit.GateResult:
    torch.manual_seed(0)
    model, spec = load_model(ModelSpec("resnet18", num_classes=10, input_shape=(3, 32, 32)))
    randomize_(model)  # torchvision zero-initialises the blocks' last BN: every block would be free to cut
    return prunekit.gate(model, spec=spec, config=GateConfig(min_keep=0.1))


def _batches(n: int, size: int = 8, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(size, 3, 32, 32, generator=g), torch.randint(0, 10, (size,), generator=g))
        for _ in range(n)
    ]


def _measure(gated: prunekit.GateResult, batches: int = 2) -> Sensitivity:
    return measure_sensitivity(
        gated.model, gated.bank, gated.graph, _batches(batches), distillation_loss, torch.device("cpu")
    )


def test_measuring_leaves_the_model_as_it_was(gated) -> None:  # noqa: ANN001
    model = gated.model.train()
    state = copy.deepcopy(model.state_dict())
    logits = gated.bank.logits.detach().clone()
    flags = [m.training for m in model.modules()]
    sensitivity = _measure(gated)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # BN statistics too
    assert torch.equal(gated.bank.logits, logits) and not gated.bank.is_decided
    assert [m.training for m in model.modules()] == flags
    assert sensitivity.images == 16 and sensitivity.batches == 2


def test_every_group_with_gates_to_decide_gets_a_curve_from_its_floor_to_all_gates(gated) -> None:  # noqa: ANN001
    sensitivity = _measure(gated)
    groups = torch.tensor(gated.bank.layout.gate_group)
    fixed = gated.bank.fixed_on
    decidable = [g for g in groups.unique().tolist() if not bool(fixed[groups == g].all())]
    assert [c.group for c in sensitivity.curves] == decidable
    for c in sensitivity.curves:
        members = groups == c.group
        assert c.kept[0] == int(fixed[members].sum()) and c.kept[-1] == int(members.sum())
        assert c.kept == sorted(set(c.kept))
        assert c.loss[-1] == 0.0  # all gates on is the reference itself
        assert all(a >= b for a, b in zip(c.loss, c.loss[1:], strict=False))  # fewer gates never cost less
    assert max(c.loss[0] for c in sensitivity.curves) > 0.01  # cutting to the floor moves the output


def test_a_curve_measures_the_cut_it_names(gated) -> None:  # noqa: ANN001
    """The loss at one measured width is the distillation loss of exactly that cut, computed by hand."""
    sensitivity = _measure(gated, batches=1)
    curve = sensitivity.curves[3]
    groups = torch.tensor(gated.bank.layout.gate_group)
    members = (groups == curve.group).nonzero().flatten()
    x = _batches(1)[0][0]
    model, bank = gated.model, gated.bank
    saved = bank.logits.detach().clone()
    with prunekit.modes.training_flags(model):
        model.eval()
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.train()
                m.momentum = 0.0  # batch statistics, running ones left alone
        with torch.no_grad():
            bank.fix_(torch.ones(bank.num_gates, dtype=torch.bool))
            reference = model(x)
            states = torch.ones(bank.num_gates, dtype=torch.bool)
            states[members[curve.kept[1] :]] = False
            bank.fix_(states)
            expected = float(distillation_loss(model(x), reference))
            bank.logits.copy_(saved)
            bank.decided.fill_(False)
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.momentum = 0.1
    assert curve.loss[1] == pytest.approx(max(expected, curve.loss[2]), rel=1e-4, abs=1e-6)


def _synthetic(gated: prunekit.GateResult, flat: int) -> Sensitivity:
    """Steep curves for every group but `flat`, whose cuts cost nothing."""
    groups = torch.tensor(gated.bank.layout.gate_group)
    fixed = gated.bank.fixed_on
    curves = []
    for g in groups.unique().tolist():
        members = groups == g
        lo, hi = int(fixed[members].sum()), int(members.sum())
        if lo < hi:
            curves.append(GroupCurve(g, str(g), [lo, hi], [0.0 if g == flat else 10.0, 0.0]))
    return Sensitivity(curves, 1, 1, 0.0)


def test_the_order_keeps_every_learnable_gate_once_most_important_first_within_a_group(gated) -> None:  # noqa: ANN001
    bank = gated.bank
    order = removal_order(bank, MacModel(gated.graph), _measure(gated))
    assert sorted(order.tolist()) == (~bank.fixed_on).nonzero().flatten().tolist()
    groups = torch.tensor(bank.layout.gate_group)[order]
    for g in groups.unique().tolist():
        within = order[groups == g]
        assert torch.equal(within, within.sort().values)  # make_layout's rank: the most important first


def test_a_group_that_costs_nothing_to_cut_is_cut_first(gated) -> None:  # noqa: ANN001
    bank = gated.bank
    flat = gated.graph.groups[5].index
    order = removal_order(bank, MacModel(gated.graph), _synthetic(gated, flat))
    groups = torch.tensor(bank.layout.gate_group)[order]
    n_flat = int((groups == flat).sum())
    assert n_flat > 0 and bool((groups[-n_flat:] == flat).all())  # kept last: removed first


def test_curves_of_several_processes_are_averaged() -> None:
    a = Sensitivity([GroupCurve(0, "a", [1, 2], [0.4, 0.0])], 2, 16, 1.0)
    b = Sensitivity([GroupCurve(0, "a", [1, 2], [0.2, 0.0])], 2, 16, 3.0)
    mean = mean_sensitivity([a, b])
    assert mean.curves[0].loss == pytest.approx([0.3, 0.0]) and mean.images == 32 and mean.seconds == 3.0
    assert Sensitivity.from_dict(mean.to_dict()).to_dict() == mean.to_dict()


def test_the_sensitivity_method_decides_before_the_first_step_within_the_budget(gated) -> None:  # noqa: ANN001
    run = copy.deepcopy(gated)
    config = FinetuneConfig(
        target_macs=0.5, epochs=1, batch_size=8, method="sensitivity", sensitivity_batches=2, device="cpu"
    )
    bank, mac_model = run.bank, MacModel(run.graph)
    budget = make_budget(bank, mac_model, run.original.macs, 0.5)
    trainer = Trainer(run.model, bank, mac_model, budget, config, 1, resolve_runtime("cpu"), graph=run.graph)
    trainer.train_one_epoch(_batches(3, seed=1))
    assert trainer.decided and trainer.dense is not None  # decided before the step: it trained the slim model
    assert 0.45 < trainer.macs_fraction() <= 0.5
    assert trainer.sensitivity is not None and trainer.sensitivity["batches"] == 2
    assert not trainer.gate_opt.state  # the gates never trained
    decisions = bank.decisions()
    groups = torch.tensor(bank.layout.gate_group)
    for g in groups.unique().tolist():  # within a group, the most important gates, none skipped
        assert bool(decisions[groups == g].long().diff().le(0).all())


class _TwoConvs(nn.Module):
    """A narrow first conv (4 gates) feeding a wide, costly second one: one gate of the first carries a
    quarter of the second's MACs."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU())
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.b(self.a(x)).mean((2, 3)))


def test_filling_to_the_budget_trades_gates_across_groups_when_the_greedy_path_falls_short() -> None:
    """By the curves the greedy state is the cheapest, but it leaves half the budget unused: a swap
    that uses it ranks first (fill_to_budget's UNUSED_BUDGET rule)."""
    gated = prunekit.gate(_TwoConvs(), input_shape=(3, 32, 32))
    bank, mac_model = gated.bank, MacModel(gated.graph)
    groups = torch.tensor(bank.layout.gate_group)
    first, second = (g.index for g in gated.graph.groups)
    n1, n2 = int((groups == first).sum()), int((groups == second).sum())
    # the measurement says: cutting the first conv costs nothing, the second one a lot
    curves = Sensitivity(
        [GroupCurve(first, "a", [1, n1], [0.0, 0.0]), GroupCurve(second, "b", [1, n2], [1.0, 0.0])], 1, 1, 0.0
    )

    def fraction(d: torch.Tensor) -> float:
        return float(mac_model(bank.unit_activity(d))[0]) / mac_model.gateable_macs

    def fits(d: torch.Tensor) -> bool:
        return fraction(d) <= 0.5

    greedy = removal_order(bank, mac_model, curves)
    short = fraction(prefix_decisions(bank, greedy, fitting_prefix(bank, greedy, fits)))
    assert short < 0.3  # the first conv went to one gate (free), and then half of it would not fit
    order = fill_to_budget(bank, greedy, curves, fits, mac_model, 0.5)
    assert sorted(order.tolist()) == sorted(greedy.tolist())
    chosen = prefix_decisions(bank, order, fitting_prefix(bank, order, fits))
    assert 0.4 < fraction(chosen) <= 0.5  # a second gate of the first conv, one of the second's given up
    assert int(chosen[groups == first].sum()) == 2
    for g in (first, second):  # within a group still the most important gates, none skipped
        assert bool(chosen[groups == g].long().diff().le(0).all())
    for gate in (~chosen).nonzero().flatten().tolist():  # nothing more fits: the prefix is the choice
        more = chosen.clone()
        more[gate] = True
        assert not fits(more)
