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
from prunekit.checkpoint import load_checkpoint
from prunekit.cli import app
from prunekit.config import FinetuneConfig, parse_target_latency
from prunekit.errors import ConfigError
from prunekit.graph import analyze
from prunekit.objective import LatencyModel, MacModel
from prunekit.plan import fraction_plan


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
    """Layers cost 0.01 + 1e-6 * c_in * c_out ms (grouped: 1e-4 per group); the model 5 ms, and 3 ms
    with every group at half its width."""

    def time_layer(module, in_shape, c_in, c_out, threads, tmp, groups=None):  # noqa: ANN001, ANN202
        if calls is not None:
            calls.append(1)
        return 0.01 + (1e-4 * groups if groups else 1e-6 * c_in * c_out)

    monkeypatch.setattr(lt, "_time_layer", time_layer)

    def whole(model, shape, threads, tmp, *, graph, plans):  # noqa: ANN001, ANN202
        # cutting one group saves nothing measurable: its slopes keep their scale (1)
        return {"full": 5.0, "half": 3.0} | {name: 5.0 for name in plans if name != "half"}

    def decided(self, keep):  # noqa: ANN001, ANN202
        # a decided model (timed at the decision point) costs 2 ms plus 3 ms times the share of units kept
        return (2.0 + 3.0 * sum(keep) / len(keep)) / 5.0

    monkeypatch.setattr(lt, "_whole_models_ms", whole)
    monkeypatch.setattr(lt.MeasuredLatency, "fraction", decided)


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
    half = fraction_plan(graph, 0.5).unit_mask(graph)
    variable_half = sum(
        1e-6 * t.macs(lambda u: float(half[u])) / t.factor for t in graph.mac_terms if t.prunable
    )
    # one scale and a fixed part make the model exact at full width (5 ms) and at half width (3 ms)
    scale = table.slope_scale
    assert scale == pytest.approx(2.0 / (variable - variable_half), rel=1e-6)
    assert table.fixed_ms + scale * variable == pytest.approx(5.0)
    assert table.fixed_ms + scale * variable_half == pytest.approx(3.0)
    assert table.calibration["half_ms"] == 3.0
    # the LatencyModel predicts the (scaled) slope part, as a MacModel with these factors would
    model_ms = LatencyModel(graph, table.beta())
    assert model_ms.gateable_macs == pytest.approx(scale * variable, rel=1e-5)
    half = torch.rand(1, graph.num_units, generator=torch.Generator().manual_seed(0)).round()
    active = half[0].tolist()
    expected = table.slope_scale * sum(
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


def test_group_scales_follow_the_measured_savings_of_each_cut(
    small: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A group whose cut saves half of what its layers predict halves the slopes of its layers (the
    geometric mean of both groups' scales for a layer between two groups)."""
    model, graph = small
    _fake_timing(monkeypatch)
    stream = next(g for g in graph.groups if g.name == "layer4.0.conv2")  # layer4's residual stream
    raw = None

    def whole(model, shape, threads, tmp, *, graph, plans):  # noqa: ANN001, ANN202
        nonlocal raw
        raw = {t.name: 1e-6 for t in graph.mac_terms if t.prunable}
        full = lt._slope_part(graph, raw, None) + 0.01
        out = {"full": full, "half": lt._slope_part(graph, raw, plans["half"].unit_mask(graph)) + 0.01}
        for name, plan in plans.items():
            if name != "half":
                saving = full - 0.01 - lt._slope_part(graph, raw, plan.unit_mask(graph))
                out[name] = full - (0.5 if int(name) == stream.index else 1.0) * saving
        return out

    monkeypatch.setattr(lt, "_whole_models_ms", whole)
    table, _ = lt.latency_table(model, graph, (3, 32, 32), threads=2, granularity=8)
    scales = table.calibration["group_scales"]
    assert scales["layer4.0.conv2"] == pytest.approx(0.5)
    # a group whose cut is too small a share of the time to resolve keeps its slopes
    assert all(v == pytest.approx(1.0) for k, v in scales.items() if k != "layer4.0.conv2")
    by_name = {t.name: t for t in table.terms}
    assert by_name["fc"].group_scale == pytest.approx(0.5)  # reads only the stream
    assert by_name["layer4.1.conv1"].group_scale == pytest.approx(0.5**0.5)  # stream -> its own group
    assert by_name["layer1.0.conv1"].group_scale == pytest.approx(1.0)


def test_channel_block_rounding(small: tuple) -> None:
    """onnxruntime pays for channels in blocks: hard decisions are costed at rounded-up widths, the
    smooth training objective is not."""
    assert [lt.rounded(n, 16) for n in (1, 16, 17, 40, 48)] == [16, 16, 32, 48, 48]
    assert lt.rounded(40, 1) == 40
    _, graph = small
    beta = {t.name: 1e-6 for t in graph.mac_terms if t.prunable}
    blocked, plain = LatencyModel(graph, beta, block=16), LatencyModel(graph, beta)
    keep = torch.ones(1, graph.num_units)
    first = graph.groups[0]  # conv1's 64 channels, one unit each: keep 40 of them
    assert first.units == first.channels == 64
    keep[0, first.offset : first.offset + 24] = 0
    hard = float(blocked(keep)[0])
    assert hard == pytest.approx(lt._slope_part(graph, beta, keep[0].bool().tolist(), 16), rel=1e-5)
    assert hard > float(plain(keep)[0])  # 40 channels cost like 48
    soft = keep.clone().requires_grad_(True)
    assert float(blocked(soft)[0].detach()) == pytest.approx(float(plain(keep)[0]), rel=1e-6)  # smooth
    full = torch.ones(1, graph.num_units)
    # fixed counts round too (the stem's 3 input channels, the head's 10 outputs), as in the fits
    assert float(blocked(full)[0]) == pytest.approx(lt._slope_part(graph, beta, None, 16), rel=1e-5)
    assert blocked.gateable_macs == pytest.approx(float(blocked(full)[0]))


def test_block_probe_finds_a_step_of_16(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def stepped(module, in_shape, c_in, c_out, threads, tmp, groups=None):  # noqa: ANN001, ANN202
        return 0.1 + 0.01 * (-(-c_out // 16) * 16)

    monkeypatch.setattr(lt, "_time_layer", stepped)
    assert lt._probe_block(1, tmp_path)[0] == 16
    monkeypatch.setattr(lt, "_time_layer", lambda m, s, c_in, c_out, *a, **k: 0.1 + 0.01 * c_out)
    assert lt._probe_block(1, tmp_path)[0] == 1


def test_calibration_falls_back_when_the_two_timings_disagree() -> None:
    # half width measured slower than full (noise on a tiny model): the slopes keep their sum
    assert lt._calibrate(5.0, 5.5, 2.0, 1.0) == (1.0, 3.0)
    # slopes that add up to more than the whole model are scaled to explain it, fixed part 0
    assert lt._calibrate(1.0, 1.0, 4.0, 2.0) == (0.25, 0.0)
    # a fit that would need a negative fixed part: the same
    assert lt._calibrate(4.0, 1.0, 4.0, 2.0) == (1.0, 0.0)
    assert lt._calibrate(5.0, 3.0, 4.0, 2.0) == (1.0, 1.0)  # exact: 1 + 1 * 4 = 5, 1 + 1 * 2 = 3


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
    assert '"event": "latency_table"' in result.stderr  # a progress line before the layers are timed
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
    assert (tmp_path / "tuned.best.pt").is_file()
    assert 0 < final["macs_fraction"] < 1 and final["macs_fraction"] != final["latency_fraction"]
    # the decided widths were timed for real: the largest set of gates whose time fits 0.9 of 5 ms
    decision = budget["decision"]
    assert decision["measured_fraction"] <= 0.9 and len(decision["measurements"]) <= 8
    fits = [m for m in decision["measurements"] if m["fraction"] <= 0.9]
    assert decision["gates"] == max(m["gates"] for m in fits)
    assert all(m["fraction"] > 0.9 for m in decision["measurements"] if m["gates"] > decision["gates"])
    slim = load_checkpoint(out)
    keep = slim.gates.unit_activity()[0].bool().tolist()  # type: ignore[union-attr]
    assert (2.0 + 3.0 * sum(keep) / len(keep)) / 5.0 == pytest.approx(decision["measured_fraction"])
    table = json.loads((tmp_path / "tuned.latency.json").read_text())
    assert table["full_ms"] == 5.0 and table["key"]["threads"] == 2 and table["version"] == lt.TABLE_VERSION
    # an absolute target, measured once: the saved table is reused
    again = _finetune(gated, out, "--target-latency", "4.6ms", "--json")
    assert again.exit_code == 0, again.stderr
    doc = json.loads(again.stdout)
    assert '"event": "latency_table"' not in again.stderr  # nothing is timed again
    assert doc["target_latency"]["table_source"] == str(tmp_path / "tuned.latency.json")
    assert doc["target_latency"]["target_ms"] == pytest.approx(4.6)
    report = CliRunner().invoke(app, ["report", str(out), "--json"])
    assert report.exit_code == 0, report.stderr
    info = json.loads(report.stdout)["checkpoint"]
    assert info["target_macs"] is None and info["target_latency"]["target"] == "4.6ms"
    assert info["target_latency"]["decision"]["measured_fraction"] <= 4.6 / 5.0


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


def test_measured_latency_times_real_exports(small: tuple) -> None:
    """The decision point's timer exports the full model once and each decided model, and gives a
    positive ratio (no timing target here: the machine is shared)."""
    model, graph = small
    timer = lt.MeasuredLatency(model, graph, (3, 32, 32), threads=1)
    keep = [True] * graph.num_units
    first = timer.fraction(keep)
    full = timer._full
    half = fraction_plan(graph, 0.5).unit_mask(graph)
    second = timer.fraction(half)
    assert timer._full == full and full is not None and full.is_file()  # exported once
    assert 0.2 < first < 5 and 0 < second < 5
    timer.close()
    assert not full.exists()


def test_within_budget_follows_the_measured_decision() -> None:
    """Where the table and the real timing of the decided widths disagree, the timing decides whether
    an epoch is within the budget (and so whether it can become the best checkpoint)."""
    from types import SimpleNamespace

    from prunekit.stages.finetune import _within_budget

    over_by_table = SimpleNamespace(target_fraction=0.5, fits=lambda kept: False)
    measured = {"decision": {"measured_fraction": 0.49}}
    decided, undecided = (
        SimpleNamespace(decided=True, gateable_kept=0.6, macs_per_example=None),
        SimpleNamespace(decided=False, gateable_kept=0.6, macs_per_example=None),
    )
    assert _within_budget(SimpleNamespace(latency=measured, budget=over_by_table), decided) is True
    assert _within_budget(SimpleNamespace(latency=measured, budget=over_by_table), undecided) is False
    too_slow = {"decision": {"measured_fraction": 0.51}}
    within_by_table = SimpleNamespace(target_fraction=0.5, fits=lambda kept: True)
    assert _within_budget(SimpleNamespace(latency=too_slow, budget=within_by_table), decided) is False
    assert _within_budget(SimpleNamespace(latency=None, budget=within_by_table), decided) is True
