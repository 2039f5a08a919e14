"""Accuracy at equal MACs and equal fine-tuning: prunekit's recipe against Torch-Pruning's criteria.

Every method starts from the same pretrained model, data, augmentation and normalisation, and gets the
same optimiser (SGD, momentum 0.9, Nesterov, weight decay 1e-4), cosine schedule per step, epochs, batch
and distillation setting (weight, temperature 2, the unpruned model as teacher). prunekit spends its
epochs as its recipe does (its default, `--method auto`, measures sensitivity on 4 training batches and
decides before the first step; `--finetune method=gumbel --gate min_keep=0.5` is the learned gates as
they were the default before: gates and weights jointly, then the weights under fixed decisions); the
Torch-Pruning criteria prune once to the target (a search over the pruning ratio, `round_to` = prunekit's
granularity, the classifier left whole) and then fine-tune with a plain loop. Every result's MACs are
counted by one counter (prunekit.measure.count_macs, fvcore) on the final model. A seed sets the data
order and augmentation as well as the initial noise, so at one seed every method sees the same batches
(results recorded before this rule drew their data order from where the previous run had left the loader).

    # the CIFAR-10 resnet18 fixture (../shared/data), unpacked to /tmp/cifar10 first:
    python benchmarks/peers.py --data /tmp/cifar10 --out benchmarks/results/peers.json
    # a smoke run in seconds (random weights, built-in data):
    python benchmarks/peers.py --data builtin --weights none --targets 0.5 --epochs 1 --seeds 0 \\
        --distill 0 --max-steps-per-epoch 2 --out /tmp/peers.json --plot /tmp/peers.png --doc /tmp/peers.md

The full grid (3 targets x 2 budgets x 2 seeds x 2 distillation settings x 5 methods = 120 runs) takes
about 8-10 hours on 2 CPU cores (one run took 65-200 s at 2 epochs and 180-400 s at 5 epochs here,
as measured in docs/benchmarks.md); results are written after every run, so it can be read as it goes. A
grid run in pieces is combined with `--merge A.json B.json ...`, which writes the result file, the plot
and the table with each prunekit recipe against the best Torch-Pruning criterion of its cell; a run
listed later that repeats an earlier one (same method, variant, cell and seed) supersedes it.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import prunekit
from prunekit.config import FinetuneConfig, GateConfig, ModelSpec
from prunekit.data import resolve_data
from prunekit.measure import count_macs, count_params
from prunekit.models import last_linear, load_model
from prunekit.trainer import distillation_loss, evaluate

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
WEIGHTS = Path(__file__).resolve().parents[2] / "shared/data/cifar10-resnet18/resnet18_cifar10jpg.pth"
METHODS = ("prunekit", "tp-l1-uniform", "tp-l1-global", "tp-bn", "tp-taylor")
WEIGHT_DECAY = 1e-4


def fixture(args: argparse.Namespace) -> tuple[nn.Module, ModelSpec, Any]:
    weights = None if args.weights == "none" else args.weights
    cifar = args.data != "builtin"
    spec = ModelSpec(
        "resnet18",
        weights=weights,
        num_classes=10,
        input_shape=(3, 32, 32),
        mean=CIFAR_MEAN if cifar else None,
        std=CIFAR_STD if cifar else None,
    )
    torch.manual_seed(0)
    model, spec = load_model(spec)
    loaders = resolve_data(
        args.data,
        **spec.preprocessing(),
        batch_size=args.batch_size,
        workers=args.workers,
        seed=0,
    )
    return model, spec, loaders


def tp_prune(model: nn.Module, spec: ModelSpec, loaders: Any, method: str, target: float, round_to: int):  # noqa: ANN201
    """Torch-Pruning with one criterion, to the largest model within `target` of the MACs."""
    import torch_pruning as tp

    importance = {
        "tp-l1-uniform": lambda: tp.importance.GroupMagnitudeImportance(p=1),
        "tp-l1-global": lambda: tp.importance.GroupMagnitudeImportance(p=1),
        "tp-bn": lambda: tp.importance.BNScaleImportance(),
        "tp-taylor": lambda: tp.importance.GroupTaylorImportance(),
    }[method]
    example = spec.example_input(1)
    total = count_macs(model, example).total_macs

    base = copy.deepcopy(model).eval()
    if method == "tp-taylor":  # first-order importance needs the loss's gradients, once
        base.train()
        for i, (x, y) in enumerate(loaders.train):
            F.cross_entropy(base(x), y).backward()
            if i >= 3:
                break
        base.eval()

    def pruned(ratio: float) -> nn.Module:
        m = copy.deepcopy(base)
        for new, old in zip(m.parameters(), base.parameters(), strict=True):  # deepcopy drops .grad
            new.grad = None if old.grad is None else old.grad.clone()
        pruner = tp.pruner.MetaPruner(
            m,
            example,
            importance=importance(),
            pruning_ratio=ratio,
            global_pruning=method == "tp-l1-global",
            round_to=round_to,
            ignored_layers=[last_linear(m)[1]],
        )
        pruner.step()
        m.zero_grad(set_to_none=True)
        return m.eval()

    lo, hi, best = 0.0, 0.95, None
    for _ in range(12):  # the MACs fall as the ratio grows: bisect for the largest model within target
        mid = (lo + hi) / 2
        candidate = pruned(mid)
        if count_macs(candidate, example).total_macs / total <= target:
            best, hi = candidate, mid
        else:
            lo = mid
    return best if best is not None else pruned(hi)


def plain_finetune(
    model: nn.Module, teacher: nn.Module, loaders: Any, args: argparse.Namespace, distill: float, epochs: int
) -> None:
    """The peer's fine-tuning: the same optimiser, schedule, batch and distillation as prunekit's."""
    opt = torch.optim.SGD(
        model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=WEIGHT_DECAY
    )
    steps_per_epoch = (
        len(loaders.train)
        if args.max_steps_per_epoch is None
        else min(args.max_steps_per_epoch, len(loaders.train))
    )
    total = max(1, steps_per_epoch * epochs)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
    )
    teacher.eval()
    for _ in range(epochs):
        model.train()
        for i, (x, y) in enumerate(loaders.train):
            if i >= steps_per_epoch:
                break
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            if distill > 0:
                with torch.no_grad():
                    soft = teacher(x)
                loss = (1 - distill) * loss + distill * distillation_loss(logits, soft)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()


def overrides(pairs: list[str], cls: type) -> dict[str, Any]:
    """KEY=VALUE settings of prunekit's recipe (a variant to measure), typed as the config field."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out: dict[str, Any] = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in fields:
            raise SystemExit(f"unknown {cls.__name__} field {key!r}")
        default = getattr(cls(), key) if cls is not FinetuneConfig else getattr(cls(target_macs=0.5), key)
        if isinstance(default, bool):
            out[key] = value.lower() in ("1", "true", "yes")
        else:  # a field whose default is None takes the text as it is
            out[key] = value if default is None else type(default)(value)
    return out


def run_one(model, spec, loaders, method, target, epochs, seed, distill, args) -> dict[str, Any]:  # noqa: ANN001
    torch.manual_seed(seed)
    # the seed sets the data order and augmentation too (the loader's generator seeds its shuffle and its
    # workers): every method sees the same batches at one seed, so they are compared pairwise
    loaders.train.generator.manual_seed(seed)
    start = time.perf_counter()
    if method == "prunekit":
        gate_config = GateConfig(granularity=args.granularity, **overrides(args.gate, GateConfig))
        gated = prunekit.gate(
            copy.deepcopy(model),
            spec=spec,
            config=gate_config,
            data=loaders.train if gate_config.importance == "taylor" else None,  # its gradient batches
        )
        config = FinetuneConfig(
            **overrides(args.finetune, FinetuneConfig),
            target_macs=target,
            epochs=epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            distill=distill,
            seed=seed,
            workers=args.workers,
            max_steps_per_epoch=args.max_steps_per_epoch,
            weight_decay=WEIGHT_DECAY,
        )
        tuned = prunekit.finetune(gated, loaders.train, loaders.val, config=config)
        final = prunekit.slim(tuned).model
    else:
        final = tp_prune(model, spec, loaders, method, target, args.granularity)
        plain_finetune(final, model, loaders, args, distill, epochs)
    acc = evaluate(final, loaders.val, torch.device("cpu"), max_batches=args.eval_batches).top1
    example = spec.example_input(1)
    return {
        "method": method,
        "target": target,
        "epochs": epochs,
        "seed": seed,
        "distill": distill,
        "top1": acc,
        "macs": count_macs(final, example).total_macs,
        "params": count_params(final),
        "seconds": time.perf_counter() - start,
        "variant": " ".join(args.gate + args.finetune) if method == "prunekit" else "",
        # the allocation: every conv's output channels, comparable across methods by module name
        "widths": {n: m.out_channels for n, m in final.named_modules() if isinstance(m, nn.Conv2d)},
    }


def label(run: dict[str, Any]) -> str:
    """The method, with the recipe variant a prunekit run measured (its --gate/--finetune settings)."""
    return run["method"] + (f" [{run['variant']}]" if run.get("variant") else "")


def summarise(runs: list[dict[str, Any]], total_macs: int) -> list[dict[str, Any]]:
    """Mean and spread over seeds for every (method, target, epochs, distill)."""
    cells: dict[tuple, list[dict[str, Any]]] = {}
    for r in runs:
        cells.setdefault((label(r), r["target"], r["epochs"], r["distill"]), []).append(r)
    rows = []
    for (method, target, epochs, distill), rs in sorted(cells.items()):
        accs = [r["top1"] for r in rs]
        rows.append(
            {
                "method": method,
                "target": target,
                "epochs": epochs,
                "distill": distill,
                "seeds": len(rs),
                "top1_mean": statistics.mean(accs),
                "top1_spread": max(accs) - min(accs),
                "macs_kept": statistics.mean(r["macs"] for r in rs) / total_macs,
                "seconds_mean": statistics.mean(r["seconds"] for r in rs),
            }
        )
    return rows


def plot(rows: list[dict[str, Any]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    epochs_seen = sorted({r["epochs"] for r in rows})
    distills_seen = sorted({r["distill"] for r in rows})
    methods = sorted({r["method"] for r in rows})
    colors = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}  # one colour per method
    # one panel per budget (columns) and distillation setting (rows)
    fig, axes = plt.subplots(
        len(distills_seen),
        len(epochs_seen),
        figsize=(6 * len(epochs_seen), 4 * len(distills_seen)),
        squeeze=False,
    )
    for (i, distill), (j, epochs) in itertools.product(enumerate(distills_seen), enumerate(epochs_seen)):
        ax = axes[i][j]
        for method in methods:
            pts = sorted(
                (r["macs_kept"], 100 * r["top1_mean"])
                for r in rows
                if r["method"] == method and r["epochs"] == epochs and r["distill"] == distill
            )
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=method, color=colors[method])
        ax.set(title=f"{epochs} epochs, distillation {distill:g}", xlabel="MACs kept", ylabel="top-1 (%)")
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=colors[m], marker="o", label=m) for m in methods]
    fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=8, frameon=False)
    legend_rows = (len(methods) + 1) // 2
    fig.tight_layout(rect=(0, 0.05 * legend_rows / len(distills_seen), 1, 1))
    fig.savefig(path, dpi=110)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="/tmp/cifar10")
    ap.add_argument("--weights", default=str(WEIGHTS), help="state_dict file, or none (random: smoke runs)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--targets", default="0.3,0.5,0.7")
    ap.add_argument("--epochs", default="2,5")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--distill", default="0,0.7")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--granularity", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--gate", action="append", default=[], help="KEY=VALUE of prunekit's GateConfig")
    ap.add_argument("--finetune", action="append", default=[], help="KEY=VALUE of its FinetuneConfig")
    ap.add_argument("--max-steps-per-epoch", type=int, default=None, help="cap steps per epoch (smoke runs)")
    ap.add_argument("--eval-batches", type=int, default=None, help="cap validation batches (smoke runs)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/peers.json"))
    ap.add_argument("--plot", type=Path, default=Path("docs/benchmarks-peers.png"))
    ap.add_argument("--doc", type=Path, default=Path("docs/benchmarks.md"))
    ap.add_argument(
        "--merge",
        nargs="+",
        type=Path,
        default=None,
        help="combine the runs of these result files (a grid run in pieces) into --out, --plot, --doc",
    )
    args = ap.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out, args.plot, args.doc)
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        ap.error(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
    model, spec, loaders = fixture(args)
    total_macs = count_macs(model, spec.example_input(1)).total_macs
    baseline = evaluate(model, loaders.val, torch.device("cpu"), max_batches=args.eval_batches).top1
    command = "python benchmarks/peers.py " + " ".join(sys.argv[1:] if argv is None else argv)
    runs: list[dict[str, Any]] = []
    grid = [
        (float(t), int(e), int(s), float(d))
        for t in args.targets.split(",")
        for e in args.epochs.split(",")
        for d in args.distill.split(",")
        for s in args.seeds.split(",")
    ]
    for target, epochs, seed, distill in grid:
        for method in methods:
            runs.append(run_one(model, spec, loaders, method, target, epochs, seed, distill, args))
            print(json.dumps(runs[-1]), flush=True)
            rows = summarise(runs, total_macs)
            doc = {
                "commands": [command],
                "baseline_top1": baseline,
                "total_macs": total_macs,
                "torch": torch.__version__,
                "summary": rows,
                "runs": runs,
            }
            args.out.write_text(json.dumps(doc, indent=1) + "\n")
    plotted = plot(rows, args.plot)
    args.doc.write_text(render(doc, args.plot if plotted else None))
    print(f"wrote {args.out}, {args.doc}" + (f", {args.plot}" if plotted else ""))
    return 0


def run_key(run: dict[str, Any]) -> tuple:
    """What makes two runs the same measurement: the method and variant, the cell and the seed."""
    return (label(run), run["target"], run["epochs"], run["distill"], run["seed"])


def commands_of(doc: dict[str, Any]) -> list[str]:
    """The commands a result file came from (files merged before this rule joined them with ' ; ')."""
    return doc.get("commands") or doc["command"].split(" ; ")


def merge(paths: list[Path], out: Path, plot_path: Path, doc_path: Path) -> int:
    """One result file from several runs of this script on the same fixture; their commands are kept.

    A run that repeats an earlier one (same method, variant, cell and seed) replaces it: files are read in
    the order given, so a rerun listed later supersedes the result it repeats (kept under "superseded").
    """
    docs = [json.loads(p.read_text()) for p in paths]
    if len({(d["baseline_top1"], d["total_macs"]) for d in docs}) != 1:
        raise SystemExit("these result files are not of the same fixture (baseline or MACs differ)")
    latest: dict[tuple, dict[str, Any]] = {}
    superseded = [r for d in docs for r in d.get("superseded", [])]
    for run in (r for d in docs for r in d["runs"]):
        if run_key(run) in latest:
            superseded.append(latest.pop(run_key(run)))
        latest[run_key(run)] = run
    runs = list(latest.values())
    commands = list(dict.fromkeys(c for d in docs for c in commands_of(d)))
    doc = {
        "commands": commands,
        "baseline_top1": docs[0]["baseline_top1"],
        "total_macs": docs[0]["total_macs"],
        "torch": docs[0]["torch"],
        "summary": summarise(runs, docs[0]["total_macs"]),
        "runs": runs,
        "superseded": superseded,
    }
    out.write_text(json.dumps(doc, indent=1) + "\n")
    plotted = plot(doc["summary"], plot_path)
    doc_path.write_text(render(doc, plot_path if plotted else None))
    print(f"wrote {out}, {doc_path}" + (f", {plot_path}" if plotted else ""))
    return 0


def against_peers(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per cell and prunekit recipe: its mean against the best Torch-Pruning criterion's mean there."""
    out = []
    for r in rows:
        if not r["method"].startswith("prunekit"):
            continue
        cell = (r["target"], r["epochs"], r["distill"])
        peers = [
            p
            for p in rows
            if p["method"].startswith("tp-") and (p["target"], p["epochs"], p["distill"]) == cell
        ]
        if not peers:
            continue
        best = max(peers, key=lambda p: p["top1_mean"])
        out.append({"prunekit": r, "best_peer": best, "margin": r["top1_mean"] - best["top1_mean"]})
    return sorted(
        out, key=lambda c: (c["prunekit"]["distill"], c["prunekit"]["epochs"], c["prunekit"]["target"])
    )


def render(doc: dict[str, Any], plot_path: Path | None) -> str:
    commands = commands_of(doc)
    lines = [
        "# Benchmarks: prunekit against Torch-Pruning at equal MACs and equal fine-tuning",
        "",
        f"torch {doc['torch']}. Unpruned top-1: {100 * doc['baseline_top1']:.2f}%, "
        f"{doc['total_macs'] / 1e6:.2f} M MACs. Means over seeds; spread = max - min; s/run = mean wall "
        "seconds of one run (pruning, fine-tuning and evaluation) on the machine that ran it.",
        "",
    ]
    if plot_path is not None:
        lines += [f"![top-1 against MACs kept]({plot_path.name})", ""]
    comparison = against_peers(doc["summary"])
    if comparison:
        lines += [
            "Each prunekit recipe against the best Torch-Pruning criterion measured in the same cell (means "
            "over seeds; the number of seeds in brackets):",
            "",
            "| target | epochs | distill | prunekit recipe | top-1 | MACs kept | best Torch-Pruning | top-1 "
            "| MACs kept | margin |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for c in comparison:
            r, p = c["prunekit"], c["best_peer"]
            lines.append(
                f"| {r['target']:g} | {r['epochs']} | {r['distill']:g} | {r['method']} | "
                f"{100 * r['top1_mean']:.2f}% ({r['seeds']}) | {r['macs_kept']:.3f} | {p['method']} | "
                f"{100 * p['top1_mean']:.2f}% ({p['seeds']}) | {p['macs_kept']:.3f} | "
                f"{100 * c['margin']:+.2f} |"
            )
        lines.append("")
    lines += [
        "Every result:",
        "",
        "| method | target | epochs | distill | seeds | MACs kept | top-1 mean | spread | s/run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["summary"]:
        seconds = f"{r['seconds_mean']:.0f}" if "seconds_mean" in r else "-"
        lines.append(
            f"| {r['method']} | {r['target']:g} | {r['epochs']} | {r['distill']:g} | {r['seeds']} | "
            f"{r['macs_kept']:.3f} | {100 * r['top1_mean']:.2f}% | {100 * r['top1_spread']:.2f} | {seconds} |"
        )
    lines += ["", "The commands these results came from, in the order they were merged:", ""]
    lines += [f"- `{c}`" for c in commands]
    if doc.get("superseded"):
        lines += [
            "",
            f"{len(doc['superseded'])} earlier run(s) were superseded by a rerun of the same cell and seed.",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
