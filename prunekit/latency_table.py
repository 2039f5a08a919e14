"""A per-layer latency table, measured with onnxruntime on this machine, for a latency budget.

Every layer whose cost depends on gates (a MacTerm of the channel graph) is exported alone as a
one-node ONNX graph (Conv or Gemm, random weights, its real input size, batch 1) and timed in
onnxruntime's CPU session at a grid of the widths the gates can choose (multiples of the gate
granularity, from a quarter of the layer's width to all of it). A least-squares fit per layer gives

    ms(layer) ~ alpha + beta * c_in * c_out      (a dense conv or linear layer)
    ms(layer) ~ alpha + beta * c                 (a grouped conv: per conv group)

which has exactly the form of a MAC term, so `prunekit.objective.LatencyModel` feeds the same
FLOP-weighted activation loss and the same budget rule with latency weights in place of MAC weights.
The whole model is timed once at full width: what the per-layer slopes do not explain (intercepts,
layers no gate touches, the runtime's own overhead) is the fixed part of the budget.

The table is saved as JSON next to the fine-tuned checkpoint and reused when it was measured for the
same layers, input shape, thread count, onnxruntime version and CPU, so it is measured once.
"""

from __future__ import annotations

import hashlib
import json
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from prunekit.errors import ConfigError, ExportError
from prunekit.graph import ChannelGraph, MacTerm
from prunekit.onnxrt import cpu_session

TABLE_VERSION = 1
WIDTH_FRACTIONS = (0.25, 0.5, 0.75, 1.0)
_WARMUP, _REPEATS = 3, 15

__all__ = ["LatencyTable", "TermLatency", "latency_table", "table_path"]


@dataclass(frozen=True)
class TermLatency:
    name: str
    kind: str  # "bilinear" or "per_unit", as the MacTerm
    alpha_ms: float  # the fitted intercept
    beta_ms: float  # ms per (c_in * c_out), or per conv group for "per_unit"
    points: tuple[tuple[int, int, float], ...]  # (c_in, c_out, measured ms); c_in = 0 for per_unit


@dataclass(frozen=True)
class LatencyTable:
    key: dict[str, Any]  # what it was measured for: reused only when this matches
    full_ms: float  # the whole model at full width, batch 1
    fixed_ms: float  # full_ms minus every term's slope part at full width
    slope_scale: float  # < 1 when the isolated layers' slopes add up to more than the whole model
    terms: tuple[TermLatency, ...]

    def beta(self) -> dict[str, float]:
        return {t.name: t.beta_ms * self.slope_scale for t in self.terms}

    def to_dict(self) -> dict[str, Any]:
        return {"version": TABLE_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LatencyTable:
        terms = tuple(
            TermLatency(t["name"], t["kind"], t["alpha_ms"], t["beta_ms"], tuple(map(tuple, t["points"])))
            for t in data["terms"]
        )
        return cls(data["key"], data["full_ms"], data["fixed_ms"], data["slope_scale"], terms)

    def save(self, path: Path) -> None:
        from prunekit.fileio import atomic_write_text

        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=1) + "\n")


def table_path(checkpoint: Path) -> Path:
    """tuned.pt -> tuned.latency.json."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.stem + ".latency.json")


def latency_table(
    model: nn.Module,
    graph: ChannelGraph,
    input_shape: tuple[int, int, int],
    *,
    threads: int,
    granularity: int,
    cached: list[Path] | tuple[Path, ...] = (),
) -> tuple[LatencyTable, Path | None]:
    """The table for `model` (ungated, eval): the first of `cached` files that was measured for the
    same key, else measured now. Returns (table, the file it came from or None)."""
    key = _key(graph, input_shape, threads)
    for path in cached:
        if Path(path).is_file():
            try:
                data = json.loads(Path(path).read_text())
                if data.get("version") == TABLE_VERSION and data.get("key") == key:
                    return LatencyTable.from_dict(data), Path(path)
            except (OSError, ValueError, KeyError, TypeError):
                continue  # a damaged or foreign file is measured again, and replaced
    return _measure(model, graph, input_shape, threads, granularity, key), None


def _key(graph: ChannelGraph, input_shape: tuple[int, int, int], threads: int) -> dict[str, Any]:
    import onnxruntime

    layers = [
        (t.name, t.kind, t.factor, len(t.in_units), len(t.out_units), len(t.units)) for t in graph.mac_terms
    ]
    return {
        "layers": hashlib.sha256(json.dumps(layers).encode()).hexdigest()[:16],
        "input_shape": list(input_shape),
        "threads": threads,
        "onnxruntime": onnxruntime.__version__,
        "cpu": _cpu_name(),
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _measure(
    model: nn.Module,
    graph: ChannelGraph,
    input_shape: tuple[int, int, int],
    threads: int,
    granularity: int,
    key: dict[str, Any],
) -> LatencyTable:
    shapes = _input_shapes(model, input_shape)
    terms = []
    variable_full = 0.0
    with tempfile.TemporaryDirectory(prefix="prunekit-latency-") as tmp:
        for term in graph.mac_terms:
            if not term.prunable:
                continue
            module = model.get_submodule(term.name)
            if term.name not in shapes:
                raise ExportError(f"cannot time layer {term.name}: it did not run in a forward pass")
            fitted, full = _time_term(term, module, shapes[term.name], threads, granularity, Path(tmp))
            terms.append(fitted)
            variable_full += fitted.beta_ms * full
        full_ms = _whole_model_ms(model, input_shape, threads, Path(tmp))
    # Isolated layers carry per-call overhead the whole graph does not; their slopes may add up to more
    # than the model's time. Then they are scaled so the fixed part keeps a tenth of the whole.
    scale = 1.0 if variable_full <= 0.9 * full_ms else 0.9 * full_ms / variable_full
    return LatencyTable(key, full_ms, full_ms - scale * variable_full, scale, tuple(terms))


def _input_shapes(model: nn.Module, input_shape: tuple[int, int, int]) -> dict[str, tuple[int, ...]]:
    """The input shape (batch 1) of every conv and linear layer, from one forward pass."""
    shapes: dict[str, tuple[int, ...]] = {}

    def recorder(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            shapes.setdefault(name, tuple(args[0].shape))

        return hook

    hooks = [
        m.register_forward_pre_hook(recorder(name))
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d | nn.Linear)
    ]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *input_shape))
    finally:
        for h in hooks:
            h.remove()
    return shapes


def _widths(units: tuple[int, ...], granularity: int) -> list[int]:
    """Channel counts to time: every channel when no unit is prunable, else the grid of fractions of
    the prunable channels (multiples of the granularity) plus the fixed ones."""
    fixed = sum(1 for u in units if u < 0)
    prunable = len(units) - fixed
    if prunable == 0:
        return [len(units)]
    out = sorted(
        {fixed + max(granularity, round(prunable * f / granularity) * granularity) for f in WIDTH_FRACTIONS}
    )
    return [min(w, len(units)) for w in out]


def _time_term(
    term: MacTerm, module: nn.Module, in_shape: tuple[int, ...], threads: int, granularity: int, tmp: Path
) -> tuple[TermLatency, float]:
    """Fit (alpha, beta) for one layer; also return its slope variable (c_in * c_out, or c) at full width."""
    points: list[tuple[int, int, float]] = []
    if term.kind == "bilinear":
        for c_in in _widths(term.in_units, granularity):
            for c_out in _widths(term.out_units, granularity):
                ms = _time_layer(module, in_shape, c_in, c_out, threads, tmp)
                points.append((c_in, c_out, ms))
        xs = [float(a * b) for a, b, _ in points]
        full = float(len(term.in_units) * len(term.out_units))
    else:  # a grouped conv: its cost follows the number of conv groups kept
        assert isinstance(module, nn.Conv2d)
        per_group_in, per_group_out = (
            module.in_channels // module.groups,
            module.out_channels // module.groups,
        )
        for g in _widths(term.units, max(1, granularity // max(1, per_group_out))):
            ms = _time_layer(module, in_shape, g * per_group_in, g * per_group_out, threads, tmp, groups=g)
            points.append((0, g, ms))
        xs = [float(g) for _, g, _ in points]
        full = float(len(term.units))
    ys = [ms for _, _, ms in points]
    alpha, beta = _fit(xs, ys)
    return TermLatency(term.name, term.kind, alpha, beta, tuple(points)), full


def _fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least squares ms = alpha + beta * x with beta >= 0 (a wider layer never counts as faster)."""
    if len(set(xs)) < 2:
        return float(np.median(ys)), 0.0
    beta, alpha = np.polyfit(np.asarray(xs), np.asarray(ys), 1)
    if beta < 0:
        return float(np.mean(ys)), 0.0
    return float(alpha), float(beta)


def _time_layer(
    module: nn.Module,
    in_shape: tuple[int, ...],
    c_in: int,
    c_out: int,
    threads: int,
    tmp: Path,
    groups: int | None = None,
) -> float:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    shape = [1, c_in, *in_shape[2:]]
    if isinstance(module, nn.Conv2d):
        g = groups if groups is not None else 1
        weight = rng.standard_normal((c_out, c_in // g, *module.kernel_size), dtype=np.float32)
        pads = [*module.padding, *module.padding] if isinstance(module.padding, tuple) else None
        if pads is None:  # padding="same" / "valid"
            raise ConfigError(f"cannot time {type(module).__name__} with padding={module.padding!r}")
        node = helper.make_node(
            "Conv",
            ["x", "w", "b"],
            ["y"],
            strides=list(module.stride),
            pads=pads,
            dilations=list(module.dilation),
            group=g,
        )
    elif isinstance(module, nn.Linear):
        shape = [int(np.prod(in_shape[:-1])), c_in]  # tokens of a transformer as rows
        weight = rng.standard_normal((c_out, c_in), dtype=np.float32)
        node = helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)
    else:
        raise ConfigError(f"cannot time layer type {type(module).__name__} for a latency budget")
    bias = rng.standard_normal((c_out,), dtype=np.float32)
    graph = helper.make_graph(
        [node],
        "layer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )
    path = tmp / "layer.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    session = cpu_session(path, threads)
    feed = {"x": rng.standard_normal(shape, dtype=np.float32)}
    for _ in range(_WARMUP):
        session.run(None, feed)
    times = []
    for _ in range(_REPEATS):
        start = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _whole_model_ms(model: nn.Module, input_shape: tuple[int, int, int], threads: int, tmp: Path) -> float:
    from prunekit.export import export_onnx
    from prunekit.measure import onnx_latency_ms

    path = tmp / "model.onnx"
    export_onnx(model, path, input_shape=input_shape)
    return onnx_latency_ms(path, (1, *input_shape), threads=threads, warmup=5, repeats=30).median_ms
