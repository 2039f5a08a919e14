"""MACs, parameters and latency of PyTorch models and ONNX files.

fvcore is used here and nowhere else, so it can be swapped. Convention (the one torchvision's
`weights.meta["_ops"]` uses): MACs are the multiply-accumulates of convolutions, linear layers, matrix
products and attention. Normalisation layers, pooling and element-wise ops are not counted: BatchNorm folds
into the preceding conv at export, so the exported ONNX graph has none, and leaving norms out makes the
PyTorch count, the ONNX count and torchvision's metadata the same quantity. (fvcore's default counts an
eval-mode BatchNorm as 2 per element, which puts mobilenet_v2 4% above torchvision's number.)
"""

from __future__ import annotations

import logging
import statistics
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.errors import ConfigError, ExportError, first_line
from prunekit.modes import training_flags
from prunekit.onnxrt import cpu_session

Inputs = torch.Tensor | tuple[torch.Tensor, ...]

# fvcore op handles that count something other than multiply-accumulates; we count them as 0.
# (set_op_handle(name, None) is silently ignored by fvcore, a handle returning 0 works.)
_NOT_MACS = (
    "aten::batch_norm",
    "aten::group_norm",
    "aten::layer_norm",
    "aten::instance_norm",
    "aten::upsample_nearest2d",
    "aten::upsample_bilinear2d",
    "aten::adaptive_avg_pool2d",
    "aten::grid_sampler",
)
_ONNX_COUNTED_OPS = ("Conv", "Gemm", "MatMul")


@dataclass(frozen=True)
class MacReport:
    total_macs: int
    params: int
    per_module: dict[str, int]  # MACs by module name, every level ("" is the whole model), module order
    per_module_params: dict[str, int]  # parameters by module name, same keys as per_module


@dataclass(frozen=True)
class ModuleRow:
    name: str
    depth: int  # 1 = a direct child of the model
    macs: int
    params: int


@dataclass(frozen=True)
class LatencyResult:
    median_ms: float
    p90_ms: float
    repeats: int
    threads: int


# -- PyTorch -----------------------------------------------------------------------------------------------


def count_params(model: nn.Module) -> int:
    """Parameters (shared ones once), as torchvision's `num_params` counts them."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, inputs: Inputs) -> MacReport:
    """MACs of one forward pass on `inputs` (totals are for the whole batch), per module, and params.

    Counted in eval mode without autograd; every module's training flag is restored afterwards.
    """
    analysis_cls = _fvcore_flop_count_analysis()
    with training_flags(model), _quiet_fvcore(), _mha_fastpath_disabled(), torch.no_grad():
        model.eval()
        analysis = analysis_cls(model, inputs)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        for op in _NOT_MACS:
            analysis.set_op_handle(op, _zero_handle)
        analysis.set_op_handle("aten::scaled_dot_product_attention", _sdpa_handle)
        per_module = {name: int(v) for name, v in analysis.by_module().items()}
    per_module_params = _params_by_module(model, per_module)
    return MacReport(
        total_macs=per_module[""],
        params=count_params(model),
        per_module=per_module,
        per_module_params=per_module_params,
    )


def module_rows(report: MacReport, depth: int) -> tuple[ModuleRow, ...]:
    """Rows of the per-module table down to `depth` levels (0: none), in module order."""
    rows = []
    for name, macs in report.per_module.items():
        level = name.count(".") + 1 if name else 0
        if 1 <= level <= depth:
            rows.append(ModuleRow(name, level, macs, report.per_module_params.get(name, 0)))
    return tuple(rows)


def torch_latency_ms(
    model: nn.Module, inputs: Inputs, threads: int, warmup: int = 5, repeats: int = 20
) -> LatencyResult:
    """Wall-clock latency of model(inputs) on the current device, with `threads` intra-op threads."""
    _check_timing_args(threads, repeats)
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with training_flags(model), torch.inference_mode():
            model.eval()
            times = _time_calls(lambda: model(*args), warmup, repeats, args[0].device)
    finally:
        torch.set_num_threads(previous_threads)
    return _latency(times, threads)


# -- ONNX --------------------------------------------------------------------------------------------------


def onnx_input_shape(path: str | Path, input_size: int | None = None) -> tuple[int, ...]:
    """Shape of the file's first input for one example: symbolic batch -> 1, symbolic spatial dims ->
    `input_size` (required then)."""
    return tuple(_concrete_input_dims(_load_onnx(path), input_size)[0][1])


def onnx_macs_params(path: str | Path, input_size: int | None = None) -> tuple[int, int]:
    """(MACs per example, parameters) of an ONNX file, from its graph and inferred shapes.

    MACs follow count_macs's convention: Conv, Gemm and MatMul only. Parameters are the elements of the
    floating-point initializers; after BatchNorm folding that is fewer than the PyTorch model's count.
    """
    import onnx
    from onnx import numpy_helper

    model = _load_onnx(path)
    inputs = _concrete_input_dims(model, input_size)
    for value, dims in inputs:
        shape = value.type.tensor_type.shape
        for dim, size in zip(shape.dim, dims, strict=True):
            dim.Clear()
            dim.dim_value = size
    batch = inputs[0][1][0] if inputs[0][1] else 1
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as err:  # onnx raises InferenceError and others for graphs it cannot type
        raise ExportError(f"cannot infer shapes in {path}: {first_line(err)}") from None

    graph = inferred.graph
    shapes: dict[str, list[int | None]] = {}
    for value in [*graph.input, *graph.value_info, *graph.output]:
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    floats = set()
    for init in graph.initializer:
        shapes[init.name] = list(init.dims)
        if numpy_helper.to_array(init).dtype.kind == "f":
            floats.add(init.name)

    counted = [node for node in graph.node if node.op_type in _ONNX_COUNTED_OPS]
    macs = sum(_onnx_node_macs(node, shapes, path) for node in counted)
    params = sum(prod(init.dims) for init in graph.initializer if init.name in floats)
    return macs // max(batch, 1), int(params)


def onnx_latency_ms(
    path: str | Path, input_shape: Sequence[int], threads: int, warmup: int = 5, repeats: int = 20
) -> LatencyResult:
    """onnxruntime CPU latency with `threads` intra-op threads (inter-op 1) on a random input."""
    import numpy as np

    _check_timing_args(threads, repeats)
    session = cpu_session(path, threads)
    first = session.get_inputs()[0]
    feed = {first.name: np.random.default_rng(0).standard_normal(input_shape, dtype=np.float32)}
    times = _time_calls(lambda: session.run(None, feed), warmup, repeats, None)
    return _latency(times, threads)


def onnx_latency_interleaved(
    paths: dict[str, str | Path], input_shape: Sequence[int], threads: int, warmup: int = 5, repeats: int = 30
) -> dict[str, LatencyResult]:
    """onnxruntime CPU latency of several files measured side by side: each round times one call of
    every session, in an order rotated per round, so drift in machine load reaches all of them alike."""
    import numpy as np

    _check_timing_args(threads, repeats)
    names = list(paths)
    sessions = {name: cpu_session(paths[name], threads, spinning=False) for name in names}
    feed = np.random.default_rng(0).standard_normal(input_shape, dtype=np.float32)
    feeds = {name: {s.get_inputs()[0].name: feed} for name, s in sessions.items()}
    for name in names:
        for _ in range(warmup):
            sessions[name].run(None, feeds[name])
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            sessions[name].run(None, feeds[name])
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: _latency(times[name], threads) for name in names}


# -- internals ---------------------------------------------------------------------------------------------


def _fvcore_flop_count_analysis() -> Any:
    # fvcore's import emits FutureWarnings from torch.jit; import it lazily and quietly.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fvcore.nn import FlopCountAnalysis
    return FlopCountAnalysis


@contextmanager
def _quiet_fvcore() -> Iterator[None]:
    """Keep fvcore's logged warnings (unsupported ops, ...) and tracer warnings away from the user."""
    logger = logging.getLogger("fvcore")
    previous = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(previous)


@contextmanager
def _mha_fastpath_disabled() -> Iterator[None]:
    # Under no_grad, nn.MultiheadAttention runs one fused op that fvcore cannot see (ViT undercounts by a
    # third); the unfused path shows the linear layers and scaled_dot_product_attention.
    backends = getattr(torch.backends, "mha", None)
    if backends is None:
        yield
        return
    previous = backends.get_fastpath_enabled()
    backends.set_fastpath_enabled(False)
    try:
        yield
    finally:
        backends.set_fastpath_enabled(previous)


def _zero_handle(inputs: list[Any], outputs: list[Any]) -> int:
    return 0


def _sdpa_handle(inputs: list[Any], outputs: list[Any]) -> int:
    # q [..., L, E] k [..., S, E] v [..., S, Ev]: q @ k^T costs L*S*E, attn @ v costs L*S*Ev per batch-head.
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(x) for x in inputs[:3])
    return prod(q[:-1]) * k[-2] * (q[-1] + v[-1])


def _params_by_module(model: nn.Module, names: dict[str, int]) -> dict[str, int]:
    """Parameters under each module name (each shared parameter counted once per module)."""
    totals = dict.fromkeys(names, 0)
    for module_name, module in model.named_modules():
        if module_name in totals:
            totals[module_name] = count_params(module)
    return totals


def _check_timing_args(threads: int, repeats: int) -> None:
    if threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {threads}")
    if repeats < 1:
        raise ConfigError(f"repeats must be at least 1, got {repeats}")


def _time_calls(call: Any, warmup: int, repeats: int, device: torch.device | None) -> list[float]:
    sync = torch.cuda.synchronize if device is not None and device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        call()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def _latency(times_ms: list[float], threads: int) -> LatencyResult:
    ordered = sorted(times_ms)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
    return LatencyResult(
        median_ms=statistics.median(ordered), p90_ms=p90, repeats=len(ordered), threads=threads
    )


def _load_onnx(path: str | Path) -> Any:
    import onnx

    if not Path(path).is_file():
        raise ExportError(f"ONNX file not found: {path}")
    try:
        return onnx.load(str(path))
    except Exception as err:  # protobuf DecodeError and friends for a file that is not ONNX
        raise ExportError(f"cannot read {path} as ONNX: {first_line(err)}") from None


def _concrete_input_dims(model: Any, input_size: int | None) -> list[tuple[Any, list[int]]]:
    """Graph inputs (not initializers) with concrete dims: symbolic batch 1, symbolic others input_size."""
    initializers = {init.name for init in model.graph.initializer}
    result = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = []
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.HasField("dim_value") and dim.dim_value > 0:
                dims.append(dim.dim_value)
            elif axis == 0:
                dims.append(1)
            elif axis == 1:
                raise ExportError(f"input {value.name!r} of the ONNX file has a symbolic channel dimension")
            elif input_size is None:
                raise ConfigError(f"input {value.name!r} has symbolic spatial dimensions: pass --input-shape")
            else:
                dims.append(input_size)
        result.append((value, dims))
    if not result:
        raise ExportError("the ONNX file has no graph inputs")
    return result


def _onnx_node_macs(node: Any, shapes: dict[str, list[int | None]], path: str | Path) -> int:
    def shape_of(name: str) -> list[int]:
        dims = shapes.get(name)
        if dims is None or any(d is None for d in dims):
            raise ExportError(f"cannot infer the shape of {name!r} ({node.op_type}) in {path}")
        return dims  # type: ignore[return-value]

    out = shape_of(node.output[0])
    if node.op_type == "Conv":
        weight = shape_of(node.input[1])  # [Cout, Cin/groups, *kernel]
        return prod(out) * prod(weight[1:])
    if node.op_type == "Gemm":
        a = shape_of(node.input[0])
        trans_a = any(attr.name == "transA" and attr.i for attr in node.attribute)
        k = a[0] if trans_a else a[1]
        return prod(out) * k  # out [M, N]
    # MatMul: out [..., M, N], K is the last dim of A (a 1-D A is a single row)
    return prod(out) * shape_of(node.input[0])[-1]
