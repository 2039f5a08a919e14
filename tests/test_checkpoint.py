"""Checkpoints: exact round trips (gated and slim), safe loading of bad files, atomic saves."""

from __future__ import annotations

import copy
import pathlib
from pathlib import Path

import pytest
import torch
from torch import nn

from prunekit.checkpoint import (
    FORMAT_VERSION,
    Checkpoint,
    load_checkpoint,
    read_checkpoint_data,
    save_checkpoint,
)
from prunekit.config import ModelSpec
from prunekit.errors import CheckpointError
from prunekit.gates import remove_gates_
from prunekit.masking import masked
from prunekit.plan import plan_from_units
from prunekit.stages.gate import gate_stage
from prunekit.surgery import slim_


@pytest.fixture(scope="module")
def gated_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A gated resnet18 (10 classes, 32 px) whose gates are half open and whose BatchNorm statistics
    are not the identity, as after some training."""
    path = tmp_path_factory.mktemp("ckpt") / "gated.pt"
    gate_stage(ModelSpec("resnet18", num_classes=10, input_shape=32), path)
    ckpt = load_checkpoint(path)
    torch.manual_seed(0)
    ckpt.model.train()
    with torch.no_grad():
        ckpt.model(torch.randn(8, 3, 32, 32))
        bank = ckpt.gates
        assert bank is not None
        bank.logits[:, 0] = 0.0
        bank.logits[:, 1] = torch.randn(bank.num_gates)
    bank.tau = 0.7
    ckpt.history = [{"epoch": 1, "val_acc": 0.5}]
    ckpt.extra["note"] = "round trip"
    save_checkpoint(ckpt, path)
    return path


def _state_equal(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


def _one_line(err: pytest.ExceptionInfo[CheckpointError], *fragments: str) -> str:
    message = str(err.value)
    assert message and "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


# -- round trips ------------------------------------------------------------------------------------


def test_gated_round_trip_is_exact(gated_file: Path, tmp_path: Path) -> None:
    first = load_checkpoint(gated_file)
    assert first.stage == "gated" and first.plan is None and first.gates is not None
    again = tmp_path / "again.pt"
    save_checkpoint(first, again)
    second = load_checkpoint(again)

    _state_equal(first.model, second.model)
    assert second.gates is not None and first.gates is not None
    assert second.gates.layout == first.gates.layout
    assert second.gates.config == first.gates.config
    assert second.gates.tau == pytest.approx(0.7)
    assert torch.equal(second.gates.decisions(), first.gates.decisions())
    assert not second.gates.decisions().all()  # the random gates survived, not fresh ones
    assert second.spec == first.spec
    assert (second.stage, second.history, second.extra["note"]) == (
        "gated",
        [{"epoch": 1, "val_acc": 0.5}],
        "round trip",
    )
    assert not second.model.training
    x = first.spec.example_input(3)
    with torch.no_grad():
        torch.testing.assert_close(second.model(x), first.model(x), rtol=0, atol=0)


def test_slim_round_trip(gated_file: Path, tmp_path: Path) -> None:
    ckpt = load_checkpoint(gated_file)
    bank = ckpt.gates
    assert bank is not None
    plan = plan_from_units(
        ckpt.graph, bank.unit_values(bank.decisions().float().unsqueeze(0))[0].bool().tolist()
    )
    plain = copy.deepcopy(ckpt.model)
    remove_gates_(plain)
    slim = slim_(copy.deepcopy(plain), ckpt.graph, plan).eval()
    path = tmp_path / "slim.pt"
    save_checkpoint(Checkpoint(ckpt.spec, slim, ckpt.graph, "slim", plan=plan, history=ckpt.history), path)

    raw = torch.load(path, weights_only=True)  # plain data, no pickled code
    assert raw["format"] == "prunekit-checkpoint" and raw["gates"] is None and raw["stage"] == "slim"
    assert isinstance(raw["prunekit_version"], str)

    loaded = load_checkpoint(path)
    assert loaded.stage == "slim" and loaded.gates is None and loaded.plan == plan
    _state_equal(slim, loaded.model)
    assert loaded.model.layer1[0].conv1.out_channels < plain.layer1[0].conv1.out_channels  # rebuilt smaller
    assert loaded.model.layer1[0].conv1.out_channels == slim.layer1[0].conv1.out_channels
    x = ckpt.spec.example_input(3)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), slim(x), rtol=0, atol=0)
        with masked(plain, ckpt.graph, plan):
            reference = plain(x)
        torch.testing.assert_close(loaded.model(x), reference, rtol=1e-4, atol=1e-5)


def test_checkpoint_is_plain_data(gated_file: Path) -> None:
    data = torch.load(gated_file, weights_only=True)
    assert data["format_version"] == FORMAT_VERSION == 2
    assert data["model"]["source"] == "resnet18" and data["model"]["num_classes"] == 10
    assert data["model"]["input_shape"] == [3, 32, 32]
    assert data["gates"]["config"]["granularity"] == 8
    assert "prunekit_gates.logits" in data["state_dict"]
    assert read_checkpoint_data(gated_file)["stage"] == "gated"


def test_evaluation_preprocessing_round_trips_and_old_checkpoints_load(
    gated_file: Path, tmp_path: Path
) -> None:
    """The spec's resize_size / interpolation are saved and read back; a checkpoint written before they
    existed (no such keys) loads with None for both (the default evaluation preprocessing)."""
    import dataclasses

    ckpt = load_checkpoint(gated_file)
    ckpt.spec = dataclasses.replace(ckpt.spec, resize_size=36, interpolation="bicubic")
    path = tmp_path / "preset.pt"
    save_checkpoint(ckpt, path)
    stored = read_checkpoint_data(path)["model"]
    assert (stored["resize_size"], stored["interpolation"]) == (36, "bicubic")
    loaded = load_checkpoint(path)
    assert (loaded.spec.resize_size, loaded.spec.interpolation) == (36, "bicubic")
    assert loaded.spec == ckpt.spec

    def drop(d: dict) -> None:
        del d["model"]["resize_size"], d["model"]["interpolation"]

    old = load_checkpoint(_edited(path, tmp_path, drop))
    assert (old.spec.resize_size, old.spec.interpolation) == (None, None)
    assert dataclasses.replace(old.spec, resize_size=36, interpolation="bicubic") == ckpt.spec
    bad = _edited(path, tmp_path, lambda d: d["model"].__setitem__("interpolation", "cubic"))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(bad)
    _one_line(err, "edited.pt", "interpolation", "'cubic'")


# -- formats: the gate-bank kind, format 1 ------------------------------------------------------------


def test_checkpoint_records_the_gate_kind(gated_file: Path) -> None:
    data = read_checkpoint_data(gated_file)
    assert data["gates"]["kind"] == "static"
    assert data["gates"]["tau"] == pytest.approx(0.7)
    assert "prunekit_gates.decided" in data["state_dict"]
    assert not bool(data["state_dict"]["prunekit_gates.decided"])  # gated, not yet decided


def test_unknown_gate_kind(gated_file: Path, tmp_path: Path) -> None:
    path = _edited(gated_file, tmp_path, lambda d: d["gates"].__setitem__("kind", "conditional"))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    _one_line(err, "edited.pt", "unknown gate kind", "'conditional'", "static")


def _as_format1(data: dict) -> dict:
    """The dict as prunekit 0.1 (checkpoint format 1) wrote it."""
    model = data["model"]
    channels, height, width = model["input_shape"]
    assert channels == 3 and height == width  # format 1 knew square RGB inputs only
    gates = {k: v for k, v in data["gates"].items() if k != "kind"}
    state = {k: v for k, v in data["state_dict"].items() if k != "prunekit_gates.decided"}
    return data | {
        "format_version": 1,
        "model": {
            "arch": model["source"],
            "num_classes": model["num_classes"],
            "input_size": height,
            "mean": model["mean"],
            "std": model["std"],
            "weights": model["weights"],
        },
        "gates": gates,
        "state_dict": state,
    }


@pytest.mark.parametrize(
    ("stage", "training", "decided"),
    [
        ("gated", None, False),
        ("finetuned", None, True),  # a finished format-1 fine-tune had fixed its decisions
        ("finetuned", {"epoch": 1, "step": 2, "decided": False}, False),  # interrupted before the decision
        ("finetuned", {"epoch": 1, "step": 2, "decided": True}, True),
    ],
    ids=["gated", "finished", "resumable-undecided", "resumable-decided"],
)
def test_format1_checkpoint_still_loads(
    gated_file: Path, tmp_path: Path, stage: str, training: dict | None, decided: bool
) -> None:
    current = load_checkpoint(gated_file)
    data = _as_format1(torch.load(gated_file, weights_only=True)) | {"stage": stage, "training": training}
    old = tmp_path / "format1.pt"
    torch.save(data, old)
    assert set(data["model"]) == {"arch", "num_classes", "input_size", "mean", "std", "weights"}
    assert "kind" not in data["gates"] and "prunekit_gates.decided" not in data["state_dict"]

    loaded = load_checkpoint(old)
    assert loaded.stage == stage and loaded.spec == current.spec
    assert loaded.spec.input_shape == (3, 32, 32)
    assert loaded.gates is not None and current.gates is not None
    assert loaded.gates.layout == current.gates.layout and loaded.gates.config == current.gates.config
    assert loaded.gates.tau == pytest.approx(0.7)
    assert torch.equal(loaded.gates.decisions(), current.gates.decisions())
    assert loaded.gates.is_decided is decided
    x = current.spec.example_input(3)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), current.model(x), rtol=0, atol=0)

    resaved = tmp_path / "format2.pt"  # saving again writes the current format
    save_checkpoint(loaded, resaved)
    raw = read_checkpoint_data(resaved)
    assert raw["format_version"] == FORMAT_VERSION and raw["gates"]["kind"] == "static"
    assert bool(raw["state_dict"]["prunekit_gates.decided"]) is decided
    _state_equal(load_checkpoint(resaved).model, loaded.model)


# -- bad files --------------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path / "nope.pt")
    _one_line(err, "not found", "nope.pt")


@pytest.mark.parametrize("keep", [0.5, 0.98, 0.0001])
def test_truncated_file(gated_file: Path, tmp_path: Path, keep: float) -> None:
    data = gated_file.read_bytes()
    bad = tmp_path / "cut.pt"
    bad.write_bytes(data[: max(1, int(len(data) * keep))])
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(bad)
    _one_line(err, "cut.pt", "corrupt or not a torch file")


def test_random_bytes(tmp_path: Path) -> None:
    bad = tmp_path / "noise.pt"
    bad.write_bytes(
        torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        .numpy()
        .tobytes()
    )
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(bad)
    _one_line(err, "noise.pt", "corrupt or not a torch file")


def test_empty_file(tmp_path: Path) -> None:
    bad = tmp_path / "empty.pt"
    bad.write_bytes(b"")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(bad)
    _one_line(err, "empty.pt", "the file is empty")


def test_plain_state_dict(tmp_path: Path) -> None:
    import torchvision

    path = tmp_path / "weights.pth"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    _one_line(err, "not a prunekit checkpoint", "--weights")


def _edited(gated_file: Path, tmp_path: Path, edit) -> Path:  # noqa: ANN001
    data = torch.load(gated_file, weights_only=True)
    edit(data)
    path = tmp_path / "edited.pt"
    torch.save(data, path)
    return path


def test_architecture_edited(gated_file: Path, tmp_path: Path) -> None:
    path = _edited(gated_file, tmp_path, lambda d: d["model"].__setitem__("source", "resnet34"))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    _one_line(err, "edited.pt", "resnet34")


def test_architecture_edited_without_gates(gated_file: Path, tmp_path: Path) -> None:
    """Without gates in the way, the strict state_dict check names the mismatch."""

    def edit(d: dict) -> None:
        d["model"]["source"] = "resnet34"
        d["gates"] = None
        d["state_dict"] = {k: v for k, v in d["state_dict"].items() if not k.startswith("prunekit_gates.")}

    with pytest.raises(CheckpointError) as err:
        load_checkpoint(_edited(gated_file, tmp_path, edit))
    _one_line(err, "edited.pt", "does not fit resnet34", "missing")


def test_num_classes_edited(gated_file: Path, tmp_path: Path) -> None:
    path = _edited(gated_file, tmp_path, lambda d: d["model"].__setitem__("num_classes", 7))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    _one_line(err, "fc.weight")


def test_unknown_architecture(gated_file: Path, tmp_path: Path) -> None:
    path = _edited(gated_file, tmp_path, lambda d: d["model"].__setitem__("source", "resnet9000"))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    _one_line(err, "resnet9000")


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (lambda d: d.__setitem__("format_version", 99), "format 99"),
        (lambda d: d.pop("state_dict"), "state_dict"),
        (lambda d: d["model"].pop("input_shape"), "input_shape"),
        (lambda d: d["state_dict"].pop("fc.bias"), "fc.bias"),
        (lambda d: d["gates"].pop("layout"), "gate"),
        (lambda d: d["gates"]["layout"].__setitem__("unit_gate", [0, 1]), "gates do not fit"),
        (lambda d: d.__setitem__("plan", {"format": "prunekit-plan", "version": 1, "groups": []}), "plan"),
    ],
    ids=[
        "format-version",
        "no-state-dict",
        "no-input-shape",
        "missing-weight",
        "no-layout",
        "bad-layout",
        "bad-plan",
    ],
)
def test_inconsistent_fields(gated_file: Path, tmp_path: Path, edit, fragment: str) -> None:  # noqa: ANN001
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(_edited(gated_file, tmp_path, edit))
    _one_line(err, "edited.pt", fragment)


class _Payload:
    """Unpickling this would create a file: a checkpoint loader must never do it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_pickled_code_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    for name, obj in [
        ("object.pt", _Payload(marker)),
        ("wrapped.pt", {"format": "prunekit-checkpoint", "format_version": 2, "extra": _Payload(marker)}),
    ]:
        path = tmp_path / name
        torch.save(obj, path)
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(path)
        _one_line(err, name, "pickled Python objects")
        assert not marker.exists()
    # the payload is real: an unsafe load would have run it
    torch.load(tmp_path / "object.pt", weights_only=False)
    assert marker.exists()


def test_pickled_model_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save(nn.Linear(2, 2), path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    _one_line(err, "model.pt", "pickled Python objects")


# -- atomic save ------------------------------------------------------------------------------------


@pytest.mark.parametrize("exc", [RuntimeError("disk full"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
def test_failed_save_keeps_the_previous_file(
    gated_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exc: BaseException
) -> None:
    ckpt = load_checkpoint(gated_file)
    path = tmp_path / "ckpt.pt"
    save_checkpoint(ckpt, path)
    before = path.read_bytes()
    real_save = torch.save

    def broken(obj: object, f: object, *args: object, **kwargs: object) -> None:
        real_save(obj, f, *args, **kwargs)
        Path(f).write_bytes(Path(f).read_bytes()[:1000])  # half written, then the failure  # type: ignore[arg-type]
        raise exc

    monkeypatch.setattr(torch, "save", broken)
    with torch.no_grad():
        ckpt.model.fc.bias.add_(1.0)  # the failed save would have changed the file
    with pytest.raises(type(exc)):
        save_checkpoint(ckpt, path)
    monkeypatch.undo()

    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]
    load_checkpoint(path)


def test_save_to_missing_directory(gated_file: Path, tmp_path: Path) -> None:
    from prunekit.errors import ConfigError

    ckpt = load_checkpoint(gated_file)
    with pytest.raises(ConfigError, match="does not exist"):
        save_checkpoint(ckpt, tmp_path / "missing" / "x.pt")
    assert not (tmp_path / "missing").exists()
