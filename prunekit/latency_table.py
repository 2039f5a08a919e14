"""A per-layer latency table, measured with onnxruntime on this machine, for a latency budget.

Every layer whose cost depends on gates (a MacTerm of the channel graph) is exported alone as a
one-node ONNX graph (Conv or Gemm, random weights, its real input size, batch 1) and timed in
onnxruntime's CPU session at a grid of the widths the gates can choose (multiples of the gate
granularity, from a quarter of the layer's width to all of it). A least-squares fit per layer gives

    ms(layer) ~ alpha + beta * c_in * c_out      (a dense conv or linear layer)
    ms(layer) ~ alpha + beta * c                 (a grouped conv: per conv group)

which has exactly the form of a MAC term, so `prunekit.objective.LatencyModel` feeds the same
FLOP-weighted activation loss and the same budget rule with latency weights in place of MAC weights.
Isolated layers do not add up to the whole graph: onnxruntime fuses conv + BN + ReLU, and memory
traffic differs, most at the early, high-resolution layers, where cutting channels saves less than the
layers alone promise. So whole models are timed too, interleaved in one run: at full width, with each
channel group cut to a quarter of its width (the rest whole), and with every group at half. Each
group's measured saving over the saving its layers predict scales the slopes of the layers it feeds or
reads (the geometric mean of the two groups' scales for a layer between two groups); then one scale and
a fixed part (intercepts, layers no gate touches, the runtime's overhead) make the model exact at full
and at half width. Every timing runs with the sessions' thread spinning off, as `slim --latency`.

onnxruntime's CPU convolutions work on blocks of channels (NCHWc: 8 or 16 per block, by the CPU's
vector width), so 40 channels cost what 48 do. A probe finds the block size; channel counts are rounded
up to it wherever the table predicts the time of decided widths (`LatencyModel` on hard decisions),
while training sees the smooth, unrounded cost.

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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from prunekit.errors import ConfigError, ExportError
from prunekit.graph import ChannelGraph, MacTerm
from prunekit.onnxrt import cpu_session

TABLE_VERSION = 4
_BLOCKS = (1, 16, 32)  # candidate channel blocks (8 is 1 for the default granularity of 8)
WIDTH_FRACTIONS = (0.25, 0.5, 0.75, 1.0)
_WARMUP, _REPEATS = 3, 15

__all__ = ["LatencyTable", "MeasuredLatency", "TermLatency", "latency_table", "rounded", "table_path"]


@dataclass(frozen=True)
class TermLatency:
    name: str
    kind: str  # "bilinear" or "per_unit", as the MacTerm
    alpha_ms: float  # the fitted intercept
    beta_ms: float  # ms per (c_in * c_out), or per conv group for "per_unit"
    points: tuple[tuple[int, int, float], ...]  # (c_in, c_out, measured ms); c_in = 0 for per_unit
    group_scale: float = 1.0  # from the whole-model timings with its groups cut (see the module text)


@dataclass(frozen=True)
class LatencyTable:
    key: dict[str, Any]  # what it was measured for: reused only when this matches
    full_ms: float  # the whole model at full width, batch 1
    fixed_ms: float  # full_ms minus every term's slope part at full width
    slope_scale: float  # the isolated layers' slopes times this explain the whole model (see _calibrate)
    terms: tuple[TermLatency, ...]
    calibration: dict[str, Any] = field(default_factory=dict)  # the whole-model timings behind the scale
    block: int = 1  # channel counts cost as if rounded up to a multiple of this (see _probe_block)

    def beta(self) -> dict[str, float]:
        """The slope of every gateable layer as the whole model sees it."""
        return {t.name: t.beta_ms * t.group_scale * self.slope_scale for t in self.terms}

    def to_dict(self) -> dict[str, Any]:
        return {"version": TABLE_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LatencyTable:
        terms = tuple(
            TermLatency(
                t["name"],
                t["kind"],
                t["alpha_ms"],
                t["beta_ms"],
                tuple(map(tuple, t["points"])),
                t.get("group_scale", 1.0),
            )
            for t in data["terms"]
        )
        return cls(
            data["key"],
            data["full_ms"],
            data["fixed_ms"],
            data["slope_scale"],
            terms,
            data.get("calibration", {}),
            int(data.get("block", 1)),
        )

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
    from prunekit.plan import fraction_plan

    shapes = _input_shapes(model, input_shape)
    terms = []
    with tempfile.TemporaryDirectory(prefix="prunekit-latency-") as tmp:
        block, probe = _probe_block(threads, Path(tmp))
        for term in graph.mac_terms:
            if not term.prunable:
                continue
            module = model.get_submodule(term.name)
            if term.name not in shapes:
                raise ExportError(f"cannot time layer {term.name}: it did not run in a forward pass")
            terms.append(_time_term(term, module, shapes[term.name], threads, granularity, Path(tmp), block))
        plans = {"half": fraction_plan(graph, 0.5)} | _group_cuts(graph)
        timed = _whole_models_ms(model, input_shape, threads, Path(tmp), graph=graph, plans=plans)
    full_ms, half_ms = timed["full"], timed["half"]
    raw = {t.name: t.beta_ms for t in terms}
    v_full = _slope_part(graph, raw, None, block)
    group_scales = {}
    for name, plan in plans.items():
        if name == "half":
            continue
        predicted = v_full - _slope_part(graph, raw, plan.unit_mask(graph), block)
        measured = full_ms - timed[name]
        # a group whose cut the timings cannot resolve (a small share of the time) keeps its slopes
        ok = predicted > 0.02 * full_ms and measured > 0
        group_scales[int(name)] = min(4.0, max(0.25, measured / predicted)) if ok else 1.0
    terms = [replace(t, group_scale=_term_scale(graph, t.name, group_scales)) for t in terms]
    beta = {t.name: t.beta_ms * t.group_scale for t in terms}
    variable_full = _slope_part(graph, beta, None, block)
    variable_half = _slope_part(graph, beta, plans["half"].unit_mask(graph), block)
    scale, fixed = _calibrate(full_ms, half_ms, variable_full, variable_half)
    calibration = {
        "half_ms": half_ms,
        "slopes_full_ms": variable_full,
        "slopes_half_ms": variable_half,
        "half_plan": "every group at half its width (its first units)",
        "group_cut_ms": {graph.groups[int(k)].name: v for k, v in timed.items() if k not in ("full", "half")},
        "group_scales": {graph.groups[g].name: v for g, v in group_scales.items()},
        "block_probe_ms": probe,
    }
    return LatencyTable(key, full_ms, fixed, scale, tuple(terms), calibration, block)


def rounded(n: float, block: int) -> float:
    """`n` channels as the runtime pays for them: rounded up to a multiple of `block`."""
    return n if block <= 1 else float(-(-round(n) // block) * block)


def _probe_block(threads: int, tmp: Path) -> tuple[int, dict[str, float]]:
    """The channel block of onnxruntime's convolutions here: time a 3x3 conv (64 -> c channels, 28x28)
    for c from 32 to 80 in steps of 8 and keep the block whose rounding explains the times best (the
    smallest one when they tie)."""
    conv = nn.Conv2d(64, 80, 3, padding=1)
    widths = list(range(32, 81, 8))
    times = {c: _time_layer(conv, (1, 64, 28, 28), 64, c, threads, tmp) for c in widths}
    best, best_err = 1, float("inf")
    for block in _BLOCKS:
        xs = [rounded(c, block) for c in widths]
        alpha, beta = _fit(xs, [times[c] for c in widths])
        err = sum((alpha + beta * x - times[c]) ** 2 for x, c in zip(xs, widths, strict=True))
        if err < 0.7 * best_err:  # a larger block must explain clearly more than the smaller one
            best, best_err = block, err
    return best, {str(c): t for c, t in times.items()}  # JSON keys: strings


def _group_cuts(graph: ChannelGraph) -> dict[str, Any]:
    """One plan per group of at least two units: that group cut to a quarter of its units, the rest whole."""
    from prunekit.plan import plan_from_scores

    scores = [0.0] * graph.num_units  # ties: the first units are kept
    plans = {}
    for group in graph.groups:
        if group.units < 2:
            continue
        counts = [max(1, g.units // 4) if g.index == group.index else g.units for g in graph.groups]
        plans[str(group.index)] = plan_from_scores(graph, scores, counts)
    return plans


def _term_scale(graph: ChannelGraph, name: str, group_scales: dict[int, float]) -> float:
    """The geometric mean of the scales of the groups a layer's gateable channels belong to."""
    term = next(t for t in graph.mac_terms if t.name == name)
    groups = {graph.unit_group[u] for u in (*term.in_units, *term.out_units, *term.units) if u >= 0}
    scales = [group_scales.get(g, 1.0) for g in sorted(groups)]
    return float(np.exp(np.mean(np.log(scales)))) if scales else 1.0


def _slope_part(graph: ChannelGraph, beta: dict[str, float], keep: Any, block: int = 1) -> float:
    """Sum of beta * (c_in * c_out, or conv groups) over the gateable layers, with the units in `keep`
    (None: all), channel counts rounded up to `block`."""

    def count(units: tuple[int, ...]) -> float:
        return rounded(sum(1.0 if u < 0 or keep is None or keep[u] else 0.0 for u in units), block)

    total = 0.0
    for t in graph.mac_terms:
        if t.prunable:
            x = count(t.in_units) * count(t.out_units) if t.kind == "bilinear" else count(t.units)
            total += beta[t.name] * x
    return total


def _calibrate(full_ms: float, half_ms: float, v_full: float, v_half: float) -> tuple[float, float]:
    """(scale, fixed) with fixed + scale * v = the measured time at both widths. When the two timings
    do not give a positive scale and a non-negative fixed part (noise on a tiny model), the slopes keep
    their sum and only the fixed part is fitted, or they are scaled to explain the whole model."""
    if v_full > v_half and full_ms > half_ms:
        scale = (full_ms - half_ms) / (v_full - v_half)
        fixed = full_ms - scale * v_full
        if fixed >= 0:
            return scale, fixed
    if v_full <= 0:
        return 1.0, full_ms
    scale = min(1.0, full_ms / v_full)
    return scale, full_ms - scale * v_full


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
    term: MacTerm,
    module: nn.Module,
    in_shape: tuple[int, ...],
    threads: int,
    granularity: int,
    tmp: Path,
    block: int = 1,
) -> TermLatency:
    """Fit (alpha, beta) for one layer on its channel counts rounded up to `block`."""
    points: list[tuple[int, int, float]] = []
    if term.kind == "bilinear":
        for c_in in _widths(term.in_units, granularity):
            for c_out in _widths(term.out_units, granularity):
                ms = _time_layer(module, in_shape, c_in, c_out, threads, tmp)
                points.append((c_in, c_out, ms))
        xs = [rounded(a, block) * rounded(b, block) for a, b, _ in points]
    else:  # a grouped conv: its cost follows the number of conv groups kept
        assert isinstance(module, nn.Conv2d)
        per_group_in, per_group_out = (
            module.in_channels // module.groups,
            module.out_channels // module.groups,
        )
        for g in _widths(term.units, max(1, granularity // max(1, per_group_out))):
            ms = _time_layer(module, in_shape, g * per_group_in, g * per_group_out, threads, tmp, groups=g)
            points.append((0, g, ms))
        xs = [rounded(g, block) for _, g, _ in points]
    alpha, beta = _fit(xs, [ms for _, _, ms in points])
    return TermLatency(term.name, term.kind, alpha, beta, tuple(points))


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
    session = cpu_session(path, threads, spinning=False)
    feed = {"x": rng.standard_normal(shape, dtype=np.float32)}
    for _ in range(_WARMUP):
        session.run(None, feed)
    times = []
    for _ in range(_REPEATS):
        start = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _whole_models_ms(
    model: nn.Module,
    input_shape: tuple[int, int, int],
    threads: int,
    tmp: Path,
    *,
    graph: ChannelGraph,
    plans: dict[str, Any],
) -> dict[str, float]:
    """onnxruntime latency (batch 1, spinning off) of `model` ("full") and of its copies slimmed by each
    of `plans`, timed interleaved so that the machine's drift reaches all of them alike."""
    paths = {"full": _export(model, None, None, tmp / "full.onnx", input_shape)}
    for name, plan in plans.items():
        paths[name] = _export(model, graph, plan, tmp / f"plan-{name}.onnx", input_shape)
    return _time_files(paths, input_shape, threads)


def _export(
    model: nn.Module, graph: ChannelGraph | None, plan: Any, path: Path, input_shape: tuple[int, int, int]
) -> Path:
    """Export `model` (a copy slimmed by `plan`, when given) to `path`."""
    import copy

    from prunekit.export import export_onnx
    from prunekit.surgery import slim_

    if plan is not None:
        model = slim_(copy.deepcopy(model), graph, plan).eval()
    export_onnx(model, path, input_shape=input_shape)
    return path


def _time_files(paths: dict[str, Path], input_shape: tuple[int, int, int], threads: int) -> dict[str, float]:
    from prunekit.measure import onnx_latency_interleaved

    timed = onnx_latency_interleaved(paths, (1, *input_shape), threads, warmup=5, repeats=40)
    return {name: t.median_ms for name, t in timed.items()}


class MeasuredLatency:
    """Times decided widths for real: the model slimmed to a unit mask, exported and timed interleaved
    with the full model in onnxruntime (batch 1, spinning off). Used at the decision point of a latency
    budget, where the table's prediction for the gates' uneven widths can be off by a fifth. The full
    model is exported once; `close()` removes the files. Called with a unit mask, it gives `fraction`."""

    def __init__(
        self, model: nn.Module, graph: ChannelGraph, input_shape: tuple[int, int, int], threads: int
    ):
        self.model, self.graph, self.input_shape, self.threads = model, graph, input_shape, threads
        self._full: Path | None = None
        self._dir: tempfile.TemporaryDirectory | None = None

    def __call__(self, keep: list[bool]) -> float:
        return self.fraction(keep)

    def fraction(self, keep: list[bool]) -> float:
        """Latency of the model slimmed to `keep` (per unit) over the full model's."""
        from prunekit.plan import plan_from_units

        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="prunekit-decide-")
        tmp = Path(self._dir.name)
        if self._full is None:
            self._full = _export(self.model, None, None, tmp / "full.onnx", self.input_shape)
        plan = plan_from_units(self.graph, keep)
        decided = _export(self.model, self.graph, plan, tmp / "decided.onnx", self.input_shape)
        timed = _time_files({"full": self._full, "decided": decided}, self.input_shape, self.threads)
        return timed["decided"] / timed["full"]

    def close(self) -> None:
        if self._dir is not None:
            self._dir.cleanup()
            self._dir, self._full = None, None
