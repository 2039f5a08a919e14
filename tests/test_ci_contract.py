"""The CI contract: a document on every exit of `run --json`, config checked before any work,
observable progress off a terminal, metrics.csv, and `report` showing what a checkpoint knows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import make_image_folder
from typer.testing import CliRunner

from prunekit.cli import app
from prunekit.cli.progress import Progress
from prunekit.config import ModelSpec
from prunekit.metrics import read_metrics
from prunekit.stages.gate import gate_stage

EXE = Path(sys.executable).parent / "prunekit"


def run_exe(*args: Any, env: dict[str, str] | None = None, **kwargs: Any) -> subprocess.CompletedProcess:
    env = os.environ | {"OMP_NUM_THREADS": "1", "COLUMNS": "120"} | (env or {})
    return subprocess.run(
        [str(EXE), *map(str, args)], capture_output=True, text=True, timeout=600, env=env, **kwargs
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ci")
    data = make_image_folder(root / "data", classes=3, train=8, val=2)
    gated = root / "gated.pt"
    gate_stage(ModelSpec("resnet18", num_classes=3, input_shape=32), gated)
    return gated, data


def _config(tmp_path: Path, data: Path, **finetune: Any) -> Path:
    values = {
        "target_macs": 0.5,
        "epochs": 1,
        "max_steps_per_epoch": 1,
        "workers": 0,
        "batch_size": 8,
    } | finetune
    lines = "\n".join(f"{k} = {json.dumps(v)}" for k, v in values.items())
    config = tmp_path / "run.toml"
    config.write_text(
        f'[model]\narch = "resnet18"\nnum_classes = 3\ninput_shape = 32\n'
        f'[finetune]\ndata = "{data}"\n{lines}\n[slim]\nexport = "none"\n'
    )
    return config


# -- results on every exit ----------------------------------------------------------------------------


def test_run_json_prints_what_was_done_when_a_later_stage_fails(
    tiny: tuple[Path, Path], tmp_path: Path
) -> None:
    _, data = tiny
    out = tmp_path / "run"
    # lr 1e30: epoch 1 is saved (huge, finite weights), epoch 2's loss is not finite: the finetune stage fails
    proc = run_exe("run", _config(tmp_path, data, lr=1e30, epochs=2), "-o", out, "--json")
    assert proc.returncode == 2, proc.stderr[-2000:]
    doc = json.loads(proc.stdout)  # exactly one document
    assert doc["summary"]["passed"] is False
    assert doc["error"]["stage"] == "finetune" and doc["error"]["exit_code"] == 2
    assert "non-finite loss" in doc["error"]["message"]
    assert doc["gate"]["output"] == str(out / "gated.pt") and doc["finetune"] is None and doc["slim"] is None
    assert set(doc["files"]) >= {"gated", "tuned", "report"} and "slim" not in doc["files"]
    assert json.loads((out / "report.json").read_text()) == doc
    assert proc.stderr.strip().splitlines()[-1].startswith("error: non-finite loss")


def test_run_json_on_an_interrupt_says_where_to_resume(
    tiny: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prunekit.trainer import Trainer

    _, data = tiny
    out = tmp_path / "run"
    real = Trainer.train_one_epoch

    def interrupted_in_epoch_two(self: Trainer, *a: Any, **k: Any) -> dict:
        if self.epoch >= 1:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(Trainer, "train_one_epoch", interrupted_in_epoch_two)
    result = CliRunner().invoke(
        app, ["run", str(_config(tmp_path, data, epochs=2)), "-o", str(out), "--json"]
    )
    assert result.exit_code == 130, result.stderr
    doc = json.loads(result.stdout)
    assert doc["error"]["exit_code"] == 130 and doc["error"]["stage"] == "finetune"
    assert f"resume from {out / 'tuned.pt'} (after epoch 1)" in doc["error"]["message"]
    assert json.loads((out / "report.json").read_text()) == doc


# -- config checked before work --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "section, line, suggestion",
    [
        ("model", 'wieghts = "x"', "weights"),
        ("gates", "granularty = 8", "granularity"),
        ("finetune", "epoch = 3", "epochs"),
        ("finetune", "lamda = 1.0", "lambda"),
        ("slim", 'exprot = "onnx"', "export"),
        ("ci", "max_acuracy_drop = 1.0", "max_accuracy_drop"),
        ("finetnue", "epochs = 3", "finetune"),
    ],
)
def test_a_bad_key_in_any_section_fails_fast_with_a_suggestion(
    tiny: tuple[Path, Path], tmp_path: Path, section: str, line: str, suggestion: str
) -> None:
    _, data = tiny
    config = _config(tmp_path, data)
    text, header = config.read_text(), f"[{section}]\n"  # the key goes into its section, or a new one
    text = text.replace(header, header + line + "\n", 1) if header in text else text + header + line + "\n"
    config.write_text(text)
    out = tmp_path / "run"
    started = time.monotonic()
    proc = run_exe("run", config, "-o", out)
    assert time.monotonic() - started < 5, "the config must be refused before any work"
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (error,) = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
    assert f"did you mean {suggestion!r}?" in error, error
    assert not out.exists()


# -- observability -----------------------------------------------------------------------------------------


def test_plain_output_has_a_first_line_before_the_baseline_and_heartbeats(
    tiny: tuple[Path, Path], tmp_path: Path
) -> None:
    gated, data = tiny
    out = tmp_path / "t.pt"
    args = ["finetune", gated, "--data", data, "--target-macs", "0.5", "--epochs", "2", "--batch-size", "4"]
    proc = run_exe(*args, "--workers", "0", "-o", out, env={"PRUNEKIT_HEARTBEAT_S": "0"})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[0] == f"finetune: {gated} on {data}"  # printed before torch is even imported
    baseline = next(i for i, x in enumerate(lines) if x.startswith("evaluating the baseline on 6 validation"))
    started = next(i for i, x in enumerate(lines) if x.startswith("device "))
    beats = [x for x in lines if " step " in x and "img/s, ETA " in x]
    assert 0 < baseline < started
    assert len(beats) == 2 * 6  # 24 images / batch 4 = 6 steps per epoch, a heartbeat every step at 0 s
    assert beats[0].startswith("epoch 1 step 1/6: loss ") and beats[-1].startswith("epoch 2 step 6/6: loss ")


def test_heartbeats_are_json_lines_with_json(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    gated, data = tiny
    args = ["finetune", gated, "--data", data, "--target-macs", "0.5", "--epochs", "1", "--batch-size", "8"]
    proc = run_exe(
        *args, "--workers", "0", "-o", tmp_path / "t.pt", "--json", env={"PRUNEKIT_HEARTBEAT_S": "0"}
    )
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(x) for x in proc.stderr.splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[:2] == ["begin", "baseline"] and kinds.count("heartbeat") == 3 and kinds[-1] == "epoch"
    beat = next(e for e in events if e["event"] == "heartbeat")
    assert {"epoch", "step", "steps", "loss", "images_per_s", "eta_s"} <= set(beat)


@pytest.mark.parametrize("ci, tty", [("true", False), ("1", False), ("false", True), ("", True)])
def test_ci_in_the_environment_forces_plain_lines_on_a_terminal(
    monkeypatch: pytest.MonkeyPatch, ci: str, tty: bool
) -> None:
    monkeypatch.setenv("CI", ci)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert Progress(json_lines=False).tty is tty


def test_metrics_csv_has_step_intervals_and_epochs(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    gated, data = tiny
    out = tmp_path / "tuned.pt"
    args = ["finetune", str(gated), "--data", str(data), "--target-macs", "0.5", "--epochs", "2"]
    result = CliRunner().invoke(app, [*args, "--batch-size", "2", "--workers", "0", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["metrics"] == str(tmp_path / "tuned.metrics.csv")
    rows = read_metrics(Path(doc["metrics"]))
    epochs = [r for r in rows if r["kind"] == "epoch"]
    steps = [r for r in rows if r["kind"] == "steps"]
    assert [int(r["epoch"]) for r in epochs] == [1, 2]
    assert [float(r["val_acc"]) for r in epochs] == [h["val_acc"] for h in doc["history"]]
    assert len(steps) == 2 * 12  # 12 steps per epoch, an interval row each step (12 // 10 = 1)
    assert int(steps[-1]["global_step"]) == 24 and float(steps[0]["images_per_s"]) > 0


def test_report_on_a_checkpoint_shows_the_decided_macs_slim_gives(
    tiny: tuple[Path, Path], tmp_path: Path
) -> None:
    gated, data = tiny
    out = tmp_path / "tuned.pt"
    args = ["finetune", str(gated), "--data", str(data), "--target-macs", "0.5", "--epochs", "1"]
    assert (
        CliRunner().invoke(app, [*args, "--batch-size", "8", "--workers", "0", "-o", str(out)]).exit_code == 0
    )
    report = CliRunner().invoke(app, ["report", str(out), "--json"])
    assert report.exit_code == 0, report.stderr
    info = json.loads(report.stdout)["checkpoint"]
    slim = CliRunner().invoke(
        app, ["slim", str(out), "--export", "none", "-o", str(tmp_path / "s.pt"), "--json"]
    )
    assert slim.exit_code == 0, slim.stderr
    slimmed = json.loads(slim.stdout)["slim"]
    assert info["decided"] is True and info["stage"] == "finetuned"
    assert (info["decided_macs"], info["decided_params"]) == (slimmed["macs"], slimmed["params"])
    assert info["decided_macs"] < json.loads(report.stdout)["macs"]
    assert info["target_macs"] == 0.5 and [h["epoch"] for h in info["history"]] == [1]
    text = CliRunner().invoke(app, ["report", str(out)]).stdout
    assert "Decided MACs" in text and f"({slimmed['macs']:,})" in text and "History" in text


def test_run_writes_plots_when_matplotlib_is_there(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")  # installed by `make test` (the dev extra): this runs in CI
    from PIL import Image

    _, data = tiny
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app, ["run", str(_config(tmp_path, data, epochs=2)), "-o", str(out), "--json"]
    )
    assert result.exit_code == 0, result.stderr
    files = json.loads(result.stdout)["files"]
    for key, name in (("plot_training", "training.png"), ("plot_widths", "widths.png")):
        assert files[key] == str(out / name)
        with Image.open(files[key]) as image:  # a real PNG, decodable, of a plot's size
            assert image.format == "PNG" and image.size[0] >= 300 and image.size[1] >= 200
            image.load()
    rows = read_metrics(out / "metrics.csv")
    assert [int(r["epoch"]) for r in rows if r["kind"] == "epoch"] == [1, 2]


def test_tensorboard_logs_the_training_curve(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")  # installed by `make test` (the dev extra): this runs in CI
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    gated, data = tiny
    board = tmp_path / "tb"
    args = ["finetune", str(gated), "--data", str(data), "--target-macs", "0.5", "--epochs", "2"]
    result = CliRunner().invoke(
        app,
        [
            *args,
            "--batch-size",
            "8",
            "--workers",
            "0",
            "-o",
            str(tmp_path / "t.pt"),
            "--tensorboard",
            str(board),
        ],
    )
    assert result.exit_code == 0, result.stderr
    events = EventAccumulator(str(board))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"train/loss", "val/accuracy", "macs/fraction_kept"} <= set(scalars)
    assert [e.step for e in events.Scalars("val/accuracy")] == [3, 6]  # 3 steps per epoch
    assert len(events.Scalars("train/loss")) == 6


def test_tensorboard_without_the_extra_is_refused_before_work(
    tiny: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a)
    )
    gated, data = tiny
    out = tmp_path / "t.pt"
    args = ["finetune", str(gated), "--data", str(data), "--target-macs", "0.5", "-o", str(out)]
    result = CliRunner().invoke(app, [*args, "--tensorboard", str(tmp_path / "tb")])
    assert result.exit_code == 2 and "pip install 'prunekit[tensorboard]'" in result.stderr
    assert not out.exists() and not (tmp_path / "tb").exists()
