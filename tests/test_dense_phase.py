"""After the decision point the slimmed model trains in place of the masked one (prunekit.dense_phase):
it computes the same, hands its weights and momentum back exactly, and trains as the masked model does."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunekit
from prunekit.config import FinetuneConfig, GateConfig
from prunekit.dense_phase import DensePhase
from prunekit.errors import VerificationError
from prunekit.objective import MacModel
from prunekit.runtime import resolve_runtime
from prunekit.trainer import Trainer, make_budget


class LayerScaled(nn.Module):
    """A residual net with a layer-scale parameter read by get_attr (a ParamSlice) and a depthwise conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.expand = nn.Sequential(nn.Conv2d(16, 32, 1), nn.BatchNorm2d(32), nn.ReLU())
        self.depthwise = nn.Sequential(
            nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.BatchNorm2d(32), nn.ReLU()
        )
        self.project = nn.Sequential(nn.Conv2d(32, 16, 1), nn.BatchNorm2d(16))
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 16).view(16, 1, 1))
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.scale * self.project(self.depthwise(self.expand(x)))
        return self.head(x.mean((2, 3)))


def _decided(seed: int = 0) -> prunekit.GateResult:
    torch.manual_seed(seed)
    gated = prunekit.gate(
        LayerScaled(), input_shape=(3, 12, 12), config=GateConfig(granularity=4, min_keep=0.25)
    )
    bank = gated.bank
    states = bank.decisions().clone()
    learnable = (~bank.fixed_on).nonzero().flatten()
    states[learnable[::2]] = False  # close every other learnable gate, in every group
    bank.fix_(states)
    return gated


def _sgd(model: nn.Module) -> torch.optim.SGD:
    bank = prunekit.gates.get_gates(model)
    ids = {id(p) for p in bank.parameters()}
    weights = [p for p in model.parameters() if id(p) not in ids]
    return torch.optim.SGD(weights, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)


def _steps(
    model: nn.Module, opt: torch.optim.Optimizer, batches: list[tuple[torch.Tensor, torch.Tensor]]
) -> None:
    model.train()
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()


def _batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(6, 3, 12, 12, generator=g), torch.randint(0, 5, (6,), generator=g)) for _ in range(n)
    ]


def test_the_twin_is_the_slim_model_and_covers_every_kind_of_slice() -> None:
    gated = _decided()
    graph = gated.graph
    assert graph.param_slices and any(s.kind == "conv_blockwise" for s in graph.module_slices)
    dense = DensePhase(gated.model, graph, _sgd(gated.model))
    x = torch.randn(4, 3, 12, 12)
    dense.verify(x)
    slim = prunekit.slim(gated).model
    assert (
        prunekit.count_params(dense.model) == prunekit.count_params(slim) < prunekit.count_params(gated.model)
    )
    for (name, a), (other, b) in zip(
        dense.model.state_dict().items(), slim.state_dict().items(), strict=True
    ):
        assert name == other and torch.equal(a, b), name


def test_sync_writes_weights_buffers_and_momentum_back_exactly() -> None:
    gated = _decided()
    opt = _sgd(gated.model)
    _steps(gated.model, opt, _batches(2))  # momentum exists before the decision, as in a real run
    dense = DensePhase(gated.model, gated.graph, opt)
    _steps(dense.model, dense.optimizer, _batches(3, seed=2))
    dense.sync()
    # the slim stage, run on the gated model now, gives the trained twin: weights and BN statistics
    slim = prunekit.slim(gated).model
    for (name, a), b in zip(dense.model.state_dict().items(), slim.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    # a new twin built from the synced model and optimiser (a resumed run) has the same momentum
    again = DensePhase(gated.model, gated.graph, opt)
    for p, q in zip(dense.model.parameters(), again.model.parameters(), strict=True):
        torch.testing.assert_close(
            dense.optimizer.state[p]["momentum_buffer"],
            again.optimizer.state[q]["momentum_buffer"],
            rtol=0,
            atol=0,
        )


def test_training_the_twin_equals_training_the_masked_model() -> None:
    """Same start, same batches, same optimiser: the masked full-width model and the slimmed one end
    with the same function (to float rounding: the convolutions sum over different widths)."""
    masked = _decided()
    twin_source = copy.deepcopy(masked)
    opt_masked, opt_twin = _sgd(masked.model), _sgd(twin_source.model)
    warm = _batches(2)
    _steps(masked.model, opt_masked, warm)
    _steps(twin_source.model, opt_twin, warm)
    dense = DensePhase(twin_source.model, twin_source.graph, opt_twin)
    batches = _batches(5, seed=3)
    _steps(masked.model, opt_masked, batches)
    _steps(dense.model, dense.optimizer, batches)
    dense.sync()
    x = torch.randn(8, 3, 12, 12)
    with torch.no_grad():
        expected = masked.model.eval()(x)
        torch.testing.assert_close(twin_source.model.eval()(x), expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(dense.model.eval()(x), expected, rtol=1e-4, atol=1e-5)


def test_a_twin_that_computes_something_else_is_refused() -> None:
    gated = _decided()
    dense = DensePhase(gated.model, gated.graph, _sgd(gated.model))
    with torch.no_grad():
        dense.model.head.bias.add_(1.0)
    with pytest.raises(VerificationError, match="differs from the gated one"):
        dense.verify(torch.randn(2, 3, 12, 12))


def test_an_undecided_model_has_no_twin() -> None:
    torch.manual_seed(0)
    gated = prunekit.gate(LayerScaled(), input_shape=(3, 12, 12), config=GateConfig(granularity=4))
    with pytest.raises(ValueError, match="decisions are fixed"):
        DensePhase(gated.model, gated.graph, _sgd(gated.model))


def test_the_trainer_trains_the_twin_after_the_decision_and_keeps_the_gated_model_in_step() -> None:
    gated = prunekit.gate(
        LayerScaled(), input_shape=(3, 12, 12), config=GateConfig(granularity=4, min_keep=0.25)
    )
    config = FinetuneConfig(target_macs=0.6, epochs=2, batch_size=6, decide_at=0.25, device="cpu", workers=0)
    bank, mac_model = gated.bank, MacModel(gated.graph)
    total = gated.original.macs
    budget = make_budget(bank, mac_model, total, 0.6)
    batches = _batches(4)
    trainer = Trainer(
        gated.model, bank, mac_model, budget, config, len(batches), resolve_runtime("cpu"), graph=gated.graph
    )
    trainer.train_one_epoch(batches)
    assert trainer.decided and trainer.dense is not None
    assert trainer.inference_model is trainer.dense.model
    assert prunekit.count_params(trainer.dense.model) < prunekit.count_params(gated.model)
    # after an epoch the gated model holds the trained weights: it computes what the twin does
    x = torch.randn(4, 3, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(gated.model.eval()(x), trainer.dense.model.eval()(x), rtol=1e-4, atol=1e-5)
    # the schedule's learning rate reaches the twin's optimiser
    assert trainer.dense.optimizer.param_groups[0]["lr"] == trainer.opt.param_groups[0]["lr"]


def test_a_frozen_gate_phase_trains_only_the_gates_until_the_decision() -> None:
    torch.manual_seed(0)
    gated = prunekit.gate(
        LayerScaled(), input_shape=(3, 12, 12), config=GateConfig(granularity=4, min_keep=0.25)
    )
    config = FinetuneConfig(
        target_macs=0.6,
        epochs=1,
        batch_size=6,
        decide_at=0.5,
        method="gumbel",
        gate_phase="frozen",
        device="cpu",
        workers=0,
    )
    bank, mac_model = gated.bank, MacModel(gated.graph)
    budget = make_budget(bank, mac_model, gated.original.macs, 0.6)
    start = {k: v.clone() for k, v in gated.model.state_dict().items() if "prunekit_gates" not in k}
    logits = bank.logits.detach().clone()
    trainer = Trainer(
        gated.model, bank, mac_model, budget, config, 6, resolve_runtime("cpu"), graph=gated.graph
    )
    assert not any(p.requires_grad for n, p in gated.model.named_parameters() if "prunekit_gates" not in n)
    trainer.train_one_epoch(_batches(2))  # the decision comes after 3 of the 6 steps
    assert not trainer.decided and not torch.equal(bank.logits, logits)
    weights = {k: v for k, v in gated.model.state_dict().items() if "prunekit_gates" not in k}
    for name, value in weights.items():  # the weights are the pretrained ones (BN statistics may move)
        if "running" not in name and "num_batches" not in name:
            assert torch.equal(value, start[name]), name
    trainer.train_one_epoch(_batches(3, seed=4))
    assert trainer.decided and trainer.dense is not None
    assert all(p.requires_grad for p in trainer.dense.model.parameters())
    assert all(p.requires_grad for n, p in gated.model.named_parameters() if "prunekit_gates" not in n)
    moved = [n for n, v in gated.model.state_dict().items() if n in start and not torch.equal(v, start[n])]
    assert any(n.endswith("weight") and "running" not in n for n in moved)  # and now the weights train


def test_the_magnitude_method_keeps_the_same_fraction_of_every_group_from_the_first_step() -> None:
    torch.manual_seed(0)
    gated = prunekit.gate(prunekit.models.build_model("resnet18", 10), input_shape=(3, 32, 32))
    config = FinetuneConfig(
        target_macs=0.5, epochs=1, batch_size=4, method="magnitude", device="cpu", workers=0
    )
    bank, mac_model = gated.bank, MacModel(gated.graph)
    budget = make_budget(bank, mac_model, gated.original.macs, 0.5)
    trainer = Trainer(
        gated.model, bank, mac_model, budget, config, 1, resolve_runtime("cpu"), graph=gated.graph
    )
    g = torch.Generator().manual_seed(0)
    trainer.train_one_epoch(
        [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g))]
    )
    assert trainer.decided and trainer.dense is not None  # decided before the step: it trained the slim model
    assert 0.45 < trainer.macs_fraction() <= 0.5
    decisions = bank.decisions()
    groups = torch.tensor(bank.layout.gate_group)
    kept = []
    for group in groups.unique().tolist():
        members = (groups == group).nonzero().flatten()
        on = decisions[members]
        assert bool(on.long().diff().le(0).all())  # the most important gates of the group, none skipped
        if len(members) >= 8:
            kept.append(float(on.float().mean()))
    assert max(kept) - min(kept) <= 0.15  # about the same fraction of every (large enough) group
    assert not trainer.gate_opt.state  # the gates never trained: the decisions are the ranking's


def test_a_frozen_gate_phase_needs_the_learned_gates() -> None:
    with pytest.raises(
        prunekit.errors.ConfigError,
        match="gate_phase 'frozen' needs method gumbel: 'magnitude' trains no gates",
    ):
        FinetuneConfig(target_macs=0.5, method="magnitude", gate_phase="frozen")
    with pytest.raises(prunekit.errors.ConfigError, match="needs method gumbel .*give --method gumbel"):
        FinetuneConfig(
            target_macs=0.5, gate_phase="frozen"
        )  # the default, auto, is sensitivity for static gates
    with pytest.raises(
        prunekit.errors.ConfigError, match="method must be one of auto, gumbel, magnitude, sensitivity"
    ):
        FinetuneConfig(target_macs=0.5, method="taylor")
    with pytest.raises(prunekit.errors.ConfigError, match="sensitivity_batches must be >= 1"):
        FinetuneConfig(target_macs=0.5, sensitivity_batches=0)


def test_auto_is_sensitivity_for_static_gates_and_gumbel_for_dynamic_ones() -> None:
    config = FinetuneConfig(target_macs=0.5)
    assert config.method == "auto"
    assert config.resolve_method(dynamic=False).method == "sensitivity"
    assert config.resolve_method(dynamic=True).method == "gumbel"
    given = FinetuneConfig(target_macs=0.5, method="magnitude")
    assert given.resolve_method(dynamic=False) is given
