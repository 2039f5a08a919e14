"""Plots of a run, written into its directory when matplotlib is installed (the `bench` extra): the
training curve (validation accuracy and MACs kept per epoch) and the channel widths per group before and
after slimming. matplotlib is optional: without it no plot is written and nothing fails."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from prunekit.fileio import atomic_path

PLOT_FILES = {"plot_training": "training.png", "plot_widths": "widths.png"}


def available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def write_run_plots(
    history: list[dict[str, Any]], widths: list[dict[str, Any]], out_dir: Path
) -> dict[str, str]:
    """Write the run's plots into `out_dir`; returns {files key: path} of those written."""
    if not available():
        return {}
    import matplotlib

    matplotlib.use("Agg", force=False)  # no display; a backend chosen by the user's matplotlibrc stays
    import matplotlib.pyplot as plt

    written: dict[str, str] = {}
    if history:
        fig, acc_axis = plt.subplots(figsize=(6, 3.5), dpi=100)
        epochs = [h["epoch"] for h in history]
        acc_axis.plot(
            epochs, [100 * h["val_acc"] for h in history], "o-", color="tab:blue", label="val top-1"
        )
        acc_axis.set_xlabel("epoch")
        acc_axis.set_ylabel("validation top-1 (%)", color="tab:blue")
        macs_axis = acc_axis.twinx()
        macs_axis.plot(epochs, [h["macs_fraction"] for h in history], "s--", color="tab:red")
        macs_axis.set_ylabel("MACs kept (of the original)", color="tab:red")
        acc_axis.set_xticks(epochs)
        fig.tight_layout()
        written["plot_training"] = _save(fig, out_dir / PLOT_FILES["plot_training"])
        plt.close(fig)
    if widths:
        fig, axis = plt.subplots(figsize=(max(6, 0.35 * len(widths)), 3.5), dpi=100)
        x = range(len(widths))
        axis.bar([i - 0.2 for i in x], [w["before"] for w in widths], width=0.4, label="before", color="0.7")
        axis.bar(
            [i + 0.2 for i in x], [w["after"] for w in widths], width=0.4, label="after", color="tab:green"
        )
        axis.set_xticks(list(x), [str(w["group"]) for w in widths], rotation=90, fontsize=6)
        axis.set_ylabel("channels")
        axis.set_title("channel widths per group")
        axis.legend()
        fig.tight_layout()
        written["plot_widths"] = _save(fig, out_dir / PLOT_FILES["plot_widths"])
        plt.close(fig)
    return written


def write_macs_plot(
    fractions: list[float], labels: list[int], classes: list[str] | None, path: Path
) -> str | None:
    """Dynamic gates: a histogram of the MACs each validation example used, and their mean per class
    (with the 5th-95th percentile range). None without matplotlib."""
    if not available() or not fractions:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    f = np.asarray(fractions)
    y = np.asarray(labels)
    fig, (hist, per_class) = plt.subplots(1, 2, figsize=(9, 3.5), dpi=100)
    hist.hist(f, bins=30, color="tab:purple")
    hist.axvline(f.mean(), color="k", ls="--", lw=1, label=f"mean {f.mean():.3f}")
    hist.set_xlabel("MACs used (fraction of the original)")
    hist.set_ylabel("examples")
    hist.legend(fontsize=8)
    present = sorted(set(y.tolist()))
    means = [f[y == c].mean() for c in present]
    lo = [means[i] - np.percentile(f[y == c], 5) for i, c in enumerate(present)]
    hi = [np.percentile(f[y == c], 95) - means[i] for i, c in enumerate(present)]
    per_class.bar(range(len(present)), means, yerr=[lo, hi], color="tab:purple", capsize=2)
    names = [classes[c] if classes and c < len(classes) else str(c) for c in present]
    per_class.set_xticks(range(len(present)), names, rotation=90, fontsize=6)
    per_class.set_ylabel("mean MACs (p5-p95)")
    per_class.set_title("per class", fontsize=9)
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out


def _save(fig: Any, path: Path) -> str:
    with atomic_path(path, suffix=".tmp.png") as tmp:
        fig.savefig(tmp, format="png")
    return str(path)


__all__ = ["PLOT_FILES", "available", "write_macs_plot", "write_run_plots"]
