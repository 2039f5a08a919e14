"""prunekit: prune torchvision classifiers with learned channel gates, slim them, export ONNX.

Importing this package is cheap: the public API below is re-exported lazily so that `prunekit --help`
never pays for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY: dict[str, str] = {
    "LoadedModel": "prunekit.models",
    "build_model": "prunekit.models",
    "example_input": "prunekit.models",
    "list_classification_models": "prunekit.models",
    "load_model": "prunekit.models",
    "LatencyResult": "prunekit.measure",
    "MacReport": "prunekit.measure",
    "count_macs": "prunekit.measure",
    "count_params": "prunekit.measure",
    "DataLoaders": "prunekit.data",
    "builtin_loaders": "prunekit.data",
    "image_folder_loaders": "prunekit.data",
    "resolve_data": "prunekit.data",
    "ChannelGraph": "prunekit.graph",
    "analyze": "prunekit.graph",
    "ChannelPlan": "prunekit.plan",
    "magnitude_plan": "prunekit.plan",
    "random_plan": "prunekit.plan",
    "masked": "prunekit.slim",
    "slim_": "prunekit.slim",
    "verify_slim": "prunekit.slim",
    "GateConfig": "prunekit.gates",
    "insert_gates_": "prunekit.gates",
    "remove_gates_": "prunekit.gates",
    "FinetuneConfig": "prunekit.finetune",
    "load_checkpoint": "prunekit.checkpoint",
    "save_checkpoint": "prunekit.checkpoint",
    "export_onnx": "prunekit.export",
    "finetune_stage": "prunekit.pipeline",
    "gate_stage": "prunekit.pipeline",
    "run_pipeline": "prunekit.pipeline",
    "slim_stage": "prunekit.pipeline",
}

__all__ = [
    "ChannelGraph",
    "ChannelPlan",
    "FinetuneConfig",
    "GateConfig",
    "analyze",
    "export_onnx",
    "finetune_stage",
    "gate_stage",
    "insert_gates_",
    "load_checkpoint",
    "magnitude_plan",
    "masked",
    "random_plan",
    "remove_gates_",
    "run_pipeline",
    "save_checkpoint",
    "slim_",
    "slim_stage",
    "verify_slim",
    "DataLoaders",
    "LatencyResult",
    "LoadedModel",
    "MacReport",
    "__version__",
    "build_model",
    "builtin_loaders",
    "count_macs",
    "count_params",
    "example_input",
    "image_folder_loaders",
    "list_classification_models",
    "load_model",
    "resolve_data",
]

if TYPE_CHECKING:
    from prunekit.checkpoint import load_checkpoint, save_checkpoint
    from prunekit.data import DataLoaders, builtin_loaders, image_folder_loaders, resolve_data
    from prunekit.export import export_onnx
    from prunekit.finetune import FinetuneConfig
    from prunekit.gates import GateConfig, insert_gates_, remove_gates_
    from prunekit.graph import ChannelGraph, analyze
    from prunekit.measure import LatencyResult, MacReport, count_macs, count_params
    from prunekit.models import (
        LoadedModel,
        build_model,
        example_input,
        list_classification_models,
        load_model,
    )
    from prunekit.pipeline import finetune_stage, gate_stage, run_pipeline, slim_stage
    from prunekit.plan import ChannelPlan, magnitude_plan, random_plan
    from prunekit.slim import masked, slim_, verify_slim


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'prunekit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
