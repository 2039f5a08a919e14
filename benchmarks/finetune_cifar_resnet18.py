"""Benchmark (issue: gates + finetune): prune the CIFAR-10 (JPEG copy) resnet18 to a MACs target.

Fine-tunes the pretrained torchvision resnet18 from ../shared/data/cifar10-resnet18 (81.83% top-1) with
prunekit's gates for a few epochs, slims it, and reports per-epoch validation accuracy and MACs, the
slimmed model's accuracy and fvcore MACs, and the per-step overhead of the gates (gated vs ungated,
interleaved in one run). Needs the unpacked data set:

    mkdir -p /tmp/cifar10 && tar xzf ../shared/data/cifar10-jpg.tar.gz -C /tmp/cifar10
    .venv/bin/python benchmarks/finetune_cifar_resnet18.py --data /tmp/cifar10 \
        --out benchmarks/results/cifar_resnet18.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from prunekit.checkpoint import load_checkpoint
from prunekit.config import FinetuneConfig, GateConfig, ModelSpec, SlimConfig
from prunekit.gates import remove_gates_
from prunekit.stages.finetune import FinetuneCallbacks, finetune_stage
from prunekit.stages.gate import gate_stage
from prunekit.stages.slim import slim_stage

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
WEIGHTS = Path(__file__).resolve().parents[2] / "shared/data/cifar10-resnet18/resnet18_cifar10jpg.pth"


def step_overhead(gated_path: Path, batch: int, steps: int) -> dict[str, float]:
    """Seconds per training step (forward + backward + SGD), gated vs ungated, interleaved."""
    ckpt = load_checkpoint(gated_path)
    gated = ckpt.model.train()
    plain = copy.deepcopy(gated)
    remove_gates_(plain)
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    times: dict[str, list[float]] = {"gated": [], "ungated": []}
    opts = {k: torch.optim.SGD(m.parameters(), lr=1e-6) for k, m in (("gated", gated), ("ungated", plain))}
    for i in range(2 * steps + 4):
        name, model = (("gated", gated), ("ungated", plain))[i % 2]
        t = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        opts[name].zero_grad()
        loss.backward()
        opts[name].step()
        if i >= 4:
            times[name].append(time.perf_counter() - t)
    g, u = statistics.median(times["gated"]), statistics.median(times["ungated"])
    return {
        "gated_s": g,
        "ungated_s": u,
        "ratio": g / u,
        "batch": batch,
        "steps": steps,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="/tmp/cifar10")
    ap.add_argument("--weights", default=str(WEIGHTS))
    ap.add_argument("--target", type=float, default=0.5)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--lam", type=float, default=5.0)
    ap.add_argument("--decide-at", type=float, default=0.2)
    ap.add_argument("--distill", type=float, default=0.7)
    ap.add_argument("--min-keep", type=float, default=0.5)
    ap.add_argument("--granularity", type=int, default=8)
    ap.add_argument("--max-steps-per-epoch", type=int, default=None)
    ap.add_argument("--workdir", default="/tmp/pk-bench")
    ap.add_argument("--out", default="benchmarks/results/cifar_resnet18.json")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    spec = ModelSpec(
        "resnet18",
        weights=args.weights,
        num_classes=10,
        input_shape=(3, 32, 32),
        mean=CIFAR_MEAN,
        std=CIFAR_STD,
    )
    gate = gate_stage(
        spec, work / "gated.pt", config=GateConfig(granularity=args.granularity, min_keep=args.min_keep)
    ).to_dict()
    overhead = step_overhead(work / "gated.pt", args.batch_size, 10)
    print("step overhead", overhead, flush=True)
    cfg = FinetuneConfig(
        target_macs=args.target,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        lam=args.lam,
        decide_at=args.decide_at,
        distill=args.distill,
        workers=2,
        max_steps_per_epoch=args.max_steps_per_epoch,
    )
    tuned = finetune_stage(
        work / "gated.pt",
        args.data,
        work / "tuned.pt",
        cfg,
        callbacks=FinetuneCallbacks(
            on_start=lambda i: print("start", i, flush=True),
            on_epoch=lambda m: print("epoch", json.dumps(m.to_dict()), flush=True),
        ),
    ).to_dict()
    slim = slim_stage(
        work / "tuned.pt", work / "slim.onnx", SlimConfig(latency=True, threads=2), data=args.data
    ).to_dict()
    result = {
        "command": "python benchmarks/finetune_cifar_resnet18.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None),
        "baseline_val_acc": tuned["baseline_val_acc"],
        "history": tuned["history"],
        "slim_val_acc": slim["accuracy"]["slim"],
        "macs_before": slim["original"]["macs"],
        "macs_after": slim["slim"]["macs"],
        "macs_ratio": slim["macs_ratio"],
        "params_ratio": slim["params_ratio"],
        "latency": slim.get("latency"),
        "widths": slim["widths"],
        "gate_step_overhead": overhead,
        "gates": {k: gate[k] for k in ("groups", "gates", "learnable_gates", "granularity")},
        "seconds": time.time() - t0,
        "torch": torch.__version__,
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("history", "widths")}, indent=1))


if __name__ == "__main__":
    main()
