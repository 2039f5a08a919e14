"""`--tensorboard DIR`: the training curve as TensorBoard scalars (the `tensorboard` extra), beside the
progress lines and metrics.csv. Written by torch's own SummaryWriter, one event file per run in DIR."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from prunekit.errors import ConfigError


def check_available() -> None:
    """Fail before any work when the tensorboard package is missing."""
    if importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("--tensorboard needs the tensorboard package: pip install 'prunekit[tensorboard]'")


class TensorboardLog:
    """Scalars per step (train/loss, train/activation_b) and per epoch (val/accuracy (top-1),
    val/accuracy_top5, val/loss, macs/fraction_kept, train/accuracy, train/images_per_s), by global step."""

    def __init__(self, logdir: Path) -> None:
        check_available()
        from torch.utils.tensorboard import SummaryWriter

        try:
            self.writer = SummaryWriter(log_dir=str(logdir))
        except OSError as exc:
            raise ConfigError(f"cannot write TensorBoard logs to {logdir}: {exc.strerror or exc}") from exc
        self.step = 0

    def on_step(self, row: dict[str, float]) -> None:
        self.step += 1
        self.writer.add_scalar("train/loss", row["loss"], self.step)
        self.writer.add_scalar("train/activation_b", row["b"], self.step)

    def on_epoch(self, m: Any) -> None:  # EpochMetrics
        for tag, value in (
            ("val/accuracy", m.val_acc),
            ("val/accuracy_top5", m.val_top5),
            ("val/loss", m.val_loss),
            ("macs/fraction_kept", m.macs_fraction),
            ("train/accuracy", m.train_acc),
            ("train/images_per_s", m.images_per_s),
        ):
            self.writer.add_scalar(tag, value, self.step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

    def callbacks(self) -> Any:
        from prunekit.stages.finetune import FinetuneCallbacks

        return FinetuneCallbacks(on_step=self.on_step, on_epoch=self.on_epoch)


__all__ = ["TensorboardLog", "check_available"]
