"""Fine-tuning: the activation loss reaches the MACs target, seeds reproduce, NaN stops cleanly, resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    assert_resume_is_exact,
    make_image_folder,
    message_lines,
    no_result_on_stdout,
)
from torch import nn
from torch.utils.data import DataLoader, Subset
from typer.testing import CliRunner

import prunekit.trainer as trainer_mod
from prunekit.checkpoint import Checkpoint, load_checkpoint, read_checkpoint_data, save_checkpoint
from prunekit.cli import app
from prunekit.config import FinetuneConfig, ModelSpec
from prunekit.data import resolve_data
from prunekit.errors import ConfigError, Interrupted, TrainingError
from prunekit.stages.finetune import (
    FinetuneSession,
    best_path,
    finetune_stage,
    prepare_finetune,
    resumed_config,
)
from prunekit.stages.gate import gate_stage
from prunekit.trainer import Trainer, run_epochs


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(gated resnet18 with 3 classes at 32 px, an ImageFolder of 3 classes: 8 train / 2 val each)."""
    root = tmp_path_factory.mktemp("tiny")
    data = make_image_folder(root / "data", classes=3, train=8, val=2)
    gated = root / "gated.pt"
    gate_stage(ModelSpec("resnet18", num_classes=3, input_shape=32), gated)
    return gated, data


@pytest.fixture(scope="module")
def gated10(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("g10") / "gated.pt"
    gate_stage(ModelSpec("resnet18", num_classes=10, input_shape=32), path)
    return path


def tiny_config(**overrides: object) -> FinetuneConfig:
    args: dict = {
        "target_macs": 0.5,
        "epochs": 2,
        "batch_size": 8,
        "workers": 0,
        "max_steps_per_epoch": 2,
        "device": "cpu",
    }
    return FinetuneConfig(**(args | overrides))


def _session(gated: Path, config: FinetuneConfig, steps: int) -> FinetuneSession:
    """The fine-tune stage's own setup (trainer, teacher, budget) for the gated checkpoint at `gated`."""
    return prepare_finetune(load_checkpoint(gated), config, steps)


def _trainer(gated: Path, config: FinetuneConfig, steps: int) -> Trainer:
    return _session(gated, config, steps).trainer


def _builtin(batch_size: int, seed: int = 0):  # noqa: ANN202
    return resolve_data("builtin", input_shape=(3, 32, 32), batch_size=batch_size, seed=seed)


# -- reaching the target ----------------------------------------------------------------------------


def _learn_gates(gated10: Path, lam: float) -> tuple[Trainer, float, list[float]]:
    """One epoch of 30 steps at gate lr 0.1 with decisions only at the very end (decide_at 1), no
    teacher: what the gates learn comes from the activation loss alone. Returns the trainer, the
    gateable fraction of the MAP decisions the gates learned (just before the decision point's
    projection) and the sampled batch fraction B of every step."""
    steps = 30
    config = FinetuneConfig(
        method="gumbel",
        target_macs=0.5,
        epochs=1,
        batch_size=8,
        lam=lam,
        gate_lr=0.1,
        decide_at=1.0,
        distill=0.0,
        workers=0,
        max_steps_per_epoch=steps,
        device="cpu",
    )
    torch.manual_seed(0)
    trainer = _trainer(gated10, config, steps)
    assert trainer.decision_fraction() == pytest.approx(1.0)  # every gate starts open
    learned: list[float] = []
    real_decide = trainer.decide

    def spy() -> None:
        learned.append(trainer.decision_fraction())  # the MAP decisions the gates learned, before projection
        real_decide()

    trainer.decide = spy  # type: ignore[method-assign]
    b_values: list[float] = []
    trainer.train_one_epoch(_builtin(8).train, on_step=lambda s: b_values.append(s["b"]))
    assert trainer.step == steps and trainer.decided and len(learned) == 1
    return trainer, learned[0], b_values


def test_strong_lambda_drives_macs_to_the_target(gated10: Path) -> None:
    """lambda 20: the gates themselves must learn the budget."""
    trainer, learned, b_values = _learn_gates(gated10, lam=20.0)
    t = trainer.budget.t
    assert t == pytest.approx(0.5)  # resnet18: every MAC is gateable
    # In so few steps the Adam-driven logits still oscillate around the target (measured over seeds and
    # 30-50 steps: 0.40-0.59), so the learned decisions get a wider band; the projection at the decision
    # point is what lands within 0.05. The lambda-0 control below stays near 1.
    assert abs(learned - t) < 0.15, learned
    assert abs(np.mean(b_values[-5:]) - t) < 0.15, b_values  # the sampled batch fraction B followed
    assert np.mean(b_values[:3]) > 0.8  # ... from (almost) everything on
    final = trainer.decision_fraction()
    assert final <= t + 1e-9 and abs(final - t) < 0.05
    assert trainer.budget.total_fraction(final) == pytest.approx(final)


def test_no_activation_loss_keeps_the_gates_open(gated10: Path) -> None:
    """The control: without the activation loss (lambda 0) the same run leaves (almost) every gate open."""
    _, learned, _ = _learn_gates(gated10, lam=0.0)
    assert learned > 0.8


def test_decide_at_fixes_decisions_within_the_budget(gated10: Path) -> None:
    config = FinetuneConfig(
        method="gumbel",
        target_macs=0.5,
        epochs=2,
        batch_size=8,
        workers=0,
        max_steps_per_epoch=4,
        device="cpu",
        decide_at=0.5,
        distill=0.0,
    )
    torch.manual_seed(0)
    trainer = _trainer(gated10, config, steps=4)
    assert (trainer.total_steps, trainer.decide_step) == (8, 4)
    decided_at: list[int] = []
    real_decide = trainer.decide
    trainer.decide = lambda: (decided_at.append(trainer.step), real_decide())  # type: ignore[method-assign]
    loaders = _builtin(8)
    val = DataLoader(Subset(loaders.val.dataset, range(16)), batch_size=16)
    saved: list[tuple[int, int]] = []
    modes: list[tuple[int, bool]] = []
    history = run_epochs(
        trainer,
        loaders.train,
        val,
        on_epoch_end=lambda tr, m: saved.append((m.epoch, tr.epoch) if tr is trainer else (-1, -1)),
        on_step=lambda s: modes.append((trainer.step, trainer.bank.sampling)),
    )

    assert decided_at == [4]
    assert saved == [(1, 1), (2, 2)]  # after each epoch, once it is counted
    assert [m.epoch for m in history] == [1, 2] and all(m.decided for m in history)
    frozen = trainer.bank.logits.detach().clone()
    assert set(frozen[:, 1].unique().tolist()) <= {-5.0, 5.0}  # decided logits, untouched afterwards
    for m in history:
        assert m.macs_fraction <= 0.5 + 1e-9 and abs(m.macs_fraction - 0.5) < 0.05
        assert m.gateable_kept == pytest.approx(m.macs_fraction)
        assert 0.0 <= m.val_acc <= 1.0 and np.isfinite(m.loss)
    assert history[0].macs_fraction == history[1].macs_fraction  # no gate changes after the decision
    # sampled gates before the decision, deterministic ones from it on (also in the second epoch)
    assert modes == [(step, step <= 4) for step in range(1, 9)]


def test_finetune_config_validation() -> None:
    for bad in (
        {"target_macs": 1.5},
        {"target_macs": 0.0},
        {"epochs": 0},
        {"decide_at": 0.0},
        {"lr": -1.0},
        {"device": "tpu"},
        {"lam": -1.0},
    ):
        with pytest.raises(ConfigError):
            FinetuneConfig(**({"target_macs": 0.5} | bad))


# -- the decision point and the trainer's parameter groups ------------------------------------------


def _train_twice(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    model.train()
    with torch.no_grad():
        return model(x), model(x)


def test_train_mode_after_the_decision_does_not_sample(gated10: Path, tmp_path: Path) -> None:
    """Once decided, `model.train()` (a user's, DDP's, BatchNorm recalibration's) keeps the fixed
    decisions: no Gumbel samples, in memory and after a checkpoint round trip."""
    config = tiny_config(distill=0.0, method="gumbel")
    trainer = _trainer(gated10, config, steps=2)
    model, bank = trainer.model, trainer.bank
    spec = load_checkpoint(gated10).spec
    x = spec.example_input(4)

    torch.manual_seed(0)
    assert bank.training is False and not bank.is_decided
    first, second = _train_twice(model, x)
    assert bank.sampling and not torch.equal(first, second)  # before the decision train mode samples

    trainer.decide()
    assert trainer.decided and bank.is_decided
    decisions = bank.decisions()
    assert 0 < int(decisions.sum()) < bank.num_gates  # the projection closed some gates, not all
    first, second = _train_twice(model, x)
    assert bank.training and not bank.sampling
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert torch.equal(bank.gate_values(4), decisions.float().unsqueeze(0))

    ckpt = load_checkpoint(gated10)
    path = tmp_path / "decided.pt"
    save_checkpoint(Checkpoint(ckpt.spec, model, ckpt.graph, "finetuned"), path)
    assert bool(read_checkpoint_data(path)["state_dict"]["prunekit_gates.decided"])
    loaded = load_checkpoint(path)
    assert loaded.gates is not None and loaded.gates.is_decided
    again, again2 = _train_twice(loaded.model, x)
    assert loaded.gates.training and not loaded.gates.sampling
    torch.testing.assert_close(again, again2, rtol=0, atol=0)
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    assert torch.equal(loaded.gates.gate_values(4), decisions.float().unsqueeze(0))


class _Wrapper(nn.Module):
    """Holds the gated model as `module`, as DDP does: every parameter name gains a `module.` prefix."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


def _param_ids(optimizer: torch.optim.Optimizer) -> list[int]:
    return [id(p) for group in optimizer.param_groups for p in group["params"]]


@pytest.mark.parametrize("wrapped", [False, True], ids=["plain", "wrapped"])
def test_trainer_selects_gate_parameters_by_identity(gated10: Path, wrapped: bool) -> None:
    config = tiny_config(distill=0.0)
    session = _session(gated10, config, steps=2)
    trainer = session.trainer
    bank = trainer.bank
    if wrapped:
        model = _Wrapper(trainer.model)
        names = [n for n, _ in model.named_parameters()]
        assert "module.prunekit_gates.logits" in names
        assert not any(n.startswith("prunekit_gates.") for n in names)  # a name filter would miss them
        trainer = Trainer(model, bank, trainer.mac_model, session.budget, config, 2, session.runtime)
    gate_ids = [id(p) for p in bank.parameters()]
    assert gate_ids and id(bank.logits) in gate_ids
    sgd, adam = _param_ids(trainer.opt), _param_ids(trainer.gate_opt)
    assert isinstance(trainer.opt, torch.optim.SGD) and isinstance(trainer.gate_opt, torch.optim.Adam)
    assert not set(sgd) & set(gate_ids)  # no gate logit in the weights' optimiser
    assert sorted(adam) == sorted(gate_ids)  # the Adam one holds exactly the bank's parameters
    weights = [id(p) for p in trainer.model.parameters() if id(p) not in set(gate_ids)]
    assert sorted(sgd) == sorted(weights)  # ... and every weight is trained


# -- reproducibility --------------------------------------------------------------------------------


def _run(tiny: tuple[Path, Path], out: Path, **overrides: object) -> tuple[dict, torch.Tensor, torch.Tensor]:
    gated, data = tiny
    result = finetune_stage(gated, str(data), out, tiny_config(**overrides)).to_dict()
    ckpt = load_checkpoint(out)
    assert ckpt.gates is not None
    with torch.no_grad():
        logits = ckpt.model(ckpt.spec.example_input(2))
    return result, ckpt.gates.logits.detach().clone(), logits


def test_same_seed_same_result(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    r1, gates1, out1 = _run(tiny, tmp_path / "a.pt", seed=3, decide_at=1.0)
    r2, gates2, out2 = _run(tiny, tmp_path / "b.pt", seed=3, decide_at=1.0)
    assert torch.equal(gates1, gates2)
    assert torch.equal(out1, out2)
    assert [h["loss"] for h in r1["history"]] == [h["loss"] for h in r2["history"]]

    _, gates3, out3 = _run(tiny, tmp_path / "c.pt", seed=4, decide_at=1.0)
    assert not torch.equal(gates3, gates1)  # another seed, other Gumbel samples and batches
    assert not torch.equal(out3, out1)


# -- failures ---------------------------------------------------------------------------------------


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(
    tiny: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gated, data = tiny
    out = tmp_path / "tuned.pt"
    real_epoch = Trainer.train_one_epoch
    real_ce = torch.nn.functional.cross_entropy
    state = {"blow": False}

    def epoch(self: Trainer, *args: object, **kwargs: object) -> dict:
        state["blow"] = self.epoch >= 1  # the second epoch diverges
        return real_epoch(self, *args, **kwargs)

    def ce(logits: torch.Tensor, target: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        loss = real_ce(logits, target, *args, **kwargs)
        training = kwargs.get("reduction", "mean") == "mean"  # evaluate() sums
        return loss * float("nan") if state["blow"] and training else loss

    monkeypatch.setattr(Trainer, "train_one_epoch", epoch)
    monkeypatch.setattr(trainer_mod.F, "cross_entropy", ce)
    with pytest.raises(TrainingError, match=r"non-finite loss at epoch 2, step 1.*lower --lr") as err:
        finetune_stage(gated, str(data), out, tiny_config(epochs=2))
    assert "\n" not in str(err.value)
    monkeypatch.undo()

    ckpt = load_checkpoint(out)  # epoch 1's checkpoint, intact and resumable
    assert [h["epoch"] for h in ckpt.history] == [1]
    assert ckpt.training is not None and ckpt.training["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt.model.state_dict().values() if v.is_floating_point())
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_diverging_learning_rate_is_a_training_error(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    gated, data = tiny
    with pytest.raises(TrainingError, match="non-finite loss"):
        finetune_stage(
            gated, str(data), tmp_path / "t.pt", tiny_config(epochs=1, lr=1e30, max_steps_per_epoch=3)
        )
    assert not (tmp_path / "t.pt").exists()


# -- interrupt and resume ---------------------------------------------------------------------------


def _momentum(state: dict) -> dict[int, torch.Tensor]:
    return {k: v["momentum_buffer"].clone() for k, v in state["state"].items() if "momentum_buffer" in v}


def test_interrupt_then_resume(
    tiny: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gated, data = tiny
    out = tmp_path / "tuned.pt"
    args = [
        "finetune",
        str(gated),
        "-o",
        str(out),
        "--data",
        str(data),
        "--target-macs",
        "0.5",
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--max-steps-per-epoch",
        "2",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--method",
        "gumbel",  # the gate optimiser's state is part of what is checked
        "--json",
    ]
    real_epoch = Trainer.train_one_epoch

    def interrupted_second(self: Trainer, *a: object, **k: object) -> dict:
        if self.epoch >= 1:
            raise KeyboardInterrupt
        return real_epoch(self, *a, **k)

    monkeypatch.setattr(Trainer, "train_one_epoch", interrupted_second)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 130, (result.stdout, result.stderr)
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: interrupted; resume from {out} (after epoch 1) with `prunekit finetune ... --resume`"
    )
    assert no_result_on_stdout(result.stdout)
    assert Interrupted().exit_code == 130 and Interrupted(terminated=True).exit_code == 143

    saved = read_checkpoint_data(out)
    training = saved["training"]
    assert training is not None and (training["epoch"], training["step"]) == (1, 2)
    assert [h["epoch"] for h in saved["history"]] == [1]
    saved_momentum = _momentum(training["optimizer"])
    assert saved_momentum and all(v.abs().sum() > 0 for v in saved_momentum.values())
    saved_adam = training["gate_optimizer"]["state"][0]["exp_avg"].clone()

    # resume: the optimizer state is restored before the first step of epoch 2
    seen: dict = {}
    real_load = Trainer.load_state

    def load_spy(self: Trainer, state: dict) -> None:
        real_load(self, state)
        seen["momentum"] = _momentum(self.opt.state_dict())
        seen["adam"] = self.gate_opt.state_dict()["state"][0]["exp_avg"].clone()
        seen["lr"] = self.sched.get_last_lr()

    def epoch_spy(self: Trainer, *a: object, **k: object) -> dict:
        seen.setdefault("starts", []).append((self.epoch, self.step))
        return real_epoch(self, *a, **k)

    monkeypatch.setattr(Trainer, "load_state", load_spy)
    monkeypatch.setattr(Trainer, "train_one_epoch", epoch_spy)
    resumed = CliRunner().invoke(
        app,
        ["finetune", str(gated), "-o", str(out), "--data", str(data), "--resume", "--workers", "0", "--json"],
    )
    assert resumed.exit_code == 0, (resumed.stdout, resumed.stderr)
    assert seen["starts"] == [(1, 2)]  # epoch 2 only, continuing the step count
    assert seen["momentum"].keys() == saved_momentum.keys()
    assert all(torch.equal(seen["momentum"][k], saved_momentum[k]) for k in saved_momentum)
    assert torch.equal(seen["adam"], saved_adam)
    assert seen["lr"][0] < 0.01  # the cosine schedule continued, not restarted

    doc = json.loads(resumed.stdout)
    assert [h["epoch"] for h in doc["history"]] == [1, 2]
    final = load_checkpoint(out)
    assert [h["epoch"] for h in final.history] == [1, 2]
    assert final.training is None  # finished: nothing left to resume
    again = CliRunner().invoke(app, ["finetune", str(gated), "-o", str(out), "--data", str(data), "--resume"])
    assert again.exit_code == 2 and "no training state to resume" in again.stderr


def test_resumed_run_equals_an_uninterrupted_one(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    gated, data = tiny
    config = tiny_config(epochs=2, decide_at=1.0, max_steps_per_epoch=2, method="gumbel")
    assert_resume_is_exact(gated, data, config, tmp_path, interrupt_after=1)  # gates and weights


def test_resume_without_checkpoint(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    gated, data = tiny
    result = CliRunner().invoke(
        app, ["finetune", str(gated), "-o", str(tmp_path / "none.pt"), "--data", str(data), "--resume"]
    )
    assert result.exit_code == 2
    assert (
        message_lines(result.stderr)[0].startswith("error: resume: no checkpoint to resume")
        and len(message_lines(result.stderr)) == 1
    )


def test_resumed_config_refuses_a_changed_lr() -> None:
    saved = tiny_config(epochs=3)
    with pytest.raises(ConfigError, match=r"\blr\b") as err:
        resumed_config(saved, {"lr": 0.5}, epochs_done=1)
    assert "\n" not in str(err.value) and "0.5" in str(err.value)


def test_resumed_config_epochs_must_grow() -> None:
    saved = tiny_config(epochs=3)
    longer = resumed_config(saved, {"epochs": 5}, epochs_done=2)
    assert longer.epochs == 5
    assert longer == FinetuneConfig(**(saved.to_dict() | {"epochs": 5}))  # nothing else changed
    for epochs in (2, 1):  # not above the 2 epochs done
        with pytest.raises(ConfigError, match="epochs") as err:
            resumed_config(saved, {"epochs": epochs}, epochs_done=2)
        assert "\n" not in str(err.value)


def test_resumed_config_accepts_the_saved_values() -> None:
    saved = tiny_config(epochs=3)
    assert resumed_config(saved, {"lr": saved.lr, "epochs": saved.epochs, "seed": saved.seed}, 2) == saved
    assert resumed_config(saved, {"lr": None, "batch_size": None}, 2) == saved  # options not given
    assert resumed_config(saved, {"workers": 3, "device": "cpu"}, 2) == FinetuneConfig(
        **(saved.to_dict() | {"workers": 3})
    )


def test_best_checkpoint_is_within_budget(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    gated, data = tiny
    out = tmp_path / "tuned.pt"
    result = finetune_stage(gated, str(data), out, tiny_config(epochs=2)).to_dict()
    assert result["best"] == str(best_path(out))
    best = load_checkpoint(best_path(out))
    rows = [h for h in best.history if h["within_budget"] and h["decided"]]
    assert rows and max(h["val_acc"] for h in rows) == best.history[-1]["val_acc"]
    assert result["final"]["macs_fraction"] <= 0.5 + 1e-9
    assert result["expected_macs"] == pytest.approx(result["final"]["macs_fraction"] * result["macs_before"])


# -- CUDA (runs only where a GPU is present) ----------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_training_and_decisions(gated10: Path) -> None:
    """The CUDA path: model, gates, MAC model and batches on the GPU, bfloat16 autocast, and eval
    decisions that equal the CPU ones after training."""
    config = FinetuneConfig(
        target_macs=0.5, epochs=1, batch_size=16, workers=0, max_steps_per_epoch=6, device="cuda", amp=True
    )
    torch.manual_seed(0)
    trainer = _trainer(gated10, config, steps=6)
    assert trainer.amp and trainer.device.type == "cuda"
    stats = trainer.train_one_epoch(_builtin(16).train)
    assert np.isfinite(stats["loss"]) and trainer.decided
    assert trainer.bank.logits.device.type == "cuda"
    assert trainer.bank.current is not None and trainer.bank.current.device.type == "cuda"
    cuda_fraction = trainer.decision_fraction()
    trainer.model.cpu()
    trainer.mac_model.cpu()
    assert trainer.decision_fraction() == pytest.approx(cuda_fraction)


@pytest.mark.parametrize("method", ["magnitude", "sensitivity"])
def test_a_run_resumed_after_the_decision_equals_an_uninterrupted_one(
    tiny: tuple[Path, Path], tmp_path: Path, method: str
) -> None:
    """Decided before the first step, so the resumed run rebuilds the slimmed twin mid-run; building it
    (module initialisation) and the sensitivity measurement (its own pass over the loader) must not move
    the random state that draws the augmentation."""
    gated, data = tiny
    config = tiny_config(epochs=2, max_steps_per_epoch=2, method=method)
    assert_resume_is_exact(gated, data, config, tmp_path, interrupt_after=1)
