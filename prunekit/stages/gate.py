"""Stage 1, gate: analyse a model's channel groups and insert learnable Gumbel gates.

`gate(model, ...)` works on any `nn.Module` that torch.fx can trace and returns a GateResult in memory;
`gate_stage(spec, out)` loads a model by its source, gates it and writes the gated checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.checkpoint import Checkpoint, save_checkpoint
from prunekit.config import GateConfig, ModelSpec
from prunekit.dynamic import check_block_order, dynamic_bank, dynamic_summary, gated_macs
from prunekit.errors import ConfigError
from prunekit.fileio import check_writable
from prunekit.gates import GateBank, insert_gates_, make_layout, ungated_copy
from prunekit.graph import ChannelGraph, FrozenChannels, analyze
from prunekit.measure import count_macs
from prunekit.models import check_runs, load_model
from prunekit.objective import MacModel
from prunekit.plan import IMPORTANCE, taylor_importance
from prunekit.runtime import model_device
from prunekit.sources import complete_spec


@dataclass(frozen=True)
class OriginalSize:
    """The ungated model's size, counted once (fvcore) and carried through every later stage."""

    macs: int
    params: int

    def to_dict(self) -> dict[str, int]:
        return {"macs": self.macs, "params": self.params}


@dataclass(frozen=True)
class GateResult:
    checkpoint: Checkpoint  # stage "gated": the model with its gates, its graph and spec
    original: OriginalSize
    gateable_macs: int  # MACs that depend on gates, every gate open
    frozen: tuple[FrozenChannels, ...] = field(default_factory=tuple)

    @property
    def model(self) -> nn.Module:
        return self.checkpoint.model

    @property
    def spec(self) -> ModelSpec:
        return self.checkpoint.spec

    @property
    def graph(self) -> ChannelGraph:
        return self.checkpoint.graph

    @property
    def bank(self) -> GateBank:
        bank = self.checkpoint.gates
        assert bank is not None  # a GateResult always holds gates
        return bank

    def save(self, path: Path | str) -> None:
        save_checkpoint(self.checkpoint, Path(path))

    def to_dict(self) -> dict[str, Any]:
        bank, spec = self.bank, self.spec
        return {
            "model": spec.name,
            "num_classes": spec.num_classes,
            "input_shape": list(spec.input_shape or ()),
            "weights": spec.weights,
            "macs": self.original.macs,
            "params": self.original.params,
            "groups": len(self.graph.groups),
            "gates": bank.num_gates,
            "learnable_gates": int((~bank.fixed_on).sum()),
            "granularity": bank.config.granularity,
            "gateable_macs": self.gateable_macs,
            "gateable_fraction": self.gateable_macs / max(1, self.original.macs),
            "frozen": [{"where": f.where, "reason": f.reason} for f in self.frozen],
            "gate_kind": bank.kind,
            **(dynamic_summary(bank, self.graph, self.original.macs) if bank.kind == "dynamic" else {}),
        }


def gate(
    model: nn.Module,
    *,
    input_shape: tuple[int, int, int] | None = None,
    spec: ModelSpec | None = None,
    config: GateConfig | None = None,
    data: Any = None,
) -> GateResult:
    """Insert gates into `model` (in place, like `insert_gates_`; pass a copy to keep the original).

    `model`: any classifier that torch.fx can trace. Give `input_shape=(C, H, W)` for a model of your
    own, or a complete `spec` (what `prunekit.models.load_model` returns) to record where it came from.
    Without a spec the normalisation recorded is ImageNet's and the class count is read from the
    model's output.
    `data`: (images, labels) training batches, needed by `config.importance == "taylor"` only (the
        first `config.importance_batches` are used; the model itself is not changed by them)."""
    config = config or GateConfig()
    check_importance_data(config, data is not None)
    device = model_device(model)
    model.cpu()  # analysed on the CPU (example inputs live there); handed back where it was
    spec = _complete_spec(model, spec, input_shape)
    model.eval()
    check_runs(model, spec)
    x = spec.example_input()
    mac_report = count_macs(model, x)
    original = OriginalSize(mac_report.total_macs, mac_report.params)
    graph = analyze(model, x)
    if config.importance == "taylor":
        importance = taylor_importance(model, graph, data, config.importance_batches, device)
    else:
        importance = IMPORTANCE[config.importance](model, graph)
    if config.dynamic:
        bank: GateBank = dynamic_bank(model, graph, config, importance, spec.name or type(model).__name__)
    else:
        bank = GateBank(make_layout(graph, config, importance), config)
    insert_gates_(model, graph, bank)
    if config.dynamic:
        check_block_order(model, graph, bank, x)  # type: ignore[arg-type]
    model.to(device)
    checkpoint = Checkpoint(spec, model, graph, "gated", extra={"original": original.to_dict()})
    gateable = gated_macs(graph, bank.layout) if config.dynamic else int(MacModel(graph).gateable_macs)
    return GateResult(checkpoint, original, gateable, tuple(graph.frozen))


def original_size(ckpt: Checkpoint) -> OriginalSize:
    """The ungated model's size as the gate stage recorded it (counted again only for a checkpoint
    made without prunekit's gate stage)."""
    recorded = ckpt.extra.get("original")
    if recorded:
        return OriginalSize(int(recorded["macs"]), int(recorded["params"]))
    report = count_macs(ungated_copy(ckpt.model), ckpt.spec.example_input())
    return OriginalSize(report.total_macs, report.params)


def _complete_spec(
    model: nn.Module, spec: ModelSpec | None, input_shape: tuple[int, int, int] | None
) -> ModelSpec:
    if spec is None:
        if input_shape is None:
            raise ConfigError("gate() needs input_shape=(C, H, W) (or a spec) to trace the model")
        spec = ModelSpec(source=None, input_shape=input_shape)
    elif input_shape is not None and tuple(input_shape) != spec.input_shape:
        spec = spec.with_input_shape(input_shape)  # the evaluation resize follows the crop
    return spec if spec.complete else complete_spec(model, spec)


def check_importance_data(config: GateConfig, has_data: bool) -> None:
    """Taylor importance ranks by the loss's gradients and needs data; the other rankings use none."""
    if config.importance == "taylor" and not has_data:
        raise ConfigError("--importance taylor ranks channels by the loss's gradients: give --data")
    if config.importance != "taylor" and has_data:
        raise ConfigError(f"--data is used by --importance taylor only (this is {config.importance})")


def gate_stage(
    spec: ModelSpec,
    out: Path,
    *,
    config: GateConfig | None = None,
    seed: int = 0,
    data: str | None = None,
    batch_size: int = 64,
) -> GateResult:
    """Load the model `spec` names, gate it and write the gated checkpoint to `out`. `data` (an
    ImageFolder root or `builtin`): the training images `importance="taylor"` ranks by."""
    config = config or GateConfig()
    check_importance_data(config, data is not None)
    check_writable(out)
    torch.manual_seed(seed)  # reproducible random init (no weights, or a fresh --num-classes head)
    model, full_spec = load_model(spec)
    batches = None
    if data is not None:
        from prunekit.data import resolve_data

        loaders = resolve_data(data, **full_spec.preprocessing(), batch_size=batch_size, seed=seed)
        if loaders.num_classes != full_spec.num_classes:
            raise ConfigError(
                f"the data has {loaders.num_classes} classes but the model {full_spec.num_classes}: "
                "give --num-classes to fit a new head"
            )
        batches = loaders.train
    result = gate(model, spec=full_spec, config=config, data=batches)
    result.save(out)
    return result


__all__ = ["GateResult", "OriginalSize", "check_importance_data", "gate", "gate_stage", "original_size"]
