"""Conditional computation against static pruning: accuracy at equal mean MACs, and onnxruntime latency
per example at batch 1 (dense original, static slim, dynamic), measured side by side in one run.

    python benchmarks/dynamic.py --data /tmp/cifar10 --seeds 0,1 --out benchmarks/results/dynamic.json \
        --plot docs/benchmarks-dynamic.png

Both methods get the same recipe (prunekit's defaults: epochs, SGD lr, distillation, decision point);
the only difference is `gate --dynamic`. Latency: every model is exported to ONNX and timed by
onnxruntime on the CPU, one thread, batch 1, the same validation images in turn, the three models
interleaved round by round; the mean over rounds is reported, and for the dynamic model every
example's time beside the MACs it used (the scatter plot).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from peers import WEIGHTS, fixture  # the accuracy benchmark's fixture (this folder)

import prunekit
from prunekit.config import FinetuneConfig, GateConfig
from prunekit.dynamic_slim import dynamic_inference_model, verify_dynamic
from prunekit.gates import ungated_copy
from prunekit.graph import analyze
from prunekit.measure import count_macs
from prunekit.objective import MacModel
from prunekit.trainer import evaluate


def add_recipe_arguments(ap: argparse.ArgumentParser) -> None:
    """The fixture and recipe options of this benchmark and of dynamic_diagnostic.py (what
    `fixture` and `finetune_config` read)."""
    ap.add_argument("--data", default="/tmp/cifar10")
    ap.add_argument("--weights", default=str(WEIGHTS), help="state_dict file, or none (random: smoke runs)")
    ap.add_argument("--target", type=float, default=0.5)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--distill", type=float, default=0.7)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--max-steps-per-epoch", type=int, default=None, help="cap steps per epoch (smoke runs)")


def finetune_config(args: argparse.Namespace, seed: int) -> FinetuneConfig:
    """The one recipe every method of this benchmark (and of dynamic_diagnostic.py) fine-tunes with."""
    return FinetuneConfig(
        target_macs=args.target,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        distill=args.distill,
        seed=seed,
        workers=args.workers,
        max_steps_per_epoch=args.max_steps_per_epoch,
    )


def train(model, spec, loaders, dynamic: bool, seed: int, args: argparse.Namespace) -> Any:  # noqa: ANN001
    torch.manual_seed(seed)
    gated = prunekit.gate(copy.deepcopy(model), spec=spec, config=GateConfig(dynamic=dynamic))
    return prunekit.finetune(gated, loaders.train, loaders.val, config=finetune_config(args, seed))


def example_fractions(tuned: Any, xs: list[torch.Tensor]) -> list[float]:
    """The whole model's MACs fraction each example uses (dynamic gates), one at a time, counted by the
    channel graph at the examples' own size (the same units: the graph's numbering does not depend on it)."""
    model = tuned.checkpoint.model.eval()
    plain = ungated_copy(model).eval()
    graph = analyze(plain, xs[0])
    total = count_macs(plain, xs[0]).total_macs
    mac_model = MacModel(graph)
    out = []
    with torch.no_grad():
        for x in xs:
            model(x)
            kept = float(mac_model(model.prunekit_gates.current)[0])
            out.append((total - mac_model.gateable_macs + kept) / total)
    return out


@torch.no_grad()
def decision_study(tuned: Any, val: Any) -> dict[str, Any]:
    """How input-dependent the learned decisions are, and what they are worth: each learnable gate's
    on-frequency over the validation images, and the accuracy of the same weights with every example
    given one static choice instead (the gates most often on, as many as fit the dynamic model's mean
    MACs: its "majority" static model). If that static choice is as accurate, the per-example
    decisions add nothing on this budget; if it is less accurate, they are what the weights learned to
    use."""
    model = copy.deepcopy(tuned.checkpoint.model).eval()
    bank = model.prunekit_gates
    mac_model = MacModel(tuned.checkpoint.graph)
    example = next(iter(val))[0][:1]
    total = count_macs(ungated_copy(model).eval(), example).total_macs
    fixed_part = total - mac_model.gateable_macs

    def fraction(activity: torch.Tensor) -> torch.Tensor:
        return (fixed_part + mac_model(activity)) / total

    states, fractions = [], []
    for x, _ in val:
        model(x)
        states.append(bank.current_gates.expand(x.shape[0], -1).clone())
        fractions.append(fraction(bank.current))
    on = torch.cat(states)  # (N, G)
    learnable = ~bank.fixed_on
    freq = on.mean(0)[learnable]
    dynamic_mean = float(torch.cat(fractions).mean())
    # the majority static model: the most frequent gates, as many as fit the dynamic mean MACs
    order = torch.argsort(on.mean(0).masked_fill(~learnable, 2.0), descending=True)
    chosen = bank.fixed_on.clone()
    for g in order.tolist():
        if chosen[g]:
            continue
        trial = chosen.clone()
        trial[g] = True
        if float(fraction(bank.unit_values(trial.float()[None]))[0]) > dynamic_mean:
            continue  # too expensive: a cheaper, less frequent gate may still fit
        chosen = trial
    static_macs = float(fraction(bank.unit_values(chosen.float()[None]))[0])
    bank.fixed_on.copy_(chosen)
    bank.offset.fill_(-1e9)  # every learnable gate off unless chosen above
    static_top1 = evaluate(model, val, torch.device("cpu")).top1
    return {
        "learnable_gates": int(learnable.sum()),
        "always_on": float((freq >= 0.99).float().mean()),
        "always_off": float((freq <= 0.01).float().mean()),
        "input_dependent": float(((freq > 0.01) & (freq < 0.99)).float().mean()),
        "on_frequency_quartiles": torch.quantile(freq, torch.tensor([0.25, 0.5, 0.75])).tolist(),
        "dynamic_mean_macs": dynamic_mean,
        "majority_static_top1": static_top1,
        "majority_static_macs": static_macs,
    }


def onnx_session(model: torch.nn.Module, x: torch.Tensor, path: Path) -> Any:
    import onnxruntime as ort

    torch.onnx.export(
        model, (x,), str(path), dynamo=False, opset_version=17, input_names=["input"], output_names=["logits"]
    )
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def latency(models: dict[str, torch.nn.Module], xs: list[torch.Tensor], rounds: int) -> dict[str, Any]:
    """Per model and per example, the mean onnxruntime time (ms) over interleaved rounds."""
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {k: onnx_session(m, xs[0], Path(tmp) / f"{k}.onnx") for k, m in models.items()}
        feeds = [x.numpy() for x in xs]
        times = {k: np.zeros((rounds, len(xs))) for k in sessions}
        for s in sessions.values():  # warm-up
            for f in feeds[:5]:
                s.run(None, {"input": f})
        for r in range(rounds):
            for k, s in sessions.items():
                for i, f in enumerate(feeds):
                    t = time.perf_counter()
                    s.run(None, {"input": f})
                    times[k][r, i] = (time.perf_counter() - t) * 1e3
    return {
        k: {
            "mean_ms": float(t.mean()),
            "round_means_ms": t.mean(1).tolist(),
            "per_example_ms": t.mean(0).tolist(),
        }
        for k, t in times.items()
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_recipe_arguments(ap)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--latency-examples", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--latency-sizes", default="32,224", help="input sizes to time at batch 1")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None)
    args = ap.parse_args(argv)
    model, spec, loaders = fixture(args)
    total = count_macs(model, spec.example_input(1)).total_macs
    xs: list[torch.Tensor] = []  # single validation images, batch 1
    for x, _ in loaders.val:
        xs.extend(x[i : i + 1] for i in range(x.shape[0]))
        if len(xs) >= args.latency_examples:
            break
    xs = xs[: args.latency_examples]
    runs = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        static = train(model, spec, loaders, False, seed, args)
        slim = prunekit.slim(static).model
        dyn = train(model, spec, loaders, True, seed, args)
        dyn_model = dynamic_inference_model(dyn.checkpoint.model, dyn.checkpoint.graph)
        check = verify_dynamic(dyn.checkpoint.model.eval(), dyn_model, torch.cat(xs[:8]))
        last = dyn.history[-1]
        row = {
            "seed": seed,
            "static_top1": evaluate(slim, loaders.val, torch.device("cpu")).top1,
            "static_macs": count_macs(slim, spec.example_input(1)).total_macs / total,
            "dynamic_top1": evaluate(dyn_model, loaders.val, torch.device("cpu")).top1,
            "dynamic_macs": last["macs_per_example"],
            "dynamic_check": check,
        }
        row["decisions"] = decision_study(dyn, loaders.val)
        dm = row["dynamic_macs"]
        print(
            f"seed {seed}: static {row['static_top1']:.4f} at {row['static_macs']:.3f} MACs; dynamic "
            f"{row['dynamic_top1']:.4f} at mean {dm['mean']:.3f} (p50 {dm['p50']:.3f}, p95 {dm['p95']:.3f}, "
            f"gate nets {dm['gate_nets']:.4f})",
            flush=True,
        )
        d = row["decisions"]
        print(
            f"  decisions: {d['input_dependent']:.0%} of {d['learnable_gates']} learnable gates "
            f"input-dependent ({d['always_on']:.0%} always on, {d['always_off']:.0%} always off); "
            f"majority static model {d['majority_static_top1']:.4f} at {d['majority_static_macs']:.3f} MACs",
            flush=True,
        )
        row["latency"] = {}
        for size in [int(v) for v in args.latency_sizes.split(",")]:
            # the same images, resized: the networks are convolutional, the decisions are made again
            sized = [F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False) for x in xs]
            fractions = example_fractions(dyn, sized)
            timed = latency(
                {"dense": ungated_copy(model).eval(), "static": slim, "dynamic": dyn_model},
                sized,
                args.rounds,
            )
            ms = {k: v["mean_ms"] for k, v in timed.items()}
            cell = {
                "ms": ms,
                "round_means_ms": {k: v["round_means_ms"] for k, v in timed.items()},
                "dynamic_mean_macs": statistics.mean(fractions),
                "dynamic_speedup": ms["dense"] / ms["dynamic"],
                "dynamic_mac_reduction": 1 / statistics.mean(fractions),
                "static_speedup": ms["dense"] / ms["static"],
                "scatter": {"macs_fraction": fractions, "ms": timed["dynamic"]["per_example_ms"]},
            }
            # the goal: speedup >= 0.6 x the MAC reduction (both as ratios dense / dynamic)
            cell["speedup_over_reduction"] = cell["dynamic_speedup"] / cell["dynamic_mac_reduction"]
            row["latency"][str(size)] = cell
            print(
                f"  {size}px batch 1: dense {ms['dense']:.3f} ms, static {ms['static']:.3f}, dynamic "
                f"{ms['dynamic']:.3f} (mean MACs {cell['dynamic_mean_macs']:.3f}): dynamic speedup "
                f"{cell['dynamic_speedup']:.2f}x for x{cell['dynamic_mac_reduction']:.2f} fewer MACs "
                f"(ratio {cell['speedup_over_reduction']:.2f})",
                flush=True,
            )
        runs.append(row)
    doc = {
        "command": "python benchmarks/dynamic.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "torch": torch.__version__,
        "target": args.target,
        "epochs": args.epochs,
        "runs": runs,
        "mean": {
            k: statistics.mean(r[k] for r in runs) for k in ("static_top1", "static_macs", "dynamic_top1")
        },
    }
    doc["mean"]["dynamic_macs_mean"] = statistics.mean(r["dynamic_macs"]["mean"] for r in runs)
    for size in runs[0]["latency"]:
        cells = [r["latency"][size] for r in runs]
        doc["mean"][f"latency_{size}px"] = {
            k: statistics.mean(c[k] for c in cells)
            for k in ("dynamic_speedup", "dynamic_mac_reduction", "speedup_over_reduction", "static_speedup")
        } | {f"{m}_ms": statistics.mean(c["ms"][m] for c in cells) for m in ("dense", "static", "dynamic")}
    if args.out is not None:
        args.out.write_text(json.dumps(doc, indent=1) + "\n")
    if args.plot is not None:
        scatter(runs, args.plot)
    return 0


def scatter(runs: list[dict[str, Any]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    sizes = list(runs[0]["latency"])
    fig, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 3.5), squeeze=False)
    for ax, size in zip(axes[0], sizes, strict=True):
        for r in runs:
            cell = r["latency"][size]
            ax.scatter(
                cell["scatter"]["macs_fraction"], cell["scatter"]["ms"], s=8, label=f"seed {r['seed']}"
            )
            ax.axhline(cell["ms"]["dense"], color="gray", ls="--", lw=1)
            ax.axhline(cell["ms"]["static"], color="tab:orange", ls=":", lw=1)
        ax.set_xlabel("MACs the example used (fraction of the original)")
        ax.set_ylabel("onnxruntime ms, batch 1, 1 thread")
        ax.set_title(f"{size} px: dense (dashed), static slim (dotted), dynamic (points)", fontsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


if __name__ == "__main__":
    sys.exit(main())
