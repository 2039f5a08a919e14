"""The JSON documents the commands print with `--json`: one typed model per command, from which the
JSON Schema files in `prunekit/schemas/` are generated (`python -m prunekit.schema` writes them; a test
checks that they are current and that every command's real output validates).

Vocabulary, the same in every document: `model` is the model source (a torchvision name,
`module:factory`, `timm:NAME`); `input_shape` is [C, H, W] of one example; `macs` and `params` are
integer counts per example; `*_ms` are milliseconds; every `*ratio` is new / original (below 1 is
smaller or faster). Each document starts with `schema_version`, `prunekit_version`, `torch_version`
and `command`. A document of a command that failed with --json has `error`.

Versioning (docs/json-schema.md): adding a field keeps SCHEMA_VERSION; renaming or removing one, or
changing its type or meaning, increments it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

SCHEMA_VERSION = 1
SCHEMA_DIR = Path(__file__).parent / "schemas"

Row = dict[str, Any]  # a table row (per epoch, per group, per module): documented in docs/json-schema.md


class _Doc(BaseModel):
    """Fields every document has. Unknown top-level fields are an error: what a command prints is
    exactly what its schema says."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int
    prunekit_version: str
    torch_version: str
    command: str


class ErrorInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    message: str
    exit_code: int  # 2 bad input, 3 accuracy gate, 130/143 interrupted
    stage: str | None = None  # `run`: the stage that stopped ("gate", "finetune", "slim", "ci")


class ErrorDoc(_Doc):
    """What any command prints with --json when it fails before it has a result."""

    error: ErrorInfo


class ModelsDoc(_Doc):
    models: list[Row]  # model, weights, default_weights, params, macs, input_shape, cached, cache_damaged


class LatencyInfo(BaseModel):
    median_ms: float
    p90_ms: float
    mean_ms: float | None = None
    threads: int
    repeats: int
    warmup: int | None = None
    batch: int | None = None
    input_shape: list[int] | None = None


class CheckpointInfoDoc(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stage: str
    decided: bool
    decided_macs: int | None
    decided_params: int | None
    target_macs: float | None
    original_macs: int | None
    history: list[Row]
    recipe: Row | None
    baseline_val_acc: float | None
    baseline_val_top5: float | None = None
    target_latency: Row | None = None  # fine-tuned with --target-latency
    gate_kind: str | None = None  # "static" or "dynamic" (None: no gates)
    macs_per_example: Row | None = None  # dynamic gates: the last validation's mean, p50, p95, min, max


class ReportDoc(_Doc):
    target: str
    kind: str  # "model" or "onnx"
    model: str | None
    weights: str | None
    num_classes: int | None
    input_shape: list[int]
    macs: int
    params: int
    modules: list[Row]  # name, depth, macs, params
    latency: Row | None
    latency_backend: str | None
    checkpoint: CheckpointInfoDoc | None


class AnalyzeDoc(_Doc):
    model: str
    input_shape: list[int]
    macs: int
    groups: list[Row]
    num_units: int
    modeled_macs: int
    prunable_macs: int
    prunable_fraction: float
    frozen: list[Row]
    dynamic: Row | None = None  # where `gate --dynamic` puts gates (blocks) and why other groups stay static


class GateDoc(_Doc):
    model: str
    num_classes: int
    input_shape: list[int]
    weights: str | None
    macs: int
    params: int
    groups: int
    gates: int
    learnable_gates: int
    granularity: int
    gateable_macs: int
    gateable_fraction: float  # gateable MACs / all MACs
    frozen: list[Row]
    output: str
    gate_kind: str = "static"  # "dynamic": input-dependent gates (gate --dynamic)
    dynamic: list[Row] | None = None  # dynamic gates: the blocks (name, reads, groups)
    gate_net_macs: int | None = None  # dynamic gates: the gate networks' MACs per example
    gate_net_fraction: float | None = None  # ... as a fraction of the model's


class FinetuneDoc(_Doc):
    output: str | None
    best: str | None
    metrics: str | None
    baseline_val_acc: float  # top-1
    baseline_val_top5: float | None = None
    history: list[Row]  # epoch, loss, ce, act_loss, train_acc, val_acc, val_top5, val_loss, ...
    final: Row
    target_macs: float | None  # None with a latency budget
    target_latency: Row | None = None  # target, target_ms, original_ms, fixed_ms, threads, table, ...
    macs_before: int
    expected_macs: int


class SlimDoc(_Doc):
    source: str | None
    plan_source: str
    model: str
    original: Row  # macs, params
    slim: Row  # macs, params, predicted_macs
    macs_ratio: float
    params_ratio: float
    removes_nothing: bool
    parity: Row  # max_abs_diff, max_abs_ref, rtol, tolerance: slim vs gated
    widths: list[Row]  # group, before, after, units
    accuracy: Row | None = None  # with --data: original, slim (top-1, 0..1)
    onnx: Row | None = None  # path, opset, exporter, max_abs_diff, size_bytes, ...: ONNX vs PyTorch
    pt2: Row | None = None  # --export pt2: path, size_bytes, max_abs_diff, ...: torch.export vs PyTorch
    quantized: dict[str, Row] | None = None  # --quantize: mode -> path, size_bytes, method, accuracy
    latency_budget: Row | None = None  # fine-tuned with --target-latency: target_ms, original_ms, ...
    latency: Row | None = None  # with --latency: original_ms, slim_ms, ratio (slim / original), models
    checkpoint: str | None = None  # the slim checkpoint written
    plan: str | None = None  # the plan written (--save-plan)
    checkpoint_bytes: int | None = None
    dynamic: Row | None = None  # dynamic gates: macs_per_example (mean, p50, p95, min, max, gate_nets)


class RunDoc(_Doc):
    config: Row
    files: dict[str, str]
    gate: Row | None
    finetune: Row | None
    slim: Row | None
    summary: Row  # passed, macs_before/after, macs_ratio, accuracy_before/after, latency_ratio, ...
    error: ErrorInfo | None


class DemoDoc(RunDoc):
    pretrain: Row


DOCUMENTS: dict[str, type[_Doc]] = {
    "models": ModelsDoc,
    "report": ReportDoc,
    "analyze": AnalyzeDoc,
    "gate": GateDoc,
    "finetune": FinetuneDoc,
    "slim": SlimDoc,
    "run": RunDoc,
    "demo": DemoDoc,
    "error": ErrorDoc,
}


def envelope(command: str) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    from prunekit import __version__

    try:
        torch_version = version("torch")  # without importing torch (a usage error stays fast)
    except PackageNotFoundError:
        torch_version = "unknown"
    return {
        "schema_version": SCHEMA_VERSION,
        "prunekit_version": str(__version__),
        "torch_version": torch_version.split("+")[0],
        "command": command,
    }


def validate(command: str, document: dict[str, Any]) -> None:
    """Raise pydantic's ValidationError when `document` does not fit the command's schema."""
    only_error = set(document) - set(_Doc.model_fields) == {"error"}
    DOCUMENTS["error" if only_error else command].model_validate(document)


def json_schema(kind: str) -> dict[str, Any]:
    """The published schema: as the model, but open to fields added later (readers ignore fields they
    do not know; prunekit's own check, `validate`, stays closed so that nothing is added by accident)."""
    schema = _open(DOCUMENTS[kind].model_json_schema())
    schema["$id"] = f"https://prunekit.dev/schemas/v{SCHEMA_VERSION}/{kind}.schema.json"
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema


def _open(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _open(v) for k, v in node.items() if not (k == "additionalProperties" and v is False)}
    if isinstance(node, list):
        return [_open(v) for v in node]
    return node


def schema_files() -> dict[Path, str]:
    return {
        SCHEMA_DIR / f"{kind}.schema.json": json.dumps(json_schema(kind), indent=2, sort_keys=True) + "\n"
        for kind in DOCUMENTS
    }


def main() -> None:
    """Write the schema files (`python -m prunekit.schema`); `--check` exits 1 when one is stale."""
    check = "--check" in sys.argv[1:]
    stale = []
    for path, text in schema_files().items():
        if check:
            if not path.is_file() or path.read_text() != text:
                stale.append(path)
        else:
            path.parent.mkdir(exist_ok=True)
            path.write_text(text)
    if stale:
        print(f"stale schema files: {', '.join(map(str, stale))} (run python -m prunekit.schema)")
        sys.exit(1)


if __name__ == "__main__":
    main()
