"""The in-memory Python API (prunekit.gate / finetune / slim / export_onnx) and the stage hand-offs:
the README's example runs verbatim, `run` traces and counts once, CLI defaults are the config's."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
import typer
from torch import nn

import prunekit
from prunekit.config import FinetuneConfig, GateConfig, ModelSpec, RunConfig, SlimConfig, defaults
from prunekit.errors import VerificationError

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_python_api_example() -> str:
    text = README.read_text()
    section = text.split("## Python API", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the README's Python API section holds one python example"
    return blocks[0]


def test_readme_python_api_example_runs_verbatim(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "readme_example"}
    exec(compile(readme_python_api_example(), "README.md#python-api", "exec"), namespace)  # noqa: S102
    small = namespace["small"]
    assert isinstance(small, prunekit.SlimResult)
    assert "TinyNet" in type(namespace["model"]).__name__  # a model that is not torchvision's
    report = small.to_dict()
    assert 0.3 < report["macs_ratio"] <= 0.5 + 0.01  # the budget, counted by fvcore on the slim model
    assert report["parity"]["max_abs_diff"] <= report["parity"]["tolerance"]
    assert (tmp_path / "tinynet-slim.onnx").is_file()
    # the slim model is a plain, smaller nn.Module with no gates left
    assert not any(isinstance(m, prunekit.gates.GateBank) for m in small.model.modules())
    assert prunekit.count_params(small.model) < prunekit.count_params(namespace["TinyNet"]())


class Branchy(nn.Module):
    """A residual net that is not torchvision's: the add couples the two producers' channels."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.back = nn.Sequential(nn.Conv2d(32, 16, 1), nn.BatchNorm2d(16))
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.back(self.body(x)))
        return self.head(x.mean((2, 3)))


def test_gate_and_slim_in_memory_on_a_custom_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    gated = prunekit.gate(Branchy(), input_shape=(3, 16, 16), config=GateConfig(granularity=4, min_keep=0.25))
    spec = gated.spec
    assert spec.source is None and spec.num_classes == 4 and spec.input_shape == (3, 16, 16)
    bank = gated.bank
    with torch.no_grad():  # close the last learnable gate of every group
        states = bank.decisions().clone()
        states[~bank.fixed_on] = False
        bank.fix_(states)
    small = prunekit.slim(gated)
    assert small.slim_size.macs < gated.original.macs
    assert small.slim_size.macs == small.predicted_macs
    # the source is left as it was: gated, and still usable
    assert prunekit.gates.get_gates(gated.model) is not None
    gated.save(tmp_path / "g.pt")
    with pytest.raises(prunekit.errors.CheckpointError, match="in memory"):
        prunekit.load_checkpoint(tmp_path / "g.pt")
    again = prunekit.load_checkpoint(tmp_path / "g.pt", model=Branchy())
    x = spec.example_input(3)
    torch.testing.assert_close(again.model(x), gated.model.eval()(x), rtol=0, atol=0)


def test_slim_refuses_a_plan_whose_macs_disagree_with_fvcore(monkeypatch: pytest.MonkeyPatch) -> None:
    gated = prunekit.gate(Branchy(), input_shape=(3, 16, 16))
    graph_cls = type(gated.graph)
    real = graph_cls.macs
    monkeypatch.setattr(
        graph_cls, "macs", lambda self, keep=None: real(self, keep) + (0 if keep is None else 10**6)
    )
    with pytest.raises(VerificationError, match="plan predicts"):
        prunekit.slim(gated)


def _counting(monkeypatch: pytest.MonkeyPatch, function: object) -> list[tuple]:
    """Replace `function` wherever a prunekit module holds it; return the list of calls' arguments."""
    calls: list[tuple] = []

    def wrapper(*args: object, **kwargs: object) -> object:
        calls.append(args)
        return function(*args, **kwargs)  # type: ignore[operator]

    for name, module in list(sys.modules.items()):
        if name == "prunekit" or name.startswith("prunekit."):
            for attr, value in list(vars(module).items()):
                if value is function:
                    monkeypatch.setattr(module, attr, wrapper)
    return calls


def test_run_traces_once_and_counts_the_original_macs_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import prunekit.checkpoint
    import prunekit.graph
    import prunekit.measure
    import prunekit.stages.run  # noqa: F401  (import every stage before patching)

    analyses = _counting(monkeypatch, prunekit.graph.analyze)
    counts = _counting(monkeypatch, prunekit.measure.count_macs)
    loads = _counting(monkeypatch, prunekit.checkpoint.load_checkpoint)
    config = RunConfig(
        model=ModelSpec("resnet18", num_classes=10, input_shape=(3, 32, 32)),
        data="builtin",
        finetune=FinetuneConfig(target_macs=0.5, epochs=1, batch_size=32, max_steps_per_epoch=2, workers=0),
        slim=SlimConfig(export="onnx"),
    )
    report = prunekit.run_pipeline(config, tmp_path / "run")
    assert len(analyses) == 1  # the architecture is traced once per run
    assert len(loads) == 0  # stages hand results over in memory, not through their files
    assert len(counts) == 2  # the original model once (at gate), the slim model once (at slim)
    original, slimmed = (args[0] for args in counts)
    # the first count saw the model before its gates were inserted (the same object carries them now)
    gate_params = original.prunekit_gates.logits.numel()
    assert prunekit.count_params(original) - gate_params == report["summary"]["params_before"]
    assert prunekit.count_params(slimmed) == report["summary"]["params_after"]
    assert report["summary"]["macs_before"] == report["gate"]["macs"]
    assert {"gated", "tuned", "onnx", "slim", "plan", "report"} <= set(report["files"])


def _cli_defaults(command: str) -> dict[str, object]:
    from prunekit.cli import app

    click_command = typer.main.get_command(app).commands[command]  # type: ignore[attr-defined]
    return {p.name: p.default for p in click_command.params}


_FINETUNE_OPTIONS = set(defaults(FinetuneConfig)) - {"gate_weight_decay"}


@pytest.mark.parametrize(
    ("command", "cls", "renames", "options"),
    [
        ("finetune", FinetuneConfig, {}, _FINETUNE_OPTIONS),
        ("gate", GateConfig, {}, {"granularity", "min_keep", "importance", "importance_batches"}),
        ("slim", SlimConfig, {}, {"export", "opset", "latency", "threads"}),
    ],
)
def test_cli_defaults_are_the_config_defaults(
    command: str, cls: type, renames: dict[str, str], options: set[str]
) -> None:
    cli = {renames.get(k, k): getattr(v, "value", v) for k, v in _cli_defaults(command).items()}
    config = defaults(cls)
    assert options <= set(cli)  # every setting the command offers is compared
    for key in options:
        assert cli[key] == config[key], key
