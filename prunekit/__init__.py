"""prunekit: prune classifiers with learned Gumbel channel gates, slim them physically, export ONNX.

The Python API works in memory on any `nn.Module` that torch.fx can trace:

    gated = prunekit.gate(model, input_shape=(3, 32, 32))
    config = prunekit.FinetuneConfig(target_macs=0.5)
    tuned = prunekit.finetune(gated, train_loader, val_loader, config=config)
    small = prunekit.slim(tuned)  # .model, .plan, .to_dict()
    prunekit.export_onnx(small, "model.onnx")

Importing this package is cheap: the names below are re-exported lazily from one table, so that
`prunekit --help` never pays for importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it (the one list: __all__ is derived from it)
_LAZY: dict[str, str] = {
    # the in-memory API, one function per stage, and its typed results
    "gate": "prunekit.stages.gate",
    "GateResult": "prunekit.stages.gate",
    "finetune": "prunekit.stages.finetune",
    "FinetuneCallbacks": "prunekit.stages.finetune",
    "FinetuneResult": "prunekit.stages.finetune",
    "prepare_finetune": "prunekit.stages.finetune",
    "slim": "prunekit.stages.slim",
    "SlimResult": "prunekit.stages.slim",
    "export_onnx": "prunekit.stages.slim",
    "DynamicSlimResult": "prunekit.stages.slim_dynamic",  # slim() of a model with dynamic gates
    # the file-based stages (what the CLI calls)
    "gate_stage": "prunekit.stages.gate",
    "finetune_stage": "prunekit.stages.finetune",
    "slim_stage": "prunekit.stages.slim",
    "run_pipeline": "prunekit.stages.run",
    # settings and the model's identity
    "ModelSpec": "prunekit.config",
    "GateConfig": "prunekit.config",
    "FinetuneConfig": "prunekit.config",
    "SlimConfig": "prunekit.config",
    "RunConfig": "prunekit.config",
    "load_run_config": "prunekit.config",
    "Runtime": "prunekit.runtime",
    "resolve_runtime": "prunekit.runtime",
    # models, data, measurement
    "build_model": "prunekit.models",
    "list_classification_models": "prunekit.models",
    "load_model": "prunekit.models",
    "DataLoaders": "prunekit.data",
    "builtin_loaders": "prunekit.data",
    "image_folder_loaders": "prunekit.data",
    "resolve_data": "prunekit.data",
    "LatencyResult": "prunekit.measure",
    "MacReport": "prunekit.measure",
    "count_macs": "prunekit.measure",
    "count_params": "prunekit.measure",
    # the building blocks
    "ChannelGraph": "prunekit.graph",
    "analyze": "prunekit.graph",
    "ChannelPlan": "prunekit.plan",
    "magnitude_plan": "prunekit.plan",
    "random_plan": "prunekit.plan",
    "masked": "prunekit.masking",
    "slim_": "prunekit.surgery",
    "verify_slim": "prunekit.surgery",
    "insert_gates_": "prunekit.gates",
    "DynamicGateBank": "prunekit.dynamic",
    "find_dynamic_blocks": "prunekit.dynamic",
    "dynamic_inference_model": "prunekit.dynamic_slim",
    "verify_dynamic": "prunekit.dynamic_slim",
    "remove_gates_": "prunekit.gates",
    "Checkpoint": "prunekit.checkpoint",
    "load_checkpoint": "prunekit.checkpoint",
    "save_checkpoint": "prunekit.checkpoint",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'prunekit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
