"""Tests for prunekit.export: ONNX export, checker, onnxruntime parity, atomic writes, quietness."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torchvision
from torch import nn

import prunekit.export as export_mod
from prunekit.errors import ConfigError, ExportError, PrunekitError, VerificationError
from prunekit.export import ExportResult, export_onnx
from prunekit.testing import calibrate_batchnorm_

SHAPE = (3, 32, 32)


class TinyNet(nn.Module):
    """A small conv net: conv-bn-relu, depthwise conv, residual add, pooling, linear."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.conv(x)))
        y = y + self.dw(y)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


class DataDependent(TinyNet):
    """torch.export cannot trace the branch; the TorchScript tracer bakes it in (TracerWarning)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        if y.sum() > -1e9:
            return y
        return -y


class PinnedBatch(TinyNet):
    """Reshapes with a constant batch of 2: it cannot even run in PyTorch at another batch size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.conv(x)))
        return self.fc(y.mean((2, 3)).reshape(2, 8))


class BatchIgnoring(TinyNet):
    """Runs at any batch size but its output always has 2 rows."""

    def __init__(self) -> None:
        super().__init__(num_classes=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).reshape(2, -1)


class Broken(TinyNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("this model cannot run")


class Unexportable(TinyNet):
    """Runs in PyTorch but refuses both exporters."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_exporting() or torch.jit.is_tracing():
            raise RuntimeError("this model refuses to be exported")
        return super().forward(x)


class GridSample(nn.Module):
    """grid_sample needs opset 16: the TorchScript exporter fails at 15 and prints the graph from C++."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = torch.zeros(x.shape[0], 4, 4, 2)
        return nn.functional.grid_sample(x, grid, align_corners=False).flatten(1)


def _tiny(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    model = TinyNet()
    calibrate_batchnorm_(model, (3, 16, 16), batches=2, batch_size=8)
    return model


def _ort_run(path: Path, x: torch.Tensor) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    (graph_input,) = session.get_inputs()
    return session.run(None, {graph_input.name: x.numpy()})[0]


def _assert_matches_torch(model: nn.Module, path: Path, x: torch.Tensor) -> None:
    model.eval()
    with torch.no_grad():
        want = model(x).numpy()
    got = _ort_run(path, x)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def _dir_listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.fixture(scope="module")
def resnet18_export(tmp_path_factory: pytest.TempPathFactory):
    """One default (dynamo) export of an untrained resnet18 at 32x32, shared by several tests."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    calibrate_batchnorm_(model, SHAPE, batches=2, batch_size=8)
    model.train()  # export_onnx must use eval mode and then restore this
    out_dir = tmp_path_factory.mktemp("resnet18")
    path = out_dir / "resnet18.onnx"
    result = export_onnx(model, path, input_shape=SHAPE)
    return model, path, result


# --------------------------------------------------------------------------- happy paths


def test_resnet18_default_export(resnet18_export) -> None:
    model, path, result = resnet18_export
    assert isinstance(result, ExportResult)
    assert result.path == path and path.is_file()
    assert result.exporter == "dynamo"
    assert result.fallback_reason is None
    assert result.opset == 18
    assert (result.export_batch, result.verify_batch) == (2, 3)
    assert result.input_shape == SHAPE
    assert result.size_bytes == path.stat().st_size > 1_000_000
    assert 0 <= result.max_abs_diff <= 1e-4 * result.max_abs_ref
    assert result.max_abs_ref > 0.1  # calibrated BN: a meaningful comparison, not ~0 vs ~0
    onnx.checker.check_model(str(path))
    proto = onnx.load(str(path))
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [18]
    assert _dir_listing(path.parent) == ["resnet18.onnx"]  # self-contained, no temp leftovers
    assert model.training  # restored


def test_resnet18_dynamic_batch(resnet18_export) -> None:
    model, path, _ = resnet18_export
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (graph_input,) = session.get_inputs()
    assert isinstance(graph_input.shape[0], str)  # symbolic batch axis
    assert graph_input.shape[1:] == list(SHAPE)
    torch.manual_seed(5)
    for batch in (5, 1):
        _assert_matches_torch(model, path, torch.randn(batch, *SHAPE))
    model.train()


def test_result_to_dict_is_json(resnet18_export) -> None:
    _, path, result = resnet18_export
    data = json.loads(json.dumps(result.to_dict()))
    assert data["path"] == str(path)
    assert data["exporter"] == "dynamo"
    assert data["input_shape"] == list(SHAPE)
    assert data["tolerance"] == pytest.approx(result.tolerance)
    assert result.tolerance == pytest.approx(result.rtol * result.max_abs_ref)  # relative to the peak
    for key in ("opset", "export_batch", "verify_batch", "max_abs_diff", "max_abs_ref", "size_bytes"):
        assert key in data
    with pytest.raises(AttributeError):
        result.opset = 19  # type: ignore[misc]  # frozen


@pytest.mark.parametrize("dynamo", [True, False])
def test_tiny_export_is_quiet(tmp_path: Path, capfd: pytest.CaptureFixture[str], dynamo: bool) -> None:
    model = _tiny()
    path = tmp_path / "tiny.onnx"
    capfd.readouterr()
    result = export_onnx(model, path, input_shape=(3, 16, 16), dynamo=dynamo)
    out, err = capfd.readouterr()
    assert out == ""  # stdout may carry a JSON document
    assert err == ""  # the exporters' warnings and logs are captured too
    assert result.exporter == ("dynamo" if dynamo else "torchscript")
    assert result.max_abs_diff <= 1e-5 * result.max_abs_ref
    torch.manual_seed(1)
    _assert_matches_torch(model, path, torch.randn(5, 3, 16, 16))


def test_torchscript_for_low_opset(tmp_path: Path) -> None:
    result = export_onnx(_tiny(), tmp_path / "m.onnx", input_shape=(3, 16, 16), opset=13)
    assert result.exporter == "torchscript"  # the dynamo exporter would silently use opset 18
    assert result.opset == 13
    assert result.fallback_reason is None


def test_fallback_to_torchscript(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    model = DataDependent()
    path = tmp_path / "dd.onnx"
    capfd.readouterr()
    result = export_onnx(model, path, input_shape=(3, 16, 16))
    assert capfd.readouterr() == ("", "")  # torch.export's failure dumps graphs to stderr
    assert result.exporter == "torchscript"
    assert result.fallback_reason and "dynamo" in result.fallback_reason
    assert "\n" not in result.fallback_reason
    assert any("TracerWarning" in w for w in result.export_warnings)
    assert _dir_listing(tmp_path) == ["dd.onnx"]


def test_given_inputs_are_checked(tmp_path: Path) -> None:
    model = _tiny()
    real = torch.rand(4, 3, 16, 16)
    result = export_onnx(model, tmp_path / "m.onnx", input_shape=(3, 16, 16), inputs=real, dynamo=False)
    assert result.max_abs_diff < 1e-4
    with pytest.raises(ExportError, match="inputs have shape"):
        export_onnx(model, tmp_path / "m.onnx", input_shape=(3, 16, 16), inputs=real[:, :, :8])


def test_model_state_is_restored(tmp_path: Path) -> None:
    model = _tiny()
    model.train()
    model.bn.eval()  # a mixed state (frozen BN) must survive, not become all-train
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_onnx(model, tmp_path / "m.onnx", input_shape=(3, 16, 16), dynamo=False)
    assert model.training and not model.bn.training and model.fc.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.device.type == "cpu" for p in model.parameters())


@pytest.mark.slow
def test_mobilenet_v3_small(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(weights=None)
    calibrate_batchnorm_(model, (3, 64, 64), batches=2, batch_size=8)
    path = tmp_path / "mnv3.onnx"
    result = export_onnx(model, path, input_shape=(3, 64, 64))
    assert result.exporter == "dynamo"
    assert result.max_abs_diff <= 1e-4 * result.max_abs_ref
    _assert_matches_torch(model, path, torch.randn(5, 3, 64, 64))


# --------------------------------------------------------------------------- failures and atomicity


def _existing(tmp_path: Path) -> Path:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"previous export")
    return path


def test_parity_failure_leaves_existing_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _existing(tmp_path)
    real_reference = export_mod._reference

    def skewed(model: nn.Module, x: torch.Tensor) -> list[np.ndarray]:
        return [r + 0.5 for r in real_reference(model, x)]

    monkeypatch.setattr(export_mod, "_reference", skewed)
    with pytest.raises(VerificationError) as info:
        export_onnx(_tiny(), path, input_shape=(3, 16, 16), dynamo=True)
    message = str(info.value)
    assert "\n" not in message
    assert "max |diff|" in message and "tolerance" in message
    assert path.read_bytes() == b"previous export"
    assert _dir_listing(tmp_path) == ["model.onnx"]


def test_parity_failure_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_reference = export_mod._reference
    monkeypatch.setattr(export_mod, "_reference", lambda m, x: [r * 2 + 1 for r in real_reference(m, x)])
    with pytest.raises(VerificationError):
        export_onnx(_tiny(), tmp_path / "new.onnx", input_shape=(3, 16, 16), dynamo=False)
    assert _dir_listing(tmp_path) == []


def test_unexportable_model(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    path = _existing(tmp_path)
    capfd.readouterr()
    with pytest.raises(ExportError) as info:
        export_onnx(Unexportable(), path, input_shape=(3, 16, 16))
    message = str(info.value)
    assert "\n" not in message and "\x1b" not in message
    assert message.startswith("ONNX export failed: dynamo exporter: ")
    assert "torchscript exporter: " in message
    assert message.count("refuses to be exported") == 2
    assert path.read_bytes() == b"previous export"
    assert _dir_listing(tmp_path) == ["model.onnx"]
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_model_that_cannot_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _existing(tmp_path)
    monkeypatch.setattr(export_mod, "_run_exporter", _no_export)  # fails before the slow export
    with pytest.raises(ExportError, match="fails in PyTorch on a random batch of 3.*cannot run"):
        export_onnx(Broken(), path, input_shape=(3, 16, 16))
    assert path.read_bytes() == b"previous export"
    assert _dir_listing(tmp_path) == ["model.onnx"]


def test_interrupted_export_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Ctrl-C after the exporter wrote the file and an external-data sidecar: both temporaries go.
    path = _existing(tmp_path)

    def write_then_interrupt(name, model, example, tmp, opset) -> None:
        Path(tmp).write_bytes(b"partial")
        Path(f"{tmp}.data").write_bytes(b"weights")
        raise KeyboardInterrupt

    monkeypatch.setattr(export_mod, "_run_exporter", write_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        export_onnx(_tiny(), path, input_shape=(3, 16, 16))
    assert path.read_bytes() == b"previous export"
    assert _dir_listing(tmp_path) == ["model.onnx"]


def test_exporter_c_level_output_is_captured(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    # The TorchScript exporter prints "Torch IR graph at exception" to file descriptor 1 from C++.
    capfd.readouterr()
    with pytest.raises(ExportError, match="opset version 15"):
        export_onnx(GridSample(), tmp_path / "g.onnx", input_shape=(3, 8, 8), opset=15)
    out, _ = capfd.readouterr()
    assert out == ""
    assert _dir_listing(tmp_path) == []


def test_pinned_batch_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="accepts any batch size"):
        export_onnx(PinnedBatch(), tmp_path / "p.onnx", input_shape=(3, 8, 8))
    assert _dir_listing(tmp_path) == []


@pytest.mark.parametrize("dynamo", [True, False])
def test_output_must_follow_batch(tmp_path: Path, dynamo: bool) -> None:
    # PyTorch runs it at batch 3 (giving 2 rows of 6), and so does onnxruntime: only the shape check
    # notices that the output does not follow the batch.
    with pytest.raises(VerificationError, match=r"output shape \(2, 6\).*not dynamic"):
        export_onnx(BatchIgnoring(), tmp_path / "b.onnx", input_shape=(3, 8, 8), dynamo=dynamo)
    assert _dir_listing(tmp_path) == []


def test_static_batch_graph_is_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def export_without_dynamic_axes(name, model, example, tmp, opset) -> None:
        torch.onnx.export(model, (example,), str(tmp), dynamo=False, opset_version=opset)

    monkeypatch.setattr(export_mod, "_run_exporter", export_without_dynamic_axes)
    with pytest.raises(VerificationError, match="static batch of 2"):
        export_onnx(_tiny(), tmp_path / "s.onnx", input_shape=(3, 16, 16))
    assert _dir_listing(tmp_path) == []


def _no_export(*args: object, **kwargs: object) -> None:
    raise AssertionError("the export should not have started")


@pytest.mark.parametrize(
    ("make_path", "reason"),
    [
        (lambda d: d / "missing" / "m.onnx", "does not exist"),
        (lambda d: d, "is a directory"),
        (lambda d: (d / "file.txt") / "m.onnx", "not a directory"),
    ],
)
def test_unwritable_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_path, reason) -> None:
    (tmp_path / "file.txt").write_text("x")
    monkeypatch.setattr(export_mod, "_run_exporter", _no_export)
    path = make_path(tmp_path)
    before = _dir_listing(tmp_path)
    with pytest.raises(ConfigError, match=f"cannot write {path}: .*{reason}") as info:
        export_onnx(TinyNet(), path, input_shape=(3, 8, 8))
    assert "\n" not in str(info.value)
    assert _dir_listing(tmp_path) == before


def test_readonly_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        probe = locked / "probe"
        try:
            probe.write_text("x")
        except PermissionError:
            pass
        else:
            pytest.skip("running with privileges that ignore directory permissions")
        monkeypatch.setattr(export_mod, "_run_exporter", _no_export)
        with pytest.raises(ConfigError, match=f"cannot write {locked / 'm.onnx'}: .*not writable"):
            export_onnx(TinyNet(), locked / "m.onnx", input_shape=(3, 8, 8))
        assert _dir_listing(locked) == []
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"opset": 17, "dynamo": True}, "opset 17 is not supported by the dynamo exporter"),
        ({"opset": 21, "dynamo": False}, "opset 21 is not supported by the TorchScript exporter"),
        ({"opset": 99}, "opset 99 is out of the supported range"),
        ({"opset": 5}, "opset 5 is out of the supported range"),
        ({"export_batch": 1}, "export_batch must be an integer >= 2"),
        ({"export_batch": 3, "verify_batch": 3}, "must differ"),
        ({"rtol": 0.0}, "rtol"),
        ({"input_shape": (3, 8)}, "input_shape"),
    ],
)
def test_bad_arguments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kwargs, match) -> None:
    monkeypatch.setattr(export_mod, "_run_exporter", _no_export)
    kwargs = {"input_shape": (3, 8, 8), **kwargs}
    with pytest.raises(ExportError, match=match) as info:
        export_onnx(TinyNet(), tmp_path / "m.onnx", **kwargs)
    assert isinstance(info.value, PrunekitError)
    assert "\n" not in str(info.value)
    assert _dir_listing(tmp_path) == []


def test_too_large_for_one_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(export_mod, "_WEIGHTS_LIMIT", 1000)
    monkeypatch.setattr(export_mod, "_run_exporter", _no_export)
    with pytest.raises(ExportError, match="2 GiB.*smaller model"):
        export_onnx(TinyNet(), tmp_path / "m.onnx", input_shape=(3, 8, 8))


def test_half_precision_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="float32"):
        export_onnx(TinyNet().half(), tmp_path / "m.onnx", input_shape=(3, 8, 8))
