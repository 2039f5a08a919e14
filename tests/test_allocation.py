"""Allocations without training (prunekit.allocation): the uniform cut, and the floors it sets under the
learned gates (FinetuneConfig.uniform_floor)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import prunekit
from prunekit.allocation import largest_prefix, raise_floors_, uniform_order, within_groups_order
from prunekit.config import FinetuneConfig, GateConfig, ModelSpec
from prunekit.models import load_model
from prunekit.stages.finetune import prepare_finetune


@pytest.fixture(scope="module")
def resnet18() -> tuple[torch.nn.Module, ModelSpec]:
    torch.manual_seed(0)
    return load_model(ModelSpec("resnet18", num_classes=10, input_shape=(3, 32, 32)))


def _gated(resnet18) -> prunekit.GateResult:  # noqa: ANN001
    model, spec = resnet18
    return prunekit.gate(copy.deepcopy(model), spec=spec)


def _group_fractions(bank, states: torch.Tensor) -> list[float]:  # noqa: ANN001
    groups = torch.tensor(bank.layout.gate_group)
    return [float(states[groups == g].float().mean()) for g in groups.unique().tolist()]


def test_the_uniform_cut_keeps_about_the_same_fraction_of_every_group(resnet18) -> None:  # noqa: ANN001
    bank = _gated(resnet18).bank
    order = uniform_order(bank)
    assert sorted(order.tolist()) == (~bank.fixed_on).nonzero().flatten().tolist()  # every learnable once
    for k in (10, 60, 120):
        states = bank.fixed_on.clone()
        states[order[:k]] = True
        fractions = _group_fractions(bank, states)
        assert max(fractions) - min(fractions) <= 0.13, (k, fractions)  # one 8-gate step at most


def test_largest_prefix_is_the_longest_that_fits(resnet18) -> None:  # noqa: ANN001
    bank = _gated(resnet18).bank
    order = uniform_order(bank)
    decisions = largest_prefix(bank, order, lambda d: int(d.sum()) <= 250)
    assert int(decisions.sum()) == 250 and bool(decisions[bank.fixed_on].all())


def test_floors_are_a_share_of_the_uniform_cut_and_never_lower_a_floor(resnet18) -> None:  # noqa: ANN001
    bank = _gated(resnet18).bank
    before = bank.fixed_on.clone()
    groups = torch.tensor(bank.layout.gate_group)
    uniform = largest_prefix(bank, uniform_order(bank), lambda d: int(d.sum()) <= 290)
    added = raise_floors_(bank, uniform, 0.9)
    assert added == int(bank.fixed_on.sum()) - int(before.sum()) > 0
    assert bool(bank.fixed_on[before].all())  # the gate stage's floors stay
    assert torch.equal(torch.tensor(bank.layout.fixed_on), bank.fixed_on)  # what a checkpoint saves
    for g in groups.unique().tolist():
        members = (groups == g).nonzero().flatten()
        fixed = bank.fixed_on[members]
        expected = max(int(before[members].sum()), math.ceil(0.9 * int(uniform[members].sum()) - 1e-9))
        assert int(fixed.sum()) == expected
        assert bool(fixed[:expected].all())  # a group's most important gates


@pytest.mark.parametrize(("target", "floor"), [(0.3, 0.5), (0.5, 0.625), (0.7, 0.71)])
def test_finetune_raises_the_floors_with_the_budget(resnet18, target: float, floor: float) -> None:  # noqa: ANN001
    model, spec = resnet18
    gated = prunekit.gate(copy.deepcopy(model), spec=spec, config=GateConfig(min_keep=0.5))
    session = prepare_finetune(
        gated.checkpoint, FinetuneConfig(target_macs=target, method="gumbel", device="cpu", distill=0), 4
    )
    bank = session.checkpoint.gates
    assert min(_group_fractions(bank, bank.fixed_on)) >= floor  # 0.5 at 0.3: the gate stage's min_keep
    assert session.floors is not None and session.floors["share"] == 0.85
    assert session.floors["fixed_gates"] == int(bank.fixed_on.sum())
    # the floors fit the budget with room to learn: the fixed gates alone stay below the target
    kept = session.trainer.budget.total_fraction(session.trainer.decision_fraction(bank.fixed_on))
    assert kept < target


def test_no_floors_when_asked_for_none_or_for_the_methods_that_learn_no_gates(resnet18) -> None:  # noqa: ANN001
    for config in (
        FinetuneConfig(target_macs=0.5, method="gumbel", uniform_floor=0, device="cpu", distill=0),
        FinetuneConfig(target_macs=0.5, method="gumbel", uniform_floor=None, device="cpu", distill=0),
        FinetuneConfig(target_macs=0.5, method="magnitude", device="cpu", distill=0),
        FinetuneConfig(target_macs=0.5, method="sensitivity", device="cpu", distill=0),
        FinetuneConfig(target_macs=0.5, device="cpu", distill=0),  # auto: sensitivity for static gates
    ):
        gated = _gated(resnet18)
        before = gated.bank.fixed_on.clone()
        session = prepare_finetune(gated.checkpoint, config, 4)
        assert session.floors is None and torch.equal(session.checkpoint.gates.fixed_on, before)


def test_a_run_saved_before_floors_existed_resumes_without_them() -> None:
    saved = FinetuneConfig(target_macs=0.5).to_dict()
    del saved["uniform_floor"]
    assert FinetuneConfig.from_dict(saved).uniform_floor is None
    assert FinetuneConfig.from_dict(FinetuneConfig(target_macs=0.5).to_dict()).uniform_floor == 0.85
    with pytest.raises(prunekit.errors.ConfigError, match="uniform_floor must be in"):
        FinetuneConfig(target_macs=0.5, uniform_floor=1.5)


def test_within_groups_order_keeps_the_uniform_counts_and_picks_by_score(resnet18) -> None:  # noqa: ANN001
    bank = _gated(resnet18).bank
    score = torch.randn(bank.num_gates, generator=torch.Generator().manual_seed(0))
    uniform, learned = uniform_order(bank), within_groups_order(bank, score)
    groups = torch.tensor(bank.layout.gate_group)
    for k in (17, 90):
        a, b = bank.fixed_on.clone(), bank.fixed_on.clone()
        a[uniform[:k]], b[learned[:k]] = True, True
        assert _group_fractions(bank, a) == _group_fractions(bank, b)  # the same count in every group
        for g in groups.unique().tolist():  # and in each group, the best-scored learnable gates
            free = ((groups == g) & ~bank.fixed_on).nonzero().flatten()
            chosen = free[b[free]]
            if 0 < len(chosen) < len(free):
                assert float(score[chosen].min()) >= float(score[free[~b[free]]].max())
