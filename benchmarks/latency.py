"""Benchmark (issue: slim/export): does halving the MACs halve the latency?

For each model (random weights; the speed of a dense model does not depend on its values), slim to
about `--target` of its MACs with a magnitude plan (per-group widths rounded to multiples of 8), export
the original and the slimmed model to ONNX, and time both in onnxruntime, interleaved, with fixed
threads. Prints the MACs ratio next to the latency ratio and the figure of merit
    efficiency = latency speedup / MACs reduction   (aim: >= 0.85)

    .venv/bin/python benchmarks/latency.py --models resnet18,resnet50 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from onnxruntime import InferenceSession

from prunekit.config import ModelSpec
from prunekit.export import export_onnx
from prunekit.graph import analyze
from prunekit.measure import count_macs
from prunekit.models import build_model
from prunekit.onnxrt import cpu_session
from prunekit.plan import Rounding, magnitude_scores, plan_from_scores
from prunekit.surgery import slim_


def plan_for_target(model, graph, target: float, round_to: int, kind: str):  # noqa: ANN001, ANN201
    """Largest keep fraction whose magnitude plan stays within `target` of the MACs (bisection).
    `uniform`: every group keeps that fraction; `internal`: groups written by several layers (residual
    streams) stay whole and only block-internal widths shrink."""
    scores = magnitude_scores(model, graph)

    def make(fraction: float):  # noqa: ANN202
        counts = [
            g.units if kind == "internal" and len(g.producers) > 1 else max(1, round(g.units * fraction))
            for g in graph.groups
        ]
        return plan_from_scores(graph, scores, counts, Rounding(round_to=round_to))

    lo, hi = 0.02, 1.0
    for _ in range(20):
        mid = (lo + hi) / 2
        if graph.macs(make(mid).unit_mask(graph)) <= target * graph.macs():
            lo = mid
        else:
            hi = mid
    return make(lo)


def interleaved_ms(sessions: dict[str, InferenceSession], x: np.ndarray, repeats: int) -> dict[str, float]:
    for s in sessions.values():
        for _ in range(5):
            s.run(None, {s.get_inputs()[0].name: x})
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(repeats):
        for k, s in sessions.items():
            t = time.perf_counter()
            s.run(None, {s.get_inputs()[0].name: x})
            times[k].append(1000 * (time.perf_counter() - t))
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="resnet18,resnet50")
    ap.add_argument("--target", type=float, default=0.5)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--round-to", type=int, default=8, help="round kept widths to multiples of this")
    ap.add_argument("--plan", choices=("uniform", "internal"), default="uniform")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    for name in args.models.split(","):
        model = build_model(name)
        x = ModelSpec(name, input_shape=(3, args.size, args.size)).example_input()
        graph = analyze(model, x)
        plan = plan_for_target(model, graph, args.target, args.round_to, args.plan)
        slim = slim_(copy.deepcopy(model), graph, plan).eval()
        macs = (count_macs(model, x).total_macs, count_macs(slim, x).total_macs)
        with tempfile.TemporaryDirectory() as tmp:
            paths = {k: Path(tmp) / f"{k}.onnx" for k in ("original", "slim")}
            for p, m in zip(paths.values(), (model, slim), strict=True):
                export_onnx(m, p, input_shape=(3, args.size, args.size))
            sessions = {k: cpu_session(p, args.threads) for k, p in paths.items()}
            batch = (
                np.random.default_rng(0)
                .standard_normal((args.batch, 3, args.size, args.size))
                .astype(np.float32)
            )
            ms = interleaved_ms(sessions, batch, args.repeats)
        mac_ratio = macs[1] / macs[0]
        lat_ratio = ms["slim"] / ms["original"]
        row = {
            "model": name,
            "plan": args.plan,
            "round_to": args.round_to,
            "input": args.size,
            "batch": args.batch,
            "threads": args.threads,
            "macs_original": macs[0],
            "macs_slim": macs[1],
            "macs_ratio": mac_ratio,
            "ms_original": ms["original"],
            "ms_slim": ms["slim"],
            "latency_ratio": lat_ratio,
            "efficiency": (1 / lat_ratio) / (1 / mac_ratio),
        }
        rows.append(row)
        print(
            f"{name:10s} MACs {macs[0] / 1e9:.3f}G -> {macs[1] / 1e9:.3f}G (x{mac_ratio:.3f})  "
            f"onnxruntime {ms['original']:.2f} ms -> {ms['slim']:.2f} ms (x{lat_ratio:.3f})  "
            f"speedup/MACs-reduction {row['efficiency']:.2f}",
            flush=True,
        )
    if args.out:
        Path(args.out).write_text(
            json.dumps(
                {
                    "command": "python benchmarks/latency.py "
                    + " ".join(f"--{k} {v}" for k, v in vars(args).items() if v is not None and k != "out"),
                    "rows": rows,
                },
                indent=1,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
