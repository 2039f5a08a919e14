"""The pipeline through the installed `prunekit` entry point: gate -> finetune -> slim -> ONNX, `run`
from a config file with its accuracy gate, slimming from plan files, and bad input (exit 2, one line,
no output left behind)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import make_image_folder, no_result_on_stdout
from typer.testing import CliRunner

import prunekit
from prunekit.checkpoint import load_checkpoint
from prunekit.cli import app
from prunekit.config import load_run_config
from prunekit.data import resolve_data
from prunekit.gates import remove_gates_
from prunekit.masking import masked
from prunekit.measure import count_macs
from prunekit.plan import ChannelPlan, random_plan
from prunekit.trainer import evaluate

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
EXE = Path(sys.executable).parent / "prunekit"
RUN_FILES = ("gated.pt", "tuned.pt", "model.onnx", "model.pt", "plan.json", "metrics.csv", "report.json")


def prunekit_cli(
    *args: str | Path, cwd: Path | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    assert EXE.exists(), f"{EXE} missing: run `make venv` (pip install -e .)"
    env = os.environ | {"OMP_NUM_THREADS": "1", "COLUMNS": "120"}
    return subprocess.run(
        [str(EXE), *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env
    )


def ok_json(proc: subprocess.CompletedProcess) -> dict[str, Any]:
    """Exit code 0 and stdout that is exactly one JSON document."""
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert proc.stdout.lstrip().startswith("{")
    return json.loads(proc.stdout)  # raises on anything but exactly one document


@pytest.fixture(scope="module")
def data10(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data10"), classes=10, train=3, val=2)


@pytest.fixture(scope="module")
def data3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data3"), classes=3, train=2, val=1)


# -- end to end through the installed entry point ---------------------------------------------------


@pytest.fixture(scope="module")
def e2e(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """gate -> finetune -> slim --export onnx on resnet18 @ 3x32x32 with the built-in data, a few steps."""
    d = tmp_path_factory.mktemp("e2e")
    gate = prunekit_cli(
        "gate", "resnet18", "--num-classes", "10", "--input-shape", "32", "-o", "gated.pt", "--json", cwd=d
    )
    tune = prunekit_cli(
        "finetune",
        "gated.pt",
        "-o",
        "tuned.pt",
        "--data",
        "builtin",
        "--target-macs",
        "0.5",
        "--epochs",
        "1",
        "--max-steps-per-epoch",
        "3",
        "--batch-size",
        "16",
        "--workers",
        "0",
        "--json",
        cwd=d,
    )
    slim = prunekit_cli(
        "slim", "tuned.pt", "--export", "onnx", "-o", "slim.onnx", "--save-plan", "plan.json", "--json", cwd=d
    )
    return {"dir": d, "gate": gate, "finetune": tune, "slim": slim}


def test_e2e_exit_codes_and_json(e2e: dict[str, Any]) -> None:
    d = e2e["dir"]
    gate, tune, slim = (ok_json(e2e[k]) for k in ("gate", "finetune", "slim"))
    assert gate["model"] == "resnet18" and gate["output"] == "gated.pt"
    assert gate["input_shape"] == [3, 32, 32]  # `--input-shape 32` means 3 x 32 x 32
    assert gate["macs"] == 37_016_576  # fvcore, resnet18 with 10 classes at 32 px
    assert tune["output"] == "tuned.pt" and len(tune["history"]) == 1
    assert slim["checkpoint"] == "slim.pt" and slim["onnx"]["path"] == "slim.onnx"
    for name in ("gated.pt", "tuned.pt", "slim.onnx", "slim.pt", "plan.json"):
        assert (d / name).is_file(), name
    assert not [p.name for p in d.iterdir() if p.name.endswith(".tmp")]
    # progress goes to stderr as JSON lines, never to stdout
    events = [
        json.loads(line)["event"] for line in e2e["finetune"].stderr.splitlines() if line.startswith("{")
    ]
    assert events == ["begin", "baseline", "start", "epoch"]


def test_e2e_macs(e2e: dict[str, Any]) -> None:
    gate, tune, slim = (json.loads(e2e[k].stdout) for k in ("gate", "finetune", "slim"))
    assert slim["original"]["macs"] == gate["macs"] == tune["macs_before"]
    assert slim["slim"]["macs"] < slim["original"]["macs"]
    assert slim["slim"]["params"] < slim["original"]["params"]
    # what fine-tuning promised is what slimming delivered, and it is on target
    assert slim["slim"]["macs"] == pytest.approx(tune["expected_macs"], rel=0.01)
    assert tune["final"]["macs_fraction"] <= 0.5 + 1e-9
    assert slim["macs_ratio"] == pytest.approx(0.5, abs=0.05)
    ckpt = load_checkpoint(e2e["dir"] / "slim.pt")
    assert count_macs(ckpt.model, ckpt.spec.example_input()).total_macs == slim["slim"]["macs"]


def test_e2e_onnx_matches_the_slim_checkpoint(e2e: dict[str, Any]) -> None:
    import onnx
    import onnxruntime as ort

    d = e2e["dir"]
    onnx.checker.check_model(str(d / "slim.onnx"), full_check=True)
    ckpt = load_checkpoint(d / "slim.pt")
    assert ckpt.stage == "slim" and ckpt.gates is None and ckpt.plan is not None
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(7))  # not the export batch (2)
    with torch.no_grad():
        ref = ckpt.model(x).numpy()
    session = ort.InferenceSession(str(d / "slim.onnx"), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert out.shape == (5, 10)
    assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max()


def test_e2e_saved_plan_reproduces_the_slim_model(e2e: dict[str, Any], tmp_path: Path) -> None:
    d = e2e["dir"]
    plan = ChannelPlan.load(d / "plan.json")
    result = CliRunner().invoke(
        app,
        [
            "slim",
            str(d / "tuned.pt"),
            "--plan",
            str(d / "plan.json"),
            "--export",
            "none",
            "-o",
            str(tmp_path / "again.pt"),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["plan_source"] == str(d / "plan.json")
    again, first = load_checkpoint(tmp_path / "again.pt"), load_checkpoint(d / "slim.pt")
    assert again.plan == first.plan == plan
    a, b = again.model.state_dict(), first.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- slimming from a plan file ----------------------------------------------------------------------


def test_slim_gated_checkpoint_by_a_random_plan(e2e: dict[str, Any], tmp_path: Path) -> None:
    gated = load_checkpoint(e2e["dir"] / "gated.pt")
    plan = random_plan(gated.graph, 0.4, seed=3)
    plan.save(tmp_path / "plan.json")
    out = tmp_path / "slim.pt"
    result = CliRunner().invoke(
        app,
        [
            "slim",
            str(e2e["dir"] / "gated.pt"),
            "--plan",
            str(tmp_path / "plan.json"),
            "--export",
            "none",
            "-o",
            str(out),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["parity"]["max_abs_diff"] <= doc["parity"]["tolerance"]  # the command verified itself
    assert doc["macs_ratio"] < 0.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json", "slim.pt"]

    slim = load_checkpoint(out)
    assert slim.plan == plan and slim.gates is None
    plain = copy.deepcopy(gated.model)
    remove_gates_(plain)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(11))
    with torch.no_grad(), masked(plain, gated.graph, plan):
        reference = plain(x)
    with torch.no_grad():
        got = slim.model(x)
    assert (got - reference).abs().max() <= 1e-4 * reference.abs().max()
    with torch.no_grad():
        assert not torch.allclose(plain(x), reference, atol=1e-3)  # the plan really removed something


def test_slim_with_latency_and_data(e2e: dict[str, Any], tmp_path: Path) -> None:
    """--latency times the original and the slim export side by side; --data measures accuracy on the
    data the baseline was measured on, so the original accuracy stands beside the slim one."""
    result = CliRunner().invoke(
        app,
        ["slim", str(e2e["dir"] / "tuned.pt"), "-o", str(tmp_path / "m.onnx"), "--latency", "--threads", "1"]
        + ["--data", "builtin", "--json"],
    )
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    lat = doc["latency"]
    assert lat["threads"] == 1 and lat["batch"] == 1 and lat["original_ms"] > 0 and lat["slim_ms"] > 0
    assert lat["ratio"] == pytest.approx(lat["slim_ms"] / lat["original_ms"])
    assert lat["ratio"] == pytest.approx(lat["slim_ms"] / lat["original_ms"])
    baseline = json.loads(e2e["finetune"].stdout)["baseline_val_acc"]
    assert doc["accuracy"]["original"] == baseline and 0.0 <= doc["accuracy"]["slim"] <= 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.pt"]


def test_analyze_happy_path() -> None:
    result = CliRunner().invoke(app, ["analyze", "resnet18", "--input-shape", "32", "--json"])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["model"] == "resnet18" and doc["macs"] > 0
    assert doc["prunable_fraction"] == pytest.approx(1.0)  # every MAC of a ResNet depends on prunable groups
    assert len(doc["groups"]) == 12
    table = CliRunner().invoke(app, ["analyze", "resnet18", "--input-shape", "32"])
    assert table.exit_code == 0 and "12 coupled channel groups" in table.stdout
    assert "100.0% depend on prunable channels" in table.stdout


# -- prunekit run -----------------------------------------------------------------------------------


def _toml(data: dict[str, dict[str, Any]]) -> str:
    lines = []
    for section, table in data.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in table.items()]
    return "\n".join(lines) + "\n"


def tiny_run_config(path: Path, data: Path, **slim: Any) -> Path:
    """examples/run.toml with tiny values: one epoch of two steps on a small ImageFolder."""
    config = tomllib.loads((EXAMPLES / "run.toml").read_text())
    config["finetune"] |= {
        "data": str(data),
        "epochs": 1,
        "max_steps_per_epoch": 2,
        "batch_size": 16,
        "workers": 0,
    }
    config["slim"] |= {"latency": False, **slim}
    config.pop("ci", None)
    path.write_text(_toml(config))
    return path


def test_example_config_parses() -> None:
    cfg = load_run_config(EXAMPLES / "run.toml")
    assert (cfg.model.source, cfg.model.num_classes, cfg.model.input_shape) == ("resnet18", 10, (3, 32, 32))
    assert cfg.data == "builtin" and 0 < cfg.finetune.target_macs < 1
    assert cfg.slim.export == "onnx"
    text = (EXAMPLES / "run.toml").read_text()
    assert sum(line.lstrip().startswith("#") for line in text.splitlines()) >= 5  # documented


def test_example_config_lists_every_option_at_its_default() -> None:
    """examples/run.toml documents every key of [gates], [finetune] and [slim] with the real default
    (options whose default is "none" are commented out), so the example never drifts from the code."""
    from prunekit.config import FinetuneConfig, GateConfig, SlimConfig, defaults

    data = tomllib.loads((EXAMPLES / "run.toml").read_text())
    text = (EXAMPLES / "run.toml").read_text()
    for section, cls in (("gates", GateConfig), ("finetune", FinetuneConfig), ("slim", SlimConfig)):
        given = {("lam" if k == "lambda" else k): v for k, v in data[section].items()}
        given.pop("data", None)
        budget = given.pop("target_macs", None)  # one budget is required: the example sets target_macs
        assert section != "finetune" or budget == 0.5
        expected = {k: v for k, v in defaults(cls).items() if v is not None}
        assert given == expected, section
        for key in (k for k, v in defaults(cls).items() if v is None and k != "target_macs"):
            assert f"# {key} = " in text, key  # documented, commented out


def _workflow_steps() -> list[dict[str, Any]]:
    yaml = pytest.importorskip("yaml")
    workflow = yaml.safe_load((EXAMPLES / "github-actions.yml").read_text())
    return workflow["jobs"]["prune"]["steps"]


def test_github_actions_example_works_outside_a_checkout() -> None:
    steps = _workflow_steps()
    uses = [s.get("uses", "") for s in steps]
    runs = "\n".join(s.get("run", "") for s in steps)
    assert not any(u.startswith("actions/checkout") for u in uses)  # nothing of prunekit's repository
    assert "examples/" not in runs and "constraints.txt" not in runs and "-e ." not in runs
    assert "--index-url https://download.pytorch.org/whl/cpu torch torchvision" in runs  # CPU wheels
    assert 'pip install "$PRUNEKIT_SPEC"' in runs
    assert 'weights = "demo-run/pretrained.pth"' in runs  # real (trained) weights, not a random init
    assert "--max-accuracy-drop" in runs and "--json" in runs
    upload = next(s for s in steps if s.get("uses", "").startswith("actions/upload-artifact"))
    assert upload["if"] == "always()"


@pytest.mark.slow
def test_github_actions_example_commands_for_real(tmp_path: Path) -> None:
    """The workflow's own shell steps, in order, with this checkout's prunekit instead of the install step
    and short epochs: the demo's weights, the config, the gated run and its exit-code handling."""
    steps = [s for s in _workflow_steps() if "run" in s and "pip install" not in s["run"]]
    env = os.environ | {
        "PATH": f"{EXE.parent}{os.pathsep}{os.environ['PATH']}",
        "OMP_NUM_THREADS": "1",
        "PRETRAIN_EPOCHS": "1",
        "MAX_ACCURACY_DROP": "100",
        "RUN_DIR": "runs/ci",
        "EXTRA_ARGS": "--epochs 1",
    }
    for step in steps:
        proc = subprocess.run(
            ["bash", "-e", "-c", step["run"]],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=1200,
        )
        assert proc.returncode == 0, (step["name"], proc.stdout[-2000:], proc.stderr[-2000:])
    doc = json.loads((tmp_path / "result.json").read_text())
    assert doc["summary"]["passed"] is True and doc["config"]["model"]["weights"] == "demo-run/pretrained.pth"
    assert (tmp_path / "runs" / "ci" / "model.onnx").is_file()


def test_example_ci_script() -> None:
    script = EXAMPLES / "ci.sh"
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = script.read_text()
    assert "set -euo pipefail" in text and "prunekit" in text and "--json" in text
    assert "3)" in text and "2)" in text  # tells the accuracy gate from bad input


FAKE_PRUNEKIT = """#!/usr/bin/env bash
if [ "$1" = "--version" ]; then echo "prunekit 0.0-fake"; exit 0; fi
echo "$@" > "$FAKE_ARGS"
echo '{"summary": {}}'
echo "error: fake failure" >&2
exit "$FAKE_RC"
"""


@pytest.mark.parametrize(
    ("rc", "message"),
    [(0, "passed"), (3, "ACCURACY GATE FAILED"), (2, "BAD INPUT"), (1, "a bug in prunekit")],
)
def test_example_ci_script_exit_codes(tmp_path: Path, rc: int, message: str) -> None:
    fake = tmp_path / "prunekit"
    fake.write_text(FAKE_PRUNEKIT)
    fake.chmod(0o755)
    env = os.environ | {
        "PRUNEKIT": str(fake),
        "FAKE_RC": str(rc),
        "FAKE_ARGS": str(tmp_path / "args"),
        "EXTRA_ARGS": "--epochs 1",
    }
    out = tmp_path / "out"
    proc = subprocess.run(
        ["bash", str(EXAMPLES / "ci.sh"), "my.toml", str(out), "1.5"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == rc, proc.stderr
    assert message in proc.stderr
    args = (tmp_path / "args").read_text().split()
    assert args == [
        "run",
        "my.toml",
        "--out-dir",
        str(out),
        "--max-accuracy-drop",
        "1.5",
        "--json",
        "--epochs",
        "1",
    ]
    assert json.loads((out / "result.json").read_text()) == {"summary": {}}


@pytest.mark.slow
def test_example_ci_script_for_real(data10: Path, tmp_path: Path) -> None:
    config = tiny_run_config(tmp_path / "run.toml", data10, export="none")
    env = os.environ | {"PRUNEKIT": str(EXE), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "out"
    proc = subprocess.run(
        ["bash", str(EXAMPLES / "ci.sh"), str(config), str(out), "100"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert result["summary"]["passed"] is True
    assert json.loads((out / "report.json").read_text())["summary"] == result["summary"]


def test_run_writes_every_file_and_a_faithful_report(data10: Path, tmp_path: Path) -> None:
    config = tiny_run_config(tmp_path / "run.toml", data10)
    out = tmp_path / "run"
    doc = ok_json(prunekit_cli("run", config, "--out-dir", out, "--max-accuracy-drop", "100", "--json"))
    for name in RUN_FILES:
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    assert report["summary"] == doc["summary"]
    s = report["summary"]
    assert s["passed"] is True and s["max_accuracy_drop"] == 100
    assert s["macs_after"] < s["macs_before"]
    assert s["accuracy_drop_points"] == pytest.approx(100 * (s["accuracy_before"] - s["accuracy_after"]))

    # the numbers are those of the files
    slim = load_checkpoint(out / "model.pt")
    assert slim.spec.input_shape == (3, 32, 32)
    assert count_macs(slim.model, slim.spec.example_input()).total_macs == s["macs_after"]
    loaders = resolve_data(
        str(data10),
        input_shape=(3, 32, 32),
        mean=slim.spec.mean,
        std=slim.spec.std,
        batch_size=64,
        train_augment=False,
    )
    assert evaluate(slim.model, loaders.val, torch.device("cpu")).top1 == pytest.approx(s["accuracy_after"])
    plain = load_checkpoint(out / "gated.pt").model
    remove_gates_(plain)
    assert evaluate(plain, loaders.val, torch.device("cpu")).top1 == pytest.approx(s["accuracy_before"])
    assert ChannelPlan.load(out / "plan.json") == slim.plan
    assert report["files"]["onnx"] == str(out / "model.onnx")


def test_run_accuracy_gate_fails_with_exit_code_3(data10: Path, tmp_path: Path) -> None:
    config = tiny_run_config(tmp_path / "run.toml", data10, export="none")
    out = tmp_path / "run"
    proc = prunekit_cli("run", config, "--out-dir", out, "--max-accuracy-drop", "-100", "--json")
    assert proc.returncode == 3, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)  # the whole report, on the failure path too: exactly one document
    assert doc["summary"]["passed"] is False and doc["error"]["exit_code"] == 3
    assert doc["slim"]["slim"]["macs"] > 0 and doc["error"]["stage"] == "ci"
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and proc.stderr.rstrip().splitlines()[-1] == errors[0]
    assert "lost" in errors[0] and "report.json" in errors[0]
    report = json.loads((out / "report.json").read_text())
    assert report == doc
    assert report["summary"]["passed"] is False and report["summary"]["max_accuracy_drop"] == -100
    assert (out / "model.pt").is_file() and not (out / "model.onnx").exists()


def test_gate_ranks_by_taylor_importance_on_the_data(tmp_path: Path) -> None:
    """`gate --importance taylor --data` records the ranking; the checkpoint fine-tunes like any other."""
    out = tmp_path / "gated.pt"
    common = ["resnet18", "--num-classes", "10", "--input-shape", "32", "--json"]
    result = CliRunner().invoke(
        app,
        [
            "gate",
            *common,
            "--importance",
            "taylor",
            "--importance-batches",
            "2",
            "--data",
            "builtin",
            "-o",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.stderr
    ckpt = load_checkpoint(out)
    config = ckpt.gates.config
    assert (config.importance, config.importance_batches) == ("taylor", 2)
    l1 = tmp_path / "l1.pt"
    assert CliRunner().invoke(app, ["gate", *common, "-o", str(l1)]).exit_code == 0
    assert ckpt.gates.layout != load_checkpoint(l1).gates.layout  # the data changed the ranking


# -- bad input: exit 2, one line, nothing written ---------------------------------------------------


def assert_user_error(result: Any, *fragments: str) -> str:
    """Exit code 2, nothing on stdout, exactly one `error: ...` line on stderr (the last; progress lines
    such as `finetune: ...` may come before it), no traceback."""
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert no_result_on_stdout(result.stdout)
    lines = result.stderr.splitlines()
    assert lines[-1].startswith("error: ") and sum(x.startswith("error: ") for x in lines) == 1, result.stderr
    assert all(x.startswith(("error: ", "finetune: ", "run: ")) for x in lines), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr
    return result.stderr


def _bad_cases(e2e: dict[str, Any], data3: Path, tmp: Path) -> dict[str, tuple[list[str], list[str], str]]:
    """name -> (argv, outputs that must not appear or change, expected message fragment)."""
    d = e2e["dir"]
    corrupt = tmp / "corrupt.pt"
    corrupt.write_bytes((d / "gated.pt").read_bytes()[:5000])
    malformed = tmp / "bad.toml"
    malformed.write_text("[model\narch = resnet18\n")
    other_plan = tmp / "other_plan.json"
    other_plan.write_text(
        json.dumps(
            {"format": "prunekit-plan", "version": 1, "groups": [{"name": "x", "units": 4, "keep": [0]}]}
        )
    )
    ft = ["finetune", str(d / "gated.pt"), "--epochs", "1", "--max-steps-per-epoch", "1", "--workers", "0"]
    return {
        "slim-a-slim-checkpoint": (
            ["slim", str(d / "slim.pt"), "-o", "out.onnx"],
            ["out.onnx", "out.pt"],
            "already slimmed",
        ),
        "slim-corrupt": (
            ["slim", str(corrupt), "-o", "out.onnx"],
            ["out.onnx", "out.pt"],
            "cannot read checkpoint",
        ),
        "slim-missing-dir": (
            ["slim", str(d / "tuned.pt"), "-o", "nodir/out.onnx"],
            ["nodir"],
            "does not exist",
        ),
        "slim-foreign-plan": (
            ["slim", str(d / "tuned.pt"), "--plan", str(other_plan), "--export", "none", "-o", "out.pt"],
            ["out.pt"],
            "the plan does not fit this model",
        ),
        "slim-bad-export": (  # rejected by Click itself (--export is an Enum), in prunekit's one-line format
            ["slim", str(d / "tuned.pt"), "--export", "tflite", "-o", "out.pt"],
            ["out.pt"],
            "export must be onnx, pt2, onnx,pt2 or none, got 'tflite'",
        ),
        "gate-taylor-without-data": (
            [
                "gate",
                "resnet18",
                "--num-classes",
                "10",
                "--input-shape",
                "32",
                "--importance",
                "taylor",
                "-o",
                "g.pt",
            ],
            ["g.pt"],
            "--importance taylor ranks channels by the loss's gradients: give --data",
        ),
        "gate-data-without-taylor": (
            [
                "gate",
                "resnet18",
                "--num-classes",
                "10",
                "--input-shape",
                "32",
                "--data",
                "builtin",
                "-o",
                "g.pt",
            ],
            ["g.pt"],
            "--data is used by --importance taylor only",
        ),
        "gate-taylor-class-mismatch": (
            [
                "gate",
                "resnet18",
                "--num-classes",
                "10",
                "--input-shape",
                "32",
                "--importance",
                "taylor",
                "--data",
                str(data3),
                "-o",
                "g.pt",
            ],
            ["g.pt"],
            "the data has 3 classes but the model 10",
        ),
        "target-too-high": (
            [*ft, "--data", "builtin", "--target-macs", "1.5", "-o", "t.pt"],
            ["t.pt"],
            "target_macs must be between 0 and 1, got 1.5",
        ),
        "target-zero": (
            [*ft, "--data", "builtin", "--target-macs", "0", "-o", "t.pt"],
            ["t.pt"],
            "target_macs must be between 0 and 1, got 0.0",
        ),
        "target-missing": (
            [*ft, "--data", "builtin", "-o", "t.pt"],
            ["t.pt"],
            "--target-macs is required",
        ),
        "missing-data": (
            [*ft, "--data", str(tmp / "nowhere"), "--target-macs", "0.5", "-o", "t.pt"],
            ["t.pt"],
            "data folder not found",
        ),
        "class-mismatch": (
            [*ft, "--data", str(data3), "--target-macs", "0.5", "-o", "t.pt"],
            ["t.pt"],
            "the data has 3 classes but the model 10",
        ),
        "finetune-not-gated": (
            [*ft[:1], str(d / "slim.pt"), *ft[2:], "--data", "builtin", "--target-macs", "0.5", "-o", "t.pt"],
            ["t.pt"],
            "has no gates",
        ),
        "gate-unknown-model": (["gate", "resnet9000", "-o", "g.pt"], ["g.pt"], "unknown model 'resnet9000'"),
        "gate-input-too-small": (
            ["gate", "alexnet", "--input-shape", "16", "-o", "g.pt"],
            ["g.pt"],
            "alexnet does not run on 3x16x16 inputs",
        ),
        "analyze-input-too-small": (
            ["analyze", "alexnet", "--input-shape", "16", "--json"],
            [],
            "alexnet does not run on 3x16x16 inputs",
        ),
        "run-malformed-toml": (
            ["run", str(malformed), "--out-dir", "rundir"],
            ["rundir"],
            "is not valid TOML",
        ),
        "run-missing-config": (
            ["run", str(tmp / "none.toml"), "--out-dir", "rundir"],
            ["rundir"],
            "config file not found",
        ),
    }


CASES = [
    "slim-a-slim-checkpoint",
    "slim-corrupt",
    "slim-missing-dir",
    "slim-foreign-plan",
    "slim-bad-export",
    "target-too-high",
    "target-zero",
    "target-missing",
    "missing-data",
    "class-mismatch",
    "finetune-not-gated",
    "gate-unknown-model",
    "gate-input-too-small",
    "analyze-input-too-small",
    "run-malformed-toml",
    "run-missing-config",
]


@pytest.mark.parametrize("preexisting", [False, True], ids=["fresh", "existing-output"])
@pytest.mark.parametrize("case", CASES)
def test_bad_input(
    case: str,
    preexisting: bool,
    e2e: dict[str, Any],
    data3: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    argv, outputs, fragment = _bad_cases(e2e, data3, inputs)[case]
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    if preexisting:
        for name in outputs:
            if "/" not in name and name not in ("rundir", "nodir"):
                (work / name).write_bytes(b"previous contents")
    before = {p.name: p.read_bytes() for p in work.iterdir()}
    result = CliRunner().invoke(app, argv)
    assert_user_error(result, fragment)
    assert {p.name: p.read_bytes() for p in work.iterdir()} == before  # nothing new, nothing changed


def test_bad_input_through_the_entry_point(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    proc = prunekit_cli("slim", bad, "-o", tmp_path / "out.onnx", "--json")
    assert proc.returncode == 2
    assert no_result_on_stdout(proc.stdout)
    assert (
        proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pt"]


def test_python_m_prunekit_version() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "prunekit", "--version"], capture_output=True, text=True, timeout=120
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, f"prunekit {prunekit.__version__}\n", "")
