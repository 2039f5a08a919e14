"""metrics.csv: the training curve of a fine-tune run, one row per interval of steps and one per epoch,
in a file any spreadsheet, pandas or a CI artifact viewer reads.

Rows are appended as training goes (a log, not an atomic output: after a crash it holds what was
done). A resumed run keeps the rows up to the epoch it resumes from and continues after them, so the
file of an interrupted and resumed run has the rows of an uninterrupted one.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Any

from prunekit.errors import WriteError

FIELDS = (
    "kind",  # "steps" (the mean over an interval of steps) or "epoch"
    "epoch",  # 1-based
    "step",  # step within the epoch at the end of the interval (epoch rows: the epoch's steps)
    "global_step",
    "loss",
    "activation_b",  # the batch's gateable MAC fraction B (steps rows)
    "images_per_s",
    "train_acc",  # epoch rows from here on
    "val_acc",  # top-1
    "val_top5",
    "val_loss",
    "macs_fraction",
    "decided",
    "seconds",
)


def metrics_path(out: Path) -> Path:
    """Where `prunekit finetune -o OUT` writes its metrics: `OUT`'s name with `.metrics.csv`."""
    return out.with_name(f"{out.stem}.metrics.csv")


class MetricsLog:
    """Append step-interval and epoch rows to `path`; `every` steps make one interval row."""

    def __init__(self, path: Path, every: int, resume_epoch: int | None = None) -> None:
        self.path, self.every = Path(path), max(1, every)
        self._rows: list[dict[str, Any]] = []
        self._global = 0
        kept = self._kept(resume_epoch) if resume_epoch is not None else []
        try:
            with open(self.path, "w", newline="") as f:
                writer = csv.DictWriter(f, FIELDS)
                writer.writeheader()
                writer.writerows(kept)
        except OSError as exc:
            raise WriteError(f"cannot write {self.path}: {exc.strerror or exc}") from exc
        if kept:
            self._global = max(int(r["global_step"] or 0) for r in kept)
        self._t0 = time.perf_counter()

    def _kept(self, epoch: int) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        with open(self.path, newline="") as f:
            return [r for r in csv.DictReader(f) if r.get("epoch") and int(r["epoch"]) <= epoch]

    def on_step(self, row: dict[str, float]) -> None:
        self._global += 1
        self._rows.append(row)
        if len(self._rows) >= self.every:
            self._flush_steps()

    def _flush_steps(self) -> None:
        if not self._rows:
            return
        rows, self._rows = self._rows, []
        seconds = time.perf_counter() - self._t0
        self._t0 = time.perf_counter()
        images = sum(r.get("images", 0) for r in rows)
        last = rows[-1]
        self._append(
            {
                "kind": "steps",
                "epoch": int(last.get("epoch", 0)),
                "step": int(last["step"]),
                "global_step": self._global,
                "loss": sum(r["loss"] for r in rows) / len(rows),
                "activation_b": sum(r["b"] for r in rows) / len(rows),
                "images_per_s": images / max(seconds, 1e-9),
                "decided": bool(last["decided"]),
                "seconds": seconds,
            }
        )

    def on_epoch(self, m: Any) -> None:  # EpochMetrics
        self._flush_steps()
        self._append(
            {
                "kind": "epoch",
                "epoch": m.epoch,
                "global_step": self._global,
                "loss": m.loss,
                "images_per_s": m.images_per_s,
                "train_acc": m.train_acc,
                "val_acc": m.val_acc,
                "val_top5": m.val_top5,
                "val_loss": m.val_loss,
                "macs_fraction": m.macs_fraction,
                "decided": m.decided,
                "seconds": m.seconds,
            }
        )
        self._t0 = time.perf_counter()  # the evaluation is not part of the next interval's speed

    def _append(self, row: dict[str, Any]) -> None:
        try:
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, FIELDS).writerow(row)
        except OSError as exc:
            raise WriteError(f"cannot write {self.path}: {exc.strerror or exc}") from exc


def read_metrics(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


__all__ = ["FIELDS", "MetricsLog", "metrics_path", "read_metrics"]
