"""The shipping hand-off: INT8/FP16 ONNX copies checked by accuracy, the torch.export program that loads
without prunekit, the interleaved latency table, and their bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from conftest import make_image_folder
from test_pipeline_cli import assert_user_error, ok_json, prunekit_cli, tiny_run_config
from typer.testing import CliRunner

from prunekit.checkpoint import load_checkpoint
from prunekit.cli import app
from prunekit.config import SlimConfig, load_run_config
from prunekit.errors import ConfigError, DataError
from prunekit.quantize import CALIBRATION_BATCH, calibration_inputs, check_accuracy, quantized_path
from prunekit.stages.slim import SlimOutputs, quantization_failure


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fine-tuned (gated, decided) resnet18 at 3x32x32 on the built-in data: a few steps."""
    d = tmp_path_factory.mktemp("ship")
    for argv in (
        ("gate", "resnet18", "--num-classes", "10", "--input-shape", "32", "-o", "gated.pt"),
        ("finetune", "gated.pt", "-o", "tuned.pt", "--data", "builtin", "--target-macs", "0.5"),
    ):
        extra = (
            ("--epochs", "1", "--max-steps-per-epoch", "4", "--batch-size", "32")
            if argv[0] == "finetune"
            else ()
        )
        proc = prunekit_cli(*argv, *extra, cwd=d)
        assert proc.returncode == 0, proc.stderr[-2000:]
    return d / "tuned.pt"


@pytest.fixture(scope="module")
def shipped(tuned: Path) -> dict[str, Any]:
    """slim --export onnx,pt2 --quantize int8,fp16 --latency on the built-in data, as JSON."""
    d = tuned.parent
    doc = ok_json(
        prunekit_cli(
            "slim", tuned, "-o", "model.onnx", "--export", "onnx,pt2", "--quantize", "int8,fp16",
            "--data", "builtin", "--calibration-batches", "2", "--latency", "--json", cwd=d,
        )
    )  # fmt: skip
    return {"dir": d, "doc": doc}


def _ort_logits(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def test_quantized_files_are_real_int8_and_fp16_models(shipped: dict[str, Any]) -> None:
    d, doc = shipped["dir"], shipped["doc"]
    int8, fp16 = onnx.load(str(d / "model.int8.onnx")), onnx.load(str(d / "model.fp16.onnx"))
    ops = {n.op_type for n in int8.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # QDQ format
    int8_weights = [t for t in int8.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert int8_weights and any(len(t.dims) == 4 for t in int8_weights)  # conv weights stored as int8
    scales = [t for t in int8.graph.initializer if t.name.endswith("_scale") and len(t.dims) == 1]
    assert any(t.dims[0] > 1 for t in scales)  # per-channel weight scales
    halves = [t for t in fp16.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16]
    assert halves and all(
        t.data_type != onnx.TensorProto.FLOAT for t in fp16.graph.initializer if len(t.dims) == 4
    )
    # float32 inputs and outputs kept: the same feed as the FP32 model
    for model in (int8, fp16):
        assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    sizes = {m: doc["quantized"][m]["size_bytes"] for m in ("int8", "fp16")}
    assert (
        sizes["int8"] < 0.35 * doc["onnx"]["size_bytes"] and sizes["fp16"] < 0.6 * doc["onnx"]["size_bytes"]
    )
    assert sizes == {m: os.path.getsize(d / f"model.{m}.onnx") for m in sizes}


def test_quantized_accuracy_is_measured_against_fp32_on_the_data(shipped: dict[str, Any]) -> None:
    """The reported top-1 and agreement are those of the files on the built-in validation split."""
    from prunekit.data import resolve_data

    d, doc = shipped["dir"], shipped["doc"]
    slim = load_checkpoint(d / "model.pt")
    loaders = resolve_data(
        "builtin", input_shape=(3, 32, 32), mean=slim.spec.mean, std=slim.spec.std, batch_size=64,
        train_augment=False,
    )  # fmt: skip
    batches = [(x.numpy(), y.numpy()) for x, y in loaders.val]
    labels = np.concatenate([y for _, y in batches])
    predictions = {
        name: np.concatenate([_ort_logits(d / file, x).argmax(1) for x, _ in batches])
        for name, file in (("fp32", "model.onnx"), ("int8", "model.int8.onnx"), ("fp16", "model.fp16.onnx"))
    }
    for mode in ("int8", "fp16"):
        acc = doc["quantized"][mode]["accuracy"]
        assert acc["examples"] == len(labels) == 1000
        assert acc["fp32_top1"] == pytest.approx(float((predictions["fp32"] == labels).mean()))
        assert acc["top1"] == pytest.approx(float((predictions[mode] == labels).mean()))
        assert acc["agreement"] == pytest.approx(float((predictions[mode] == predictions["fp32"]).mean()))
        assert acc["drop_points"] == pytest.approx(100 * (acc["fp32_top1"] - acc["top1"]))
    # and the files are good copies: they mostly agree with the FP32 model
    assert doc["quantized"]["fp16"]["accuracy"]["agreement"] >= 0.98
    assert doc["quantized"]["int8"]["accuracy"]["agreement"] >= 0.9
    assert doc["quantized"]["int8"]["method"]["calibration"] == {
        "method": "minmax",
        "batches": 2,
        "images": 64,
    }
    assert doc["accuracy"]["slim"] == pytest.approx(doc["quantized"]["int8"]["accuracy"]["fp32_top1"])


def test_latency_table_times_every_file_side_by_side(shipped: dict[str, Any]) -> None:
    doc = shipped["doc"]
    lat = doc["latency"]
    assert lat["interleaved"] is True and lat["batch"] == 1
    models = lat["models"]
    assert set(models) == {"original", "slim", "int8", "fp16"}
    assert all(m["median_ms"] > 0 and m["size_bytes"] > 0 for m in models.values())
    assert models["slim"]["macs"] == doc["slim"]["macs"] == models["int8"]["macs"]
    assert models["original"]["macs"] == doc["original"]["macs"]
    assert models["slim"]["size_bytes"] == doc["onnx"]["size_bytes"]
    assert (
        lat["slim_ms"] == models["slim"]["median_ms"]
        and lat["original_ms"] == models["original"]["median_ms"]
    )


def test_shipping_table_in_human_output(tuned: Path, tmp_path: Path) -> None:
    proc = prunekit_cli(
        "slim", tuned, "-o", tmp_path / "m.onnx", "--quantize", "fp16", "--data", "builtin", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "shipping" in proc.stdout and "slim FP16" in proc.stdout and "slim FP32" in proc.stdout
    assert f"wrote {tmp_path / 'm.fp16.onnx'}" in proc.stdout


def test_pt2_loads_with_plain_pytorch_in_a_clean_process(shipped: dict[str, Any], tmp_path: Path) -> None:
    """The .pt2 loads with torch.export.load in a process where importing prunekit is impossible, and
    its outputs equal the slim checkpoint's at two batch sizes."""
    d, doc = shipped["dir"], shipped["doc"]
    assert doc["pt2"]["path"] == "model.pt2" and doc["pt2"]["size_bytes"] == os.path.getsize(d / "model.pt2")
    slim = load_checkpoint(d / "model.pt")
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = slim.model.eval()(x)
    torch.save({"x": x}, tmp_path / "x.pt")
    script = f"""
import importlib.abc, sys
class NoPrunekit(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "prunekit" or name.startswith("prunekit."):
            raise ImportError("prunekit must not be imported")
sys.meta_path.insert(0, NoPrunekit())
import torch
program = torch.export.load({str(d / "model.pt2")!r})
module = program.module()
x = torch.load({str(tmp_path / "x.pt")!r}, weights_only=True)["x"]
out = {{"five": module(x), "one": module(x[:1])}}
torch.save(out, {str(tmp_path / "out.pt")!r})
assert not [m for m in sys.modules if m == "prunekit" or m.startswith("prunekit.")]
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    torch.testing.assert_close(out["five"], expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["one"], expected[:1], rtol=1e-4, atol=1e-5)


def test_pt2_alone_is_written_at_the_output_path(tuned: Path, tmp_path: Path) -> None:
    doc = ok_json(prunekit_cli("slim", tuned, "-o", tmp_path / "m.pt2", "--export", "pt2", "--json"))
    assert (tmp_path / "m.pt2").is_file() and (tmp_path / "m.pt").is_file()
    assert not list(tmp_path.glob("*.onnx")) and "onnx" not in doc
    assert doc["pt2"]["max_abs_diff"] <= doc["pt2"]["rtol"] * doc["pt2"]["max_abs_ref"]


# -- bad input ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("small"), classes=10, train=2, val=1)  # 20 images


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--quantize", "int8"], "--quantize int8 needs --data"),
        (["--quantize", "fp16"], "--quantize fp16 needs --data"),
        (["--quantize", "int4", "--data", "builtin"], "unknown quantisation mode 'int4'"),
        (["--quantize", "int8", "--export", "pt2", "--data", "builtin"], "export onnx too"),
        (["--quantize", "int8", "--export", "none", "--data", "builtin"], "export onnx too"),
        (["--export", "tflite"], "export must be onnx, pt2, onnx,pt2 or none"),
        (["--max-quantization-drop", "1"], "max_quantization_drop needs quantize"),
        (["--quantize", "int8", "--max-quantization-drop", "-1", "--data", "builtin"], "must be >= 0"),
        (["--quantize", "int8", "--calibration-batches", "0", "--data", "builtin"], "calibration_batches"),
    ],
)
def test_bad_shipping_options_are_one_line_errors(
    tuned: Path, tmp_path: Path, extra: list[str], fragment: str
) -> None:
    out = tmp_path / "m.onnx"
    result = CliRunner().invoke(app, ["slim", str(tuned), "-o", str(out), *extra])
    assert_user_error(result, fragment)
    assert list(tmp_path.iterdir()) == []


def test_calibration_set_smaller_than_a_batch_is_refused_before_any_write(
    tuned: Path, small_data: Path, tmp_path: Path
) -> None:
    # the checkpoint is of 10 classes; so is the data, but it has 20 training images (< one batch of 32)
    result = CliRunner().invoke(
        app,
        ["slim", str(tuned), "-o", str(tmp_path / "m.onnx"), "--quantize", "int8", "--data", str(small_data)],
    )
    assert_user_error(result, "calibration set has", f"fewer than one batch of {CALIBRATION_BATCH}")
    assert list(tmp_path.iterdir()) == []


def test_a_second_export_may_not_overwrite_the_checkpoint(tuned: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        [
            "slim",
            str(tuned),
            "-o",
            str(tmp_path / "m.pt2"),
            "--export",
            "pt2",
            "--checkpoint",
            str(tmp_path / "m.pt2"),
        ],
    )
    assert_user_error(result, "same path")


# -- units ----------------------------------------------------------------------------------------


def test_quantization_gate_names_the_worst_copy() -> None:
    config = SlimConfig(quantize="int8,fp16", max_quantization_drop=1.0)
    result = {
        "quantized": {
            "int8": {"mode": "int8", "accuracy": {"drop_points": 1.5}},
            "fp16": {"mode": "fp16", "accuracy": {"drop_points": 0.1}},
        }
    }
    assert (
        quantization_failure(result, config)
        == "the int8 model lost 1.50 top-1 points against FP32 (allowed 1)"
    )
    result["quantized"]["int8"]["accuracy"]["drop_points"] = 1.0  # at the limit: passes
    assert quantization_failure(result, config) is None
    assert quantization_failure(result, SlimConfig(quantize="int8")) is None  # no gate asked for


def test_check_accuracy_counts() -> None:
    labels = np.array([0, 1, 2, 3])
    fp32 = np.array([0, 1, 2, 0])  # 3/4 right
    q = np.array([0, 1, 0, 3])  # 3/4 right, agrees with fp32 on 2
    acc = check_accuracy(fp32, q, labels)
    assert acc == {"examples": 4, "fp32_top1": 0.75, "top1": 0.75, "drop_points": 0.0, "agreement": 0.5}


def test_calibration_batches_are_seeded_whole_batches() -> None:
    data = [(torch.full((1, 2, 2), float(i)), 0) for i in range(100)]
    a, b = calibration_inputs(data, 5), calibration_inputs(data, 5)
    assert len(a) == 100 // CALIBRATION_BATCH  # only whole batches, at most what the data holds
    assert all(x.shape == (CALIBRATION_BATCH, 1, 2, 2) and x.dtype == np.float32 for x in a)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    picked = np.concatenate([x[:, 0, 0, 0] for x in a])
    assert len(set(picked.tolist())) == len(picked) and not np.array_equal(picked, np.arange(len(picked)))
    with pytest.raises(DataError, match="fewer than one batch"):
        calibration_inputs(data[: CALIBRATION_BATCH - 1], 1)


def test_output_paths(tmp_path: Path) -> None:
    """Every output is named after the first format's path, in its folder (which must exist: checked)."""
    out = SlimOutputs.for_output(
        (tmp_path / "model.onnx"), SlimConfig(export="onnx,pt2", quantize="int8"), None, None
    )
    assert (out.onnx, out.pt2, out.checkpoint) == (
        (tmp_path / "model.onnx"),
        (tmp_path / "model.pt2"),
        (tmp_path / "model.pt"),
    )
    assert out.quantized == {"int8": (tmp_path / "model.int8.onnx")}
    assert quantized_path(Path("a/b.onnx"), "fp16") == Path("a/b.fp16.onnx")
    pt2_first = SlimOutputs.for_output((tmp_path / "m.pt2"), SlimConfig(export="pt2,onnx"), None, None)
    assert (pt2_first.pt2, pt2_first.onnx) == ((tmp_path / "m.pt2"), (tmp_path / "m.onnx"))
    assert SlimOutputs.for_output((tmp_path / "m.pt"), SlimConfig(export="none"), None, None).checkpoint == (
        tmp_path / "m.pt"
    )


def test_toml_takes_lists_and_strings(tmp_path: Path) -> None:
    assert SlimConfig(export=["onnx", "pt2"], quantize=["int8"]).formats == ("onnx", "pt2")  # type: ignore[arg-type]
    assert SlimConfig(quantize="INT8, fp16").quantize_modes == ("int8", "fp16")
    with pytest.raises(ConfigError, match="quantize must be a str"):
        SlimConfig(quantize=8)  # type: ignore[arg-type]


# -- run ------------------------------------------------------------------------------------------


def _worse_by(points: float) -> Any:
    """A stand-in for prunekit.quantize.check_accuracy whose quantised copies lose `points`."""

    def check(reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
        return check_accuracy(reference, candidate, labels) | {"drop_points": points}

    return check


def test_slim_quantization_gate_exits_3_after_writing(
    tuned: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("prunekit.quantize.check_accuracy", _worse_by(2.5))
    out = tmp_path / "m.onnx"
    argv = ["slim", str(tuned), "-o", str(out), "--quantize", "fp16", "--data", "builtin"]
    result = CliRunner().invoke(app, [*argv, "--max-quantization-drop", "2"])
    assert result.exit_code == 3, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: the fp16 model lost 2.50 top-1 points against FP32 (allowed 2); the files are written: "
        f"{tmp_path / 'm.fp16.onnx'}"
    ]
    assert {p.name for p in tmp_path.iterdir()} == {"m.onnx", "m.fp16.onnx", "m.pt"}
    assert CliRunner().invoke(app, [*argv, "--max-quantization-drop", "2.5"]).exit_code == 0  # at the limit


def test_run_ships_every_artifact(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", classes=10, train=4, val=2)  # 40 training images
    config = tiny_run_config(
        tmp_path / "run.toml", data, export="onnx,pt2", quantize="int8", calibration_batches=1,
        max_quantization_drop=100.0,
    )  # fmt: skip
    cfg = load_run_config(config)
    assert cfg.slim.quantize_modes == ("int8",) and cfg.slim.formats == ("onnx", "pt2")
    out = tmp_path / "run"
    doc = ok_json(prunekit_cli("run", config, "--out-dir", out, "--json"))
    report = json.loads((out / "report.json").read_text())
    assert doc == report and report["summary"]["passed"] is True
    for name in ("model.onnx", "model.int8.onnx", "model.pt2", "model.pt", "report.json"):
        assert (out / name).is_file(), name
    assert report["files"]["onnx_int8"] == str(out / "model.int8.onnx")
    assert report["files"]["pt2"] == str(out / "model.pt2")
    assert report["slim"]["quantized"]["int8"]["method"]["calibration"]["images"] == CALIBRATION_BATCH
    assert report["summary"]["max_quantization_drop"] == 100.0
    assert report["config"]["slim"]["quantize"] == "int8"


def test_run_quantization_gate_fails_with_exit_code_3(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("prunekit.quantize.check_accuracy", _worse_by(4.0))
    data = make_image_folder(tmp_path / "data", classes=10, train=4, val=2)
    config = tiny_run_config(
        tmp_path / "run.toml", data, export="onnx", quantize="int8", calibration_batches=1,
        max_quantization_drop=1.0,
    )  # fmt: skip
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", str(config), "--out-dir", str(out), "--json"])
    assert result.exit_code == 3, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert json.loads(result.stdout) == report
    assert report["summary"]["passed"] is False and report["error"]["stage"] == "ci"
    assert report["error"]["message"].startswith(
        "the int8 model lost 4.00 top-1 points against FP32 (allowed 1)"
    )
    assert (out / "model.int8.onnx").is_file() and (out / "model.onnx").is_file()


def test_run_refuses_a_too_small_calibration_set_before_training(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", classes=10, train=3, val=1)  # 30 < 32
    config = tiny_run_config(tmp_path / "run.toml", data, quantize="int8")
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", str(config), "--out-dir", str(out)])
    assert_user_error(result, "calibration set has 30 image(s)")
    assert not (out / "gated.pt").exists()
