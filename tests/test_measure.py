"""MAC and parameter counts against torchvision's published metadata, ONNX counting, latency."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn
from typer.testing import CliRunner

from prunekit.cli import app
from prunekit.measure import (
    count_macs,
    module_rows,
    onnx_input_shape,
    onnx_latency_ms,
    onnx_macs_params,
    torch_latency_ms,
)
from prunekit.models import build_model, load_model

# torchvision's weights.meta["_ops"] (labelled GFLOPS) counts conv, linear, matmul and attention MACs.
ACCEPTANCE_MODELS = ["resnet50", "resnet18", "mobilenet_v2", "efficientnet_b0", "vgg16_bn"]


def torchvision_meta(name: str) -> dict:
    return torchvision.models.get_model_weights(name).DEFAULT.meta


@pytest.mark.parametrize("name", ACCEPTANCE_MODELS)
def test_macs_and_params_match_torchvision_metadata(name: str) -> None:
    model = build_model(name)
    report = count_macs(model, torch.randn(1, 3, 224, 224))
    meta = torchvision_meta(name)
    assert report.total_macs == pytest.approx(meta["_ops"] * 1e9, rel=0.03)
    assert report.params == meta["num_params"]


def test_report_json_matches_torchvision_metadata() -> None:
    result = CliRunner().invoke(app, ["report", "resnet50", "--json"])
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    meta = torchvision_meta("resnet50")
    assert data["macs"] == pytest.approx(meta["_ops"] * 1e9, rel=0.03)
    assert data["params"] == meta["num_params"]
    assert data["input_shape"] == [3, 224, 224]
    assert {row["name"] for row in data["modules"]} >= {"conv1", "layer1", "layer4", "fc"}
    assert result.stderr == ""


def test_attention_is_counted_with_the_fastpath_off() -> None:
    # Under no_grad the fused attention kernel hides the projections from fvcore; count_macs must not.
    layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, batch_first=True).eval()
    tokens, dim, ff = 10, 32, 64
    expected = tokens * dim * 3 * dim + 2 * tokens * tokens * dim + tokens * dim * dim + 2 * tokens * dim * ff
    assert count_macs(layer, torch.randn(1, tokens, dim)).total_macs == expected
    assert torch.backends.mha.get_fastpath_enabled()  # restored


def test_counting_is_quiet_and_restores_training_mode(
    capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    model = torchvision.models.resnet18(weights=None, num_classes=10).train()
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.DEBUG):
        warnings.simplefilter("always")
        report = count_macs(model, torch.randn(1, 3, 32, 32))
    assert model.training
    assert report.total_macs > 0
    assert [str(w.message) for w in caught] == []
    assert [r for r in caplog.records if r.name.startswith("fvcore")] == []
    assert capfd.readouterr() == ("", "")


def test_module_rows_by_depth() -> None:
    model = torchvision.models.resnet18(weights=None)
    report = count_macs(model, torch.randn(1, 3, 64, 64))
    top = module_rows(report, 1)
    assert [row.name for row in top][:3] == ["conv1", "bn1", "relu"]
    assert sum(row.macs for row in top) == report.total_macs  # resnet18 does all its MACs in children
    assert sum(row.params for row in top) == report.params
    deeper = {row.name: row for row in module_rows(report, 2)}
    assert deeper["layer1.0"].depth == 2
    assert deeper["layer1"].macs == sum(deeper[f"layer1.{i}"].macs for i in range(2))
    assert module_rows(report, 0) == ()


@pytest.fixture(scope="module")
def resnet18_onnx(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    model = torchvision.models.resnet18(weights=None).eval()
    path = tmp_path_factory.mktemp("onnx") / "resnet18.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated; it is faster for a test
        torch.onnx.export(
            model,
            (torch.randn(2, 3, 224, 224),),
            str(path),
            dynamo=False,
            input_names=["input"],
            dynamic_axes={"input": {0: "batch"}},
        )
    return path, model


def test_onnx_macs_agree_with_fvcore(resnet18_onnx: tuple[Path, nn.Module]) -> None:
    path, model = resnet18_onnx
    macs, params = onnx_macs_params(path)
    torch_report = count_macs(model, torch.randn(1, 3, 224, 224))
    assert macs == pytest.approx(torch_report.total_macs, rel=0.01)
    # BatchNorm is folded into the convs at export: its scale/shift vanish, conv biases appear.
    assert params == pytest.approx(torch_report.params, rel=0.01)
    assert onnx_input_shape(path) == (1, 3, 224, 224)


def test_report_onnx_json(resnet18_onnx: tuple[Path, nn.Module]) -> None:
    path, _ = resnet18_onnx
    result = CliRunner().invoke(app, ["report", str(path), "--json"])
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["kind"] == "onnx"
    assert data["macs"] == onnx_macs_params(path)[0]
    assert data["modules"] == [] and data["latency"] is None


def test_onnx_latency(resnet18_onnx: tuple[Path, nn.Module]) -> None:
    path, _ = resnet18_onnx
    result = onnx_latency_ms(path, (1, 3, 224, 224), threads=1, warmup=1, repeats=3)
    assert result.repeats == 3 and result.threads == 1
    assert 0 < result.median_ms <= result.p90_ms


def test_torch_latency_restores_threads_and_mode() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()).train()
    before = torch.get_num_threads()
    result = torch_latency_ms(model, torch.randn(1, 3, 32, 32), threads=1, warmup=1, repeats=5)
    assert torch.get_num_threads() == before
    assert model.training
    assert result.repeats == 5 and 0 < result.median_ms <= result.p90_ms


# Where a model built without weights differs from the one torchvision's metadata describes, with the reason.
ZOO_EXCEPTIONS = {
    "googlenet": "without weights it keeps two auxiliary classifiers (params); the DEFAULT weights drop them",
    "vit_h_14": "its DEFAULT weights are for 518 px inputs; without weights torchvision builds it for 224 px",
}


@pytest.mark.slow
@pytest.mark.parametrize("name", torchvision.models.list_models(module=torchvision.models))
def test_whole_zoo_matches_torchvision_metadata(name: str) -> None:

    model = build_model(name)
    report = count_macs(model, load_model(name)[1].example_input())
    meta = torchvision_meta(name)
    if name != "vit_h_14":
        assert report.total_macs == pytest.approx(meta["_ops"] * 1e9, rel=0.03)
    if name not in ZOO_EXCEPTIONS:
        assert report.params == meta["num_params"]
