"""The latency budget: parsing the target, the per-layer table (fit, reuse), the LatencyModel that
replaces MAC weights, and `finetune --target-latency` through the CLI with its one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision
from test_pipeline_cli import assert_user_error
from typer.testing import CliRunner

import prunekit.latency_table as lt
from prunekit.cli import app
from prunekit.config import FinetuneConfig, parse_target_latency
from prunekit.errors import ConfigError
from prunekit.graph import analyze
from prunekit.objective import LatencyModel, MacModel


@pytest.mark.parametrize(
    "value, parsed",
    [
        ("0.5", ("fraction", 0.5)),
        (0.25, ("fraction", 0.25)),
        ("12ms", ("ms", 12.0)),
        (" 7.5 MS", ("ms", 7.5)),
    ],
)
def test_parse_target_latency(value: object, parsed: tuple[str, float]) -> None:
    assert parse_target_latency(value) == parsed  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["fast", "1.0", "0", "-3ms", "nanms", "1.5"])
def test_bad_target_latency(value: str) -> None:
    with pytest.raises(ConfigError, match="target_latency"):
        parse_target_latency(value)


def test_one_budget_only() -> None:
    with pytest.raises(ConfigError, match="one budget"):
        FinetuneConfig()
    with pytest.raises(ConfigError, match="one budget"):
        FinetuneConfig(target_macs=0.5, target_latency="0.5")
    assert FinetuneConfig(target_latency=0.5).target_latency == "0.5"  # type: ignore[arg-type]  # TOML number


@pytest.fixture(scope="module")
def small() -> tuple[torch.nn.Module, object]:
    model = torchvision.models.resnet18(num_classes=10).eval()
    return model, analyze(model, torch.zeros(1, 3, 32, 32))


def _fake_timing(monkeypatch: pytest.MonkeyPatch, calls: list[int] | None = None) -> None:
    """Layers cost 0.01 + 1e-6 * c_in * c_out ms (grouped: 1e-4 per group); the model 5 ms."""

    def time_layer(module, in_shape, c_in, c_out, threads, tmp, groups=None):  # noqa: ANN001, ANN202
        if calls is not None:
            calls.append(1)
        return 0.01 + (1e-4 * groups if groups else 1e-6 * c_in * c_out)

    monkeypatch.setattr(lt, "_time_layer", time_layer)
    monkeypatch.setattr(lt, "_whole_model_ms", lambda *a: 5.0)


def test_table_fits_the_measured_slopes_and_is_reused(
    small: tuple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, graph = small
    calls: list[int] = []
    _fake_timing(monkeypatch, calls)
    table, found = lt.latency_table(model, graph, (3, 32, 32), threads=2, granularity=8)
    assert found is None and calls
    for term in table.terms:
        assert term.beta_ms == pytest.approx(1e-6, rel=1e-6) and term.alpha_ms == pytest.approx(
            0.01, abs=1e-9
        )
        assert len(term.points) > 1
    variable = sum(1e-6 * len(t.in_units) * len(t.out_units) for t in graph.mac_terms if t.prunable)
    assert table.slope_scale == 1.0 and table.fixed_ms == pytest.approx(5.0 - variable)
    # the LatencyModel predicts the slope part, as a MacModel with these factors would
    model_ms = LatencyModel(graph, table.beta())
    assert model_ms.gateable_macs == pytest.approx(variable, rel=1e-5)
    half = torch.rand(1, graph.num_units, generator=torch.Generator().manual_seed(0)).round()
    active = half[0].tolist()
    expected = sum(
        1e-6 * t.macs(lambda u: active[u]) / t.factor
        for t in graph.mac_terms
        if t.prunable  # c_in * c_out
    )
    assert float(model_ms(half)[0]) == pytest.approx(expected, rel=1e-4)
    assert float(model_ms(half)[0]) < model_ms.gateable_macs
    assert len(MacModel(graph).dense_factor) == len(model_ms.dense_factor)

    path = tmp_path / "t.latency.json"
    table.save(path)
    calls.clear()
    again, found = lt.latency_table(model, graph, (3, 32, 32), threads=2, granularity=8, cached=[path])
    assert found == path and not calls and again == table
    _, found = lt.latency_table(model, graph, (3, 32, 32), threads=1, granularity=8, cached=[path])
    assert found is None and calls  # measured for other settings: measured again
    path.write_text("{not json")
    _, found = lt.latency_table(model, graph, (3, 32, 32), threads=2, granularity=8, cached=[path])
    assert found is None  # a damaged file is measured again


def test_slopes_are_scaled_when_isolated_layers_add_up_to_more_than_the_model(
    small: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, graph = small
    _fake_timing(monkeypatch)
    monkeypatch.setattr(lt, "_whole_model_ms", lambda *a: 0.5)
    table, _ = lt.latency_table(model, graph, (3, 32, 32), threads=2, granularity=8)
    assert table.slope_scale < 1 and table.fixed_ms == pytest.approx(0.05)


def test_real_measurement_of_one_layer_grows_with_its_width(tmp_path: Path) -> None:
    conv = torch.nn.Conv2d(64, 64, 3, padding=1)
    small = lt._time_layer(conv, (1, 64, 56, 56), 8, 8, 1, tmp_path)
    large = lt._time_layer(conv, (1, 64, 56, 56), 64, 64, 1, tmp_path)
    assert 0 < small < large


# -- the CLI --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("latency")
    result = CliRunner().invoke(
        app, ["gate", "resnet18", "--num-classes", "10", "--input-shape", "32", "-o", str(d / "gated.pt")]
    )
    assert result.exit_code == 0, result.stderr
    return d / "gated.pt"


def _finetune(gated: Path, out: Path, *extra: str) -> object:
    argv = ["finetune", str(gated), "-o", str(out), "--data", "builtin", "--epochs", "1"]
    return CliRunner().invoke(app, [*argv, "--max-steps-per-epoch", "4", "--batch-size", "32", *extra])


def test_finetune_toward_a_latency_budget(
    gated: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_timing(monkeypatch)
    out = tmp_path / "tuned.pt"
    result = _finetune(gated, out, "--target-latency", "0.9", "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    budget = doc["target_latency"]
    assert (
        budget["target"] == "0.9"
        and budget["original_ms"] == 5.0
        and budget["target_ms"] == pytest.approx(4.5)
    )
    assert budget["table"] == str(tmp_path / "tuned.latency.json") and budget["table_source"] == "measured"
    assert doc["target_macs"] is None
    final = doc["final"]
    assert final["decided"] and final["within_budget"] and final["latency_fraction"] <= 0.9 + 1e-9
    assert 0 < final["macs_fraction"] < 1 and final["macs_fraction"] != final["latency_fraction"]
    table = json.loads((tmp_path / "tuned.latency.json").read_text())
    assert table["full_ms"] == 5.0 and table["key"]["threads"] == 2
    # an absolute target, measured once: the saved table is reused
    again = _finetune(gated, out, "--target-latency", "4.6ms", "--json")
    assert again.exit_code == 0, again.stderr
    doc = json.loads(again.stdout)
    assert doc["target_latency"]["table_source"] == str(tmp_path / "tuned.latency.json")
    assert doc["target_latency"]["target_ms"] == pytest.approx(4.6)


def test_unreachable_latency_budget_is_one_line_and_writes_nothing(
    gated: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_timing(monkeypatch)
    result = _finetune(gated, tmp_path / "tuned.pt", "--target-latency", "0.2")
    assert_user_error(result, "cannot be met", "minimum widths")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--target-latency", "fast"], "target_latency must be"),
        (["--target-latency", "0.5", "--target-macs", "0.5"], "not both"),
        (["--target-latency", "2"], "target_latency must be"),
    ],
)
def test_bad_latency_options(gated: Path, tmp_path: Path, extra: list[str], fragment: str) -> None:
    assert_user_error(_finetune(gated, tmp_path / "t.pt", *extra), fragment)
    assert list(tmp_path.iterdir()) == []
