"""Every command's `--json` document against its schema (prunekit/schemas/*.schema.json, generated from
prunekit.schema): success, error and exit-3 documents, and the schema files are current."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_image_folder
from typer.testing import CliRunner

import prunekit
from prunekit import schema
from prunekit.cli import app
from prunekit.config import ModelSpec
from prunekit.stages.gate import gate_stage

ENVELOPE = {"schema_version", "prunekit_version", "torch_version", "command"}


def document(args: list[Any], code: int = 0) -> dict[str, Any]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == code, (result.stdout, result.stderr)
    doc = json.loads(result.stdout)  # exactly one document
    assert set(doc) >= ENVELOPE and doc["schema_version"] == schema.SCHEMA_VERSION
    assert doc["prunekit_version"] == prunekit.__version__
    assert doc["torch_version"] == torch.__version__.split("+")[0]
    schema.validate(doc["command"], doc)  # the model the schema file is generated from
    return doc


def test_the_schema_files_are_current() -> None:
    for path, text in schema.schema_files().items():
        assert path.read_text() == text, f"{path} is stale: run python -m prunekit.schema"
    assert {p.name for p in schema.SCHEMA_DIR.glob("*.json")} == {
        f"{k}.schema.json" for k in schema.DOCUMENTS
    }


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("schema")
    data = make_image_folder(root / "data", classes=3, train=4, val=2)
    gated = root / "gated.pt"
    gate_stage(ModelSpec("resnet18", num_classes=3, input_shape=32), gated)
    tuned = root / "tuned.pt"
    args = ["finetune", gated, "--data", data, "--target-macs", "0.5", "--epochs", "1", "--workers", "0"]
    assert CliRunner().invoke(app, [str(a) for a in [*args, "-o", tuned]]).exit_code == 0
    config = root / "run.toml"
    config.write_text(
        '[model]\narch = "resnet18"\nnum_classes = 3\ninput_shape = 32\n'
        f'[finetune]\ndata = "{data}"\ntarget_macs = 0.5\nepochs = 1\nworkers = 0\nbatch_size = 8\n'
        '[slim]\nexport = "none"\n'
    )
    return {"root": root, "data": data, "gated": gated, "tuned": tuned, "config": config}


def test_every_command_prints_a_document_of_its_schema(files: dict[str, Path]) -> None:
    root = files["root"]
    models = document(["models", "--filter", "resnet1", "--json"])
    assert {r["model"] for r in models["models"]} >= {"resnet18"}
    assert all(r["input_shape"] == [3, 224, 224] for r in models["models"])
    report = document(["report", "resnet18", "--input-shape", "32", "--json"])
    assert report["input_shape"] == [3, 32, 32] and isinstance(report["macs"], int)
    assert document(["report", files["tuned"], "--json"])["checkpoint"]["decided"] is True
    analyze = document(["analyze", "resnet18", "--input-shape", "32", "--json"])
    assert analyze["model"] == "resnet18" and analyze["input_shape"] == [3, 32, 32]
    gate = document(
        ["gate", "resnet18", "--num-classes", "3", "--input-shape", "32", "-o", root / "g.pt", "--json"]
    )
    assert gate["model"] == "resnet18" and isinstance(gate["gates"], int)
    finetune = document(
        ["finetune", files["gated"], "--data", files["data"], "--target-macs", "0.5", "--epochs", "1"]
        + ["--workers", "0", "-o", root / "t2.pt", "--json"]
    )
    assert "gateable_kept" in finetune["history"][0] and "gateable_fraction" not in finetune["history"][0]
    slim = document(["slim", files["tuned"], "--latency", "-o", root / "m.onnx", "--json"])
    assert slim["latency"]["ratio"] == pytest.approx(
        slim["latency"]["slim_ms"] / slim["latency"]["original_ms"]
    )
    onnx = document(["report", root / "m.onnx", "--json"])
    assert onnx["kind"] == "onnx" and onnx["input_shape"] == [3, 32, 32] and onnx["model"] is None
    run = document(["run", files["config"], "-o", root / "run", "--json"])
    assert run["summary"]["passed"] is True and run["error"] is None
    assert run["summary"]["latency_ratio"] is None  # no --latency in the config


def test_exit_3_and_failed_stage_documents_fit_the_schema(files: dict[str, Path]) -> None:
    root = files["root"]
    gate_failed = document(
        ["run", files["config"], "-o", root / "r3", "--max-accuracy-drop", "-100", "--json"], 3
    )
    assert gate_failed["summary"]["passed"] is False and gate_failed["error"]["exit_code"] == 3
    stage_failed = document(
        ["run", files["config"], "-o", root / "r2", "--data", root / "nowhere", "--json"], 2
    )
    assert set(stage_failed) == ENVELOPE | {"error"}  # refused before any stage: the error alone


@pytest.mark.parametrize(
    "args",
    [
        ["models", "--filter", "x", "--bogus", "--json"],
        ["report", "no-such-model", "--json"],
        ["analyze", "resnet18", "--input-shape", "3", "--json"],
        ["gate", "resnet18", "--granularity", "0", "-o", "{tmp}/g.pt", "--json"],
        [
            "finetune",
            "{tmp}/missing.pt",
            "--data",
            "builtin",
            "--target-macs",
            "0.5",
            "-o",
            "{tmp}/t.pt",
            "--json",
        ],
        ["slim", "{tmp}/missing.pt", "-o", "{tmp}/m.onnx", "--json"],
        ["run", "{tmp}/missing.toml", "--json"],
        ["demo", "--out-dir", "{tmp}/afile", "--json"],
        ["frobnicate", "--json"],
    ],
    ids=lambda a: a[0],
)
def test_error_documents_fit_the_schema(tmp_path: Path, args: list[str]) -> None:
    (tmp_path / "afile").write_text("x")
    doc = document([a.replace("{tmp}", str(tmp_path)) for a in args], 2)
    assert set(doc) == ENVELOPE | {"error"} and doc["error"]["exit_code"] == 2 and doc["error"]["message"]


def test_demo_document_fits_the_schema(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The demo's real pipeline on untrained weights, 2 steps (its pretraining is the slow part)."""
    from dataclasses import replace

    from prunekit.models import build_model
    from prunekit.stages import demo

    def untrained(out: Path, *, epochs: int, on_epoch: Any = None) -> dict[str, Any]:
        torch.save(build_model(demo.DEMO_ARCH, 10).state_dict(), out)
        return {"weights": str(out), "val_acc": 0.1, "epochs": epochs}

    real_config = demo.demo_config

    def quick(weights: Path, finetune_epochs: int = 1) -> Any:
        config = real_config(weights, finetune_epochs=1)
        finetune = replace(config.finetune, max_steps_per_epoch=2)
        slim = replace(config.slim, latency=False)
        return replace(config, finetune=finetune, slim=slim, max_accuracy_drop=-100.0)  # the gate fails

    monkeypatch.setattr(demo, "pretrain", untrained)
    monkeypatch.setattr(demo, "demo_config", quick)
    result = CliRunner().invoke(app, ["demo", "--out-dir", str(tmp_path / "d"), "--json"])
    assert result.exit_code == 3, result.stderr  # the failure path: its document has pretrain too
    doc = json.loads(result.stdout)
    schema.validate("demo", doc)
    assert doc["command"] == "demo" and doc["pretrain"]["epochs"] == 8 and set(doc) >= ENVELOPE
