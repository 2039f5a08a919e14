"""Zoo coverage: every torchvision classification model through analyze -> random plan -> slim -> check.

For each model (weights=None, then every parameter and BatchNorm statistic randomised, eval mode,
float32): trace + channel analysis, a random plan keeping ~50% of every prunable group (seed 0), slimming,
and the exactness check of the slimmed model against the masked reference (max |diff| <= 1e-4 max |ref|).
MACs are fvcore's (prunekit.measure.count_macs, per example). Writes a Markdown report (rewritten after
every model, so a long run that dies still leaves its results) and prints a table.

    .venv/bin/python benchmarks/coverage.py                            # the whole zoo -> docs/coverage.md
    .venv/bin/python benchmarks/coverage.py --models resnet18,swin_t --out /tmp/cov.md

Timings are wall-clock seconds, single-threaded by default (--threads), on whatever machine runs it.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import platform
import re
import shlex
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torchvision
from torch import nn

from prunekit.graph import ChannelGraph, analyze
from prunekit.masking import masked
from prunekit.measure import count_macs, count_params
from prunekit.models import build_model
from prunekit.parity import compare_outputs
from prunekit.plan import random_plan
from prunekit.surgery import slim_
from prunekit.testing import randomize_

KEEP = 0.5
SEED = 0
RTOL = 1e-4
TORCH_PRUNING = "Torch-Pruning: 77 of 85 in its own torchvision sweep (fails Swin, ShuffleNetV2, RAFT)"
ALWAYS_FROZEN = ("model input", "model output")
# Per-model input sizes; everything else runs at 64 px.
INPUT_SIZE = {"inception_v3": 96}
NEEDS_224 = ("vit_", "swin_", "maxvit_")  # fixed position embeddings / window partitions


def input_size(name: str) -> int:
    if name.startswith(NEEDS_224):
        return 224
    return INPUT_SIZE.get(name, 64)


@dataclass
class Row:
    name: str
    size: int
    status: str = "FAILED"
    error: str = ""
    params: int = 0
    params_after: int = 0
    groups: int = 0
    prunable_fraction: float = 0.0
    macs: int = 0
    macs_after: int = 0
    rel_diff: float = float("nan")
    t_analyze: float = float("nan")
    t_slim: float = float("nan")
    t_check: float = float("nan")
    reasons: list[str] = field(default_factory=list)

    @property
    def exact(self) -> bool:
        return self.status == "exact"


def frozen_reasons(graph: ChannelGraph) -> list[str]:
    """Distinct reasons for frozen channels, with how many places gave each (input/output left out).
    Block indices in module paths are collapsed (features.5.3.attn -> features.*.*.attn) to dedupe."""
    places: dict[str, set[str]] = {}
    for f in graph.frozen:
        if f.reason not in ALWAYS_FROZEN:
            places.setdefault(re.sub(r"(?<=\.)\d+(?=\.)", "*", f.reason), set()).add(f.where)
    return [f"{reason} (x{len(where)})" if len(where) > 1 else reason for reason, where in places.items()]


def run_one(name: str, size: int | None = None, build: Callable[[], nn.Module] | None = None) -> Row:
    """Analyse, slim by a random plan and check one model (`build`: how to make it; default torchvision)."""
    size = size or input_size(name)
    row = Row(name, size)
    stage = "build"
    try:
        model = randomize_(build() if build is not None else build_model(name))
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(SEED))
        row.params = count_params(model)
        stage = "fvcore"
        row.macs = count_macs(model, x[:1]).total_macs
        stage = "analyze"
        start = time.perf_counter()
        graph = analyze(model, x)
        row.t_analyze = time.perf_counter() - start
        row.groups = len(graph.groups)
        row.prunable_fraction = graph.prunable_macs / max(1, row.macs)
        row.reasons = frozen_reasons(graph)
        plan = random_plan(graph, KEEP, SEED)
        stage = "masked reference"
        start = time.perf_counter()
        with torch.no_grad(), masked(model, graph, plan):
            reference = model(x)
        t_reference = time.perf_counter() - start
        stage = "slim"
        start = time.perf_counter()
        slim_(model, graph, plan)  # in place: no second copy of the big models
        row.t_slim = time.perf_counter() - start
        stage = "check"
        start = time.perf_counter()
        with torch.no_grad():
            out = model(x)
        parity = compare_outputs(reference, out, RTOL)
        row.t_check = t_reference + time.perf_counter() - start
        row.rel_diff = parity.max_abs_diff / max(parity.max_abs_ref, 1e-12)
        stage = "fvcore (slimmed)"
        row.macs_after = count_macs(model, x[:1]).total_macs
        row.params_after = count_params(model)
        if parity.ok:
            row.status = "exact"
        else:
            row.error = f"max |diff| {parity.max_abs_diff:.3g} > {parity.tolerance:.3g} (rtol {RTOL})"
    except Exception as exc:  # a benchmark reports every failure and goes on
        row.error = f"{stage}: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}"
    finally:
        gc.collect()
    return row


# -- rendering -----------------------------------------------------------------------------------------


def _m(macs: int) -> str:
    return f"{macs / 1e6:,.1f}M" if macs else "-"


def _s(seconds: float) -> str:
    return "-" if seconds != seconds else f"{seconds:.2f}"


def _ratio(row: Row) -> str:
    return f"{row.macs_after / row.macs:.3f}" if row.macs and row.macs_after else "-"


def _status(row: Row) -> str:
    return "exact" if row.exact else f"FAILED: {row.error}"


def summary_line(rows: list[Row], total: int) -> str:
    exact = sum(r.exact for r in rows)
    done = "" if len(rows) == total else f" (partial: {len(rows)} of {total} run so far)"
    return f"**{exact} of {len(rows)} models slim exactly**{done}. For comparison, {TORCH_PRUNING}."


def timing_lines(rows: list[Row], resnet50_224: Row | None) -> list[str]:
    lines = []
    if resnet50_224 is not None:
        lines.append(_timing("resnet50 at 224 px", resnet50_224))
    done = [r for r in rows if r.params]
    if done:
        largest = max(done, key=lambda r: r.params)
        lines.append(
            _timing(
                f"largest model, {largest.name} ({largest.params / 1e6:.0f}M params) at {largest.size} px",
                largest,
            )
        )
    return lines


def _timing(label: str, row: Row) -> str:
    status = "exact" if row.exact else "FAILED"
    return (
        f"{label}: trace+analysis {_s(row.t_analyze)} s, slim {_s(row.t_slim)} s, "
        f"check {_s(row.t_check)} s ({status})"
    )


def render_markdown(rows: list[Row], total: int, command: str, resnet50_224: Row | None, threads: int) -> str:
    lines = [
        "# Zoo coverage: analyse, slim, check",
        "",
        f"Produced by `{command}` on {datetime.date.today().isoformat()} "
        f"(torch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"Python {platform.python_version()}, {platform.machine()} CPU, {threads} thread(s)).",
        "",
        summary_line(rows, total),
        "",
        "Every classification model of `torchvision.models.list_models(module=torchvision.models)`, "
        "`weights=None`, then every parameter and BatchNorm statistic randomised; eval mode, float32, "
        f"a batch of 2. Plan: a random {KEEP:.0%} of every prunable channel group (seed {SEED}), rounded to "
        "multiples of 8 channels. *Exact*: the slimmed model's output equals the masked model's, "
        f"max |diff| <= {RTOL:g} x max |output|.",
        "",
        "- *groups*: prunable coupled channel groups. *prunable MACs*: the share of the model's MACs whose "
        "cost depends on a prunable group (`graph.prunable_macs / count_macs`).",
        "- *MACs*: fvcore (prunekit.measure.count_macs: conv, linear and matmul; norms and pooling not "
        "counted), per example at the input size shown, before and after the random plan.",
        "- *time*: seconds for trace + analysis, slimming, and the check (masked and slimmed forward "
        "passes); a shared machine, so read them as orders of magnitude.",
        "- *frozen*: why channels are not prunable, distinct reasons (xN: in N places; block indices in "
        "module paths shown as `*`). The model input and the classifier output are always frozen and not "
        "listed.",
        "",
    ]
    timings = timing_lines(rows, resnet50_224)
    if timings:
        lines += ["Benchmark timings:", ""] + [f"- {t}" for t in timings] + [""]
    lines += [
        "| model | input | status | groups | prunable MACs | MACs | MACs slim | ratio | params | params slim "
        "| analyse s | slim s | check s | frozen |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [r.name, str(r.size), _status(r), str(r.groups), f"{r.prunable_fraction:.1%}"]
        cells += [
            _m(r.macs),
            _m(r.macs_after),
            _ratio(r),
            f"{r.params / 1e6:.2f}M",
            f"{r.params_after / 1e6:.2f}M",
        ]
        cells += [_s(r.t_analyze), _s(r.t_slim), _s(r.t_check), "; ".join(r.reasons) or "-"]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def print_row(r: Row) -> None:
    status = f"exact ({r.rel_diff:.1e})" if r.exact else f"FAILED {r.error}"
    head = f"{r.name:22} {r.size:4} {r.groups:4} {r.prunable_fraction:6.1%}"
    macs = f"{_m(r.macs):>12} {_m(r.macs_after):>12} {_ratio(r):>6}"
    times = f"{_s(r.t_analyze):>7} {_s(r.t_slim):>6} {_s(r.t_check):>7}"
    print(f"{head} {macs} {times}  {status}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated subset (default: every classification model)")
    parser.add_argument("--out", type=Path, default=Path("docs/coverage.md"), help="Markdown report path")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--no-resnet50-224", action="store_true", help="skip the resnet50 224 px timing run")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")

    names = torchvision.models.list_models(module=torchvision.models)
    if args.models:
        wanted = [n.strip() for n in args.models.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in names]
        if unknown:
            parser.error(f"not torchvision classification models: {', '.join(unknown)}")
        names = wanted
    command = shlex.join(["python", "benchmarks/coverage.py", *(sys.argv[1:] if argv is None else argv)])

    print(
        f"{'model':22} {'in':>4} {'grp':>4} {'prun%':>6} {'MACs':>12} {'MACs slim':>12} {'ratio':>6} "
        f"{'analyse':>7} {'slim':>6} {'check':>7}  status",
        flush=True,
    )
    resnet50_224 = None
    if not args.no_resnet50_224:
        resnet50_224 = run_one("resnet50", 224)
        print_row(resnet50_224)
        print("  (resnet50 at 224 px: the timing reference, not part of the sweep)", flush=True)
    rows: list[Row] = []
    for name in names:
        rows.append(run_one(name))
        print_row(rows[-1])
        args.out.write_text(render_markdown(rows, len(names), command, resnet50_224, args.threads))

    print()
    print(summary_line(rows, len(names)).replace("**", ""))
    for line in timing_lines(rows, resnet50_224):
        print(line)
    failed = [r for r in rows if not r.exact]
    for r in failed:
        print(f"FAILED {r.name}: {r.error}")
    print(f"wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
