"""Training progress on stderr: a rich bar per step on a terminal; off a terminal (or with `CI` set in
the environment, as every CI system sets it), plain lines: one per epoch and a heartbeat every
HEARTBEAT_S seconds with the step, loss, images/s and ETA, so that a CI job that kills silent steps
(CircleCI: 10 minutes) sees output during long epochs. With --json, one JSON line per event,
heartbeats included. The result itself goes to stdout."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from dataclasses import asdict
from typing import Any

from prunekit.cli import render
from prunekit.cli.render import pct, pct_top5

HEARTBEAT_S = 30.0  # seconds between heartbeat lines off a terminal (PRUNEKIT_HEARTBEAT_S overrides)


def in_ci() -> bool:
    """`CI` is set (to anything but false/0), as GitHub Actions, GitLab, CircleCI, Jenkins... set it."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def heartbeat_seconds() -> float:
    try:
        return max(0.0, float(os.environ.get("PRUNEKIT_HEARTBEAT_S", HEARTBEAT_S)))
    except ValueError:
        return HEARTBEAT_S


class Progress:
    def __init__(self, json_lines: bool, quiet: bool = False) -> None:
        self.json_lines = json_lines
        self.quiet = quiet  # the other processes under torchrun: silent unless an error happens
        self.tty = sys.stderr.isatty() and not json_lines and not quiet and not in_ci()
        self.bar: Any = None
        self.task: Any = None
        self.steps = 0
        self.epochs = 0
        self.start_epoch = 0
        self.heartbeat_s = heartbeat_seconds()
        self._t0 = time.monotonic()
        self._done = 0  # steps since start
        self._images = 0
        self.phase = "starting"
        self._stream = sys.stderr  # the watchdog thread writes where this command's lines go
        self._last_output = time.monotonic()
        self._stopped = threading.Event()
        self._watchdog: threading.Thread | None = None

    def _start_watchdog(self) -> None:
        """Off a terminal, a line whenever nothing was printed for `heartbeat_s`, also while no step
        runs (screening the data, evaluating, recalibrating): a silent CI step is never silent long."""
        if self._watchdog is not None or self.tty or self.quiet or self.heartbeat_s < 0.1:
            return
        self._watchdog = threading.Thread(target=self._watch, name="prunekit-heartbeat", daemon=True)
        self._watchdog.start()

    def _watch(self) -> None:
        while not self._stopped.wait(min(5.0, self.heartbeat_s / 2)):
            idle = time.monotonic() - self._last_output
            if idle >= self.heartbeat_s:
                if self.json_lines:
                    self.line(json.dumps({"event": "alive", "phase": self.phase, "idle_s": round(idle, 1)}))
                else:
                    self.line(f"... still {self.phase} ({_clock(idle)} since the last line)")

    def begin(self, command: str, text: str) -> None:
        """The first line, before anything slow (importing torch, loading, evaluating)."""
        if self.json_lines:
            self.line(json.dumps({"event": "begin", "command": command, "message": text}))
        else:
            self.line(f"{command}: {text}")
        self.phase = "loading the model and the data"
        self._start_watchdog()

    def latency_table(self, path: str | None) -> None:
        self.phase = "timing the layers for the latency budget"
        if self.json_lines:
            self.line(json.dumps({"event": "latency_table", "path": path}))
        else:  # the table is saved (to `path`) only once the budget is known to be reachable
            self.line("finetune: timing every gateable layer in onnxruntime for the latency budget ...")

    def baseline(self, images: int) -> None:
        self.phase = "evaluating the baseline"
        if self.json_lines:
            self.line(json.dumps({"event": "baseline", "images": images}))
        else:
            self.line(f"evaluating the baseline on {images} validation images ...")

    def start(self, info: Any) -> None:  # FinetuneStart
        self.steps = int(info.steps_per_epoch)
        self.epochs, self.start_epoch = int(info.epochs), int(info.start_epoch)
        self._t0 = time.monotonic()
        self.phase = "training"
        self._start_watchdog()
        if self.json_lines:
            self.line(json.dumps({"event": "start", **asdict(info)}))
        else:
            self.line(
                f"device {info.device}{' (bf16 autocast)' if info.amp else ''}; "
                f"target {info.target_macs:g} of the {'MACs' if info.budget == 'macs' else 'latency'} "
                f"(t = {info.t:.3f} of the gateable "
                f"{info.gateable_fraction:.3f}); baseline val acc "
                f"{pct_top5(info.baseline_val_acc, info.baseline_val_top5)}"
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
        self._done += 1
        epoch = int(s.get("epoch", 0))
        done = int(s["step"]) >= self.steps
        self.phase = f"evaluating epoch {epoch}" if done else f"training epoch {epoch}"
        self._images += int(s.get("images", 0))
        if self.bar is not None:
            state = "decided" if s["decided"] else f"B {s['b']:.3f}"
            self.bar.update(self.task, completed=int(s["step"]), info=f"loss {s['loss']:.3f} {state}")
            return
        now = time.monotonic()
        if now - self._last_output >= self.heartbeat_s:  # any line printed resets the clock
            self._heartbeat(s, now - self._t0)

    def _heartbeat(self, s: dict[str, float], elapsed: float) -> None:
        epoch, step = int(s.get("epoch", 0)), int(s["step"])
        total = max(0, (self.epochs - self.start_epoch) * self.steps)
        left = max(0, total - self._done)
        eta = elapsed / max(1, self._done) * left  # includes the evaluations so far, pro rata
        rate = self._images / max(elapsed, 1e-9)
        if self.json_lines:
            row = {"event": "heartbeat", "epoch": epoch, "step": step, "steps": self.steps, "loss": s["loss"]}
            self.line(json.dumps(row | {"images_per_s": rate, "eta_s": eta, "decided": bool(s["decided"])}))
            return
        state = " decided" if s["decided"] else f" B {s['b']:.3f}"
        self.line(
            f"epoch {epoch} step {step}/{self.steps}: loss {s['loss']:.4f}{state}, {rate:.0f} img/s, "
            f"ETA {_clock(eta)}"
        )

    def epoch(self, m: Any) -> None:  # EpochMetrics
        if self.bar is not None:
            self.bar.reset(self.task, description=f"epoch {m.epoch + 1}")
        if self.json_lines:
            self.line(json.dumps(render.to_jsonable({"event": "epoch", **m.to_dict()})))
        else:
            self.line(
                f"epoch {m.epoch}: loss {m.loss:.4f} (ce {m.ce:.4f}, act {m.act_loss:.4f}) "
                f"train {pct(m.train_acc)} "
                f"val {pct_top5(m.val_acc, m.val_top5)} MACs {m.macs_fraction:.3f}"
                + (
                    ""
                    if m.macs_per_example is None
                    else " per example (p50 {p50:.3f}, p95 {p95:.3f})".format(**m.macs_per_example)
                )
                + ("" if m.latency_fraction is None else f" latency {m.latency_fraction:.3f} (table)")
                + f"{' decided' if m.decided else ''} "
                f"[{m.seconds:.0f}s, {m.images_per_s:.0f} img/s]"
            )

    def event(self, name: str, **fields: Any) -> None:
        """A one-off line: `stage gate: done`, a pretraining epoch, ..."""
        if self.json_lines:
            self.line(json.dumps({"event": name, **fields}))
        elif name == "stage":
            self.line(f"stage {fields['stage']}: done")
        elif name == "pretrain":
            self.line(
                f"pretrain epoch {fields['epoch']}: val {pct_top5(fields['val_acc'], fields.get('val_top5'))}"
            )

    def stop(self) -> None:
        self._stopped.set()
        if self.bar is not None:
            self.bar.stop()

    def line(self, text: str) -> None:
        if self.quiet:
            return
        self._last_output = time.monotonic()
        if self.bar is not None:
            self.bar.console.print(text)
        else:
            print(text, file=self._stream, flush=True)

    def callbacks(self) -> Any:
        from prunekit.stages.finetune import FinetuneCallbacks

        return FinetuneCallbacks(
            on_start=self.start,
            on_step=self.step,
            on_epoch=self.epoch,
            on_baseline=self.baseline,
            on_latency_table=self.latency_table,
        )


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"
