"""The CLI contract: stdout for results, one-line errors on stderr, exit codes, --json, fast start-up."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import pytest
import torch
import torchvision
import typer
from conftest import no_result_on_stdout
from typer.testing import CliRunner

import prunekit
from prunekit.cli import app
from prunekit.cli.common import user_errors
from prunekit.cli.render import NON_TTY_WIDTH
from prunekit.stages import report as report_stage

BIN = Path(sys.executable).parent


def invoke(*args: str) -> typer.testing.Result:
    return CliRunner().invoke(app, list(args))


def assert_user_error(result: typer.testing.Result, *fragments: str) -> str:
    """Exit code 2, nothing on stdout, exactly one `error: ...` line on stderr, no traceback."""
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert no_result_on_stdout(result.stdout)
    assert result.stderr.startswith("error: ") and result.stderr.endswith("\n")
    assert result.stderr.count("\n") == 1
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.stderr
    return result.stderr


# -- start-up --------------------------------------------------------------------------------------


def test_installed_entry_point_version() -> None:
    exe = BIN / "prunekit"
    assert exe.exists(), f"{exe} missing: run `make venv` (pip install -e .)"
    proc = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, f"prunekit {prunekit.__version__}\n", "")


def test_python_m_help() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "prunekit", "--help"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "report" in proc.stdout and "models" in proc.stdout
    assert proc.stderr == ""


def test_cli_import_does_not_import_heavy_modules() -> None:
    code = (
        "import sys, prunekit.cli\n"
        "heavy = [m for m in ('torch', 'torchvision', 'fvcore', 'onnx', 'onnxruntime') if m in sys.modules]\n"
        "print(','.join(heavy))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ""


def test_version_in_process() -> None:
    result = invoke("--version")
    assert (result.exit_code, result.stdout, result.stderr) == (0, f"prunekit {prunekit.__version__}\n", "")


def test_usage_error_is_exit_code_2() -> None:
    result = invoke("report", "resnet18", "--depth", "-1")
    assert result.exit_code == 2
    assert no_result_on_stdout(result.stdout) and "Traceback" not in result.output


# -- user errors: exit 2, one line -----------------------------------------------------------------


@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_unknown_model(json_flag: list[str]) -> None:
    message = assert_user_error(invoke("report", "resnet1888", *json_flag), "unknown model 'resnet1888'")
    assert "did you mean resnet18" in message


def test_missing_hub_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    expected = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert_user_error(invoke("report", "resnet18", "--weights", "IMAGENET1K_V1"), str(expected))


def test_mismatched_state_dict(tmp_path: Path) -> None:
    state_dict = torchvision.models.resnet18(weights=None, num_classes=10).state_dict()
    state_dict.pop("layer4.1.bn2.bias")
    path = tmp_path / "r18.pth"
    torch.save(state_dict, path)
    assert_user_error(
        invoke("report", "resnet18", "--weights", str(path), "--num-classes", "4", "--json"),
        "does not fit resnet18(num_classes=4)",
        "1 missing key(s) (layer4.1.bn2.bias)",
        "fc.weight: file [10, 512], model [4, 512]",
    )


def test_corrupt_weights_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.pth"
    path.write_bytes(b"\x00" * 100)
    assert_user_error(invoke("report", "resnet18", "--weights", str(path)), "cannot read weights file")


def test_corrupt_checkpoint_report_is_a_user_error(tmp_path: Path) -> None:
    path = tmp_path / "tuned.pt"
    path.write_bytes(b"placeholder")
    assert_user_error(invoke("report", str(path)), "corrupt or not a torch file")


def test_too_small_input_is_a_user_error() -> None:
    assert_user_error(invoke("report", "alexnet", "--input-shape", "16"), "does not run on 3x16x16 inputs")


def test_missing_onnx_file(tmp_path: Path) -> None:
    assert_user_error(invoke("report", str(tmp_path / "none.onnx")), "ONNX file not found")


def test_missing_data_folder_through_the_error_helper(tmp_path: Path) -> None:
    # A command of our own, built the way every prunekit command is (see prunekit.cli.common).
    probe = typer.Typer()

    @probe.command()
    @user_errors
    def train(data: Annotated[str, typer.Option()]) -> None:
        from prunekit.data import resolve_data

        resolve_data(data, input_shape=(3, 32, 32))

    missing = tmp_path / "nowhere"
    result = CliRunner().invoke(probe, ["--data", str(missing)])
    assert_user_error(result, f"error: data folder not found: {missing}")


def test_bugs_are_not_disguised_as_user_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(report_stage, "report_target", broken)
    result = invoke("report", "resnet18")
    assert result.exit_code == 1
    assert isinstance(result.exception, RuntimeError)


# -- results ---------------------------------------------------------------------------------------


def test_models_json() -> None:
    result = invoke("models", "--json", "--filter", "resnet")
    assert result.exit_code == 0 and result.stderr == ""
    rows = json.loads(result.stdout)["models"]
    names = [row["model"] for row in rows]
    assert "resnet50" in names and all("resnet" in n for n in names)
    r50 = rows[names.index("resnet50")]
    assert r50["params"] == 25_557_032 and r50["macs"] == 4_089_000_000
    assert r50["default_weights"] == "ResNet50_Weights.IMAGENET1K_V2"
    assert r50["weights"] == ["IMAGENET1K_V1", "IMAGENET1K_V2"] and r50["input_shape"] == [3, 224, 224]


def test_models_table_on_a_non_terminal() -> None:
    result = invoke("models", "--filter", "mobilenet")
    assert result.exit_code == 0 and result.stderr == ""
    assert "mobilenet_v2" in result.stdout and "mobilenet_v3_large" in result.stdout
    assert max(len(line) for line in result.stdout.splitlines()) <= NON_TTY_WIDTH


def test_models_filter_without_match() -> None:
    result = invoke("models", "--filter", "no-such-net")
    assert result.exit_code == 0
    assert "no classification model name contains 'no-such-net'" in result.stderr


def test_report_table_on_a_non_terminal() -> None:
    result = invoke("report", "resnet18", "--input-shape", "64", "--depth", "2")
    assert result.exit_code == 0 and result.stderr == ""
    out = result.stdout
    assert "MACs" in out and "FLOP" not in out
    assert "layer1.0" in out and "3 x 64 x 64" in out
    assert max(len(line) for line in out.splitlines()) <= NON_TTY_WIDTH


def test_report_json_with_latency() -> None:
    result = invoke("report", "resnet18", "--input-shape", "32", "--depth", "0", "--latency", "--json")
    assert result.exit_code == 0 and result.stderr == ""
    data = json.loads(result.stdout)
    assert data["modules"] == [] and data["latency_backend"] == "torch"
    assert data["latency"]["threads"] == 1 and data["latency"]["median_ms"] > 0
