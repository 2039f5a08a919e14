"""Where the budget goes: hand-set allocations of a MACs target over the stages, fine-tuned as the peers are.

Each allocation is a shape, one width multiplier per group-name prefix (`conv1:1,layer1:1,...,layer4:0.3`:
every group whose first producer's name starts with the prefix). One scale is bisected so that every
group keeps `min(1, scale x multiplier)` of its gates (the most important first, by the gate stage's
ranking) and the model fits the target; the model is slimmed (prunekit's exact surgery) and fine-tuned
with the same plain loop, optimiser, schedule and distillation as `peers.py`'s Torch-Pruning runs.
Before fine-tuning, the slimmed model's accuracy with recalibrated BatchNorm statistics is recorded too
(cheap; it ranks allocations long before a fine-tune ends).

    python benchmarks/allocations.py --data /tmp/cifar10 --target 0.5 --seeds 0,1 \\
        --shape uniform=layer1:1 --shape layer4-cut=layer4:0.3 --out benchmarks/results/allocations.json

`uniform` (every multiplier 1) is the uniform cut of `--method magnitude`, which Torch-Pruning's group-L1
uniform reproduces. A smoke run: `--data builtin --weights none --epochs 1 --max-steps-per-epoch 2`.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # peers.py: the shared fixture and fine-tuning
import peers  # noqa: E402

import prunekit  # noqa: E402
from prunekit.config import GateConfig  # noqa: E402
from prunekit.gates import GateBank, get_gates  # noqa: E402
from prunekit.graph import ChannelGraph  # noqa: E402
from prunekit.measure import count_macs  # noqa: E402
from prunekit.objective import MacModel  # noqa: E402
from prunekit.trainer import evaluate, recalibrate_batchnorm  # noqa: E402


def parse_shape(text: str) -> tuple[str, dict[str, float]]:
    """`name=prefix:multiplier,...` -> (name, {prefix: multiplier})."""
    name, _, spec = text.partition("=")
    if not name or not spec:
        raise SystemExit(f"--shape wants NAME=PREFIX:MULT,..., got {text!r}")
    pairs = {}
    for item in spec.split(","):
        prefix, _, mult = item.partition(":")
        pairs[prefix] = float(mult)
    return name, pairs


def multiplier(group_name: str, shape: dict[str, float]) -> float:
    """The multiplier of the longest prefix that matches (1 where none does)."""
    matches = [p for p in shape if group_name.startswith(p)]
    return shape[max(matches, key=len)] if matches else 1.0


def decisions(bank: GateBank, graph: ChannelGraph, shape: dict[str, float], scale: float) -> torch.Tensor:
    """Every group keeps its first round(min(1, scale x multiplier) x gates) gates (at least one)."""
    keep = bank.fixed_on.clone()
    groups = torch.tensor(bank.layout.gate_group)
    for group in graph.groups:
        members = (groups == group.index).nonzero().flatten()  # most important first (make_layout)
        fraction = min(1.0, scale * multiplier(group.name, shape))
        keep[members[: max(1, round(fraction * len(members)))]] = True
    return keep


def fit(bank: GateBank, graph: ChannelGraph, shape: dict[str, float], target: float, total: float) -> Any:
    """The largest scale whose decisions keep at most `target` of the whole model's MACs."""
    mac = MacModel(graph)

    def fraction(scale: float) -> float:
        kept = float(mac(bank.unit_activity(decisions(bank, graph, shape, scale)))[0])
        return (total - float(mac.gateable_macs) + kept) / total

    lo, hi = 0.0, 1.0 / max(1e-9, min(shape.values()))
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fraction(mid) <= target else (lo, mid)
    return decisions(bank, graph, shape, lo), lo


def run_one(model, spec, loaders, name, shape, target, seed, args) -> dict[str, Any]:  # noqa: ANN001
    start = time.perf_counter()
    # min_keep 0.05: only each group's first gate is fixed, so a shape can cut a group below half
    gated = prunekit.gate(copy.deepcopy(model), spec=spec, config=GateConfig(granularity=8, min_keep=0.05))
    bank = get_gates(gated.model)
    assert bank is not None
    example = spec.example_input(1)
    total = count_macs(model, example).total_macs
    chosen, scale = fit(bank, gated.graph, shape, target, total)
    bank.fix_(chosen)
    final = prunekit.slim(gated).model  # exact: checked against the gated model by slim()
    device = torch.device("cpu")
    probe = copy.deepcopy(final)
    recalibrate_batchnorm(probe, loaders.train, device, args.recalibrate_batches)
    before = evaluate(probe, loaders.val, device, max_batches=args.eval_batches).top1
    torch.manual_seed(seed)
    loaders.train.generator.manual_seed(seed)  # the data order and augmentation, as peers.py
    peers.plain_finetune(final, model, loaders, args, args.distill, args.epochs)
    return {
        "shape": name,
        "multipliers": shape,
        "scale": scale,
        "target": target,
        "epochs": args.epochs,
        "seed": seed,
        "distill": args.distill,
        "top1_before_finetune": before,
        "top1": evaluate(final, loaders.val, device, max_batches=args.eval_batches).top1,
        "macs": count_macs(final, example).total_macs / total,
        "params": sum(p.numel() for p in final.parameters()),
        "seconds": time.perf_counter() - start,
        "widths": {n: m.out_channels for n, m in final.named_modules() if isinstance(m, torch.nn.Conv2d)},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="/tmp/cifar10")
    ap.add_argument("--weights", default=str(peers.WEIGHTS), help="state_dict file, or none (smoke runs)")
    ap.add_argument("--target", type=float, default=0.5)
    ap.add_argument("--shape", action="append", default=[], help="NAME=PREFIX:MULT,... (repeatable)")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--distill", type=float, default=0.7)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--recalibrate-batches", type=int, default=20)
    ap.add_argument("--max-steps-per-epoch", type=int, default=None)
    ap.add_argument("--eval-batches", type=int, default=None)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/allocations.json"))
    args = ap.parse_args(argv)
    shapes = [parse_shape(s) for s in args.shape] or [("uniform", {"layer1": 1.0})]
    model, spec, loaders = peers.fixture(args)
    command = "python benchmarks/allocations.py " + " ".join(sys.argv[1:] if argv is None else argv)
    runs: list[dict[str, Any]] = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for name, shape in shapes:
            runs.append(run_one(model, spec, loaders, name, shape, args.target, seed, args))
            print(json.dumps({k: v for k, v in runs[-1].items() if k != "widths"}), flush=True)
            args.out.write_text(json.dumps({"command": command, "runs": runs}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
