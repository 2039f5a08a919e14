"""Fine-tuning throughput after the decision point: prunekit's training loop against a minimal PyTorch
loop on the same pruned model, batch, data loader and augmentation, measured interleaved in one process.

Three loops take turns, `--block` steps each, `--rounds` times, with and without distillation:
- `prunekit`: prunekit's Trainer (what `prunekit finetune` runs) after its gates are decided; it trains
  the slimmed model (prunekit.dense_phase) and keeps the gated model in step;
- `masked`: the same Trainer without the channel graph, so it trains the full-width masked model (what
  prunekit did before the dense phase);
- `plain`: `for x, y in loader: loss(model(x), y).backward(); opt.step()` on the slimmed model, with the
  same SGD, cosine schedule and, when distilling, the same teacher and loss.

    python benchmarks/throughput.py --data /tmp/cifar10 --out benchmarks/results/throughput.json
    python benchmarks/throughput.py --data builtin --weights none --rounds 1 --block 3  # seconds

Images per second are the mean over rounds; the ratio is prunekit / plain.
"""

from __future__ import annotations

import argparse
import copy
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
from peers import WEIGHTS, fixture  # the same fixture as the accuracy benchmark (this folder)
from torch import nn

import prunekit
from prunekit.config import FinetuneConfig, GateConfig
from prunekit.runtime import resolve_runtime
from prunekit.stages.finetune import prepare_finetune
from prunekit.trainer import Trainer, distillation_loss


def batches(loader: Any) -> Any:
    """An endless stream of training batches (a new pass over the loader when one ends)."""
    while True:
        yield from loader


class PlainLoop:
    """The minimal loop a user would write around the pruned model."""

    def __init__(self, model: nn.Module, teacher: nn.Module, distill: float, lr: float, steps: int) -> None:
        self.model, self.teacher, self.distill = model, teacher.eval(), distill
        self.opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=1e-4)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
        )

    def run(self, block: Any) -> None:
        self.model.train()
        for x, y in block:
            logits = self.model(x)
            loss = F.cross_entropy(logits, y)
            if self.distill > 0:
                with torch.no_grad():
                    soft = self.teacher(x)
                loss = (1 - self.distill) * loss + self.distill * distillation_loss(logits, soft)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.sched.step()


def decided_trainers(
    args: argparse.Namespace, fixed: tuple[nn.Module, Any, Any], distill: float
) -> tuple[Trainer, Trainer, PlainLoop, Any]:
    """prunekit's trainer past its decision point, the same without the graph, and the plain loop,
    on a copy of the fixture's model (`fixed`: model, spec, loaders)."""
    model, spec, loaders = fixed
    gated = prunekit.gate(copy.deepcopy(model), spec=spec, config=GateConfig())
    steps = 100 * args.block * args.rounds  # a long schedule: the rate barely moves while measuring
    config = FinetuneConfig(
        target_macs=args.target,
        epochs=1,
        batch_size=args.batch_size,
        decide_at=2 / steps,
        distill=distill,
        device="cpu",
        workers=args.workers,
    )
    session = prepare_finetune(gated.checkpoint, config, steps, runtime=resolve_runtime("cpu"))
    trainer = session.trainer
    stream = batches(loaders.train)
    trainer.train_one_epoch(itertools.islice(stream, 3))  # past the decision: the slimmed model trains
    assert trainer.dense is not None, "the trainer did not switch to the slimmed model"
    masked_model = copy.deepcopy(gated.checkpoint.model)
    bank = prunekit.gates.get_gates(masked_model)
    masked = Trainer(
        masked_model,
        bank,
        copy.deepcopy(trainer.mac_model),
        trainer.budget,
        config,
        steps,
        resolve_runtime("cpu"),
        teacher=session.plain if distill > 0 else None,
    )
    masked.step = trainer.step
    slim = prunekit.slim(session.checkpoint).model
    plain = PlainLoop(slim, session.plain, distill, args.lr, steps)
    return trainer, masked, plain, stream


def measure(args: argparse.Namespace, fixed: tuple[nn.Module, Any, Any], distill: float) -> dict[str, Any]:
    trainer, masked, plain, stream = decided_trainers(args, fixed, distill)
    loops = {
        "prunekit": lambda block: trainer.train_one_epoch(block),
        "masked": lambda block: masked.train_one_epoch(block),
        "plain": plain.run,
    }
    rates: dict[str, list[float]] = {name: [] for name in loops}
    for _ in range(args.rounds):
        for name, run in loops.items():
            block = list(itertools.islice(stream, args.block)) if args.pre_decoded else None
            images = args.block * args.batch_size
            start = time.perf_counter()
            run(block if block is not None else itertools.islice(stream, args.block))
            rates[name].append(images / (time.perf_counter() - start))
    mean = {name: statistics.mean(r) for name, r in rates.items()}
    return {
        "distill": distill,
        "images_per_s_mean": mean,
        "images_per_s_runs": rates,
        "prunekit_over_plain": mean["prunekit"] / mean["plain"],
        "masked_over_plain": mean["masked"] / mean["plain"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="/tmp/cifar10")
    ap.add_argument("--weights", default=str(WEIGHTS), help="state_dict file, or none (random weights)")
    ap.add_argument("--target", type=float, default=0.5)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--block", type=int, default=30, help="steps per turn")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--distill", default="0,0.7")
    ap.add_argument("--pre-decoded", action="store_true", help="time the steps only, batches fetched before")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    fixed = fixture(args)  # decoded once for every setting
    results = [measure(args, fixed, float(d)) for d in args.distill.split(",")]
    doc = {
        "command": "python benchmarks/throughput.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "results": results,
    }
    for r in results:
        m = r["images_per_s_mean"]
        print(
            f"distill {r['distill']:g}: prunekit {m['prunekit']:.0f} img/s, masked {m['masked']:.0f}, "
            f"plain {m['plain']:.0f}; prunekit/plain {r['prunekit_over_plain']:.2f}, "
            f"masked/plain {r['masked_over_plain']:.2f}"
        )
    if args.out is not None:
        args.out.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
