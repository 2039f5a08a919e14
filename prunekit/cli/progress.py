"""Training progress on stderr: a rich bar per step on a terminal, one line per epoch otherwise, one
JSON line per event with --json. The result itself goes to stdout."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from typing import Any

from prunekit.cli import render
from prunekit.cli.render import pct


class Progress:
    def __init__(self, json_lines: bool, quiet: bool = False) -> None:
        self.json_lines = json_lines
        self.quiet = quiet  # the other processes under torchrun: silent unless an error happens
        self.tty = sys.stderr.isatty() and not json_lines and not quiet
        self.bar: Any = None
        self.task: Any = None
        self.steps = 0

    def start(self, info: Any) -> None:  # FinetuneStart
        self.steps = int(info.steps_per_epoch)
        if self.json_lines:
            self.line(json.dumps({"event": "start", **asdict(info)}))
        else:
            self.line(
                f"device {info.device}{' (bf16 autocast)' if info.amp else ''}; "
                f"target {info.target_macs:g} of the MACs (t = {info.t:.3f} of the gateable "
                f"{info.gateable_fraction:.3f}); baseline val acc {pct(info.baseline_val_acc)}"
            )
        if self.tty:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as Bar

            self.bar = Bar(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
                console=render.stderr_console(),
                transient=True,
            )
            self.bar.start()
            self.task = self.bar.add_task(f"epoch {info.start_epoch + 1}", total=self.steps, info="")

    def step(self, s: dict[str, float]) -> None:
        if self.bar is not None:
            state = "decided" if s["decided"] else f"B {s['b']:.3f}"
            self.bar.update(self.task, completed=int(s["step"]), info=f"loss {s['loss']:.3f} {state}")

    def epoch(self, m: Any) -> None:  # EpochMetrics
        if self.bar is not None:
            self.bar.reset(self.task, description=f"epoch {m.epoch + 1}")
        if self.json_lines:
            self.line(json.dumps(render.to_jsonable({"event": "epoch", **m.to_dict()})))
        else:
            self.line(
                f"epoch {m.epoch}: loss {m.loss:.4f} (ce {m.ce:.4f}, act {m.act_loss:.4f}) "
                f"train {pct(m.train_acc)} "
                f"val {pct(m.val_acc)} MACs {m.macs_fraction:.3f}{' decided' if m.decided else ''} "
                f"[{m.seconds:.0f}s, {m.images_per_s:.0f} img/s]"
            )

    def event(self, name: str, **fields: Any) -> None:
        """A one-off line: `stage gate: done`, a pretraining epoch, ..."""
        if self.json_lines:
            self.line(json.dumps({"event": name, **fields}))
        elif name == "stage":
            self.line(f"stage {fields['stage']}: done")
        elif name == "pretrain":
            self.line(f"pretrain epoch {fields['epoch']}: val {pct(fields['val_acc'])}")

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()

    def line(self, text: str) -> None:
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.console.print(text)
        else:
            print(text, file=sys.stderr, flush=True)

    def callbacks(self) -> Any:
        from prunekit.stages.finetune import FinetuneCallbacks

        return FinetuneCallbacks(on_start=self.start, on_step=self.step, on_epoch=self.epoch)
