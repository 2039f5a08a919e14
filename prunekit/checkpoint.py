"""prunekit checkpoints: one file of plain data that loads with `torch.load(path, weights_only=True)`.

Loading never unpickles code: it rebuilds the architecture from its model source (or takes the freshly
built model the caller passes), analyses it, shrinks what the stored plan removed, inserts gates of the
recorded kind where the file says, then loads the state_dict strictly. A truncated, foreign or
inconsistent file is a CheckpointError with one line saying why.

Format 2 (this version) records the model as a ModelSpec (source, input_shape (C, H, W), ...) and the
gate bank's kind. Format 1 files (prunekit 0.1) still load.
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
from prunekit.config import ModelSpec
from prunekit.errors import CheckpointError, PrunekitError
from prunekit.fileio import atomic_path
from prunekit.gates import GateBank, gate_bank_from_description, get_gates, insert_gates_
from prunekit.graph import ChannelGraph, analyze
from prunekit.plan import ChannelPlan
from prunekit.runtime import unwrap

FORMAT = "prunekit-checkpoint"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
STAGES = ("gated", "finetuned", "slim")


@dataclass
class Checkpoint:
    """A model at one stage: "gated" or "finetuned" (gates, no plan) or "slim" (plan, no gates)."""

    spec: ModelSpec  # complete: every field filled in
    model: nn.Module
    graph: ChannelGraph  # of the unslimmed architecture: plans and gates refer to it
    stage: str  # one of STAGES
    plan: ChannelPlan | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    training: dict[str, Any] | None = None  # optimizer/scheduler/epoch state for --resume
    extra: dict[str, Any] = field(default_factory=dict)  # reports and metadata (plain data)

    @property
    def gates(self) -> GateBank | None:
        return get_gates(unwrap(self.model))


def save_checkpoint(ckpt: Checkpoint, path: Path) -> None:
    """Write atomically: an interrupted save never leaves a corrupt file or loses the previous one."""
    bank = ckpt.gates
    if ckpt.stage not in STAGES:
        raise ValueError(f"unknown checkpoint stage {ckpt.stage!r}")
    data: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "prunekit_version": str(__version__),
        "torch_version": str(torch.__version__),
        "model": ckpt.spec.to_dict(),
        "stage": ckpt.stage,
        "gates": None if bank is None else bank.describe(),
        "plan": None if ckpt.plan is None else ckpt.plan.to_dict(),
        "history": ckpt.history,
        "training": ckpt.training,
        "extra": ckpt.extra,
        "state_dict": {k: v.detach().cpu() for k, v in unwrap(ckpt.model).state_dict().items()},
    }
    with atomic_path(Path(path), fsync=True) as tmp:  # on disk before it replaces the previous one
        torch.save(data, tmp)


def _sniff(path: Path) -> None:
    """Name what a file is when it is plainly not a checkpoint, before torch.load guesses."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from exc
    if not head:
        raise CheckpointError(f"cannot read checkpoint {path}: the file is empty")
    if path.suffix.lower() == ".onnx" or (head[:1] == b"\x08" and head[:2] != b"PK"):
        raise CheckpointError(
            f"{path} looks like an ONNX model, not a prunekit checkpoint (`prunekit report` reads ONNX "
            "files; slim and finetune take the .pt checkpoints of gate and finetune)"
        )


def non_finite_tensor(state_dict: dict[str, Any]) -> str | None:
    """The name of the first floating tensor holding a NaN or an infinity, else None."""
    for name, tensor in state_dict.items():
        if (
            isinstance(tensor, torch.Tensor)
            and tensor.is_floating_point()
            and not torch.isfinite(tensor).all()
        ):
            return name
    return None


def read_checkpoint_data(path: Path) -> dict[str, Any]:
    """The raw dict, loaded safely and checked for the format; no model is built."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    _sniff(path)
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
    if data.get("format_version") not in READABLE_VERSIONS:
        raise CheckpointError(
            f"{path} has checkpoint format {data.get('format_version')!r}; "
            f"this prunekit reads {', '.join(map(str, READABLE_VERSIONS))}"
        )
    return data


def load_checkpoint(
    path: Path | str, *, model: nn.Module | None = None, source: str | None = None
) -> Checkpoint:
    """Rebuild the checkpoint's model and load its weights strictly (on the CPU, in eval mode).

    `source`: the model source the user names (`--model`). A checkpoint of a model of one's own
    (`module:factory`, `file.py:factory`) is rebuilt only when the user names the same source: prunekit
    never imports code on a file's word. torchvision and timm models rebuild from their names.
    `model`: a freshly built, unslimmed, ungated instance of the architecture instead (for a model that
    was handed over in memory)."""
    path = Path(path)
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
    bad = non_finite_tensor(state_dict) if isinstance(state_dict, dict) else None
    if bad is not None:
        raise CheckpointError(
            f"{path} holds non-finite weights (NaN or infinity, first in {bad}): the training that wrote it "
            "diverged; use an earlier checkpoint or train again with a lower --lr / --gate-lr"
        )
    missing = [k for k in ("num_classes", "input_shape", "mean", "std") if getattr(spec, k) is None]
    if missing:
        raise CheckpointError(
            f"{path} is inconsistent: missing or malformed field {', '.join(map(repr, missing))}"
        )
    if stage not in STAGES:
        raise CheckpointError(
            f"{path} is inconsistent: unknown stage {stage!r} (expected {', '.join(STAGES)})"
        )
    if model is None:
        model = _build(spec, path, source)
    elif get_gates(model) is not None:
        raise CheckpointError("load_checkpoint(model=...) takes a freshly built model without gates")
    graph = analyze(model, spec.example_input())
    if plan is not None:
        from prunekit.surgery import slim_

        try:
            slim_(model, graph, plan)
        except PrunekitError as exc:
            raise CheckpointError(f"{path}: the stored channel plan does not fit {spec.name}") from exc
    if data.get("gates") is not None:
        _insert_recorded_gates(model, graph, data["gates"], path, spec)
        if data["format_version"] == 1:
            state_dict = _format1_state(data, state_dict)
    _load_state_strict(model, state_dict, path, spec.name)
    model.eval()
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


def _build(spec: ModelSpec, path: Path, given: str | None) -> nn.Module:
    """Build the recorded source, under the trust rule (see load_checkpoint)."""
    from prunekit.models import build_model
    from prunekit.sources import is_code_source, same_source

    recorded = spec.source
    if given is not None and (recorded is None or not same_source(given, recorded)):
        raise CheckpointError(
            f"{path} holds a model built by {recorded or 'code handed over in memory'}, not {given}"
        )
    if is_code_source(recorded) and given is None:
        raise CheckpointError(
            f"{path} holds a model built by {recorded}; prunekit imports no code a file names: "
            f"pass --model {recorded} to load it"
        )
    try:
        return build_model(recorded, spec.num_classes, **spec.model_args)  # type: ignore[arg-type]
    except PrunekitError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc


def _insert_recorded_gates(
    model: nn.Module, graph: ChannelGraph, description: Any, path: Path, spec: ModelSpec
) -> None:
    try:
        bank = gate_bank_from_description(description)
    except PrunekitError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{path}: malformed gate configuration ({exc})") from exc
    try:
        insert_gates_(model, graph, bank)
    except PrunekitError as exc:
        raise CheckpointError(f"{path}: the stored gates do not fit {spec.name}: {exc}") from exc


def _format1_state(data: dict[str, Any], state_dict: Any) -> Any:
    """Format 1 kept "decided" in the training state (or implied it: a finished fine-tune is decided);
    format 2 keeps it in the gate bank's state."""
    if not isinstance(state_dict, dict):
        return state_dict
    training = data.get("training")
    if training is not None:
        decided = bool(training.get("decided", False))
    else:
        decided = data.get("stage") == "finetuned"
    return {**state_dict, "prunekit_gates.decided": torch.tensor(decided)}


def _load_state_strict(model: nn.Module, state_dict: Any, path: Path, name: str) -> None:
    from prunekit.models import mismatch_message

    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f"{path} is inconsistent: state_dict is not a mapping of names to tensors")
    problem = mismatch_message(str(path), f"{name} as the checkpoint describes it", model, state_dict)
    if problem:
        raise CheckpointError(problem)
    model.load_state_dict(state_dict, strict=True)


__all__ = [
    "Checkpoint",
    "load_checkpoint",
    "read_checkpoint_data",
    "save_checkpoint",
]
