"""The embedded demo: everything offline, on the built-in Fashion-MNIST subset.

Pretrained weights cannot be downloaded offline, so the demo first trains its own small torchvision
classifier (resnet18 at 32 px), saves it as a plain state_dict, and then runs the real pipeline on it
exactly as a user would: gate -> finetune -> slim -> export, with the accuracy gate switched on.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from prunekit.config import FinetuneConfig, GateConfig, ModelSpec, RunConfig, SlimConfig
from prunekit.errors import PrunekitError
from prunekit.fileio import atomic_path
from prunekit.runtime import resolve_device
from prunekit.stages.finetune import FinetuneCallbacks
from prunekit.stages.run import run_dir, run_pipeline
from prunekit.trainer import evaluate

DEMO_ARCH = "resnet18"
DEMO_INPUT_SHAPE = (3, 32, 32)


def pretrain(
    out: Path,
    *,
    epochs: int = 4,
    batch_size: int = 128,
    lr: float = 0.05,
    seed: int = 0,
    device: str = "auto",
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train resnet18 from scratch on the built-in data; save its state_dict to `out`."""
    from prunekit.data import resolve_data
    from prunekit.models import IMAGENET_MEAN, IMAGENET_STD, build_model

    torch.manual_seed(seed)
    dev = resolve_device(device)
    # the pipeline normalises a local weights file with ImageNet statistics: train with the same
    loaders = resolve_data(
        "builtin",
        input_shape=DEMO_INPUT_SHAPE,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        batch_size=batch_size,
        seed=seed,
    )
    model = build_model(DEMO_ARCH, loaders.num_classes).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps = epochs * len(loaders.train)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.25)
    for epoch in range(1, epochs + 1):
        model.train()
        for x, y in loaders.train:
            x, y = x.to(dev), y.to(dev)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        val = evaluate(model, loaders.val, dev)
        if on_epoch:
            on_epoch({"epoch": epoch, "val_acc": val.top1, "val_top5": val.top5})
    with atomic_path(out) as tmp:
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, tmp)
    return {"weights": str(out), "val_acc": val.top1, "val_top5": val.top5, "epochs": epochs}


def demo_config(weights: Path, *, finetune_epochs: int = 3, max_accuracy_drop: float = 2.0) -> RunConfig:
    return RunConfig(
        model=ModelSpec(DEMO_ARCH, weights=str(weights), num_classes=10, input_shape=DEMO_INPUT_SHAPE),
        data="builtin",
        finetune=FinetuneConfig(target_macs=0.5, epochs=finetune_epochs, batch_size=128, lr=0.02, workers=0),
        gates=GateConfig(granularity=8),
        slim=SlimConfig(export="onnx", latency=True, threads=2),
        max_accuracy_drop=max_accuracy_drop,
    )


def run_demo(
    out_dir: Path,
    *,
    pretrain_epochs: int = 8,
    finetune_epochs: int = 3,
    on_pretrain: Callable[[dict[str, Any]], None] | None = None,
    callbacks: FinetuneCallbacks | None = None,
    on_stage: Callable[[str, Any], None] | None = None,
) -> dict[str, Any]:
    out_dir = Path(out_dir)
    run_dir(out_dir)  # a file in the way, or an unwritable place, stops the demo before it trains
    weights = out_dir / "pretrained.pth"
    pre = pretrain(weights, epochs=pretrain_epochs, on_epoch=on_pretrain)
    try:
        report = run_pipeline(
            demo_config(weights, finetune_epochs=finetune_epochs), out_dir, callbacks, on_stage
        )
    except PrunekitError as err:  # the document of a failed run (exit 3, a stage, Ctrl-C) has it too
        if getattr(err, "report", None) is not None:
            err.report["pretrain"] = pre  # type: ignore[attr-defined]
        raise
    report["pretrain"] = pre
    return report
