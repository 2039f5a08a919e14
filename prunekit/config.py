"""The `prunekit run` config file (TOML): one section per stage, every key optional but the model's.

[model]      arch, weights, num_classes, input_size, mean, std
[gates]      granularity, min_keep
[finetune]   data, target_macs, epochs, batch_size, lr, gate_lr, lam, tau, ... (FinetuneConfig)
[slim]       export ("onnx" | "none"), opset, latency, threads
[ci]         max_accuracy_drop (percentage points; the run fails with exit code 3 beyond it)
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from prunekit.errors import ConfigError
from prunekit.finetune import FinetuneConfig
from prunekit.gates import GateConfig


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    weights: str | None = None  # torchvision weights name or a local state_dict file
    num_classes: int | None = None
    input_size: int | None = None
    mean: tuple[float, float, float] | None = None  # input normalisation of the weights
    std: tuple[float, float, float] | None = None

    def __post_init__(self) -> None:
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None:
                if len(value) != 3:
                    raise ConfigError(f"[model] {name} needs 3 values (R, G, B)")
                object.__setattr__(self, name, tuple(float(v) for v in value))


@dataclass(frozen=True)
class SlimConfig:
    export: str = "onnx"
    opset: int = 18
    latency: bool = True
    threads: int = 2


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig
    data: str
    finetune: FinetuneConfig
    gates: GateConfig = field(default_factory=GateConfig)
    slim: SlimConfig = field(default_factory=SlimConfig)
    max_accuracy_drop: float | None = None  # percentage points

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": vars(self.model),
            "gates": self.gates.to_dict(),
            "finetune": {"data": self.data, **self.finetune.to_dict()},
            "slim": vars(self.slim),
            "ci": {"max_accuracy_drop": self.max_accuracy_drop},
        }


def _section(
    data: dict[str, Any], name: str, cls: type, renames: dict[str, str] | None = None
) -> dict[str, Any]:
    raw = data.get(name, {})
    if not isinstance(raw, dict):
        raise ConfigError(f"[{name}] must be a table")
    known = {f.name for f in fields(cls)}
    out = {}
    for key, value in raw.items():
        key = (renames or {}).get(key, key).replace("-", "_")
        if key not in known:
            raise ConfigError(f"unknown key {key!r} in [{name}] (known: {', '.join(sorted(known))})")
        out[key] = value
    return out


def parse_run_config(data: dict[str, Any], overrides: dict[str, Any] | None = None) -> RunConfig:
    """Build a RunConfig from parsed TOML; `overrides` ("section.key": value) come from CLI flags."""
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for dotted, value in (overrides or {}).items():
        if value is not None:
            section, key = dotted.split(".")
            data.setdefault(section, {})[key] = value
    unknown = set(data) - {"model", "gates", "finetune", "slim", "ci"}
    if unknown:
        raise ConfigError(f"unknown section(s) {', '.join(sorted(unknown))} in the config")
    model = _section(data, "model", ModelConfig)
    if "arch" not in model:
        raise ConfigError('the config needs [model] arch = "<torchvision model name>"')
    ft = dict(data.get("finetune", {}))
    dataset = ft.pop("data", None)
    if dataset is None:
        raise ConfigError('the config needs [finetune] data = "builtin" or a folder')
    if "target_macs" not in ft and "target-macs" not in ft:
        raise ConfigError("the config needs [finetune] target_macs = <fraction of MACs to keep>")
    ft_args = _section({"finetune": ft}, "finetune", FinetuneConfig, {"lambda": "lam"})
    ci = data.get("ci", {})
    if not isinstance(ci, dict) or set(ci) - {"max_accuracy_drop", "max-accuracy-drop"}:
        raise ConfigError("[ci] takes only max_accuracy_drop")
    drop = ci.get("max_accuracy_drop", ci.get("max-accuracy-drop"))
    try:
        return RunConfig(
            model=ModelConfig(**model),
            data=str(dataset),
            finetune=FinetuneConfig(**ft_args),
            gates=GateConfig(**_section(data, "gates", GateConfig)),
            slim=SlimConfig(**_section(data, "slim", SlimConfig)),
            max_accuracy_drop=None if drop is None else float(drop),
        )
    except TypeError as exc:
        raise ConfigError(f"invalid config: {exc}") from exc


def load_run_config(path: Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {path}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    return parse_run_config(data, overrides)


__all__ = ["ModelConfig", "RunConfig", "SlimConfig", "load_run_config", "parse_run_config"]
