"""prunekit checkpoints: one file of plain data that loads with `torch.load(path, weights_only=True)`.

Loading never unpickles code: it rebuilds the architecture from its name and arguments, analyses it,
shrinks what the stored plan removed, inserts gates where the file says, then loads the state_dict
strictly. A truncated, foreign or inconsistent file is a CheckpointError with one line saying why.
"""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit import __version__
from prunekit.errors import CheckpointError, PrunekitError
from prunekit.fileio import atomic_path
from prunekit.gates import GateBank, GateConfig, GateLayout, get_gates, insert_gates_
from prunekit.graph import ChannelGraph, analyze
from prunekit.plan import ChannelPlan

FORMAT = "prunekit-checkpoint"
FORMAT_VERSION = 1


@dataclass
class ModelSpec:
    """What it takes to rebuild the model before its weights are loaded."""

    arch: str
    num_classes: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights: str | None = None  # where the original weights came from (informational)

    def to_dict(self) -> dict[str, Any]:
        return {
            "arch": self.arch,
            "num_classes": self.num_classes,
            "input_size": self.input_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "weights": self.weights,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        return cls(
            arch=str(d["arch"]),
            num_classes=int(d["num_classes"]),
            input_size=int(d["input_size"]),
            mean=tuple(float(x) for x in d["mean"]),  # type: ignore[arg-type]
            std=tuple(float(x) for x in d["std"]),  # type: ignore[arg-type]
            weights=d.get("weights"),
        )


@dataclass
class Checkpoint:
    """A model at some stage: gated (gates, no plan), slim (plan, no gates), or plain."""

    spec: ModelSpec
    model: nn.Module
    graph: ChannelGraph  # of the unslimmed architecture: plans and gates refer to it
    stage: str  # "gated", "finetuned", "slim"
    plan: ChannelPlan | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    training: dict[str, Any] | None = None  # optimizer/scheduler/epoch state for --resume
    extra: dict[str, Any] = field(default_factory=dict)  # reports and metadata (plain data)

    @property
    def gates(self) -> GateBank | None:
        return get_gates(self.model)


def example_batch(spec: ModelSpec, batch: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, 3, spec.input_size, spec.input_size, generator=g)


def save_checkpoint(ckpt: Checkpoint, path: Path) -> None:
    """Write atomically: an interrupted save never leaves a corrupt file or loses the previous one."""
    bank = ckpt.gates
    data: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "prunekit_version": str(__version__),
        "torch_version": str(torch.__version__),
        "model": ckpt.spec.to_dict(),
        "stage": ckpt.stage,
        "gates": None
        if bank is None
        else {"config": bank.config.to_dict(), "layout": bank.layout.to_dict(), "tau": float(bank.tau)},
        "plan": None if ckpt.plan is None else ckpt.plan.to_dict(),
        "history": ckpt.history,
        "training": ckpt.training,
        "extra": ckpt.extra,
        "state_dict": {k: v.detach().cpu() for k, v in ckpt.model.state_dict().items()},
    }
    with atomic_path(Path(path)) as tmp:
        torch.save(data, tmp)


def read_checkpoint_data(path: Path) -> dict[str, Any]:
    """The raw dict, loaded safely and checked for the format; no model is built."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(
            f"cannot read checkpoint {path}: corrupt or not a torch file ({reason[:160]})"
        ) from exc
    except pickle.UnpicklingError as exc:  # weights_only refuses anything that is not plain data
        if "global" in str(exc).lower():
            raise CheckpointError(
                f"refusing to read {path}: it holds pickled Python objects, not plain data (loading it could "
                "run code; prunekit checkpoints never need that)"
            ) from exc
        raise CheckpointError(
            f"cannot read checkpoint {path}: corrupt or not a torch file (bad pickle)"
        ) from exc
    except Exception as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {type(exc).__name__}") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a prunekit checkpoint "
            "(a plain state_dict? pass it as --weights to `prunekit gate`)"
        )
    if data.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {data.get('format_version')!r}; "
            f"this prunekit reads {FORMAT_VERSION}"
        )
    return data


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> Checkpoint:
    data = read_checkpoint_data(path)
    try:
        spec = ModelSpec.from_dict(data["model"])
        stage = str(data["stage"])
        state_dict = data["state_dict"]
        plan = None if data.get("plan") is None else ChannelPlan.from_dict(data["plan"])
    except PrunekitError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path} is inconsistent: missing or malformed field {exc}") from exc

    from prunekit.models import build_model

    try:
        model = build_model(spec.arch, spec.num_classes)
    except PrunekitError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    graph = analyze(model, example_batch(spec))
    if plan is not None:
        from prunekit.slim import slim_

        try:
            slim_(model, graph, plan)
        except PrunekitError as exc:
            raise CheckpointError(f"{path}: the stored channel plan does not fit {spec.arch}") from exc
    gates = data.get("gates")
    if gates is not None:
        try:
            layout = GateLayout.from_dict(gates["layout"])
            config = GateConfig(**gates["config"])
            bank = GateBank(layout, config)
            bank.tau = float(gates.get("tau", 1.0))
            insert_gates_(model, graph, bank)
        except PrunekitError as exc:
            raise CheckpointError(f"{path}: the stored gates do not fit {spec.arch}: {exc}") from exc
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: malformed gate configuration ({exc})") from exc
    _load_state_strict(model, state_dict, path, spec.arch)
    model.to(device).eval()
    return Checkpoint(
        spec=spec,
        model=model,
        graph=graph,
        stage=stage,
        plan=plan,
        history=list(data.get("history") or []),
        training=data.get("training"),
        extra=dict(data.get("extra") or {}),
    )


def _load_state_strict(model: nn.Module, state_dict: Any, path: Path, arch: str) -> None:
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"{path} is inconsistent: state_dict is not a dict")
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and isinstance(state_dict[k], torch.Tensor) and state_dict[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if shapes:
            parts.append(f"{len(shapes)} with other shapes (e.g. {shapes[0]})")
        raise CheckpointError(
            f"{path}: weights do not fit {arch} as the checkpoint describes it: " + "; ".join(parts)
        )
    model.load_state_dict(state_dict, strict=True)


__all__ = [
    "Checkpoint",
    "ModelSpec",
    "example_batch",
    "load_checkpoint",
    "read_checkpoint_data",
    "save_checkpoint",
]
