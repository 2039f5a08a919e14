"""Benchmark (issue 13, the shipping hand-off): FP32 / INT8 / FP16 accuracy and latency, and the
latency budget against the latency it asked for.

Everything runs through the installed `prunekit` command, so the numbers are what a user gets, and
each command is recorded in the results next to its output.

* `quantize`: on the CIFAR-10 resnet18 fixture (../shared/data/cifar10-resnet18, the JPEG copy
  unpacked in --cifar), gate -> finetune (--target-macs 0.5, a short budget) -> slim --quantize
  int8,fp16 --latency on the 10,000 test images: top-1 of FP32 / INT8 / FP16, their agreement with
  FP32, file sizes and onnxruntime latency at batch 1 (interleaved). The same on the built-in data with
  the demo's resnet18 when --builtin-checkpoint names its tuned.pt.
* `latency`: resnet18 and mobilenet_v2 at 224 px (random weights: latency does not depend on them),
  gate -> finetune --target-latency T (a few steps on the built-in data, enough to decide the gates)
  -> slim --latency: the measured slim/original latency ratio against T.

    .venv/bin/python benchmarks/shipping.py quantize --cifar /tmp/cifar10
    .venv/bin/python benchmarks/shipping.py latency --models resnet18,mobilenet_v2 --target 0.5

Results: benchmarks/results/shipping_<part>.json.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
EXE = Path(sys.executable).parent / "prunekit"
FIXTURE = ROOT.parent / "shared" / "data" / "cifar10-resnet18" / "resnet18_cifar10jpg.pth"
RESULTS = ROOT / "benchmarks" / "results"


def cli(*args: Any, cwd: Path, log: list[dict[str, Any]]) -> dict[str, Any]:
    argv = [str(EXE), *map(str, args), "--json"]
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=cwd)
    seconds = time.perf_counter() - start
    log.append({"command": "prunekit " + shlex.join(map(str, args)), "seconds": round(seconds, 1)})
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {log[-1]['command']}\n{proc.stderr[-2000:]}")
    # finetune --json streams one event per line before its document
    return json.loads("\n".join(line for line in proc.stdout.splitlines() if not line.startswith('{"event"')))


def shipping_row(slim: dict[str, Any]) -> dict[str, Any]:
    models = slim["latency"]["models"]
    row: dict[str, Any] = {
        "macs": {"original": slim["original"]["macs"], "slim": slim["slim"]["macs"]},
        "fp32_top1": slim["quantized"]["int8"]["accuracy"]["fp32_top1"],
        "examples": slim["quantized"]["int8"]["accuracy"]["examples"],
        "latency_ms": {name: m["median_ms"] for name, m in models.items()},
        "size_mib": {name: round(m["size_bytes"] / 2**20, 2) for name, m in models.items()},
    }
    for mode, q in slim["quantized"].items():
        row[mode] = {k: q["accuracy"][k] for k in ("top1", "drop_points", "agreement")}
    return row


def quantize(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    log: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="prunekit-ship-") as tmp:
        d = Path(tmp)
        if args.cifar:
            cli(
                "gate",
                "resnet18",
                "--weights",
                FIXTURE,
                "--num-classes",
                "10",
                "--input-shape",
                "32",
                "-o",
                "gated.pt",
                cwd=d,
                log=log,
            )
            cli(
                "finetune",
                "gated.pt",
                "--data",
                args.cifar,
                "--target-macs",
                "0.5",
                "--epochs",
                "1",
                "--max-steps-per-epoch",
                str(args.steps),
                "--batch-size",
                "128",
                "--workers",
                "2",
                "-o",
                "tuned.pt",
                cwd=d,
                log=log,
            )
            slim = cli(
                "slim",
                "tuned.pt",
                "-o",
                "model.onnx",
                "--quantize",
                "int8,fp16",
                "--data",
                args.cifar,
                "--latency",
                cwd=d,
                log=log,
            )
            results["cifar10_resnet18"] = shipping_row(slim)
        if args.builtin_checkpoint:
            slim = cli(
                "slim",
                Path(args.builtin_checkpoint).resolve(),
                "-o",
                "builtin.onnx",
                "--checkpoint",
                "builtin.pt",
                "--quantize",
                "int8,fp16",
                "--data",
                "builtin",
                "--latency",
                cwd=d,
                log=log,
            )
            results["builtin_demo_resnet18"] = shipping_row(slim)
    return {"results": results, "commands": log}


def latency(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    log: list[dict[str, Any]] = []
    for arch in args.models.split(","):
        with tempfile.TemporaryDirectory(prefix="prunekit-lat-") as tmp:
            d = Path(tmp)
            cli(
                "gate",
                arch,
                "--num-classes",
                "10",
                "--input-shape",
                str(args.size),
                "--min-keep",
                str(args.min_keep),
                "-o",
                "gated.pt",
                cwd=d,
                log=log,
            )
            tuned = cli(
                "finetune",
                "gated.pt",
                "--data",
                "builtin",
                "--target-latency",
                str(args.target),
                "--epochs",
                "1",
                "--max-steps-per-epoch",
                str(args.steps),
                "--batch-size",
                "16",
                "--decide-at",
                "0.5",
                "--distill",
                "0",
                "--workers",
                "0",
                "-o",
                "tuned.pt",
                cwd=d,
                log=log,
            )
            # the machine is shared and noisy: the slim/original ratio is measured several times (each
            # time interleaved) and its mean reported
            runs = []
            for i in range(args.repeats):
                argv = ("slim", "tuned.pt", "-o", f"m{i}.onnx", "--checkpoint", f"s{i}.pt", "--latency")
                runs.append(cli(*argv, cwd=d, log=log)["latency"])
            ratios = [r["ratio"] for r in runs]
            mean = statistics.mean(ratios)
            results[arch] = {
                "target": args.target,
                "table_full_ms": tuned["target_latency"]["original_ms"],
                "predicted_fraction": tuned["final"]["latency_fraction"],
                "macs_fraction": tuned["final"]["macs_fraction"],
                "measured_fractions": ratios,
                "measured_fraction_mean": mean,
                "measured_fraction_spread": [min(ratios), max(ratios)],
                "measured_original_ms": [r["original_ms"] for r in runs],
                "measured_slim_ms": [r["slim_ms"] for r in runs],
                "error_vs_target": mean / args.target - 1.0,
            }
            print(arch, json.dumps(results[arch]), flush=True)
    return {"results": results, "commands": log, "size": args.size}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="part", required=True)
    q = sub.add_parser("quantize")
    q.add_argument("--cifar", help="the unpacked CIFAR-10 JPEG copy (train/ + test/)")
    q.add_argument("--builtin-checkpoint", help="a tuned.pt fine-tuned on the built-in data (prunekit demo)")
    q.add_argument("--steps", type=int, default=100, help="fine-tune steps (one epoch, capped)")
    lat = sub.add_parser("latency")
    lat.add_argument("--models", default="resnet18,mobilenet_v2")
    lat.add_argument("--target", type=float, default=0.5)
    lat.add_argument("--size", type=int, default=224)
    lat.add_argument("--steps", type=int, default=16)
    lat.add_argument("--min-keep", type=float, default=0.25)
    lat.add_argument("--repeats", type=int, default=3, help="slim --latency measurements per model")
    args = parser.parse_args()
    out = quantize(args) if args.part == "quantize" else latency(args)
    out |= {"argv": sys.argv[1:], "date": time.strftime("%Y-%m-%d")}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"shipping_{args.part}.json"
    if path.is_file():  # one part at a time (CIFAR, built-in): earlier results of other cases stay
        before = json.loads(path.read_text())
        out["results"] = before.get("results", {}) | out["results"]
        out["commands"] = [c for c in before.get("commands", []) if c not in out["commands"]] + out[
            "commands"
        ]
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out["results"], indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
