"""Regression tests for defects found in review: each names what went wrong before."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import message_lines
from PIL import Image
from torch import nn
from typer.testing import CliRunner

import prunekit
from prunekit.cli import app
from prunekit.config import FinetuneConfig, load_run_config
from prunekit.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
RESNET = f"{ROOT / 'examples' / 'cifar_resnet.py'}:resnet"


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean((2, 3)))


def one_line(result, *fragments: str) -> None:  # noqa: ANN001
    assert result.exit_code == 2, result.stderr
    lines = message_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, (
        result.stderr
    )
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_a_deep_copy_of_a_gated_model_has_gates_of_its_own() -> None:
    """Before: the copy's mask hooks still read the original bank, so closing its gates changed nothing."""
    gated = prunekit.gate(
        Small(), input_shape=(3, 8, 8), config=prunekit.GateConfig(granularity=4, min_keep=0.25)
    )
    twin = copy.deepcopy(gated.model).eval()
    x = gated.spec.example_input(2)
    before = gated.model.eval()(x)
    bank = twin.prunekit_gates
    bank.fix_(bank.fixed_on.clone())  # close every learnable gate of the copy only
    assert not torch.allclose(twin(x), before)
    torch.testing.assert_close(gated.model(x), before, rtol=0, atol=0)  # the original is untouched
    prunekit.remove_gates_(twin)  # removes the copy's hooks, not the original's
    torch.testing.assert_close(gated.model(x), before, rtol=0, atol=0)


def test_finetune_refuses_a_decided_model() -> None:
    """Before: a second finetune() on the same GateResult silently kept the first run's decisions."""
    gated = prunekit.gate(Small(), input_shape=(3, 8, 8))
    gated.bank.fix_(gated.bank.decisions())
    data = [(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0]))]
    with pytest.raises(ConfigError, match="decided already"):
        prunekit.finetune(gated, data, data, config=FinetuneConfig(target_macs=0.5))


def test_batch_size_one_with_batchnorm_is_refused() -> None:
    gated = prunekit.gate(Small(), input_shape=(3, 8, 8))
    data = [(torch.randn(1, 3, 8, 8), torch.tensor([0]))]
    with pytest.raises(ConfigError, match="batch_size 1 cannot train BatchNorm"):
        prunekit.finetune(gated, data, data, config=FinetuneConfig(target_macs=0.5, batch_size=1))


def test_report_passes_model_args_to_the_factory() -> None:
    """Before: `report SOURCE --model-arg depth=56` measured the default depth."""
    macs = {}
    for depth in (20, 56):
        result = CliRunner().invoke(
            app,
            [
                "report",
                RESNET,
                "--input-shape",
                "32",
                "--model-arg",
                f"depth={depth}",
                "--depth",
                "0",
                "--json",
            ],
        )
        assert result.exit_code == 0, result.stderr
        macs[depth] = json.loads(result.stdout)["macs"]
    assert macs[56] > 2.5 * macs[20]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["analyze", "resnet18", "--model-arg", "foo=1"], "resnet18 does not take ['foo']"),
        (["analyze", "resnet18", "--model-arg", "weights=DEFAULT"], "not as a model argument"),
        (
            ["analyze", f"{ROOT / 'examples' / 'cifar_resnet.py'}:resnet20", "--input-shape", "1,32,32"],
            "does not run",
        ),
    ],
)
def test_bad_model_arguments_and_shapes_are_one_line_errors(args: list[str], fragment: str) -> None:
    one_line(CliRunner().invoke(app, args), fragment)


def test_small_images_of_other_aspect_ratios_are_read_every_epoch(tmp_path: Path) -> None:
    """Before: decoding into memory stacked images of different shapes and crashed."""
    from prunekit.data import DecodedImages, image_folder_loaders

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c, size in (("a", (30, 40)), ("b", (40, 30))):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(2):
                pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / c / f"{i}.png")
    stats = {"mean": (0.5,) * 3, "std": (0.25,) * 3}
    data = image_folder_loaders(tmp_path, input_shape=(3, 32, 32), batch_size=4, workers=0, **stats)
    assert not isinstance(data.train.dataset, DecodedImages)  # ragged after the resize: read per image
    assert isinstance(data.val.dataset, DecodedImages)  # the centre crop makes them one shape
    images, _ = next(iter(data.train))
    assert images.shape == (4, 3, 32, 32)


def test_run_checks_the_class_count_before_any_stage_writes(tmp_path: Path) -> None:
    """Before: gated.pt was written, then the run stopped with a hint about a flag `run` does not have."""
    config = tmp_path / "run.toml"
    config.write_text(
        '[model]\narch = "resnet18"\ninput_shape = 32\n[finetune]\ndata = "builtin"\ntarget_macs = 0.5\n'
    )
    result = CliRunner().invoke(app, ["run", str(config), "--out-dir", str(tmp_path / "out")])
    one_line(result, "10 classes but the model 1000", "[model] num_classes = 10")
    assert not list((tmp_path / "out").iterdir())


@pytest.mark.parametrize(
    ("section", "line", "fragment"),
    [
        ("finetune", "epochs = 1.5", "epochs must be an int, got 1.5"),
        ("slim", 'latency = "no"', "latency must be a bool, got 'no'"),
        ("gates", "granularity = 8.5", "granularity must be an int, got 8.5"),
    ],
)
def test_config_values_of_the_wrong_type_name_the_key(
    tmp_path: Path, section: str, line: str, fragment: str
) -> None:
    config = tmp_path / "run.toml"
    base = {"model": 'arch = "resnet18"', "finetune": 'data = "builtin"\ntarget_macs = 0.5'}
    base[section] = (base.get(section, "") + "\n" + line).strip()
    config.write_text("".join(f"[{name}]\n{body}\n" for name, body in base.items()))
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        load_run_config(config)
