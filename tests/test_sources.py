"""Model sources beyond torchvision (package.module:factory, file.py:factory, timm:NAME), the trust
rule for reloading them, and the CIFAR ResNet-20 example whose shortcut zero-pads channels."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import message_lines
from typer.testing import CliRunner

from prunekit.checkpoint import load_checkpoint, read_checkpoint_data
from prunekit.cli import app
from prunekit.errors import CheckpointError
from prunekit.graph import analyze
from prunekit.masking import masked
from prunekit.models import resolve_source
from prunekit.plan import random_plan
from prunekit.surgery import slim_
from prunekit.testing import randomize_

ROOT = Path(__file__).resolve().parents[1]
EXE = Path(sys.executable).parent / "prunekit"
RESNET20 = f"{ROOT / 'examples' / 'cifar_resnet.py'}:resnet20"

MODELS = textwrap.dedent(
    """
    import torch
    from torch import nn


    class Tiny(nn.Module):
        def __init__(self, width, num_classes):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
            self.head = nn.Linear(width, num_classes)

        def forward(self, x):
            return self.head(self.body(x).mean((2, 3)))


    class Branchy(nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # control flow on a tensor value: torch.fx cannot trace this
                return x.mean((2, 3))
            return x.amax((2, 3))


    def tiny(width: int = 8, num_classes: int = 4):
        return Tiny(width, num_classes)


    def not_a_model():
        return 3


    def untraceable(num_classes: int = 3):
        return Branchy()
    """
)


def cli(*args: str | Path, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = os.environ | {"OMP_NUM_THREADS": "1", "COLUMNS": "200"} | (env or {})
    return subprocess.run(
        [str(EXE), *map(str, args)], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=300
    )


def one_error_line(proc: subprocess.CompletedProcess | object, *fragments: str) -> str:
    code = getattr(proc, "returncode", getattr(proc, "exit_code", None))
    stderr = proc.stderr  # type: ignore[attr-defined]
    assert code == 2, stderr
    assert "Traceback" not in stderr
    lines = message_lines(stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def models_file(tmp_path: Path) -> Path:
    path = tmp_path / "mymodels.py"
    path.write_text(MODELS)
    return path


def test_file_factory_with_model_args(models_file: Path, tmp_path: Path) -> None:
    source = f"{models_file}:tiny"
    proc = cli(
        "gate",
        source,
        "--input-shape",
        "3,16,16",
        "--model-arg",
        "width=16",
        "-o",
        "g.pt",
        "--json",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["num_classes"] == 4 and doc["input_shape"] == [3, 16, 16]
    recorded = read_checkpoint_data(tmp_path / "g.pt")["model"]
    assert recorded["source"] == f"{models_file}:tiny" and recorded["model_args"] == {"width": 16}
    ckpt = load_checkpoint(tmp_path / "g.pt", source=f"{models_file}:tiny")
    assert ckpt.model.body[0].out_channels == 16  # the argument reached the factory


def test_package_module_factory(models_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(models_file.parent))
    out = tmp_path / "g.pt"
    result = CliRunner().invoke(
        app, ["gate", "mymodels:tiny", "--input-shape", "16", "-o", str(out), "--json"]
    )
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["model"] == "mymodels:tiny"
    assert load_checkpoint(out, source="mymodels:tiny").spec.model_args == {}


MARKER_MODEL = textwrap.dedent(
    """
    # Imports of this file leave a marker: the test proves prunekit imports it only when told to.
    import os
    from pathlib import Path
    Path(os.environ["PRUNEKIT_TEST_MARKER"]).write_text("imported")
    from mymodels import tiny  # noqa: F401
    """
)


def test_a_checkpoint_never_imports_the_code_it_names(models_file: Path, tmp_path: Path) -> None:
    (tmp_path / "marker_model.py").write_text(MARKER_MODEL)
    marker = tmp_path / "imported.txt"
    env = {"PRUNEKIT_TEST_MARKER": str(marker), "PYTHONPATH": str(tmp_path)}
    source = f"{tmp_path / 'marker_model.py'}:tiny"
    assert cli("gate", source, "--input-shape", "16", "-o", "g.pt", cwd=tmp_path, env=env).returncode == 0
    assert marker.exists()  # the user named it: imported
    marker.unlink()
    before = sorted(p.name for p in tmp_path.iterdir())
    for args in (
        ["slim", "g.pt", "-o", "s.onnx"],
        ["report", "g.pt"],
        ["finetune", "g.pt", "-o", "t.pt", "--data", "builtin", "--target-macs", "0.5"],
    ):
        proc = cli(*args, cwd=tmp_path, env=env)
        one_error_line(proc, "imports no code a file names", f"pass --model {source}")
        assert not marker.exists(), f"{args[0]} imported the checkpoint's code"
        assert sorted(p.name for p in tmp_path.iterdir()) == before  # and wrote nothing
    other = f"{models_file}:tiny"
    proc = cli("slim", "g.pt", "--model", other, "-o", "s.onnx", cwd=tmp_path, env=env)
    one_error_line(proc, f"built by {source}, not {other}")
    assert not marker.exists()
    proc = cli("slim", "g.pt", "--model", "resnet18", "-o", "s.onnx", cwd=tmp_path, env=env)
    one_error_line(proc, "not resnet18")
    proc = cli(
        "slim", "g.pt", "--plan", "none.json", "--model", source, "-o", "s.onnx", cwd=tmp_path, env=env
    )
    assert proc.returncode == 2 and marker.exists()  # named: imported (then the plan file is missing)
    with pytest.raises(CheckpointError, match="imports no code"):
        load_checkpoint(tmp_path / "g.pt")  # in this process too


@pytest.mark.parametrize(
    ("source", "fragments"),
    [
        ("{file}:tinny", ["has no 'tinny'", "did you mean tiny"]),
        ("{file}:not_a_model", ["returned a int, not a torch.nn.Module"]),
        ("{file}:untraceable", ["cannot trace Branchy with torch.fx", "if x.sum() > 0", "leaf"]),
        ("{dir}/missing.py:tiny", ["model file not found"]),
        ("{dir}/broken.py:tiny", ["importing", "broken.py failed: ModuleNotFoundError: No module named"]),
        ("no_such_package_xyz.mod:tiny", ["cannot import no_such_package_xyz.mod"]),
        ("timm:resnet-18", ["timm has no model 'resnet-18'", "did you mean"]),
        ("{file}:tiny --model-arg depth=3", ["does not take ['depth']"]),
    ],
)
def test_bad_sources_are_one_line_errors(
    models_file: Path, tmp_path: Path, source: str, fragments: list[str]
) -> None:
    pytest.importorskip("timm")
    (tmp_path / "broken.py").write_text("from no_such_module_abc import thing\n")
    text, *extra = source.format(file=models_file, dir=tmp_path).split(" ", 1)
    args = [
        "gate",
        text,
        "--input-shape",
        "16",
        "-o",
        str(tmp_path / "g.pt"),
        *(extra[0].split() if extra else []),
    ]
    result = CliRunner().invoke(app, args)
    one_error_line(result, *fragments)
    assert not (tmp_path / "g.pt").exists()


def test_resnet20_example_slims_exactly_and_freezes_only_the_padded_channels() -> None:
    model = randomize_(resolve_source(RESNET20).build(10), seed=1)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    graph = analyze(model, x)
    # the residual stream is prunable through the zero-padding shortcuts; only the pads are frozen
    stream = graph.groups[0]
    assert stream.name == "conv1" and stream.channels == 16 and len(graph.groups) == 10
    pads = [f for f in graph.frozen if "padding adds constant channels" in f.reason]
    assert len(pads) == 2
    assert graph.prunable_macs == graph.modeled_macs  # every MAC depends on a prunable group
    for seed in (0, 1):
        plan = random_plan(graph, 0.5, seed)
        slim = slim_(copy.deepcopy(model), graph, plan).eval()
        with torch.no_grad(), masked(model, graph, plan):
            reference = model(x)
        with torch.no_grad():
            out = slim(x)
        assert (out - reference).abs().max() <= 1e-4 * reference.abs().max()
        assert slim.conv1.out_channels < 16  # the stream itself was cut


def test_resnet20_end_to_end_through_the_cli(tmp_path: Path) -> None:
    args = [
        "--data",
        "builtin",
        "--target-macs",
        "0.5",
        "--epochs",
        "1",
        "--max-steps-per-epoch",
        "3",
        "--workers",
        "0",
    ]
    assert cli("gate", RESNET20, "--input-shape", "3,32,32", "-o", "g.pt", cwd=tmp_path).returncode == 0
    tune = cli(
        "finetune", "g.pt", "--model", RESNET20, *args, "--batch-size", "16", "-o", "t.pt", cwd=tmp_path
    )
    assert tune.returncode == 0, tune.stderr
    slim = cli("slim", "t.pt", "--model", RESNET20, "-o", "s.onnx", "--json", cwd=tmp_path)
    assert slim.returncode == 0, slim.stderr
    doc = json.loads(slim.stdout)
    assert doc["parity"]["max_abs_diff"] <= doc["parity"]["tolerance"]
    assert doc["onnx"]["max_abs_diff"] <= doc["onnx"]["tolerance"]
    assert doc["macs_ratio"] <= 0.51 and (tmp_path / "s.onnx").is_file()


TIMM_MODELS = ["resnet18", "mobilenetv3_small_100", "convnext_atto", "regnety_002", "ghostnet_100"]


@pytest.mark.parametrize("name", TIMM_MODELS)
def test_timm_models_slim_exactly(name: str) -> None:
    pytest.importorskip("timm")
    model = randomize_(resolve_source(f"timm:{name}").build(), seed=2)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    graph = analyze(model, x)
    assert graph.prunable_macs > 0.5 * graph.modeled_macs, [f.reason for f in graph.frozen]
    plan = random_plan(graph, 0.5, 0)
    with torch.no_grad(), masked(model, graph, plan):
        reference = model(x)
    slim = slim_(model, graph, plan)
    with torch.no_grad():
        out = slim(x)
    assert (out - reference).abs().max() <= 1e-4 * reference.abs().max()


def test_timm_source_fills_the_spec_from_the_pretrained_config() -> None:
    pytest.importorskip("timm")
    from prunekit.config import ModelSpec
    from prunekit.models import load_model

    _, spec = load_model(ModelSpec("timm:resnet18", num_classes=7))
    assert spec.input_shape == (3, 224, 224) and spec.num_classes == 7
    assert spec.mean == pytest.approx((0.485, 0.456, 0.406))


SHARED = ROOT.parent / "shared" / "data"


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "cifar10-resnet").is_dir(), reason="needs ../shared/data (benchmark data)")
def test_pretrained_resnet20_matches_its_stored_accuracy(tmp_path: Path) -> None:
    import tarfile

    from prunekit.config import ModelSpec
    from prunekit.data import resolve_data
    from prunekit.models import load_model
    from prunekit.trainer import evaluate

    with tarfile.open(SHARED / "cifar10-jpg.tar.gz") as tar:
        tar.extractall(
            tmp_path, members=[m for m in tar.getmembers() if m.name.startswith("test")], filter="data"
        )
    spec = ModelSpec(
        RESNET20, weights=str(SHARED / "cifar10-resnet" / "resnet20-12fca82f.th"), input_shape=32
    )
    model, spec = load_model(spec)
    root = tmp_path / "cifar"  # train/ + test/, as prunekit reads a data folder (train/ is not used here)
    root.mkdir()
    (root / "test").symlink_to(tmp_path / "test")
    (root / "train").symlink_to(tmp_path / "test")
    data = resolve_data(str(root), input_shape=spec.input_shape, mean=spec.mean, std=spec.std, batch_size=250)
    assert len(data.val.dataset) == 10_000 and len(data.classes) == 10
    acc = evaluate(model, data.val, torch.device("cpu")).top1
    assert abs(acc - 0.810) <= 0.003  # the JPEG copy's stored accuracy (../shared/data/README.md)
