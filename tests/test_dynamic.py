"""Dynamic gates (conditional computation): placement, training, checkpoints, the skipping model and its
ONNX export, verified example by example, and the one-line errors around them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import assert_resume_is_exact, make_image_folder, message_lines, randomize
from typer.testing import CliRunner

from prunekit.checkpoint import load_checkpoint, save_checkpoint
from prunekit.cli import app
from prunekit.config import FinetuneConfig, GateConfig, ModelSpec
from prunekit.dynamic import DynamicGateBank, find_dynamic_blocks
from prunekit.dynamic_slim import dynamic_inference_model, never_on, verify_dynamic, verify_onnx_dynamic
from prunekit.errors import ConfigError, VerificationError
from prunekit.export import export_onnx
from prunekit.graph import analyze
from prunekit.schema import validate
from prunekit.stages.finetune import finetune
from prunekit.stages.gate import gate, gate_stage

SHAPE = (3, 32, 32)


def _loaders(n: int = 64, batch: int = 16, seed: int = 0):  # noqa: ANN202
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *SHAPE, generator=gen)
    y = torch.randint(0, 10, (n,), generator=gen)
    ds = torch.utils.data.TensorDataset(x, y)
    train = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, generator=gen)
    val = torch.utils.data.DataLoader(ds, batch_size=batch)
    return train, val


def _inputs(n: int, seed: int) -> torch.Tensor:
    """Images whose colour and contrast differ from example to example: pure noise would give every
    example the same block averages, and so the same decisions."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.rand(n, 1, 1, 1, generator=gen) * 2 + 0.2
    return torch.randn(n, *SHAPE, generator=gen) * scale + torch.randn(n, 3, 1, 1, generator=gen) * 2


def _config(**kw: object) -> FinetuneConfig:
    return FinetuneConfig(**({"target_macs": 0.5, "epochs": 2, "batch_size": 16, "device": "cpu"} | kw))


def _decided_with_spread(model_name: str = "resnet18", seed: int = 0, **gates: object):  # noqa: ANN202
    """A gated model whose decided gates really differ from example to example (random gate networks
    around the on/off boundary): a check that passes with every gate on would prove nothing."""
    m = getattr(torchvision.models, model_name)(num_classes=10).eval()
    result = gate(m, input_shape=SHAPE, config=GateConfig(dynamic=True, **gates))  # type: ignore[arg-type]
    randomize(result.model, seed)  # the gate networks too: nothing depends on the global RNG
    bank = result.bank
    assert isinstance(bank, DynamicGateBank)
    with torch.no_grad():
        for net in bank.nets:
            net.weight2.mul_(30.0)  # margins spread over examples
            net.bias2[:, 1] = net.bias2[:, 0]
    bank.fix_()
    return result


@pytest.fixture(scope="module")
def decided():  # noqa: ANN201
    return _decided_with_spread()


@pytest.fixture(scope="module")
def trained():  # noqa: ANN201
    torch.manual_seed(0)
    m = torchvision.models.resnet18(num_classes=10).eval()
    g = gate(m, input_shape=SHAPE, config=GateConfig(dynamic=True))
    train, val = _loaders()
    return finetune(g, train, val, config=_config())


# -- placement --------------------------------------------------------------------------------------


def test_resnet_blocks_gate_their_internal_widths_only() -> None:
    for name, per_block in (("resnet18", 1), ("resnet50", 2)):
        m = getattr(torchvision.models, name)(num_classes=10).eval()
        graph = analyze(m, torch.randn(1, *SHAPE))
        placement = find_dynamic_blocks(m, graph)
        assert len(placement.blocks) == (8 if name == "resnet18" else 16)
        for b in placement.blocks:
            assert len(b.groups) == per_block
            assert b.reader.endswith(".conv1")  # the block's first layer reads its input
            names = [graph.groups[g].name for g in b.groups]
            assert all(n.startswith(b.reader.rsplit(".", 1)[0]) for n in names)  # inside the block
        streams = [
            g.name for g in graph.groups if g.index not in {x for b in placement.blocks for x in b.groups}
        ]
        assert "conv1" in streams  # the stem's stream is shared by layer1's blocks: static
        assert all("shared across blocks" in placement.static[s] for s in streams)


def test_a_model_without_residual_blocks_is_refused_with_the_reason() -> None:
    m = torchvision.models.vgg11(num_classes=10).eval()
    with pytest.raises(ConfigError, match="no residual block") as err:
        gate(m, input_shape=SHAPE, config=GateConfig(dynamic=True))
    assert "\n" not in str(err.value)
    mb = torchvision.models.mobilenet_v2(num_classes=10).eval()
    with pytest.raises(ConfigError, match="depthwise"):
        gate(mb, input_shape=SHAPE, config=GateConfig(dynamic=True))


def test_dynamic_defaults_and_gate_network_cost() -> None:
    assert GateConfig(dynamic=True).min_keep == 0.25 and GateConfig(dynamic=True).granularity == 16
    assert GateConfig().min_keep == 0.05 and GateConfig().granularity == 8
    m = torchvision.models.resnet18(num_classes=10).eval()
    result = gate(m, input_shape=SHAPE, config=GateConfig(dynamic=True))
    d = result.to_dict()
    assert d["gate_kind"] == "dynamic" and len(d["dynamic"]) == 8
    # the stem, the downsampling shortcuts and the head read no gated channel
    assert 0.5 < d["gateable_fraction"] < 0.95
    # one Linear(C_in, 16) + Linear(16, 2) per learnable gate, counted exactly
    bank = result.bank
    expected = sum(net.fc1.in_features * 16 * net.gates + net.gates * 32 for net in bank.nets)
    assert d["gate_net_macs"] == expected
    assert d["gate_net_fraction"] < 0.02  # the goal, even at 32 px where the convs are cheapest


# -- per-example gates --------------------------------------------------------------------------------


def test_decisions_depend_on_the_input(decided) -> None:  # noqa: ANN001
    model, bank = decided.model, decided.bank
    model.eval()
    with torch.no_grad():
        model(_inputs(16, 1))
    rows = bank.current
    assert rows.shape[0] == 16
    assert len({tuple(r.tolist()) for r in rows}) > 1  # examples differ
    fixed_units = [u for u, g in enumerate(bank.layout.unit_gate) if g < 0 or bank.layout.fixed_on[g]]
    assert bool((rows[:, fixed_units] == 1).all())  # streams and always-on gates stay on


def test_training_samples_per_example_and_calibrates_the_budget(trained) -> None:  # noqa: ANN001
    bank = trained.checkpoint.gates
    assert bank.is_decided and float(bank.offset) != 0.0
    last = trained.history[-1]
    stats = last["macs_per_example"]
    assert set(stats) >= {"mean", "p50", "p95", "min", "max", "gate_nets", "with_gate_nets"}
    assert stats["min"] <= stats["p50"] <= stats["p95"] <= stats["max"]
    assert last["macs_fraction"] == pytest.approx(stats["mean"])
    assert stats["with_gate_nets"] == pytest.approx(stats["mean"] + stats["gate_nets"])
    # the calibration batches are the (unshuffled order of the) training data here: the offset makes
    # their mean fit, and the validation examples (the same images) land within a few percent
    assert abs(stats["mean"] - 0.5) < 0.05
    assert last["within_budget"] is True and last["calibrated_fraction"] <= 0.5 + 1e-9


def test_checkpoint_round_trip_keeps_decisions_and_outputs(trained, tmp_path: Path) -> None:  # noqa: ANN001
    path = tmp_path / "dyn.pt"
    save_checkpoint(trained.checkpoint, path)
    back = load_checkpoint(path, model=torchvision.models.resnet18(num_classes=10))
    assert isinstance(back.gates, DynamicGateBank) and back.gates.is_decided
    assert float(back.gates.offset) == float(trained.checkpoint.gates.offset)
    x = torch.randn(8, *SHAPE)
    a, b = trained.checkpoint.model.eval(), back.model.eval()
    with torch.no_grad():
        ya, yb = a(x), b(x)
        assert torch.equal(trained.checkpoint.gates.current, back.gates.current)
    assert torch.allclose(ya, yb, atol=1e-6)


def test_a_static_checkpoint_still_loads_as_static(tmp_path: Path) -> None:
    path = tmp_path / "static.pt"
    gate_stage(ModelSpec("resnet18", num_classes=10, input_shape=32), path)
    ckpt = load_checkpoint(path)
    assert ckpt.gates.kind == "static" and not isinstance(ckpt.gates, DynamicGateBank)
    raw = torch.load(path, weights_only=True)
    raw["gates"].pop("kind")  # a checkpoint written before gate kinds existed
    torch.save(raw, path)
    assert load_checkpoint(path).gates.kind == "static"


# -- the skipping model -------------------------------------------------------------------------------


def test_skipping_model_equals_gated_per_example(decided) -> None:  # noqa: ANN001
    gated = decided.model.eval()
    dyn = dynamic_inference_model(gated, decided.graph)
    x = _inputs(6, 2)
    report = verify_dynamic(gated, dyn, x)
    assert report["max_abs_diff"] <= 1e-4 * max(1.0, report["output_scale"])


def test_skipping_model_computes_only_the_chosen_channels_at_batch_1(decided) -> None:  # noqa: ANN001
    from prunekit.dynamic_slim import DecidingReader

    dyn = dynamic_inference_model(decided.model.eval(), decided.graph)
    readers = {n: m for n, m in dyn.model.named_modules() if isinstance(m, DecidingReader)}
    assert len(readers) == 8
    widths: dict[str, int] = {}
    for name, r in readers.items():  # the reader wraps the block's first, sliced, convolution
        r.inner.register_forward_hook(lambda _m, _i, out, name=name: widths.update({name: out.shape[1]}))
    seen: dict[str, set[int]] = {n: set() for n in readers}
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _ in range(4):
            dyn(_inputs(1, int(torch.randint(0, 10**6, (1,), generator=gen))))
            for name, r in readers.items():
                chosen = int(dyn.selection.channels[r.groups[0]].numel())
                assert widths[name] == chosen  # the convolution itself ran on the chosen channels only
                seen[name].add(chosen)
    full = {n: r.inner.inner.out_channels for n, r in readers.items()}
    assert all(min(seen[n]) < full[n] for n in readers)  # fewer than all channels, everywhere
    assert any(len(s) > 1 for s in seen.values())  # and not the same for every input


def test_a_wrong_skipping_model_is_refused(decided) -> None:  # noqa: ANN001
    gated = decided.model.eval()
    dyn = dynamic_inference_model(gated, decided.graph)
    dyn.model.layer2[0].conv1.offset += 5.0  # decides differently from the gated model
    with pytest.raises(VerificationError, match="decisions"):
        verify_dynamic(gated, dyn, _inputs(4, 4))


def test_never_on_channels_are_removed_exactly_on_the_calibration_data(decided) -> None:  # noqa: ANN001
    gated = decided.model.eval()
    batches = [_inputs(8, 5)]
    drop = never_on(gated, batches)
    assert drop  # random gate networks leave some channels off for all 8 examples
    dyn = dynamic_inference_model(gated, decided.graph, drop)
    verify_dynamic(gated, dyn, batches[0])
    assert sum(len(v) for v in dyn.removed.values()) == len(drop)


def test_onnx_matches_per_example_at_two_batch_sizes(decided, tmp_path: Path) -> None:  # noqa: ANN001
    import onnx

    dyn = dynamic_inference_model(decided.model.eval(), decided.graph)
    path = tmp_path / "dyn.onnx"
    x = _inputs(5, 6)
    export_onnx(dyn, path, input_shape=SHAPE, opset=17, dynamo=False, inputs=x)
    report = verify_onnx_dynamic(path, dyn, x, 1e-4)
    assert report["batch_sizes"] == [1, 5]
    graph = onnx.load(str(path)).graph
    initializers = {i.name for i in graph.initializer}
    ops = [n.op_type for n in graph.node]
    assert ops.count("NonZero") == len(dyn.group_units)  # one selection per dynamic group, in the graph
    # convolutions whose weights are gathered in the graph (not constant): the real skipping
    assert sum(1 for n in graph.node if n.op_type == "Conv" and n.input[1] not in initializers) >= 16


def test_onnx_gathers_input_channels_in_whole_blocks(decided, tmp_path: Path) -> None:  # noqa: ANN001
    import onnx
    from onnx import numpy_helper

    dyn = dynamic_inference_model(decided.model.eval(), decided.graph)
    assert set(dyn.selection.block.values()) == {16}  # --dynamic's 16 channels per gate
    path = tmp_path / "dyn.onnx"
    export_onnx(dyn, path, input_shape=SHAPE, opset=17, dynamo=False, inputs=_inputs(2, 9))
    graph = onnx.load(str(path)).graph
    blocked = {
        i.name
        for i in graph.initializer
        if len(i.dims) == 3 and i.dims[2] % 16 == 0 and numpy_helper.to_array(i).size > 16 * 16
    }
    gathers = [n for n in graph.node if n.op_type == "Gather" and n.input[0] in blocked]
    # every block's second convolution reads the first one's chosen channels: 8 block gathers
    assert len(gathers) == 8
    assert all(a.i == 1 for n in gathers for a in n.attribute if a.name == "axis")


def test_gates_of_unequal_sizes_are_gathered_in_their_common_block(tmp_path: Path) -> None:
    """Granularity 12 on widths 64..512 gives gates of 12 channels and a last one of 4 or 8: blocks of
    4 channels (the gcd). The skipping model and its ONNX file stay exact per example."""
    result = _decided_with_spread(seed=1, granularity=12)
    gated = result.model.eval()
    dyn = dynamic_inference_model(gated, result.graph)
    assert set(dyn.selection.block.values()) == {4}
    x = _inputs(4, 10)
    verify_dynamic(gated, dyn, x)
    path = tmp_path / "dyn12.onnx"
    export_onnx(dyn, path, input_shape=SHAPE, opset=17, dynamo=False, inputs=x)
    assert verify_onnx_dynamic(path, dyn, x, 1e-4)["batch_sizes"] == [1, 4]


def test_channel_blocks_put_each_gates_channels_together() -> None:
    from prunekit.dynamic_slim import _channel_blocks

    units, blocks, size = _channel_blocks([10, 11, 12, 13, 14, 15], [1, 0, 1, 0, 2, 2])
    assert (units, blocks, size) == ([10, 12, 11, 13, 14, 15], [1, 0, 2], 2)
    assert _channel_blocks([0, 1, 2], [0, 0, 1]) == ([0, 1, 2], [0, 0, 1], 1)


def test_onnx_check_catches_a_changed_graph(decided, tmp_path: Path) -> None:  # noqa: ANN001
    dyn = dynamic_inference_model(decided.model.eval(), decided.graph)
    path = tmp_path / "dyn.onnx"
    x = _inputs(3, 7)
    export_onnx(dyn, path, input_shape=SHAPE, opset=17, dynamo=False)
    dyn.model.layer3[1].conv1.offset -= 5.0  # PyTorch now decides otherwise than the file
    with pytest.raises(VerificationError):
        verify_onnx_dynamic(path, dyn, x, 1e-4)


# -- resume -------------------------------------------------------------------------------------------


def test_resumed_dynamic_run_equals_an_uninterrupted_one(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", classes=3, train=8, val=2)
    gated = tmp_path / "gated.pt"
    gate_stage(ModelSpec("resnet18", num_classes=3, input_shape=32), gated, config=GateConfig(dynamic=True))
    config = _config(epochs=3, batch_size=8, workers=0, max_steps_per_epoch=2, decide_at=0.5)
    # interrupted after the decision (mid-run): the calibrated offset and the frozen networks resume
    assert_resume_is_exact(gated, data, config, tmp_path, interrupt_after=2)


# -- the command line -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dyncli")
    data = make_image_folder(root / "data", classes=3, train=8, val=4)
    runner = CliRunner()
    files = {
        "data": data,
        "gated": root / "gated.pt",
        "tuned": root / "tuned.pt",
        "static": root / "static.pt",
    }
    common = ["--num-classes", "3", "--input-shape", "3,32,32"]
    r = runner.invoke(app, ["gate", "resnet18", *common, "--dynamic", "-o", str(files["gated"])])
    assert r.exit_code == 0, r.output
    r = runner.invoke(
        app,
        [
            "finetune", str(files["gated"]), "--data", str(data), "--target-macs", "0.6", "--epochs", "2",
            "--batch-size", "8", "--workers", "0", "--max-steps-per-epoch", "2", "-o", str(files["tuned"]),
        ],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["gate", "resnet18", *common, "-o", str(files["static"])])
    assert r.exit_code == 0, r.output
    return files


def test_cli_slim_exports_a_verified_dynamic_onnx(cli_files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "model.onnx"
    r = CliRunner().invoke(
        app, ["slim", str(cli_files["tuned"]), "-o", str(out), "--data", str(cli_files["data"]), "--json"]
    )
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    validate("slim", doc)
    stats = doc["dynamic"]["macs_per_example"]
    assert (
        stats["min"] <= stats["mean"] <= stats["max"] and doc["dynamic"]["measured_on"] == "validation data"
    )
    assert doc["onnx"]["per_example"]["batch_sizes"][0] == 1 and out.is_file()
    assert not out.with_suffix(".pt").exists()  # a dynamic model ships as ONNX only


FT = "finetune {gated} --data {data} -o {out}"
GATE = "gate vgg11 --num-classes 3 --input-shape 3,32,32 -o {out}"


@pytest.mark.parametrize(
    ("command", "needle"),
    [
        (FT + " --target-macs 0.5 --method magnitude", "static gates"),
        (FT + " --target-macs 0.5 --method sensitivity", "static gates"),
        (FT + " --target-latency 0.5", "static gates"),
        ("slim {tuned} -o {out}.onnx --quantize int8 --data {data}", "static gates"),
        ("slim {tuned} -o {out}.pt2 --export pt2", "ships as ONNX"),
        ("slim {tuned} -o {out}.onnx --drop-never-on", "needs --data"),
        ("slim {static} -o {out}.onnx --drop-never-on", "dynamic gates"),
        (GATE + " --dynamic", "no residual block"),
    ],
)
def test_cli_one_line_errors(cli_files: dict[str, Path], tmp_path: Path, command: str, needle: str) -> None:
    names = {
        "gated": cli_files["gated"],
        "tuned": cli_files["tuned"],
        "static": cli_files["static"],
        "data": cli_files["data"],
        "out": tmp_path / "out",
    }
    argv = [a.format(**{k: str(v) for k, v in names.items()}) for a in command.split()]
    r = CliRunner().invoke(app, argv)
    assert r.exit_code == 2, r.output
    lines = message_lines(r.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines
    assert not list(tmp_path.iterdir())  # nothing written


def test_run_with_dynamic_gates_end_to_end(cli_files: dict[str, Path], tmp_path: Path) -> None:
    """`prunekit run` with [gates] dynamic = true: gate, fine-tune, the skipping model in ONNX, the report."""
    import tomllib

    from prunekit.config import load_run_config
    from prunekit.stages.run import run_pipeline

    config = tomllib.loads((Path(__file__).parents[1] / "examples" / "run.toml").read_text())
    config["model"] |= {"num_classes": 3}
    config["gates"] |= {"dynamic": True}
    config["finetune"] |= {
        "data": str(cli_files["data"]),
        "epochs": 1,
        "max_steps_per_epoch": 2,
        "batch_size": 8,
        "workers": 0,
    }
    config.pop("ci", None)
    lines = []  # JSON scalars and lists are TOML values
    for section, values in config.items():
        lines += [f"[{section}]", *(f"{k} = {json.dumps(v)}" for k, v in values.items())]
    (tmp_path / "run.toml").write_text("\n".join(lines) + "\n")
    run = load_run_config(tmp_path / "run.toml")
    out = tmp_path / "run"
    report = run_pipeline(run, out)
    assert report["gate"]["gate_kind"] == "dynamic"
    assert (out / "model.onnx").is_file() and not (out / "model.pt").exists()
    stats = report["slim"]["dynamic"]["macs_per_example"]
    assert report["summary"]["macs_ratio"] == pytest.approx(stats["mean"])
    assert report["slim"]["onnx"]["per_example"]["batch_sizes"][0] == 1


def test_python_api_slim_and_export(trained, tmp_path: Path) -> None:  # noqa: ANN001
    import prunekit

    _, val = _loaders()
    result = prunekit.slim(trained, val_loader=val)
    assert isinstance(result, prunekit.DynamicSlimResult)
    assert result.accuracy is not None and result.macs["examples"] == 64
    report = prunekit.export_onnx(result, tmp_path / "model.onnx")
    assert report["per_example"]["batch_sizes"][0] == 1 and (tmp_path / "model.onnx").is_file()
